"""Building blocks shared by the UNet, the VAE and the CLIP text encoder.

Layers carry the diffusers / transformers checkpoint key prefixes as names, with "-" for "."
(PyTorch forbids dots in parameter names): `mid_block-resnets-0-conv1` holds
`mid_block.resnets.0.conv1.weight`, so `weights.py` maps weights by name. Each helper passes its
`dtype` (a Keras dtype policy name, None for the global policy) to every layer it creates.
"""
from keras import layers, ops

# Attention scores per image and head computed at once. Larger self-attention is done in query
# chunks: at 512x512 the UNet's 4096 x 4096 self-attention would otherwise hold 2 GiB of scores at batch 2.
MAX_ATTENTION_SCORES = 2**20


def resnet_block(x, channels, groups, epsilon, name, t_emb=None, dtype=None):
    """ResnetBlock2D (DDPM): two GroupNorm-SiLU-conv3x3, the timestep embedding added in between."""
    h = layers.GroupNormalization(groups, epsilon=epsilon, name=f"{name}-norm1", dtype=dtype)(x)
    h = layers.Conv2D(channels, 3, padding="same", name=f"{name}-conv1", dtype=dtype)(ops.silu(h))
    if t_emb is not None:
        t = layers.Dense(channels, name=f"{name}-time_emb_proj", dtype=dtype)(ops.silu(t_emb))
        h = h + t[:, None, None, :]
    h = layers.GroupNormalization(groups, epsilon=epsilon, name=f"{name}-norm2", dtype=dtype)(h)
    h = layers.Conv2D(channels, 3, padding="same", name=f"{name}-conv2", dtype=dtype)(ops.silu(h))
    if x.shape[-1] != channels:
        x = layers.Conv2D(channels, 1, name=f"{name}-conv_shortcut", dtype=dtype)(x)
    return x + h


def query_chunks(tokens, keys):
    """How many equal query chunks keep each chunk within MAX_ATTENTION_SCORES scores per image and
    head; 1 where a size is unknown until run time."""
    if tokens is None or keys is None:
        return 1
    return next(n for n in range(1, tokens + 1) if tokens % n == 0 and tokens // n * keys <= MAX_ATTENTION_SCORES)


class QueryChunkedAttention(layers.Layer):
    """Attention of (B, T, heads, head_dim) queries to (B, S, heads, head_dim) keys and values, in
    `query_chunks` equal query chunks one after the other: `ops.map` compiles to a loop, so only one
    chunk's scores exist at a time. Sized when called, for models of any image size (the VAE decoder)."""

    def call(self, q, k, v):
        _, tokens, heads, head_dim = q.shape
        chunks = query_chunks(tokens, k.shape[1])
        if chunks == 1:
            return ops.dot_product_attention(q, k, v)
        q = ops.reshape(q, (-1, chunks, tokens // chunks, heads, head_dim))
        out = ops.map(lambda chunk: ops.dot_product_attention(chunk, k, v), ops.moveaxis(q, 1, 0))
        return ops.reshape(ops.moveaxis(out, 0, 1), (-1, tokens, heads, head_dim))

    def compute_output_shape(self, q_shape, k_shape, v_shape):
        return q_shape


def attention(x, context, heads, name, qkv_bias=False, causal=False,
              names=("to_q", "to_k", "to_v", "to_out-0"), dtype=None):
    """Multi-head attention of tokens x (B, T, C) to context (B, S, D); self-attention if context is None."""
    channels = x.shape[-1]
    context = x if context is None else context
    q, k, v = (layers.Dense(channels, use_bias=qkv_bias, name=f"{name}-{key}", dtype=dtype)(source)
               for key, source in zip(names, (x, context, context)))
    q, k, v = map(layers.Reshape((-1, heads, channels // heads), dtype=dtype), (q, k, v))  # (B, T, heads, head_dim)
    if causal:
        out = ops.dot_product_attention(q, k, v, is_causal=True)
    else:
        out = QueryChunkedAttention(dtype=dtype)(q, k, v)
    out = layers.Reshape((-1, channels), dtype=dtype)(out)
    return layers.Dense(channels, name=f"{name}-{names[3]}", dtype=dtype)(out)


def vae_attention(x, groups, name, dtype=None):
    """Single-head self-attention over all pixels, with a residual (the VAE encoder's and decoder's mid-block)."""
    h = layers.GroupNormalization(groups, epsilon=1e-6, name=f"{name}-group_norm", dtype=dtype)(x)
    return x + to_image(attention(to_tokens(h, dtype), None, 1, name, qkv_bias=True, dtype=dtype), x, dtype)


def to_tokens(x, dtype=None):
    """(B, H, W, C) feature map -> (B, H*W, C) tokens."""
    return layers.Reshape((-1, x.shape[-1]), dtype=dtype)(x)


class ToImage(layers.Layer):
    """(B, H*W, C) tokens -> a feature map shaped like `like`, whose size is read when called."""

    def call(self, tokens, like):
        return ops.reshape(tokens, ops.shape(like))

    def compute_output_shape(self, tokens_shape, like_shape):
        return like_shape


def to_image(tokens, like, dtype=None):
    return ToImage(dtype=dtype)(tokens, like)
