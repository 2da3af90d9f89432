"""Devices, meshes and shardings; what a program prints; command-line errors (the lowest room)."""
