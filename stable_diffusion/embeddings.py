"""Textual-inversion embeddings (Gal et al., 2022): new words for the CLIP text encoders, from the files people publish.

Files (`read`):
- diffusers `learned_embeds.safetensors` (or `.bin`): `{token: (width,) or (n, width)}`;
- A1111 `.pt` (or `.bin`): `{"string_to_param": {"*": (n, width)}, "name": ..., ...}`;
- A1111 `.safetensors`: `{"emb_params": (n, width)}`;
- SDXL's, as A1111 reads them and civitai publishes them (`.safetensors`, or `.pt`): `{"clip_l": (n, 768),
  "clip_g": (n, 1280)}`, the vectors of `text_encoder` (CLIP ViT-L) and `text_encoder_2` (OpenCLIP ViT-bigG).
Pickled files are read without PyTorch by `ckpt.read`, which refuses unexecuted anything but tensors and plain
containers. The token is the diffusers file's key, or for A1111 and SDXL files the file's name without its
extension (the name A1111 prompts use), unless `token=` names another.

Loading (`load`): an embedding of n vectors for token t adds the tokens t, t_1, ..., t_{n-1}, as diffusers does (t
in a prompt stands for all of them: `Tokenizer.expand`), with the ids of n rows appended to the text encoder's token
embedding: a new Embedding layer replaces the old one in a copy of the text encoder's graph that shares every other
layer, and so its weights (LoRAs merged into them stay undoable), as transformers' `resize_token_embeddings`. SDXL's
file does so for each text encoder and its tokenizer, as diffusers' two `load_textual_inversion` calls (`clip_g`
with `text_encoder_2` and `tokenizer_2`, `clip_l` with `text_encoder` and `tokenizer`) under one token.

Training (`train.train_textual_inversion`): `with_trainable_rows` appends the new token's rows to the token
embedding of a copy of the text encoder's graph as a variable of their own (`AppendedRows`), which alone trains.

References: diffusers `loaders/textual_inversion.py` (`load_textual_inversion`); AUTOMATIC1111/stable-diffusion-webui
`modules/textual_inversion/textual_inversion.py` (`create_embedding_from_data`).
"""
import copy
from pathlib import Path

import keras
import numpy as np
from keras import ops

from . import ckpt
from .weights import read_tensor, safetensors_header

TOKEN_EMBEDDING = "embeddings-token_embedding"  # the text encoder's token embedding layer
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # each text encoder's vectors in SDXL's files


def read(path, token=None):
    """(token, {text encoder: vectors}) of the embedding file at `path` (see the module docstring): vectors float32
    (n, width) for "text_encoder", and for SDXL's files also for "text_encoder_2".

    Raises ValueError naming the file if it is unreadable or holds something other than one embedding.
    """
    path = Path(path)
    data = ({key: read_tensor(path, entry) for key, entry in safetensors_header(path)[0].items()}
            if path.suffix == ".safetensors" else ckpt.read(path))
    encoders = ["text_encoder"]
    if isinstance(data, dict) and set(data) == set(SDXL_KEYS.values()):  # SDXL: clip_l, clip_g
        name, encoders, values = path.stem, list(SDXL_KEYS), [data[key] for key in SDXL_KEYS.values()]
    elif isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # A1111 .pt
        name, values = path.stem, list(data["string_to_param"].values())
    elif isinstance(data, dict) and len(data) == 1:  # A1111 .safetensors, or diffusers {token: vectors}
        name, values = (path.stem if "emb_params" in data else next(iter(data))), list(data.values())
    else:
        name, values = None, []
    values = [value.read() if isinstance(value, ckpt.Tensor) else value for value in values]
    if len(values) != len(encoders) or not all(isinstance(value, np.ndarray) and value.ndim in (1, 2) and value.size
                                               for value in values):
        found = sorted(map(str, data))[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a textual-inversion embedding: expected one tensor (n, width) under "
                         f"string_to_param (A1111 .pt), emb_params (A1111 .safetensors) or a token (diffusers), or "
                         f"SDXL's two under clip_l and clip_g; found {found}.")
    vectors = {encoder: np.asarray(value, "float32").reshape(-1, value.shape[-1])
               for encoder, value in zip(encoders, values)}
    if not all(np.isfinite(value).all() for value in vectors.values()):
        raise ValueError(f"{path} holds an embedding with values that are not finite (a damaged file?).")
    return (name if token is None else token), vectors


def load(sd, path, *, token=None):
    """`StableDiffusion.load_textual_inversion`: adds the textual-inversion embedding at `path` to `sd` (a
    `StableDiffusion`): its tokens to the tokenizer of each text encoder, its vectors to the text encoder's token
    embedding (see the module docstring).

    Args:
        path: an A1111 `.pt` / `.safetensors` or diffusers `learned_embeds.safetensors` / `.bin` file; for SDXL, a
            file of its `clip_l` and `clip_g` vectors.
        token: the token prompts use for it; default: the file's (see the module docstring).

    Raises ValueError, leaving `sd` unchanged, if `token` is not a non-empty string, the file holds no embedding,
    holds vectors for other text encoders than the model's (an SD 1.x / 2.x embedding on SDXL or the reverse),
    their width is not their text encoder's, or a token it adds is in a tokenizer already.
    """
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(f"token must be None or a non-empty string, got {token!r}.")
    token, vectors = read(path, token)
    encoders = [name for name in SDXL_KEYS if getattr(sd, name) is not None]
    if set(vectors) != set(encoders):
        raise ValueError(f"{path} holds vectors for {' and '.join(vectors)}; this model's text encoders are "
                         f"{' and '.join(encoders)}: the embedding was made for another model (SDXL's hold clip_l "
                         f"and clip_g).")
    grown = {name: grown_by(sd, name, token, rows, path) for name, rows in vectors.items()}  # all checked first
    for name, (text_encoder, tokenizer) in grown.items():
        rows = text_encoder.get_layer(TOKEN_EMBEDDING).input_dim
        sd.config = dict(sd.config, **{name: dict(sd.config[name], vocab_size=rows)})
        setattr(sd, name, text_encoder)
        setattr(sd, name.replace("text_encoder", "tokenizer"), tokenizer)


def grown_by(sd, name, token, vectors, path):
    """(a copy of `sd`'s text encoder `name` with the rows `vectors` (n, width) appended to its token embedding, a
    copy of its tokenizer reading `token` as their ids); ValueError naming `path` for a width not the encoder's or a
    token in the tokenizer already."""
    text_encoder = getattr(sd, name)
    old = text_encoder.get_layer(TOKEN_EMBEDDING)
    table = ops.convert_to_numpy(old.embeddings)  # (rows, width)
    rows, width = table.shape
    if vectors.shape[1] != width:
        part = f" ({SDXL_KEYS[name]})" if sd.text_encoder_2 is not None else ""
        raise ValueError(f"{path} holds an embedding{part} of width {vectors.shape[1]}; this model's "
                         f"{name.replace('_', ' ')} is {width} wide (SD 1.x: 768, SD 2.x: 1024, SDXL: 768 and 1280): "
                         f"the embedding was made for another model.")
    try:
        tokenizer = with_tokens(getattr(sd, name.replace("text_encoder", "tokenizer")), token, len(vectors),
                                first_id=rows)
    except ValueError as error:
        raise ValueError(f"Cannot add {path}: {error} Pass token=... to give the embedding another name.") from None
    table = np.concatenate([table, vectors.astype(table.dtype)])
    new = keras.layers.Embedding(*table.shape, weights=[table], name=old.name, dtype=old.dtype_policy)
    grown = with_token_embedding(text_encoder, new)
    grown.compile(jit_compile=text_encoder.jit_compile)
    return grown, tokenizer


def with_tokens(tokenizer, token, count, *, first_id):
    """A copy of `tokenizer` (the original unchanged) that reads `token` as the ids `first_id` .. `first_id + count
    - 1`: the tokens `token`, `token_1`, ..., `token_{count - 1}`, as diffusers names a multi-vector embedding's.
    ValueError (`Tokenizer.add_tokens`) if one of them is in the tokenizer already."""
    names = [token] + [f"{token}_{i}" for i in range(1, count)]
    tokenizer = copy.copy(tokenizer)  # `add_tokens` changes the copy only
    tokenizer.add_tokens(dict(zip(names, range(first_id, first_id + count))))
    return tokenizer


def with_token_embedding(text_encoder, layer):
    """A copy of `text_encoder`'s graph with `layer` for its token embedding, sharing every other layer (and so its
    weights), as transformers' `resize_token_embeddings`."""
    old = text_encoder.get_layer(TOKEN_EMBEDDING)
    return keras.models.clone_model(text_encoder, clone_function=lambda other: layer if other is old else other)


class AppendedRows(keras.layers.Layer):
    """A token embedding with rows appended: token ids (B, L) -> vectors (B, L, width), from `embedding` (a frozen
    Keras `Embedding`) for the ids it has, from `rows`, this layer's variable (n, width), for the next n ids.

    Args:
        embedding: the text encoder's token embedding layer; set it `trainable=False` to train `rows` alone.
        vectors: the initial rows (n, width).
    """

    def __init__(self, embedding, vectors, name="appended_rows"):
        super().__init__(name=name, dtype=embedding.dtype_policy)
        self.embedding = embedding
        self.rows = self.add_weight(shape=np.shape(vectors), initializer="zeros", name="rows")
        self.rows.assign(np.asarray(vectors, "float32"))

    def call(self, ids):
        first = self.embedding.input_dim
        old = self.embedding(ops.minimum(ids, first - 1))  # (B, L, width)
        new = ops.take(self.rows, ops.maximum(ids - first, 0), axis=0)
        return ops.where(ops.expand_dims(ids >= first, -1), new, old)  # rows autocast as the layer computes


def with_trainable_rows(text_encoder, vectors):
    """A copy of `text_encoder`'s graph whose token embedding has the rows `vectors` (n, width) appended as an
    `AppendedRows` layer, sharing every other layer: returns (copy, its `AppendedRows`)."""
    layer = AppendedRows(text_encoder.get_layer(TOKEN_EMBEDDING), vectors)
    return with_token_embedding(text_encoder, layer), layer
