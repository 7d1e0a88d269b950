"""Full-size SD 1.5, SD 2.1 and SDXL 1.0 (base and refiner) architectures: parameter counts equal the reference
models (diffusers / transformers built on the meta device from the hub configs), and the full-size SD 1.5 UNet equals
diffusers' on the same random weights."""
import gc

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import ldm_reference
from reference import FULL_SIZE_VAE as VAE, HUB_CONFIGS, full_size_sdxl, nchw, nhwc, randomize, relative_difference
from stable_diffusion import diffusers_folder, ldm
from stable_diffusion.decoder import Decoder
from stable_diffusion.diffusion_model import DiffusionModel
from stable_diffusion.encoder import Encoder
from stable_diffusion.text_encoder import TextEncoder
from stable_diffusion.weights import Tensors, load_weights

pytestmark = pytest.mark.xdist_group("full_size")  # under `--dist loadgroup`, one worker holds these gigabytes


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


# Ours per model name: the class and the size arguments (any size: the counts do not depend on it).
SDXL_MODELS = {"text_encoder": (TextEncoder, {}), "text_encoder_2": (TextEncoder, {}),
               "diffusion_model": (DiffusionModel, dict(latent_height=32, latent_width=32)),
               "decoder": (Decoder, dict(latent_height=None, latent_width=None)),
               "encoder": (Encoder, dict(img_height=64, img_width=64))}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_sdxl_parameter_counts(family):
    """SDXL 1.0 base and refiner: each of our models, built from the configs `ldm.plan` infers from the full-size
    original key shapes (the path `sd_xl_base_1.0.safetensors` takes), has as many parameters as its diffusers /
    transformers counterpart: UNet, CLIP ViT-L, OpenCLIP ViT-bigG with projection, VAE decoder and encoder. Ours are
    built one at a time in bfloat16 (the base UNet: 5.1 GB)."""
    with torch.device("meta"):
        models = full_size_sdxl(family)
    state = ldm_reference.ldm_state_dict(models, family)
    config = ldm.plan({key: tuple(value.shape) for key, value in state.items()}, family).config
    expected = {name: count(getattr(models, name)) for name in ldm.TEXT_ENCODERS[family]}
    expected.update(diffusion_model=count(models.unet), decoder=count(models.vae.decoder) + count(
        models.vae.post_quant_conv), encoder=count(models.vae.encoder) + count(models.vae.quant_conv))
    got = {}
    for name in expected:
        model_class, size = SDXL_MODELS[name]
        got[name] = model_class(**size, **config[name], dtype="bfloat16").count_params()
        gc.collect()  # the model built, counted and dropped before the next
    assert got == expected
    if family == "sdxl":  # the published SDXL base UNet figure
        assert got["diffusion_model"] == 2_567_463_684


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
