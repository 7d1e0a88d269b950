"""Full-size SD 1.5 and SD 2.1 architectures: parameter counts equal the reference models (diffusers /
transformers built on the meta device from the hub configs), and the full-size UNet equals diffusers'
on the same random weights."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from reference import FULL_SIZE_VAE as VAE, HUB_CONFIGS, nchw, nhwc, randomize, relative_difference
from stable_diffusion import diffusers_folder
from stable_diffusion.decoder import Decoder
from stable_diffusion.diffusion_model import DiffusionModel
from stable_diffusion.text_encoder import TextEncoder
from stable_diffusion.weights import Tensors, load_weights


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("version", ["sd-1.5", "sd-2.1"])
def test_parameter_counts(version):
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


@pytest.mark.slow
def test_unet_step_equals_diffusers():
    """One full-size SD 1.5 UNet call (batch 2, 32x32 latents) on diffusers' random weights, loaded by name."""
    config = HUB_CONFIGS["sd-1.5"]["unet"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    randomize(unet.conv_out)  # zero-initialised in diffusers, which would hide the whole output
    ours = DiffusionModel(latent_height=32, latent_width=32, **diffusers_folder.unet_config(config))
    load_weights([ours], Tensors.from_arrays({k: v.numpy() for k, v in unet.state_dict().items()},
                                             "diffusers UNet2DConditionModel"))
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 32, 32, 4), dtype=np.float32)
    timesteps, context = np.array([10.0, 999.0], "float32"), rng.standard_normal((2, 77, 768), dtype=np.float32)
    with torch.no_grad():
        expected = nhwc(unet(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)
    diff = relative_difference(ours.predict_on_batch([latents, timesteps, context]), expected)
    assert diff <= 1e-3, f"max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 1e-3)"
