"""CLIP text transformer (Radford et al., 2021), the text conditioning of Stable Diffusion.

References: openai/CLIP `model.py`; transformers `CLIPTextModel` and `CLIPTextModelWithProjection`, whose keys
(without the `text_model.` prefix) name the layers. SD 1.x uses CLIP ViT-L/14 (quick_gelu); SD 2.x the penultimate
layer of OpenCLIP ViT-H/14 (gelu), stored by diffusers as a 23-layer model; SDXL the un-normed penultimate states of
ViT-L/14 and OpenCLIP ViT-bigG/14, and the latter's projected pooled output.
"""
import keras
from keras import layers, ops

from .blocks import attention

ACTIVATIONS = {"quick_gelu": lambda x: x * ops.sigmoid(1.702 * x), "gelu": lambda x: ops.gelu(x, approximate=False)}


class TextEncoder(keras.Model):
    """CLIP text transformer: token ids (B, L) -> final-layer-normed hidden states (B, L, width) [, text_embeds].

    Args:
        vocab_size, max_length: BPE vocabulary size; tokens per prompt (positions).
        width: hidden size (768 for ViT-L/14, 1024 for OpenCLIP ViT-H/14, 1280 for OpenCLIP ViT-bigG/14).
        num_layers, num_heads, intermediate_size: transformer blocks; attention heads; MLP hidden size.
        activation: "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP).
        projection_dim: also output text_embeds (B, projection_dim), the end token's state projected; 0: none.
        dtype: the layers' Keras dtype policy, e.g. "mixed_bfloat16"; None: the global one.
    """

    def __init__(self, vocab_size=49408, max_length=77, width=768, num_layers=12, num_heads=12,
                 intermediate_size=3072, activation="quick_gelu", projection_dim=0, dtype=None, name="text_encoder"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        tokens = keras.Input((max_length,), dtype="int32", name="tokens")
        x = layers.Embedding(vocab_size, width, name="embeddings-token_embedding", dtype=dtype)(tokens)
        positions = ops.cumsum(ops.ones_like(tokens), axis=1) - 1  # (B, L): 0 .. L - 1, no captured constant
        x = x + layers.Embedding(max_length, width, name="embeddings-position_embedding", dtype=dtype)(positions)
        for i in range(num_layers):  # pre-LN blocks with causal self-attention
            block = f"encoder-layers-{i}"
            h = layers.LayerNormalization(epsilon=1e-5, name=f"{block}-layer_norm1", dtype=dtype)(x)
            x = x + attention(h, None, num_heads, f"{block}-self_attn", qkv_bias=True, causal=True,
                              names=("q_proj", "k_proj", "v_proj", "out_proj"), dtype=dtype)
            h = layers.LayerNormalization(epsilon=1e-5, name=f"{block}-layer_norm2", dtype=dtype)(x)
            h = layers.Dense(intermediate_size, name=f"{block}-mlp-fc1", dtype=dtype)(h)
            x = x + layers.Dense(width, name=f"{block}-mlp-fc2", dtype=dtype)(ACTIVATIONS[activation](h))
        x = layers.LayerNormalization(epsilon=1e-5, name="final_layer_norm", dtype=dtype)(x)
        if projection_dim:  # at the end token: the largest id (transformers' rule for SDXL's eos_token_id 2)
            pooled = ops.take_along_axis(x, ops.argmax(tokens, axis=-1)[:, None, None], axis=1)[:, 0]
            x = [x, layers.Dense(projection_dim, use_bias=False, name="text_projection", dtype=dtype)(pooled)]
        super().__init__(tokens, x, name=name)


def skipping(encoder, k, normed=True):
    """A model sharing the layers of `encoder` (or of a copy with more token rows): token ids -> `hidden_states[-1 - k]`
    (k: 1 .. blocks), final-layer-normed (SD 1.x/2.x's clip_skip k) or not (SDXL: k = clip_skip + 1) [, text_embeds]."""
    blocks = [layer for layer in encoder.layers if layer.name.endswith("layer_norm1")]  # the first of each block
    if type(k) is not int or not 0 < k <= len(blocks):
        raise ValueError(f"clip_skip must be None or an integer from 0 to {len(blocks)}, got {k!r}.")
    inputs = []  # of the blocks, in order, as the graph is copied

    def call(layer, x, *args, **kwargs):  # notes each block's input, for block N - k's
        inputs.extend([x] if layer in blocks else [])
        return layer(x, *args, **kwargs)
    copy = keras.models.clone_model(encoder, clone_function=lambda layer: layer, call_function=call)
    states = copy.get_layer("final_layer_norm")(inputs[-k]) if normed else inputs[-k]
    return keras.Model(copy.inputs, [states, *copy.outputs[1:]] if len(copy.outputs) > 1 else states)
