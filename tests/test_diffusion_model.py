"""UNet parity: ours vs diffusers' UNet2DConditionModel on the same weights and inputs."""
import numpy as np
import pytest
import torch

from reference import nchw, nhwc, relative_difference
from stable_diffusion import StableDiffusion, blocks


def unet_difference(pipe, sd, height, width):
    """Max abs difference of our UNet's output from diffusers', relative to the output's scale."""
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, height // 8, width // 8, 4), dtype=np.float32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    timesteps = np.array([1, 981])
    with torch.no_grad():
        expected = nhwc(pipe.unet(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
    got = sd.diffusion_model.predict_on_batch([latents, timesteps.astype("float32"), context])
    assert got.shape == expected.shape == latents.shape
    return relative_difference(got, expected)


@pytest.mark.parametrize("kind, height, width", [("sd1", 64, 48), ("sd2", 48, 64), ("deep", 64, 96)])
def test_equals_diffusers(kind, height, width, reference, ours):
    diff = unet_difference(reference(kind)[0], ours(kind, height, width), height, width)
    assert diff <= 1e-3, f"max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 1e-3)"


def test_attention_in_query_chunks_equals_diffusers(reference, monkeypatch):
    """Large self-attention runs in query chunks (as at 512x512); forced here on 8x6 latents: 48
    queries in 12 chunks of 4, in the UNet and in the VAE decoder."""
    monkeypatch.setattr(blocks, "MAX_ATTENTION_SCORES", 5 * 48)
    pipe, folder = reference("sd1")
    sd = StableDiffusion.from_checkpoint(folder, img_height=64, img_width=48)
    diff = unet_difference(pipe, sd, 64, 48)  # float32 rounding: ~1e-6; misplaced chunks gave 5e-4 and more
    assert diff <= 5e-5, f"max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 5e-5)"
    latents = np.random.default_rng(2).standard_normal((1, 8, 6, 4), dtype=np.float32)
    with torch.no_grad():
        expected = nhwc(pipe.vae.decode(nchw(latents) / pipe.vae.config.scaling_factor).sample)
    diff = relative_difference(sd.decoder.predict_on_batch(latents), expected)
    assert diff <= 1e-4, f"max abs diff {diff:.2e} of the output scale vs AutoencoderKL.decode (tolerance 1e-4)"
