"""The VAE decoder of latent diffusion (Rombach et al., 2022, sec. 3.1): latents -> RGB image.

Layer names follow diffusers' `AutoencoderKL` keys (`post_quant_conv`, `decoder.*`).
"""
import keras
from keras import layers, ops

from .blocks import resnet_block, vae_attention

SCALING_FACTOR = 0.18215  # SD 1.x / 2.x: the UNet's latents are the VAE's times this (unit variance)


class Decoder(keras.Model):
    """VAE decoder: latents as the UNet produces them (B, h, w, 4) -> RGB (B, 8h, 8w, 3), about [-1, 1].

    Args:
        latent_height, latent_width: latent size; None: any (the pipeline's decoder also decodes tiles).
        latent_channels, out_channels: channels of the latents; of the image.
        channels: channels of the encoder's levels; the decoder walks them in reverse.
        layers_per_block: ResBlocks per encoder level (the decoder has one more).
        norm_groups: GroupNorm groups.
        scaling_factor: the latents' scale (`self.scaling_factor`), undone before decoding.
        dtype: the layers' Keras dtype policy, e.g. "mixed_bfloat16"; None: the global one.
    """

    def __init__(self, latent_height=64, latent_width=64, latent_channels=4, out_channels=3,
                 channels=(128, 256, 512, 512), layers_per_block=2, norm_groups=32,
                 scaling_factor=SCALING_FACTOR, dtype=None, name="decoder"):
        latents = keras.Input((latent_height, latent_width, latent_channels), name="latents")
        x = layers.Conv2D(latent_channels, 1, name="post_quant_conv", dtype=dtype)(latents / scaling_factor)
        x = layers.Conv2D(channels[-1], 3, padding="same", name="decoder-conv_in", dtype=dtype)(x)
        x = resnet_block(x, channels[-1], norm_groups, 1e-6, "decoder-mid_block-resnets-0", dtype=dtype)
        x = vae_attention(x, norm_groups, "decoder-mid_block-attentions-0", dtype)
        x = resnet_block(x, channels[-1], norm_groups, 1e-6, "decoder-mid_block-resnets-1", dtype=dtype)
        for up, width in enumerate(reversed(channels)):
            for i in range(layers_per_block + 1):
                x = resnet_block(x, width, norm_groups, 1e-6, f"decoder-up_blocks-{up}-resnets-{i}", dtype=dtype)
            if up < len(channels) - 1:
                x = layers.Conv2D(width, 3, padding="same", name=f"decoder-up_blocks-{up}-upsamplers-0-conv",
                                  dtype=dtype)(layers.UpSampling2D(2, dtype=dtype)(x))
        x = layers.GroupNormalization(norm_groups, epsilon=1e-6, name="decoder-conv_norm_out", dtype=dtype)(x)
        x = layers.Conv2D(out_channels, 3, padding="same", name="decoder-conv_out", dtype=dtype)(ops.silu(x))
        super().__init__(latents, x, name=name)
        self.scaling_factor = scaling_factor
