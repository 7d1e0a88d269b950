"""Stable Diffusion in Keras 3: small, compiled (TensorFlow graphs or XLA), equal to the reference implementation."""
__all__ = ["StableDiffusion", "CheckpointError"]


def __getattr__(name):
    """`StableDiffusion` and `CheckpointError`, imported when first asked for: the package imports no Keras or
    TensorFlow until then (the command line checks its arguments first)."""
    if name == "StableDiffusion":
        from .stable_diffusion import StableDiffusion
        return StableDiffusion
    if name == "CheckpointError":
        from .weights import CheckpointError
        return CheckpointError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
