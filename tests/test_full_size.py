"""Full-size SD 1.5 and SD 2.1 architectures: parameter counts equal the reference models
(diffusers / transformers built on the meta device from the hub configs), and one UNet step runs."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from stable_diffusion import checkpoints
from stable_diffusion.decoder import Decoder
from stable_diffusion.diffusion_model import DiffusionModel
from stable_diffusion.text_encoder import TextEncoder

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)
UNET = dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32)
HUB_CONFIGS = {  # the values of the hub's config.json files
    "sd-1.5": dict(
        unet=dict(UNET, sample_size=64, attention_head_dim=8, cross_attention_dim=768),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408)),
    "sd-2.1": dict(
        unet=dict(UNET, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                  use_linear_projection=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", max_position_embeddings=77, vocab_size=49408)),
}


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
    ours = TextEncoder(**checkpoints.text_encoder_config(config["text"]))
    assert ours.count_params() == count(text)
    ours = Decoder(**checkpoints.vae_configs(VAE)["decoder"])
    assert ours.count_params() == count(vae.decoder) + count(vae.post_quant_conv)
    ours = DiffusionModel(latent_height=32, latent_width=32, **checkpoints.unet_config(config["unet"]))
    assert ours.count_params() == count(unet)
    if version == "sd-1.5":  # the published SD 1.5 figures
        assert (count(unet), count(vae.decoder) + count(vae.post_quant_conv), count(text)) == (
            859_520_964, 49_490_199, 123_060_480)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 32, 32, 4), dtype=np.float32)
    context = rng.standard_normal((2, 77, config["unet"]["cross_attention_dim"]), dtype=np.float32)
    output = ours.predict_on_batch([latents, np.array([999.0, 999.0]), context])
    assert output.shape == latents.shape and np.isfinite(output).all()
