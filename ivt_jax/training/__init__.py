"""Training: optimizer (optim), the train step (step) and its jitted setup (setup), batches placed ahead
(prefetch), checkpoints and checksums (checkpoints, integrity), one run per workdir (run_guard), the loop (loop)."""
