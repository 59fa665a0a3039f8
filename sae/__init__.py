"""Sparse autoencoders for mechanistic interpretability: harvest → train → analyse."""

__version__ = "0.1.0"
