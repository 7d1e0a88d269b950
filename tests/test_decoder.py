"""VAE parity: our decoder and encoder vs diffusers' AutoencoderKL on the same weights."""
import numpy as np
import pytest
import torch

from reference import nchw, nhwc


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_decoder_equals_diffusers(kind, reference, ours):
    pipe, _ = reference(kind)
    sd = ours(kind, 64, 48)
    latents = np.random.default_rng(2).standard_normal((2, 8, 6, 4), dtype=np.float32)
    with torch.no_grad():
        expected = nhwc(pipe.vae.decode(nchw(latents) / pipe.vae.config.scaling_factor).sample)
    got = sd.decoder.predict_on_batch(latents)
    assert got.shape == expected.shape == (2, 64, 48, 3)
    diff = np.abs(got - expected).max() / np.abs(expected).max()
    assert diff <= 1e-4, f"max abs diff {diff:.2e} of the output scale vs AutoencoderKL.decode (tolerance 1e-4)"


def test_encoder_equals_diffusers(reference, ours):
    pipe, _ = reference("sd1")
    sd = ours("sd1", 64, 48)
    images = np.random.default_rng(3).uniform(-1, 1, (2, 64, 48, 3)).astype("float32")
    with torch.no_grad():
        expected = nhwc(pipe.vae.encode(nchw(images)).latent_dist.parameters)
    got = sd.encoder.predict_on_batch(images)
    assert got.shape == expected.shape == (2, 8, 6, 8)
    diff = np.abs(got - expected).max() / np.abs(expected).max()
    assert diff <= 1e-4, f"max abs diff {diff:.2e} of the output scale vs AutoencoderKL.encode (tolerance 1e-4)"
