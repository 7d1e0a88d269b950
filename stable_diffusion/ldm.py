"""Original single-file Stable Diffusion 1.x / 2.x / XL checkpoints (the latent-diffusion layout of the
CompVis, RunwayML and Stability `.ckpt` / `.safetensors` releases and their fine-tunes, and its SDXL form
with `conditioner.embedders.*` text encoders): the key table to the diffusers names our layers carry, the
architecture read off the tensor shapes, and the files read (`read`, `read_vae`).

`plan(shapes)` tells the family from the text encoders' prefixes (`TEXT_ENCODERS`), splits a checkpoint's
keys by component, infers each component's configuration from the shapes, and names every tensor:
`{diffusers key: (original key, part)}`, where `part` picks a third of OpenCLIP's fused q/k/v projection
or transposes its text projection (`weights.take_part`). Tensors whose prefix maps to None are
known-unused; keys no rule matches keep their own name, so strict loading reports them.

What the tensors do not hold comes from the family, as in the original inference configs: the SD 1.x
UNet has 8 heads per level, SD 2.x and SDXL 64-wide heads; the CLIP and OpenCLIP text encoders have
64-wide heads; SD 2.x uses OpenCLIP's penultimate layer followed by `ln_final`; SDXL's UNet takes 6 time
ids (base: sizes and crop) or 5 (refiner: sizes and aesthetic score) beside the pooled text of its
OpenCLIP ViT-bigG (`text_encoder_2`, every layer and the projection kept), and its VAE's latents are
scaled by 0.13025. The SDXL base's CLIP ViT-L is `text_encoder`; the refiner has none.

References: CompVis/stable-diffusion `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel) and
`model.py` (VAE Encoder / Decoder), `configs/stable-diffusion/v1-inference.yaml`;
Stability-AI/stablediffusion `configs/stable-diffusion/v2-inference(-v).yaml` and
`ldm/modules/encoders/modules.py` (FrozenOpenCLIPEmbedder, layer "penultimate");
Stability-AI/generative-models `configs/inference/sd_xl_base.yaml`, `sd_xl_refiner.yaml` and
`sgm/modules/encoders/modules.py` (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2: the pooled state
`@ text_projection`; ConcatTimestepEmbedderND); diffusers `loaders/single_file_utils.py` (the same
mapping in the other direction, which the tests check).
"""
from dataclasses import dataclass

from . import ckpt
from .decoder import SCALING_FACTOR
from .tokenizer import Tokenizer
from .weights import CheckpointError, Tensors, part_shape, strict_loader

UNET, VAE, CLIP, OPEN_CLIP, EMA = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.",
                                   "cond_stage_model.model.", "model_ema.")
SDXL_CLIP, SDXL_OPEN_CLIP, REFINER_OPEN_CLIP = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.",
                                                "conditioner.embedders.0.model.")
# Each family's text encoders, by model name: (prefix, layout). "clip": transformers' CLIPTextModel names;
# "open_clip": OpenCLIP's, up to the penultimate layer (SD 2.x); "open_clip_projected": OpenCLIP's, every layer
# and the text projection (SDXL's text_encoder_2, transformers' CLIPTextModelWithProjection).
TEXT_ENCODERS = {"sd1": {"text_encoder": (CLIP, "clip")}, "sd2": {"text_encoder": (OPEN_CLIP, "open_clip")},
                 "sdxl": {"text_encoder": (SDXL_CLIP, "clip"), "text_encoder_2": (SDXL_OPEN_CLIP, "open_clip_projected")},
                 "sdxl_refiner": {"text_encoder_2": (REFINER_OPEN_CLIP, "open_clip_projected")}}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base", "sdxl_refiner": "SDXL refiner"}
SDXL_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}  # sizes and crop, then the target size (base) or aesthetic score
SDXL_SCALING_FACTOR = 0.13025  # sgm's sd_xl_base / sd_xl_refiner `scale_factor`
HEAD_WIDTH, SD1_UNET_HEADS = 64, 8
# Training-only tensors: the DDPM schedule buffers, the learned log-variance, the EMA bookkeeping, sgm's sigmas.
KNOWN_UNUSED = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar",
                "model_ema.decay", "model_ema.num_updates", "denoiser.sigmas")
UNSUPPORTED = {"control_model.": "ControlNet", f"{UNET}joint_blocks.": "SD3", "text_encoders.": "SD3",
               f"{UNET}double_blocks.": "Flux", "double_blocks.": "Flux"}
CLASS_CONDITIONED = f"{UNET}label_emb."  # SD 2.x upscaler and unCLIP; SDXL's "text_time" embedding
# diffusers' StableDiffusionPipeline scheduler config of SD 1.5 and 2.1 (their PNDM config without its class, so the
# default sampler is DDIM: `schedulers.default_name`).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
# SDXL base and refiner: diffusers' scheduler_config of sd_xl_base and sd_xl_refiner (the same EulerDiscreteScheduler
# config, without its class: the default sampler is DDIM).
SDXL_SCHEDULER = dict(SCHEDULER, interpolation_type="linear", sample_max_value=1.0, skip_prk_steps=True,
                      use_karras_sigmas=False)
# Each text encoder layout's tokenizer padding, as the releases' tokenizer configs: CLIP ViT-L's with the end token,
# OpenCLIP's (SD 2.x's ViT-H, SDXL's ViT-bigG) with "!".
PAD_TOKENS = {"clip": "<|endoftext|>", "open_clip": "!", "open_clip_projected": "!"}
SINGLE_FILES = (".safetensors", ".ckpt")
CKPT_METADATA = ("global_step", "epoch", "pytorch-lightning_version")  # non-tensor entries of a .ckpt
SD2_BASE_GLOBAL_STEP = 875000  # diffusers: an SD 2.x file at this step is 512-base (epsilon), others 768-v

UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn": "self_attn", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2"}


@dataclass
class Plan:
    """What `plan` found: the family (a key of `FAMILY_NAMES`), model configs by model name ("text_encoder",
    "text_encoder_2" where the family has them, "diffusion_model", "decoder", "encoder"), and the tensor names
    per model group."""

    family: str
    config: dict
    names: dict  # {("text_encoder",): {diffusers key: (original key, part)}, ...}


def count(shapes, prefix, index):
    """How many distinct values the `index`-th dotted part of the keys under `prefix` takes."""
    return len({key.split(".")[index] for key in shapes if key.startswith(prefix)})


def strip(shapes, prefix):
    return {key.removeprefix(prefix): shape for key, shape in shapes.items() if key.startswith(prefix)}


def unet_config(s, family):
    """DiffusionModel arguments from the UNet's shapes (keys without `model.diffusion_model.`). The transformer
    depth per level: at levels without attention 1, but at the last, whose entry the middle block takes, the
    middle block's; one number where all are equal."""
    levels = 1 + sum(key.startswith("input_blocks.") and key.endswith(".op.weight") for key in s)
    per_level = count(s, "input_blocks.", 1) // levels  # ResBlocks + the downsampler (conv_in at level 0)
    first = [1 + level * per_level for level in range(levels)]
    channels = tuple(s[f"input_blocks.{block}.0.out_layers.3.weight"][0] for block in first)
    heads = SD1_UNET_HEADS if family == "sd1" else tuple(width // HEAD_WIDTH for width in channels)
    attention_levels = tuple(f"input_blocks.{block}.1.proj_in.weight" in s for block in first)
    depths = [count(s, f"input_blocks.{block}.1.transformer_blocks.", 4) if attention else 1
              for block, attention in zip(first, attention_levels)]
    middle = count(s, "middle_block.1.transformer_blocks.", 3)
    if attention_levels[-1] and depths[-1] != middle:
        raise ValueError(f"the last level's transformers have {depths[-1]} blocks, the middle one {middle}")
    depths[-1] = middle
    return dict(in_channels=s["input_blocks.0.0.weight"][1], out_channels=s["out.2.weight"][0],
                channels=channels, layers_per_block=per_level - 1, attention_levels=attention_levels,
                num_heads=heads, context_dim=s["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
                transformer_depth=depths[0] if len(set(depths)) == 1 else tuple(depths))


def text_time_config(s, pooled_dim, num_time_ids):
    """DiffusionModel arguments of SDXL's "text_time" embedding, whose first layer (`label_emb.0.0`) takes the
    pooled text (pooled_dim) and num_time_ids ids, each embedded in time_id_dim (sgm's ConcatTimestepEmbedderND)."""
    time_id_dim, rest = divmod(s["label_emb.0.0.weight"][1] - pooled_dim, num_time_ids)
    if rest or time_id_dim < 1:
        raise ValueError(f"label_emb.0.0.weight {s['label_emb.0.0.weight']} does not take the pooled text "
                         f"({pooled_dim}) and {num_time_ids} embedded time ids")
    return dict(pooled_dim=pooled_dim, num_time_ids=num_time_ids, time_id_dim=time_id_dim)


def unet_table(levels, layers_per_block, attention_levels):
    """{LDM prefix: diffusers prefix} of the UNet (openaimodel's input/middle/output blocks)."""
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0"}
    resnets = {"middle_block.0": "mid_block.resnets.0", "middle_block.2": "mid_block.resnets.1"}
    per_level = layers_per_block + 1
    for level in range(levels):
        for i in range(layers_per_block):
            block = 1 + level * per_level + i
            resnets[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{i}"
            if attention_levels[level]:
                table[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{i}"
        if level < levels - 1:
            table[f"input_blocks.{(level + 1) * per_level}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    for up, level in enumerate(reversed(range(levels))):
        for i in range(per_level):
            resnets[f"output_blocks.{up * per_level + i}.0"] = f"up_blocks.{up}.resnets.{i}"
            if attention_levels[level]:
                table[f"output_blocks.{up * per_level + i}.1"] = f"up_blocks.{up}.attentions.{i}"
        if level > 0:  # after the attention, where the level has one
            upsampler = f"output_blocks.{up * per_level + layers_per_block}.{2 if attention_levels[level] else 1}.conv"
            table[upsampler] = f"up_blocks.{up}.upsamplers.0.conv"
    for old, new in resnets.items():
        table.update({f"{old}.{a}": f"{new}.{b}" for a, b in UNET_RESNET.items()})
    return table


def vae_configs(s, scaling_factor=SCALING_FACTOR):
    """Decoder and Encoder arguments from the VAE's shapes (keys without `first_stage_model.`)."""
    levels = count(s, "encoder.down.", 2)
    shared = dict(latent_channels=s["decoder.conv_in.weight"][1],
                  channels=tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)),
                  layers_per_block=count(s, "encoder.down.0.block.", 4))
    return dict(decoder=dict(shared, out_channels=s["decoder.conv_out.weight"][0], scaling_factor=scaling_factor),
                encoder=dict(shared, in_channels=s["encoder.conv_in.weight"][1]))


def vae_table(levels, layers_per_block):
    """{LDM prefix: diffusers prefix} of the VAE (the decoder's `up` blocks are numbered by level)."""
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv", "loss": None}
    resnets = {}
    for part in ("encoder", "decoder"):
        table.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                      f"{part}.norm_out": f"{part}.conv_norm_out"})
        table.update({f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}" for a, b in VAE_ATTENTION.items()})
        resnets.update({f"{part}.mid.block_{i + 1}": f"{part}.mid_block.resnets.{i}" for i in range(2)})
    for level in range(levels):
        resnets.update({f"encoder.down.{level}.block.{i}": f"encoder.down_blocks.{level}.resnets.{i}"
                        for i in range(layers_per_block)})
        if level < levels - 1:
            table[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
    for up, level in enumerate(reversed(range(levels))):
        resnets.update({f"decoder.up.{level}.block.{i}": f"decoder.up_blocks.{up}.resnets.{i}"
                        for i in range(layers_per_block + 1)})
        if level > 0:
            table[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    for old, new in resnets.items():
        table.update({f"{old}.{a}": f"{new}.{b}" for a, b in VAE_RESNET.items()})
    return table


def text_encoder_config(s, activation):
    """TextEncoder arguments from the text encoder's shapes, already under transformers' names and layout."""
    vocab_size, width = s["embeddings.token_embedding.weight"]
    projection = {"projection_dim": s["text_projection.weight"][0]} if "text_projection.weight" in s else {}
    return dict(vocab_size=vocab_size, max_length=s["embeddings.position_embedding.weight"][0], width=width,
                num_layers=count(s, "encoder.layers.", 2), num_heads=width // HEAD_WIDTH,
                intermediate_size=s["encoder.layers.0.mlp.fc1.weight"][0], activation=activation, **projection)


def open_clip_table(resblocks, projected=False):
    """{OpenCLIP prefix: transformers CLIP prefix}. SD 2.x: the last block and the projection are dropped
    (SD 2.x conditions on the penultimate layer, then `ln_final`), as diffusers' 23-layer conversion of
    ViT-H/14; `projected` (SDXL's ViT-bigG/14): every block and the text projection are kept."""
    kept = resblocks if projected else resblocks - 1
    table = {"token_embedding": "embeddings.token_embedding", "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final": "final_layer_norm", "text_projection": "text_projection.weight" if projected else None,
             "logit_scale": None, **{f"transformer.resblocks.{i}": None for i in range(kept, resblocks)}}
    for i in range(kept):
        table.update({f"transformer.resblocks.{i}.{a}": f"encoder.layers.{i}.{b}" for a, b in OPEN_CLIP_BLOCK.items()})
    return table


def text_table(layout, s):
    """{original prefix: transformers prefix} of a text encoder of `layout` (`TEXT_ENCODERS`) from its shapes."""
    if layout == "clip":
        return CLIP_TABLE
    return open_clip_table(count(s, "transformer.resblocks.", 2), projected=layout == "open_clip_projected")


CLIP_TABLE = {"text_model": "", "text_model.embeddings.position_ids": None, "embeddings.position_ids": None}


def map_keys(keys, table):
    """{diffusers key: (key, part)}: each key's longest dotted prefix in `table` replaced; dropped where it
    maps to None; kept as is where none matches. OpenCLIP's fused `in_proj` becomes q, k, v (parts 0-2), its
    `text_projection` (x @ W) is transposed (part "T") into transformers' Linear layout."""
    names = {}
    for key in keys:
        parts = key.split(".")
        match = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in table), None)
        if match is None:
            names[key] = (key, None)
            continue
        target = table[".".join(parts[:match])]
        if target is None:
            continue
        new = ".".join(filter(None, [target, *parts[match:]]))
        if new.endswith((".in_proj_weight", ".in_proj_bias")):
            base, kind = new.rsplit(".in_proj_", 1)
            names.update({f"{base}.{p}_proj.{kind}": (key, i) for i, p in enumerate("qkv")})
        else:
            names[new] = (key, "T" if parts[-1] == "text_projection" else None)
    return names


def prefixed(names, prefix):
    return {new: (prefix + key, part) for new, (key, part) in names.items()}


def family_of(shapes, source):
    """The family (a key of `FAMILY_NAMES`), told by its text encoders' prefixes (`TEXT_ENCODERS`); CheckpointError
    for other layouts (SD3, Flux, ControlNet, class-conditioned SD 2.x UNets, unknown text encoders)."""
    has = lambda prefix: any(key.startswith(prefix) for key in shapes)
    for prefix, name in UNSUPPORTED.items():
        if has(prefix):
            raise CheckpointError(f"{source} is a {name} checkpoint ({prefix}* keys); only Stable Diffusion "
                                  f"1.x, 2.x and XL single files are supported.")
    if not has(UNET):
        raise CheckpointError(f"{source} has no {UNET}* tensors: not a Stable Diffusion 1.x / 2.x / XL checkpoint.")
    found = [family for family, encoders in TEXT_ENCODERS.items() if all(has(p) for p, _ in encoders.values())]
    if len(found) != 1:
        expected = "; ".join(f"{' and '.join(p + '*' for p, _ in encoders.values())} ({FAMILY_NAMES[family]})"
                             for family, encoders in TEXT_ENCODERS.items())
        raise CheckpointError(f"{source} has no text encoders of a known layout; expected {expected}.")
    if found[0] not in SDXL_TIME_IDS and has(CLASS_CONDITIONED):
        raise CheckpointError(f"{source} has a class-conditioned {FAMILY_NAMES[found[0]]} UNet ({CLASS_CONDITIONED}* "
                              f"keys: an upscaler or unCLIP), which is not supported.")
    return found[0]


def describe(error):
    """A KeyError as the key missing, another error (of a shape of too few dimensions) as a wrong shape."""
    return f"no {error}" if isinstance(error, KeyError) else f"a tensor of the wrong shape: {error}"


def scaling_factor(family):
    """The latent scaling factor of `family`'s VAE, which its UNet was trained on: SD's, or SDXL's 0.13025."""
    return SDXL_SCALING_FACTOR if family in SDXL_TIME_IDS else SCALING_FACTOR


def vae_plan(s, source, scaling_factor=SCALING_FACTOR):
    """(Decoder / Encoder configs, names) of VAE shapes without their prefix."""
    try:
        config = vae_configs(s, scaling_factor)
    except (KeyError, IndexError) as error:
        raise CheckpointError(f"{source}: the VAE tensors do not have the latent-diffusion layout "
                              f"({describe(error)}).") from error
    return config, map_keys(s, vae_table(len(config["decoder"]["channels"]), config["decoder"]["layers_per_block"]))


def plan(shapes, source, use_ema=None, with_vae=True):
    """Configs and tensor names of a single-file SD 1.x / 2.x / XL checkpoint given its tensor shapes by key.

    Args:
        shapes: {key: shape} of every tensor in the file (after any `state_dict` nesting).
        source: the file, for error messages.
        use_ema: for files holding both UNet weight sets (a `model_ema.*` copy): load the EMA ones
            (default) or, with False, the training ones. EMA-only files hold one set, used either way.
        with_vae: whether to load the file's VAE (False when another VAE file replaces it).
    """
    family = family_of(shapes, source)
    encoders, name = TEXT_ENCODERS[family], FAMILY_NAMES[family]
    use_ema = use_ema is not False and any(key.startswith(EMA) and key not in KNOWN_UNUSED for key in shapes)
    if with_vae and not any(key.startswith(VAE) for key in shapes):
        raise CheckpointError(f"{source} has no VAE ({VAE}* tensors); pass a VAE file with vae=PATH.")
    components = (UNET, *(prefix for prefix, _ in encoders.values()), VAE, EMA)
    unknown = [key for key in shapes if key not in KNOWN_UNUSED and not key.startswith(components)]
    if unknown:
        raise CheckpointError(f"{source} holds tensors of no {name} component: {unknown[:5]}"
                              + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    config, names = {}, {}
    try:
        for model, (prefix, layout) in encoders.items():
            text = strip(shapes, prefix)
            text_names = map_keys(text, text_table(layout, text))
            config[model] = text_encoder_config({new: part_shape(prefix + key, text[key], part, source)
                                                 for new, (key, part) in text_names.items()},
                                                "quick_gelu" if layout == "clip" else "gelu")
            names[(model,)] = prefixed(text_names, prefix)
        unet_shapes = strip(shapes, UNET)
        unet = unet_config(unet_shapes, family)
        if family in SDXL_TIME_IDS:
            unet.update(text_time_config(unet_shapes, config["text_encoder_2"]["projection_dim"],
                                         SDXL_TIME_IDS[family]))
    except CheckpointError:  # a ValueError that already says what is wrong
        raise
    except (KeyError, IndexError, ValueError) as error:
        raise CheckpointError(f"{source}: the tensors do not have the {name} layout ({describe(error)}).") from error
    unet_names = prefixed(map_keys(unet_shapes, unet_table(len(unet["channels"]), unet["layers_per_block"],
                                                           unet["attention_levels"])), UNET)
    if use_ema:  # LDM's EMA copy names each parameter without its dots: model_ema.diffusion_modelinput_blocks00weight
        unet_names = {new: (EMA + "".join(key.split(".")[1:]), part) for new, (key, part) in unet_names.items()}
        missing = [key for key, _ in unet_names.values() if key not in shapes]
        if missing:
            raise CheckpointError(f"{source}: the EMA weights lack {missing[:5]}; pass use_ema=False for the "
                                  f"others.")
    config["diffusion_model"], names[("diffusion_model",)] = unet, unet_names
    if with_vae:
        config_vae, vae_names = vae_plan(strip(shapes, VAE), source, scaling_factor(family))
        config.update(config_vae)
        names[("encoder", "decoder")] = prefixed(vae_names, VAE)
    return Plan(family, config, names)


def standalone_vae_plan(shapes, source, latent_scaling=SCALING_FACTOR):
    """(Decoder / Encoder configs, names) of a VAE file (`vae-ft-mse-840000` style: `encoder.*`,
    `decoder.*`, maybe `loss.*`), or of the VAE inside a full checkpoint; its latents scaled by `latent_scaling`
    (the file does not say)."""
    prefix = VAE if any(key.startswith(VAE) for key in shapes) else ""
    s = {key: shape for key, shape in strip(shapes, prefix).items() if key not in KNOWN_UNUSED}
    if not any(key.startswith("decoder.") for key in s):
        raise CheckpointError(f"{source} is not a VAE checkpoint: no {prefix}decoder.* tensors.")
    config, names = vae_plan(s, source, latent_scaling)
    return config, prefixed(names, prefix)


def open_single_file(path):
    """(Tensors, global_step or None) of a `.safetensors` or `.ckpt` file, any `state_dict` nesting removed.
    Tensors are read one at a time: plain reads at the offsets of a safetensors header, or views of a
    memory map of the `.ckpt` (`ckpt.read`, which refuses unexecuted any pickle but of tensors)."""
    if path.suffix == ".safetensors":
        return Tensors.from_safetensors([path]), None
    data = ckpt.read(path)
    global_step = data.get("global_step") if isinstance(data, dict) else None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict of tensors.")
    others = [key for key, value in data.items() if not isinstance(value, ckpt.Tensor) and key not in CKPT_METADATA]
    if others:
        raise CheckpointError(f"{path} holds entries that are not tensors: {others[:5]}.")
    tensors = {key: value for key, value in data.items() if isinstance(value, ckpt.Tensor)}
    readers, shapes = {k: t.read for k, t in tensors.items()}, {k: t.shape for k, t in tensors.items()}
    return Tensors(readers, shapes, str(path)), global_step


def read(path, with_vae=True, prediction_type=None, use_ema=None):
    """The fields of a `checkpoints.Checkpoint` of an original SD 1.x / 2.x / XL base or refiner checkpoint file: UNet,
    text encoders and (unless replaced) VAE. Without the VAE, "decoder" holds the family's latent `scaling_factor`
    alone, which the replacing VAE keeps. SDXL's settings are those of diffusers' `from_single_file`, which takes them
    from the hub's configs: its scheduler config, 1024 pixels; the base zeroes the states of no negative prompt, the
    refiner (no first text encoder) does not and takes an aesthetic score (`requires_aesthetics_score`); both run the
    VAE in float32 under float16 policies (`force_upcast`, `sdxl.vae_dtypes`)."""
    tensors, global_step = open_single_file(path)
    found = plan(tensors.shapes, path, use_ema, with_vae)
    sdxl = found.family in SDXL_TIME_IDS
    if prediction_type is None:
        base = found.family != "sd2" or global_step == SD2_BASE_GLOBAL_STEP
        prediction_type = "epsilon" if base else "v_prediction"
    size = 1024 if sdxl else 768 if prediction_type == "v_prediction" else 512  # diffusers' defaults for such files
    config = dict(found.config, scheduler=dict(SDXL_SCHEDULER if sdxl else SCHEDULER, prediction_type=prediction_type))
    if sdxl:
        refiner = found.family == "sdxl_refiner"  # the hub's model_index.json and vae/config.json of each
        config["pipeline"] = dict(force_zeros_for_empty_prompt=not refiner, force_upcast=True,
                                  **(dict(requires_aesthetics_score=True) if refiner else {}))
        config.setdefault("text_encoder", None)
    if not with_vae:
        config["decoder"] = dict(scaling_factor=scaling_factor(found.family))
    parts, tensors_of = {}, {}
    for models, names in found.names.items():
        subset = tensors.subset(names)
        parts[models] = strict_loader(subset)
        tensors_of.update(dict.fromkeys(models, subset))
    tokenizers = {"tokenizer": None} | {model.replace("text_encoder", "tokenizer"): Tokenizer.from_vendored(
        PAD_TOKENS[layout]) for model, (_, layout) in TEXT_ENCODERS[found.family].items()}  # the refiner: no first
    return dict(config=config, **tokenizers, img_height=size, img_width=size, parts=parts,
                sources=dict.fromkeys([*config, "size"], path), tensors=tensors_of)


def read_vae(path, latent_scaling=SCALING_FACTOR):
    """(Decoder / Encoder configs, loader, the `weights.Tensors` it loads) of a VAE file in the original
    layout, its latents scaled by `latent_scaling` (the checkpoint's: the file does not say)."""
    if not (path.is_file() and path.suffix in SINGLE_FILES):
        raise ValueError(f"vae must be a {' / '.join(SINGLE_FILES)} file, got {path}.")
    tensors, _ = open_single_file(path)
    config, names = standalone_vae_plan(tensors.shapes, path, latent_scaling)
    subset = tensors.subset(names)
    return config, strict_loader(subset), subset
