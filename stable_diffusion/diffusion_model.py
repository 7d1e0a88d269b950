"""The conditional UNet of latent diffusion (Rombach et al., 2022, sec. 3.3) and SDXL (Podell et al., 2023: transformer
depth per level, a "text_time" embedding of the pooled text and size/crop ids), built from its configuration like
diffusers' `UNet2DConditionModel`, whose keys name the layers.

Down path: per level, ResBlocks each followed by a spatial transformer that cross-attends to the text
(where the level has attention), then a stride-2 conv. Middle: ResBlock, transformer, ResBlock. Up
path: the mirror image, concatenating the skip connections, with nearest-neighbour upsampling.
"""
import math

import keras
import numpy as np
from keras import layers, ops

from .blocks import attention, resnet_block, to_image, to_tokens


def timestep_embedding(timesteps, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal embedding (...) -> (..., dim) of diffusion timesteps (DDPM; diffusers' `Timesteps`)."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - freq_shift)).astype("float32")
    angles = ops.cast(timesteps, "float32")[..., None] * freqs
    sin, cos = ops.sin(angles), ops.cos(angles)
    return ops.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def feed_forward(x, name, mult=4, dtype=None):
    """GEGLU MLP (Shazeer, 2020) of the transformer blocks, with exact GELU as in PyTorch."""
    h, gate = ops.split(layers.Dense(x.shape[-1] * mult * 2, name=f"{name}-net-0-proj", dtype=dtype)(x), 2, axis=-1)
    return layers.Dense(x.shape[-1], name=f"{name}-net-2", dtype=dtype)(h * ops.gelu(gate, approximate=False))


def spatial_transformer(x, context, heads, depth, groups, name, dtype=None):
    """Transformer2DModel: norm, proj_in, [self-attn, cross-attn to context, MLP] x depth, proj_out."""
    t = layers.GroupNormalization(groups, epsilon=1e-6, name=f"{name}-norm", dtype=dtype)(x)
    t = layers.Dense(x.shape[-1], name=f"{name}-proj_in", dtype=dtype)(to_tokens(t, dtype))  # a 1x1 conv in SD 1.x
    for i in range(depth):
        block = f"{name}-transformer_blocks-{i}"
        norm = lambda h, n: layers.LayerNormalization(epsilon=1e-5, name=f"{block}-norm{n}", dtype=dtype)(h)
        t = t + attention(norm(t, 1), None, heads, f"{block}-attn1", dtype=dtype)
        t = t + attention(norm(t, 2), context, heads, f"{block}-attn2", dtype=dtype)
        t = t + feed_forward(norm(t, 3), f"{block}-ff", dtype=dtype)
    return x + to_image(layers.Dense(x.shape[-1], name=f"{name}-proj_out", dtype=dtype)(t), x, dtype)


class DiffusionModel(keras.Model):
    """Conditional UNet: [latents (B, h, w, C), timesteps (B,), context (B, L, D)] -> (B, h, w, C_out), the
    noise (epsilon) or the velocity (v), as the checkpoint was trained; SDXL takes text_embeds, time_ids too.

    Args:
        latent_height, latent_width, in_channels, out_channels: latent size (image size / 8) and channels.
        channels: output channels of each level.
        layers_per_block: ResBlocks per level on the down path (one more on the up path).
        attention_levels: whether each level has spatial transformers.
        num_heads: attention heads, one number or one per level (SD 1.x: 8; SD 2.x: channels / 64).
        context_dim: width of the text encoder's hidden states.
        transformer_depth: blocks per spatial transformer, one number or one per level (the middle: the last).
        norm_groups, norm_eps, flip_sin_to_cos, freq_shift: the ResBlocks' GroupNorm; the timestep embedding's layout.
        pooled_dim: SDXL's "text_time" embedding: inputs text_embeds (B, pooled_dim) and time_ids (B,
            num_time_ids), each id embedded as a timestep of time_id_dim; 0: none (SD 1.x/2.x).
        dtype: the layers' Keras dtype policy, e.g. "mixed_bfloat16"; None: the global one.
    """

    def __init__(self, latent_height=64, latent_width=64, in_channels=4, out_channels=4,
                 channels=(320, 640, 1280, 1280), layers_per_block=2, attention_levels=(True, True, True, False),
                 num_heads=8, context_dim=768, transformer_depth=1, norm_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
                 freq_shift=0, pooled_dim=0, num_time_ids=6, time_id_dim=256, dtype=None, name="diffusion_model"):
        heads, depths = ([v] * len(channels) if isinstance(v, int) else list(v) for v in (num_heads, transformer_depth))
        inputs = [keras.Input((latent_height, latent_width, in_channels), name="latents"),
                  keras.Input((), name="timesteps"), keras.Input((None, context_dim), name="context")]
        latents, timesteps, context = inputs
        embed = lambda x, name: layers.Dense(4 * channels[0], name=f"{name}-linear_2", dtype=dtype)(
            ops.silu(layers.Dense(4 * channels[0], name=f"{name}-linear_1", dtype=dtype)(x)))  # TimestepEmbedding
        t_emb = embed(timestep_embedding(timesteps, channels[0], flip_sin_to_cos, freq_shift), "time_embedding")
        if pooled_dim:  # SDXL: the pooled text embedding and the embedded ids, concatenated
            inputs += [keras.Input((pooled_dim,), name="text_embeds"), keras.Input((num_time_ids,), name="time_ids")]
            ids = timestep_embedding(inputs[4], time_id_dim, flip_sin_to_cos, freq_shift)  # (B, n, dim)
            ids = ops.reshape(ids, (-1, num_time_ids * time_id_dim))  # (B, n * dim)
            t_emb = t_emb + embed(ops.concatenate([inputs[3], ids], axis=-1), "add_embedding")
        resnet = lambda x, level, name: resnet_block(x, channels[level], norm_groups, norm_eps, name, t_emb, dtype)
        transformer = lambda x, level, name: spatial_transformer(x, context, heads[level], depths[level],
                                                                 norm_groups, name, dtype)

        def res_attn(x, level, block, i):
            x = resnet(x, level, f"{block}-resnets-{i}")
            return transformer(x, level, f"{block}-attentions-{i}") if attention_levels[level] else x

        x = layers.Conv2D(channels[0], 3, padding="same", name="conv_in", dtype=dtype)(latents)
        skips = [x]
        for level in range(len(channels)):
            for i in range(layers_per_block):
                x = res_attn(x, level, f"down_blocks-{level}", i)
                skips.append(x)
            if level < len(channels) - 1:  # symmetric padding, as PyTorch's padding=1
                x = layers.Conv2D(channels[level], 3, strides=2, name=f"down_blocks-{level}-downsamplers-0-conv",
                                  dtype=dtype)(layers.ZeroPadding2D(1, dtype=dtype)(x))
                skips.append(x)

        x = resnet(x, -1, "mid_block-resnets-0")
        x = transformer(x, -1, "mid_block-attentions-0")
        x = resnet(x, -1, "mid_block-resnets-1")

        for up, level in enumerate(reversed(range(len(channels)))):
            for i in range(layers_per_block + 1):
                x = res_attn(layers.Concatenate(dtype=dtype)([x, skips.pop()]), level, f"up_blocks-{up}", i)
            if level > 0:
                x = layers.Conv2D(channels[level], 3, padding="same", name=f"up_blocks-{up}-upsamplers-0-conv",
                                  dtype=dtype)(layers.UpSampling2D(2, dtype=dtype)(x))

        x = layers.GroupNormalization(norm_groups, epsilon=norm_eps, name="conv_norm_out", dtype=dtype)(x)
        x = layers.Conv2D(out_channels, 3, padding="same", name="conv_out", dtype=dtype)(ops.silu(x))
        super().__init__(inputs, x, name=name)
