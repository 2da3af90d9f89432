"""Evaluation: embedding a split and its metrics (evaluate, metrics), top-k over a sharded gallery (retrieval),
the retrieval picture and the drawing helpers (pictures)."""
