"""Shared fixtures: tiny reference pipelines (diffusers + transformers, random weights, saved with
`save_pretrained`) and our pipeline loaded from the same folders."""
import functools

import pytest


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(kind) -> (diffusers pipeline, its saved folder), built once per kind."""
    from reference import make_pipeline

    @functools.cache
    def build(kind):
        folder = tmp_path_factory.mktemp(kind)
        return make_pipeline(kind, folder), folder

    return build


@pytest.fixture(scope="session")
def ours(reference):
    """ours(kind, height=64, width=64, jit_compile=False) -> our StableDiffusion loaded from the reference
    folder; eager unless a test is about the XLA path."""
    from stable_diffusion import StableDiffusion

    @functools.cache
    def load(kind, height=64, width=64, jit_compile=False):
        return StableDiffusion.from_checkpoint(reference(kind)[1], img_height=height, img_width=width,
                                               jit_compile=jit_compile)

    return load
