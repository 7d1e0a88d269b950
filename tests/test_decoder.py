"""VAE parity: our decoder and encoder vs diffusers' AutoencoderKL on the same weights."""
import copy

import numpy as np
import pytest
import torch

from reference import nchw, nhwc, relative_difference
from stable_diffusion import tiling


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_decoder_equals_diffusers(kind, reference, ours):
    pipe, _ = reference(kind)
    sd = ours(kind, 64, 48)
    latents = np.random.default_rng(2).standard_normal((2, 8, 6, 4), dtype=np.float32)
    with torch.no_grad():
        expected = nhwc(pipe.vae.decode(nchw(latents) / pipe.vae.config.scaling_factor).sample)
    got = sd.decoder.predict_on_batch(latents)
    assert got.shape == expected.shape == (2, 64, 48, 3)
    diff = relative_difference(got, expected)
    assert diff <= 1e-4, f"max abs diff {diff:.2e} of the output scale vs AutoencoderKL.decode (tolerance 1e-4)"


def test_encoder_equals_diffusers(reference, ours):
    pipe, _ = reference("sd1")
    sd = ours("sd1", 64, 48)
    images = np.random.default_rng(3).uniform(-1, 1, (2, 64, 48, 3)).astype("float32")
    with torch.no_grad():
        expected = nhwc(pipe.vae.encode(nchw(images)).latent_dist.parameters)
    got = sd.encoder.predict_on_batch(images)
    assert got.shape == expected.shape == (2, 8, 6, 8)
    diff = relative_difference(got, expected)
    assert diff <= 1e-4, f"max abs diff {diff:.2e} of the output scale vs AutoencoderKL.encode (tolerance 1e-4)"


def test_tiled_decoding_equals_diffusers(reference, ours):
    """`enable_vae_tiling` decodes as diffusers' `AutoencoderKL.tiled_decode`: 4x4-latent tiles (32 px)
    over 9x7 latents, 3x3 tiles whose last row and column are 3 and 1 latents wide."""
    pipe, _ = reference("sd1")
    sd = ours("sd1")
    vae = copy.copy(pipe.vae)  # the same modules, its own tile settings
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    latents = np.random.default_rng(4).standard_normal((2, 9, 7, 4), dtype=np.float32)
    with torch.no_grad():
        expected = nhwc(vae.tiled_decode(nchw(latents) / vae.config.scaling_factor).sample)
    got = tiling.decode(sd.decoder.predict_on_batch, latents, 32, 8)
    assert got.shape == expected.shape == (2, 72, 56, 3)
    diff = relative_difference(got, expected)
    assert diff <= 1e-4, f"max abs diff {diff:.2e} of the output scale vs AutoencoderKL.tiled_decode (tolerance 1e-4)"
    untiled, one_tile = sd.decode(latents), sd.decode(latents[:, :4, :4])
    try:
        sd.enable_vae_tiling(32)
        tiled = sd.decode(latents)
        np.testing.assert_array_equal(tiled, np.round(np.clip(got / 2 + 0.5, 0, 1) * 255).astype("uint8"))
        assert np.abs(tiled.astype(int) - untiled).max() > 10  # tiles do change the image
        np.testing.assert_array_equal(sd.decode(latents[:, :4, :4]), one_tile)  # no larger than a tile: whole
    finally:
        sd.enable_vae_tiling(None)


@pytest.mark.parametrize("tile_size", [0, 16, 36, 32.0, "512"])
def test_vae_tile_size_must_fit_the_decoder(tile_size, ours):
    with pytest.raises(ValueError, match="tile_size must be a multiple of 8 pixels, at least 32"):
        ours("sd1").enable_vae_tiling(tile_size)
