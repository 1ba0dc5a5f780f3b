"""Checkpoint formats: reading, detecting and writing each family's on-disk layouts."""
