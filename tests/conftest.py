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
    folder; eager unless a test is about the XLA path; DDIM, as the reference pipelines (their folders name
    PNDMScheduler, as the hub's SD folders: the default sampler would be PNDM)."""
    from stable_diffusion import StableDiffusion

    @functools.cache
    def load(kind, height=64, width=64, jit_compile=False):
        return StableDiffusion.from_checkpoint(reference(kind)[1], img_height=height, img_width=width,
                                               jit_compile=jit_compile, scheduler="ddim")

    return load


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    """(the tiny diffusers StableDiffusionXLPipeline of `reference.make_sdxl_pipeline`, its folder, ours(jit_compile) ->
    our pipeline loaded from it, once per value); tests that change either put it back."""
    from reference import make_sdxl_pipeline
    from stable_diffusion import StableDiffusion

    folder = tmp_path_factory.mktemp("sdxl")
    pipe = make_sdxl_pipeline(folder)
    return pipe, folder, functools.cache(lambda jit: StableDiffusion.from_checkpoint(folder, jit_compile=jit))


@pytest.fixture
def interrupted(monkeypatch):
    """`interrupted(train, *args, **kwargs)` runs a training call that stops, as on Ctrl-C, once the `Backup` of
    its first epoch is written (a rerun with the same backup folder resumes from there)."""
    from stable_diffusion.train import Backup

    save = Backup.on_epoch_end

    def stop_after_first_epoch(self, epoch, logs=None):
        save(self, epoch, logs)
        raise KeyboardInterrupt

    def run(train, *args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(Backup, "on_epoch_end", stop_after_first_epoch)
            with pytest.raises(KeyboardInterrupt):
                train(*args, **kwargs)

    return run


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model loads (`StableDiffusion.from_checkpoint`): errors must come before."""
    from stable_diffusion import StableDiffusion

    monkeypatch.setattr(StableDiffusion, "from_checkpoint", lambda *args, **kwargs: pytest.fail("a model loaded"))
