"""Building blocks shared by the UNet, the VAE and the CLIP text encoder.

Layers carry the diffusers / transformers checkpoint key prefixes as names, with "-" for "."
(PyTorch forbids dots in parameter names): `mid_block-resnets-0-conv1` holds
`mid_block.resnets.0.conv1.weight`, so `checkpoints.py` maps weights by name.
"""
from keras import layers, ops


def resnet_block(x, channels, groups, epsilon, name, t_emb=None):
    """ResnetBlock2D (DDPM): two GroupNorm-SiLU-conv3x3, the timestep embedding added in between."""
    h = layers.GroupNormalization(groups, epsilon=epsilon, name=f"{name}-norm1")(x)
    h = layers.Conv2D(channels, 3, padding="same", name=f"{name}-conv1")(ops.silu(h))
    if t_emb is not None:
        t = layers.Dense(channels, name=f"{name}-time_emb_proj")(ops.silu(t_emb))
        h = h + t[:, None, None, :]
    h = layers.GroupNormalization(groups, epsilon=epsilon, name=f"{name}-norm2")(h)
    h = layers.Conv2D(channels, 3, padding="same", name=f"{name}-conv2")(ops.silu(h))
    if x.shape[-1] != channels:
        x = layers.Conv2D(channels, 1, name=f"{name}-conv_shortcut")(x)
    return x + h


def attention(x, context, heads, name, qkv_bias=False, causal=False,
              names=("to_q", "to_k", "to_v", "to_out-0")):
    """Multi-head attention of tokens x (B, T, C) to context (B, S, D); self-attention if context is None."""
    channels = x.shape[-1]
    context = x if context is None else context
    q, k, v = (layers.Dense(channels, use_bias=qkv_bias, name=f"{name}-{key}")(source)
               for key, source in zip(names, (x, context, context)))
    split_heads = layers.Reshape((-1, heads, channels // heads))  # (B, T, heads, head_dim)
    out = ops.dot_product_attention(split_heads(q), split_heads(k), split_heads(v), is_causal=causal)
    out = layers.Reshape((-1, channels))(out)
    return layers.Dense(channels, name=f"{name}-{names[3]}")(out)


def to_tokens(x):
    """(B, H, W, C) feature map -> (B, H*W, C) tokens."""
    _, height, width, channels = x.shape
    return ops.reshape(x, (-1, height * width, channels))


def to_image(tokens, like):
    """(B, H*W, C) tokens -> a feature map shaped like `like`."""
    return ops.reshape(tokens, (-1, *like.shape[1:]))
