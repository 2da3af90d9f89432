"""Training objectives: CMPM (cmpm), the part head's losses (part), CLIP's SDM, ID and ITC (clip)."""
