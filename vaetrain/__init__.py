"""vaetrain: distil and finetune SD-family autoencoders."""

__version__ = "0.1.0"
