"""Full-size SD 1.5 and SD 2.1 architectures: parameter counts equal the reference models
(diffusers / transformers built on the meta device from the hub configs), and one UNet step runs."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from reference import FULL_SIZE_VAE as VAE, HUB_CONFIGS
from stable_diffusion import diffusers_folder
from stable_diffusion.decoder import Decoder
from stable_diffusion.diffusion_model import DiffusionModel
from stable_diffusion.text_encoder import TextEncoder


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd-1.5", "sd-2.1"])
def test_parameter_counts_and_one_step(version):
    config = HUB_CONFIGS[version]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(**config["text"]))
    ours = TextEncoder(**diffusers_folder.text_encoder_config(config["text"]))
    assert ours.count_params() == count(text)
    ours = Decoder(**diffusers_folder.vae_configs(VAE)["decoder"])
    assert ours.count_params() == count(vae.decoder) + count(vae.post_quant_conv)
    ours = DiffusionModel(latent_height=32, latent_width=32, **diffusers_folder.unet_config(config["unet"]))
    assert ours.count_params() == count(unet)
    if version == "sd-1.5":  # the published SD 1.5 figures
        assert (count(unet), count(vae.decoder) + count(vae.post_quant_conv), count(text)) == (
            859_520_964, 49_490_199, 123_060_480)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 32, 32, 4), dtype=np.float32)
    context = rng.standard_normal((2, 77, config["unet"]["cross_attention_dim"]), dtype=np.float32)
    output = ours.predict_on_batch([latents, np.array([999.0, 999.0]), context])
    assert output.shape == latents.shape and np.isfinite(output).all()
