"""LoRA files (Hu et al., 2022, "LoRA: Low-Rank Adaptation of Large Language Models") merged into the
weights of the text encoders (SDXL's two) and the UNet: the kernel W of each adapted layer, in PyTorch's
layout (out, in) or (out, in, kh, kw), becomes W + scale * alpha / rank * up @ down, so generating with
LoRAs costs what it costs without. Several files stack; `unload` puts back the values from before the first.

Formats (`.safetensors`), each tensor named by its module, the diffusers / transformers key prefix that
names our layers (`weights.variable_key`):
- kohya-ss / A1111: `lora_unet_<module>` and `lora_te_text_model_<module>` (SDXL: `lora_te1_...` for
  `text_encoder`, CLIP ViT-L, and `lora_te2_...` for `text_encoder_2`, OpenCLIP ViT-bigG) with "_" for ".",
  each with `.lora_down.weight` (rank, in[, kh, kw]), `.lora_up.weight` (out, rank[, 1, 1]) and `.alpha`
  (default: the rank); UNet modules also by their original latent-diffusion / sgm names (`lora_unet_
  input_blocks_1_1_proj_in`, as kohya's SDXL LoRAs name them), through `ldm.py`'s table.
- diffusers / PEFT, as `save_lora_weights` writes them: `unet.<module>`, `text_encoder.<module>` and (SDXL)
  `text_encoder_2.<module>` (or `text_encoder.text_model.<module>`, ...) with `.lora_A.weight` (down) and
  `.lora_B.weight` (up). alpha and rank as in PEFT's `LoraConfig`, read from the file's
  `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`, `use_rslora`: alpha / sqrt(rank)); without it
  alpha = rank, as diffusers does.

Training goes the other way (`train.train_lora`): `enable` gives chosen Dense and Conv2D layers Keras' own
LoRA (`layer.enable_lora`: kernel W + alpha / rank * A @ B, A (in, rank) or (kh, kw, in, rank), B (rank, out),
W frozen) and `write` saves A and B as a diffusers file, the one layout both loaders read.

References: kohya-ss/sd-scripts `networks/lora.py` (SDXL: over `library/sdxl_original_unet.py`); diffusers
`loaders/lora_conversion_utils.py` (`_convert_non_diffusers_lora_to_diffusers`, `_maybe_map_sgm_blocks_to_diffusers`),
`loaders/lora_base.py` (`write_lora_layers`) and `utils/peft_utils.py` (`get_peft_kwargs`); peft
`tuners/lora/layer.py` (`get_delta_weight`, `scaling`, `reset_lora_parameters`).
"""
import json
import math
import numbers
import re
from pathlib import Path

import keras
import numpy as np

from . import bundle, ldm
from .weights import listing, named_variables, read_tensor, safetensors_header, to_keras_layout

PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".lora_A.weight": "down",
         ".lora_B.weight": "up"}
METADATA = "lora_adapter_metadata"  # diffusers: {"unet.lora_alpha": ..., "text_encoder.r": ...} as JSON
# diffusers component: its modules' prefix in the keys written. "text_model." as transformers 4 names the text
# encoder's modules, which diffusers strips for transformers 5 (whose CLIPTextModel has no `text_model`).
COMPONENTS = {"unet": "", "text_encoder": "text_model.", "text_encoder_2": "text_model."}
# Each text encoder's kohya prefixes: SD 1.x / 2.x "lora_te", SDXL's "lora_te1" and "lora_te2" (sd-scripts'
# LORA_PREFIX_TEXT_ENCODER1 / 2); diffusers reads either of the first two as text_encoder, whatever the pipeline.
KOHYA_TEXT = {"text_encoder": ("lora_te", "lora_te1"), "text_encoder_2": ("lora_te2",)}
PROJECTION = "text_projection"  # SDXL's text_encoder_2: beside `text_model` in transformers 4, not inside it
# 1x1 convs in SD 1.x UNets, Linear in SD 2.x ones, Dense here: a LoRA of them would fit only one in diffusers.
EITHER_LAYOUT = ("proj_in", "proj_out")


def kernels(model):
    """{module: kernel variable} of the Dense and Conv2D layers of `model`, e.g. `conv_in`."""
    return {key.removesuffix(".weight"): variable for key, variable in named_variables(model).items()
            if variable.name == "kernel"}


def module_names(sd):
    """{module name in a LoRA file: (kernel variable, diffusers component)} in every spelling above, of the UNet and
    each text encoder (`KOHYA_TEXT`) that the pipeline `sd` has."""
    unet = kernels(sd.diffusion_model)
    levels = ldm.count(unet, "down_blocks.", 1)
    table = ldm.unet_table(levels, ldm.count(unet, "down_blocks.0.resnets.", 3),
                           [f"down_blocks.{level}.attentions.0.proj_in" in unet for level in range(levels)])
    original = ldm.map_keys(unet, {new: old for old, new in table.items()})  # {LDM name: (module, None)}
    names = {}
    for module, variable in unet.items():
        names[f"unet.{module}"] = names["lora_unet_" + module.replace(".", "_")] = (variable, "unet")
    for old, (module, _) in original.items():
        names["lora_unet_" + old.replace(".", "_")] = (unet[module], "unet")
    for component, kohya in KOHYA_TEXT.items():
        encoder = getattr(sd, component)
        for module, variable in (kernels(encoder) if encoder is not None else {}).items():
            path = module if module == PROJECTION else f"text_model.{module}"  # as in transformers 4
            spellings = {f"{component}.{module}", f"{component}.{path}",
                         *(f"{prefix}_{path.replace('.', '_')}" for prefix in kohya)}
            names.update(dict.fromkeys(spellings, (variable, component)))
    return names


def peft_configs(path, metadata):
    """{component: {LoraConfig field: value}} of a diffusers file's metadata; {} for other files."""
    try:
        packed = json.loads(metadata.get(METADATA, "{}"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a readable LoRA file: its {METADATA} is not JSON ({error}).") from error
    if not isinstance(packed, dict):
        raise ValueError(f"{path} is not a readable LoRA file: its {METADATA} is not a JSON object.")
    configs = {}
    for key, value in packed.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def multiplier(path, name, parts, component, configs):
    """alpha / rank of the module `name`: its kohya `.alpha` tensor, else for a diffusers name (`unet.<module>`) its
    component's PEFT config in `configs` (alpha_pattern keys match module suffixes, as peft's `get_pattern_key`),
    else 1."""
    rank = parts["down"]["shape"][0]
    if "alpha" in parts:
        return float(read_tensor(path, parts["alpha"]).reshape(-1)[0]) / rank
    config, module = configs.get(component), name.removeprefix(f"{component}.")
    if not config or module == name:
        return 1.0
    pattern = next((key for key in config.get("alpha_pattern") or {} if re.match(rf"(.*\.)?({key})$", module)), None)
    alpha = config["alpha_pattern"][pattern] if pattern else config.get("lora_alpha", 8)  # LoraConfig's default
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def check(name, parts, variable):
    """What is wrong with one module's tensors for `variable`, or None."""
    missing = [part for part in ("down", "up") if part not in parts]
    if missing:
        return f"{name} has no {' / '.join(missing)} tensor"
    down, up = parts["down"]["shape"], parts["up"]["shape"]
    if (len(down) not in (2, 4) or len(up) != len(down) or not down[0] or up[1] != down[0]
            or any(n != 1 for n in up[2:]) or int(np.prod(parts.get("alpha", {}).get("shape", ()))) != 1):
        shapes = {part: entry["shape"] for part, entry in parts.items()}
        return f"{name} has the shapes {shapes}: not a LoRA of a linear or conv layer"
    zeros = np.broadcast_to(np.float32(0), (up[0], *down[1:]))  # the update's shape, without reading it
    if to_keras_layout("kernel", zeros, variable.shape).shape != tuple(variable.shape):
        return f"{name} updates a PyTorch {zeros.shape} weight, {variable.path} is {tuple(variable.shape)}"
    return None


def read(path, names):
    """[(variable, alpha / rank, down entry, up entry)] of the LoRA file `path`; ValueError naming the
    file if it is not one, or listing what fits no layer of `names` (`module_names`): other shapes first."""
    entries, metadata = safetensors_header(path)
    configs = peft_configs(path, metadata)
    modules, problems, unknown = {}, [], []
    for key, entry in entries.items():
        name, part = next(((key.removesuffix(suffix), part) for suffix, part in PARTS.items()
                           if key.endswith(suffix)), (key, None))
        if part is None:
            unknown.append(f"unexpected tensor {key} {entry['shape']}")
        else:
            modules.setdefault(name, {})[part] = entry
    plan = []
    for name, parts in modules.items():
        if name not in names:
            unknown.append(f"{name}: no such layer in this model")
            continue
        variable, component = names[name]
        problem = check(name, parts, variable)
        if problem:
            problems.append(problem)
            continue
        try:
            factor = multiplier(path, name, parts, component, configs)
        except (TypeError, ValueError, re.error):  # metadata values of other types
            factor = math.nan
        if not math.isfinite(factor):
            problems.append(f"{name} has no finite alpha / rank ({factor})")
        plan.append((variable, factor, parts["down"], parts["up"]))
    if problems or unknown or not plan:
        listed = listing(problems + unknown or ["no LoRA tensors"])
        raise ValueError(f"{path} does not fit this model's text encoders and UNet (a kohya or diffusers LoRA of a "
                         f"model of this architecture, SD 1.x, 2.x or XL, was expected):{listed}")
    return plan


def load(sd, path, *, scale=1.0):
    """`StableDiffusion.load_lora`: adds the kohya / diffusers LoRA file `path` times `scale` to the kernels of
    `sd`'s text encoders and UNet, in place (compiled functions see the new values; generation costs what it did),
    after checking all of it: on an error nothing changed. LoRAs stack; `unload_lora` removes them all.

    Raises: FileNotFoundError; ValueError: a scale that is not a finite number, a file that is not a
    readable `.safetensors` LoRA, or one with tensors that fit no layer (other names, other shapes: a
    LoRA of another architecture), listing them."""
    path = Path(path)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")
    if not path.is_file():
        raise FileNotFoundError(f"No LoRA file at {path}.")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file; LoRAs are read from .safetensors files only.")
    originals = sd.lora_originals  # {id: (variable, its value before its first change)}
    for variable, factor, down, up in read(path, module_names(sd)):
        down, up = (read_tensor(path, entry).astype(np.float32) for entry in (down, up))
        update = (up.reshape(len(up), -1) @ down.reshape(len(down), -1)).reshape(len(up), *down.shape[1:])
        if id(variable) not in originals:
            originals[id(variable)] = (variable, np.array(variable.numpy()))  # a copy: assign may reuse the buffer
        update = scale * factor * to_keras_layout("kernel", update, variable.shape)
        variable.assign((variable.numpy().astype(np.float32) + update).astype(variable.dtype))


def unload(sd):
    """`StableDiffusion.unload_lora`: restores the weights every `load_lora` of `sd` changed, bit-exactly."""
    for variable, value in sd.lora_originals.values():
        variable.assign(value)
    sd.lora_originals.clear()


def enable(model, targets, *, rank, alpha=None):
    """Freezes `model` but for a LoRA (Keras' `enable_lora`) of each Dense / Conv2D layer whose module name
    (`weights.variable_key` without `.weight`) is in `targets` or ends in "." + one of them, as PEFT's
    `target_modules`; their biases stay frozen, as PEFT's default `bias="none"`. A starts as diffusers'
    training scripts start it (`init_lora_weights="gaussian"`: normal, std 1 / rank), B at zero.

    Args:
        model: the text encoder or UNet.
        targets: module names or suffixes, e.g. `("to_q", "to_k", "to_v", "to_out.0")`.
        rank, alpha: the LoRA's rank and alpha (default: the rank); its update is alpha / rank * A @ B.
    Returns:
        the names of the adapted modules.
    Raises:
        ValueError: a target that names no Dense / Conv2D layer, or `proj_in` / `proj_out`.
    """
    layers = {layer.name.replace("-", "."): layer for layer in model.layers
              if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))}
    matches = lambda module, target: module == target or module.endswith(f".{target}")
    unmatched = [target for target in targets if not any(matches(module, target) for module in layers)]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} name no Dense or Conv2D layer of the {model.name} model.")
    chosen = {module: layer for module, layer in layers.items() if any(matches(module, t) for t in targets)}
    either = sorted(module for module in chosen if module.rsplit(".", 1)[-1] in EITHER_LAYOUT)
    if either:
        raise ValueError(f"LoRA targets {either[:3]} are 1x1 convs in SD 1.x and linear layers in SD 2.x "
                         f"diffusers UNets; a diffusers file fits only one of them: leave them out.")
    for layer in model.layers:
        layer.trainable = False
    for layer in chosen.values():
        layer.trainable = True
        layer.enable_lora(rank, lora_alpha=alpha, a_initializer=keras.initializers.RandomNormal(stddev=1 / rank))
        if layer.bias is not None:
            layer.bias.trainable = False
    return list(chosen)


def torch_layout(kernel):
    """A Keras kernel (in, out) or (kh, kw, in, out) in PyTorch's layout (out, in[, kh, kw])."""
    return kernel.T if kernel.ndim == 2 else kernel.transpose(3, 2, 0, 1)


def write(path, models):
    """Writes the LoRA layers (`enable`) of `models` as a diffusers LoRA file, as
    `StableDiffusionPipeline.save_lora_weights` writes PEFT adapters: `unet.<module>.lora_A.weight` (rank, in[,
    kh, kw]) and `.lora_B.weight` (out, rank[, 1, 1]), float32, `text_encoder.text_model.<module>...` likewise,
    and each component's `LoraConfig` fields (`r`, `lora_alpha`, `target_modules`: the module names, which
    PEFT matches as suffixes) as `lora_adapter_metadata`.

    Args:
        path: the `.safetensors` file to write.
        models: {"unet": UNet, "text_encoder": text encoder}; one without LoRA layers is left out.
    Raises:
        ValueError: the LoRA layers of one model differ in rank or alpha (a config holds one of each).
    """
    tensors, config = {}, {}
    for component, model in models.items():
        layers = {layer.name.replace("-", "."): layer for layer in model.layers if getattr(layer, "lora_enabled", False)}
        settings = {(layer.lora_rank, layer.lora_alpha) for layer in layers.values()}
        if len(settings) > 1:
            raise ValueError(f"The LoRA layers of the {model.name} model have several (rank, alpha): {settings}.")
        for module, layer in layers.items():
            down = torch_layout(np.asarray(layer.lora_kernel_a.numpy(), np.float32))
            up = torch_layout(np.asarray(layer.lora_kernel_b.numpy(), np.float32))  # (out, rank)
            name = f"{component}.{COMPONENTS[component]}{module}"
            tensors[f"{name}.lora_A.weight"] = down
            tensors[f"{name}.lora_B.weight"] = up.reshape(*up.shape, *[1] * (down.ndim - 2))
        if layers:
            (rank, alpha), = settings
            config.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                           f"{component}.target_modules": sorted(layers)})
    metadata = {"format": "pt", METADATA: json.dumps(config, indent=2, sort_keys=True)}
    bundle.write_safetensors(Path(path), tensors, metadata, alignment=1)
