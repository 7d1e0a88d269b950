"""The VAE encoder of latent diffusion (Rombach et al., 2022, sec. 3.1): RGB image -> latent posterior.

Layer names follow diffusers' `AutoencoderKL` keys (`encoder.*`, `quant_conv`). Used to start
image-to-image and inpainting from a picture, and to train a VAE.
"""
import keras
from keras import layers, ops

from .blocks import resnet_block, vae_attention


class Encoder(keras.Model):
    """VAE encoder: RGB in [-1, 1] (B, H, W, 3) -> mean and log-variance (B, H/8, W/8, 2 * 4).

    The latents the UNet works on are `mean * decoder.scaling_factor` (or a posterior sample, scaled).

    Args:
        img_height, img_width: image size.
        in_channels: image channels.
        latent_channels: channels of the latents.
        channels: output channels of each level.
        layers_per_block: ResBlocks per level.
        norm_groups: GroupNorm groups.
        dtype: the layers' Keras dtype policy, e.g. "mixed_bfloat16"; None: the global one.
    """

    def __init__(self, img_height=512, img_width=512, in_channels=3, latent_channels=4,
                 channels=(128, 256, 512, 512), layers_per_block=2, norm_groups=32, dtype=None,
                 name="encoder"):
        images = keras.Input((img_height, img_width, in_channels), name="images")
        x = layers.Conv2D(channels[0], 3, padding="same", name="encoder-conv_in", dtype=dtype)(images)
        for level, width in enumerate(channels):
            for i in range(layers_per_block):
                x = resnet_block(x, width, norm_groups, 1e-6, f"encoder-down_blocks-{level}-resnets-{i}", dtype=dtype)
            if level < len(channels) - 1:  # diffusers pads right and bottom only, then a valid conv
                x = layers.ZeroPadding2D(((0, 1), (0, 1)), dtype=dtype)(x)
                x = layers.Conv2D(width, 3, strides=2, name=f"encoder-down_blocks-{level}-downsamplers-0-conv",
                                  dtype=dtype)(x)
        x = resnet_block(x, channels[-1], norm_groups, 1e-6, "encoder-mid_block-resnets-0", dtype=dtype)
        x = vae_attention(x, norm_groups, "encoder-mid_block-attentions-0", dtype)
        x = resnet_block(x, channels[-1], norm_groups, 1e-6, "encoder-mid_block-resnets-1", dtype=dtype)
        x = layers.GroupNormalization(norm_groups, epsilon=1e-6, name="encoder-conv_norm_out", dtype=dtype)(x)
        x = layers.Conv2D(2 * latent_channels, 3, padding="same", name="encoder-conv_out", dtype=dtype)(ops.silu(x))
        x = layers.Conv2D(2 * latent_channels, 1, name="quant_conv", dtype=dtype)(x)
        super().__init__(images, x, name=name)
