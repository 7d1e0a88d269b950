"""Checkpoints -> Keras models: diffusers folders (as written by `save_pretrained`) and our bundles
(a `config.json`, one Keras `.weights.h5` per model and the tokenizer files).

The Keras layers are named after the checkpoint key prefixes, so mapping is by name, with the one
table below: `KEY_SUFFIX` names the PyTorch tensor of each Keras variable and `to_keras_layout`
transposes it. Loading is strict: every variable gets exactly one tensor of the right shape, every
tensor is used (or known-unused), and nothing is assigned before everything checks out.
"""
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizer import Tokenizer, shipped_path

BUNDLE_FORMAT, BUNDLE_CONFIG = "keras-stable-diffusion/1", "config.json"
BUNDLE_MODELS = ("text_encoder", "diffusion_model", "decoder", "encoder")
KEY_SUFFIX = {"kernel": "weight", "gamma": "weight", "embeddings": "weight", "bias": "bias", "beta": "bias"}

# diffusers' DDIMScheduler defaults, for keys a checkpoint's scheduler config leaves out.
DIFFUSERS_DDIM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                               beta_schedule="linear", steps_offset=0, set_alpha_to_one=True,
                               prediction_type="epsilon", timestep_spacing="leading",
                               clip_sample=True, clip_sample_range=1.0)


def to_keras_layout(variable_name, tensor, shape):
    """A PyTorch tensor in the layout of the Keras variable `variable_name` of `shape`."""
    if variable_name != "kernel":
        return tensor
    if tensor.ndim == 4 and len(shape) == 2:  # a 1x1 conv in PyTorch, a Dense here
        tensor = tensor[:, :, 0, 0]
    return tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T  # (out, in, kh, kw) -> (kh, kw, in, out)


class Tensors(Mapping):
    """Checkpoint tensors by key, read lazily one at a time, with their shapes known up front."""

    def __init__(self, readers, shapes, source):
        self._readers, self.shapes, self.source = readers, shapes, source

    @classmethod
    def from_arrays(cls, arrays, source="arrays"):
        return cls({k: (lambda v=v: np.asarray(v)) for k, v in arrays.items()},
                   {k: tuple(np.shape(v)) for k, v in arrays.items()}, source)

    @classmethod
    def from_safetensors(cls, paths, rename=lambda key: key):
        from safetensors import safe_open

        readers, shapes = {}, {}
        for path in paths:
            try:
                handle = safe_open(str(path), framework="np")
            except Exception as error:
                raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
            for key in handle.keys():
                readers[rename(key)] = lambda handle=handle, key=key: handle.get_tensor(key)
                shapes[rename(key)] = tuple(handle.get_slice(key).get_shape())
        return cls(readers, shapes, ", ".join(map(str, paths)))

    def __getitem__(self, key):
        return self._readers[key]()

    def __iter__(self):
        return iter(self._readers)

    def __len__(self):
        return len(self._readers)


def load_weights(models, tensors, unused_prefixes=()):
    """Assigns every variable of `models` from `tensors`, strictly; raises ValueError listing problems."""
    plan, problems, used = [], [], set()
    for layer in (layer for model in models for layer in model.layers):
        for variable in layer.weights:
            key = f"{layer.name.replace('-', '.')}.{KEY_SUFFIX[variable.name]}"
            if key not in tensors:
                problems.append(f"missing tensor {key} for {variable.path} {tuple(variable.shape)}")
                continue
            zeros = np.broadcast_to(np.float32(0), tensors.shapes[key])  # shape check without reading
            shape = to_keras_layout(variable.name, zeros, variable.shape).shape
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
        variable.assign(to_keras_layout(variable.name, tensors[key], variable.shape).astype(variable.dtype))


@dataclass
class Checkpoint:
    """What `read` found: model configs, tokenizer, default image size, and how to load the weights."""

    config: dict
    tokenizer: Tokenizer
    img_height: int
    img_width: int
    load_into: Callable  # load_into(sd) assigns the weights of sd's models


def read(path=None):
    """Reads the checkpoint at `path`: a diffusers folder or a bundle written by `save_bundle`;
    None: the demo model bundle shipped in `weights/demo`."""
    path = shipped_path("demo") if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.is_dir() and (path / "model_index.json").exists():
        return read_diffusers(path)
    if path.is_dir() and (path / BUNDLE_CONFIG).exists():
        return read_bundle(path)
    raise ValueError(f"{path} is not a checkpoint this library reads: expected a diffusers folder "
                     f"(with model_index.json) or a saved bundle (with {BUNDLE_CONFIG}).")


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
    parts = [(("text_encoder",), find_weights(folder / "text_encoder", lambda k: k.removeprefix("text_model.")),
              ("embeddings.position_ids",)),
             (("diffusion_model",), find_weights(folder / "unet"), ()),
             (("encoder", "decoder"), find_weights(folder / "vae"), ())]

    def load_into(sd):
        for names, tensors, unused in parts:
            load_weights([getattr(sd, name) for name in names], tensors, unused)

    size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return Checkpoint(config, tokenizer, size, size, load_into)


def save_bundle(sd, path, overwrite=False):
    """Writes `sd` as a bundle folder, under a temporary name renamed at the end."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = dict(format=BUNDLE_FORMAT, img_height=sd.img_height, img_width=sd.img_width, **sd.config)
    (partial / BUNDLE_CONFIG).write_text(json.dumps(config, indent=2))
    for name in BUNDLE_MODELS:
        getattr(sd, name).save_weights(partial / f"{name}.weights.h5")
    sd.tokenizer.save(partial / "tokenizer")
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)


def read_bundle(folder):
    """A bundle folder written by `save_bundle`."""
    config = read_json(folder / BUNDLE_CONFIG)
    if config.pop("format", None) != BUNDLE_FORMAT:
        raise ValueError(f"{folder / BUNDLE_CONFIG} is not a {BUNDLE_FORMAT} config.")
    files = {name: folder / f"{name}.weights.h5" for name in BUNDLE_MODELS}
    for file in files.values():
        if not file.exists():
            raise FileNotFoundError(f"Missing {file}: the bundle is incomplete.")

    def load_into(sd):
        for name, file in files.items():
            getattr(sd, name).load_weights(file)

    return Checkpoint(config, Tokenizer.from_folder(folder / "tokenizer"), config.pop("img_height"),
                      config.pop("img_width"), load_into)


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
