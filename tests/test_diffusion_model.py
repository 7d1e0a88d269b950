"""UNet parity: ours vs diffusers' UNet2DConditionModel on the same weights and inputs."""
import numpy as np
import pytest
import torch

from reference import nchw, nhwc


@pytest.mark.parametrize("kind, height, width", [("sd1", 64, 48), ("sd2", 48, 64), ("deep", 64, 96)])
def test_equals_diffusers(kind, height, width, reference, ours):
    pipe, _ = reference(kind)
    sd = ours(kind, height, width)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, height // 8, width // 8, 4), dtype=np.float32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    timesteps = np.array([1, 981])
    with torch.no_grad():
        expected = nhwc(pipe.unet(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
    got = sd.diffusion_model.predict_on_batch([latents, timesteps.astype("float32"), context])
    assert got.shape == expected.shape == latents.shape
    diff = np.abs(got - expected).max() / np.abs(expected).max()
    assert diff <= 1e-3, f"max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 1e-3)"
