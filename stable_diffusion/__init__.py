"""Stable Diffusion in Keras 3: small, compiled (TensorFlow graphs or XLA), equal to the reference implementation."""
__all__ = ["StableDiffusion"]


def __getattr__(name):
    """`StableDiffusion`, imported when first asked for: the package imports no Keras or TensorFlow until
    then (the command line checks its arguments first)."""
    if name == "StableDiffusion":
        from .stable_diffusion import StableDiffusion
        return StableDiffusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
