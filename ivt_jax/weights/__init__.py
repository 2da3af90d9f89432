"""Weights from files: reading (files), key mapping (mapping), load reports (report), pretrained and released
weights (pretrained), CLIP weights (clip)."""
