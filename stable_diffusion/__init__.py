"""Stable Diffusion in Keras 3: small, XLA-compiled, equal to the reference implementation."""
from .stable_diffusion import StableDiffusion
from .weights import CheckpointError

__all__ = ["StableDiffusion", "CheckpointError"]
