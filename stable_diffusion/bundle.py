"""Our bundle format, written by `StableDiffusion.save`, a folder of:

    config.json                    {"format": "keras-stable-diffusion/2", "img_height", "img_width",
                                    the arguments of each model, the scheduler config naming the
                                    pipeline's sampler (diffusers' `_class_name`: the default sampler
                                    when loaded), and the "grammar" of the prompts (`data.GRAMMAR`;
                                    {} for most models)}
    text_encoder.safetensors       one weights file per model (SDXL: text_encoder_2 too; its refiner: no
                                   text_encoder, null in config.json), keyed by the diffusers / transformers
    diffusion_model.safetensors    names (`weights.named_variables`, e.g.
    decoder.safetensors            `down_blocks.0.resnets.0.conv1.weight`)
    encoder.safetensors
    tokenizer/                     vocab.json, merges.txt, tokenizer_config.json

The weights files are safetensors files any safetensors reader opens. Unlike diffusers', their tensors
are in the Keras layout of their variables (conv kernels (kh, kw, in, out), dense kernels (in, out);
`weights.to_keras_layout` turns PyTorch tensors into it), as each file's `__metadata__` says:
{"format": "keras-stable-diffusion/2", "layout": "keras"}. Tensors keep their variables' dtype
(float32, float16 or bfloat16). Every tensor starts on a 64-byte boundary of the file, after a U8
tensor `__padding__.N` where one is needed (safetensors wants the data contiguous), so loading maps
each file copy-on-write and hands `weights.load_weights` numpy views of it: on TensorFlow the variables
are the file's pages, read from disk when first used, and writes to them stay private.
"""
import json
import mmap
from functools import partial

import numpy as np

from . import files, schedulers
from .tokenizer import Tokenizer
from .weights import (SAFETENSORS_DTYPES, CheckpointError, Tensors, keras_layout, load_weights, named_variables,
                      read_json, safetensors_header)

FORMAT, OLD_FORMAT, CONFIG = "keras-stable-diffusion/2", "keras-stable-diffusion/1", "config.json"
METADATA = {"format": FORMAT, "layout": "keras"}
MODELS = ("text_encoder", "diffusion_model", "decoder", "encoder")
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # SDXL has the second
OPTIONAL = ("grammar", "pipeline", "text_encoder_2")  # config entries a bundle may have
ALIGNMENT, PADDING = 64, "__padding__."
DTYPE_NAMES = {np.dtype(dtype): name for name, dtype in SAFETENSORS_DTYPES.items()}
RECONVERT = "python -m stable_diffusion.convert ORIGINAL_CHECKPOINT NEW_BUNDLE"


def save(sd, path, *, overwrite=False):
    """`StableDiffusion.save`: writes `sd` as a bundle folder for `from_checkpoint`: config (with `sd`'s sampler, the
    bundle's default), a `.safetensors` per model, tokenizer; under a temporary name renamed once complete
    (`files.staged`). FileExistsError if `path` exists, unless `overwrite`; ValueError for a quantized pipeline
    (`quantization.py`): bundles hold float weights."""
    names = model_names(sd.config)
    if any(layer.quantization_mode for name in names for layer in getattr(sd, name).layers):
        raise ValueError('A quantized pipeline cannot be saved (bundles hold float weights): save it unquantized '
                         'and load the bundle with quantize="int8".')
    with files.staged(path, overwrite=overwrite) as staging:
        staging.mkdir(parents=True)
        scheduler = schedulers.diffusers_config(sd.scheduler_name, sd.config["scheduler"])  # the sampler it loads with
        config = dict(format=FORMAT, img_height=sd.img_height, img_width=sd.img_width,
                      **dict(sd.config, scheduler=scheduler))
        (staging / CONFIG).write_text(json.dumps(config, indent=2))
        for name in names:
            write_safetensors(staging / f"{name}.safetensors", named_variables(getattr(sd, name)))
        for name in names:
            if name in TOKENIZERS:
                getattr(sd, TOKENIZERS[name]).save(staging / TOKENIZERS[name])


def model_names(config):
    """The names of the models a pipeline `config` has: `MODELS` but a text encoder it has not (None: SDXL's refiner
    has no first), and SDXL's second text encoder if it has one."""
    return [name for name in (*MODELS, "text_encoder_2") if config.get(name) is not None]


def write_safetensors(path, tensors, metadata=METADATA, alignment=ALIGNMENT):
    """Writes `tensors` ({key: Keras variable or numpy array}, each read when written, a variable with
    `variable.numpy()`) as a safetensors file in which every tensor starts on an `alignment`-byte boundary
    (1: no `__padding__` tensors, for readers that take every tensor for a weight)."""
    header, values, end = {"__metadata__": metadata}, [], 0
    for key, tensor in tensors.items():
        dtype, shape = np.dtype(tensor.dtype), tuple(tensor.shape)
        if end % alignment:
            gap = -end % alignment
            header[f"{PADDING}{len(values)}"] = dict(dtype="U8", shape=[gap], data_offsets=[end, end + gap])
            values.append((np.zeros(gap, np.uint8), np.uint8))
            end += gap
        size = dtype.itemsize * int(np.prod(shape))
        header[key] = dict(dtype=DTYPE_NAMES[dtype], shape=list(shape), data_offsets=[end, end + size])
        values.append((tensor, dtype))
        end += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-(8 + len(encoded)) % alignment)  # the data starts on a boundary too
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor, dtype in values:
            array = np.ascontiguousarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor, dtype)
            file.write(array.reshape(-1).view(np.uint8).data)


def read(folder):
    """The fields of a `checkpoints.Checkpoint` of the bundle `folder`; each weights file's header is
    checked here, its tensors mapped (`open_weights`)."""
    config = read_json(folder / CONFIG)
    found = config.pop("format", None)
    if found == OLD_FORMAT:
        raise CheckpointError(f"{folder} is a {OLD_FORMAT} bundle (Keras .weights.h5 files), a format this "
                              f"version no longer reads. Convert its original checkpoint again: {RECONVERT}")
    if found != FORMAT:
        raise CheckpointError(f"{folder / CONFIG} is not a {FORMAT} config (its format is {found!r}).")
    height, width = config.pop("img_height", None), config.pop("img_width", None)
    names = sorted([*MODELS, "scheduler"])
    if sorted(set(config) - set(OPTIONAL)) != names or not all(
            isinstance(v, dict) or v is None and k == "text_encoder" for k, v in config.items()):
        raise CheckpointError(f"{folder / CONFIG} does not hold an object of settings for each of {names} "
                              f"(text_encoder: or null, SDXL's refiner; and img_height, img_width, format, "
                              f"optionally {', '.join(OPTIONAL)}) but {config!r:.200}.")
    files = {name: folder / f"{name}.safetensors" for name in model_names(config)}
    for file in files.values():
        if not file.exists():
            raise FileNotFoundError(f"Missing {file}: the bundle is incomplete.")
    tensors = {name: open_weights(file) for name, file in files.items()}

    def load(models, names):
        for model, name in zip(models, names):
            load_weights([model], tensors[name], layout=keras_layout)

    parts = {names: partial(load, names=names)  # the VAE one part, as `checkpoints.read(vae=...)` replaces it
             for names in ((name,) for name in files if name not in ("encoder", "decoder"))}
    parts[("encoder", "decoder")] = partial(load, names=("encoder", "decoder"))
    tokenizers = {"tokenizer": None, **{TOKENIZERS[name]: Tokenizer.from_folder(folder / TOKENIZERS[name])
                                        for name in files if name in TOKENIZERS}}
    return dict(config=config, **tokenizers, img_height=height, img_width=width, parts=parts,
                sources=dict.fromkeys([*config, "size"], folder / CONFIG), tensors=tensors)


def open_weights(path):
    """The tensors of a bundle weights file, as views of the file mapped copy-on-write: its pages are
    read when first used, and writes stay private."""
    entries, metadata = safetensors_header(path)
    if {key: metadata.get(key) for key in METADATA} != METADATA:
        raise CheckpointError(f"{path} is not a {FORMAT} weights file: its __metadata__ is {metadata}, "
                              f"not {METADATA}.")
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)

    def view(entry):
        count = int(np.prod(entry["shape"]))
        return np.frombuffer(mapped, entry["dtype"], count, entry["offset"]).reshape(entry["shape"])

    entries = {key: entry for key, entry in entries.items() if not key.startswith(PADDING)}
    return Tensors({key: partial(view, entry) for key, entry in entries.items()},
                   {key: entry["shape"] for key, entry in entries.items()}, str(path), owned=True)
