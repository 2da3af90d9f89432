"""The models: the IVT encoder (encoder), the part head (part), CLIP's two towers (clip), the head a config
chooses and its embedding functions (heads)."""
