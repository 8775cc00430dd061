"""Diffusion hyperfeatures: per-pixel descriptors from every layer and step of a diffusion model."""

__version__ = "0.1.0"
