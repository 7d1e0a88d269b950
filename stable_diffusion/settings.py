"""The settings a checkpoint gives the models, the scheduler, the image size and the prompts' grammar,
checked before anything is built (`check`), so that a damaged or foreign file gives one CheckpointError naming it rather than an
error from deep inside Keras, a model that takes minutes to build, or an allocation of a size the file
does not hold.

The form of each setting is that of its default in the model's signature; what the weights hold bounds
the sizes and gives the block counts; the rest is what the models need of their settings (heads and
norm groups dividing the channels, one value per level) and what the scheduler accepts.
"""
import inspect
import math

from . import data, ldm, schedulers
from .decoder import Decoder
from .diffusion_model import DiffusionModel
from .encoder import Encoder
from .text_encoder import ACTIVATIONS, TextEncoder
from .weights import CheckpointError

MODELS = {"text_encoder": TextEncoder, "text_encoder_2": TextEncoder, "diffusion_model": DiffusionModel,
          "decoder": Decoder, "encoder": Encoder}  # text_encoder_2: SDXL's alone
SET_BY_THE_PIPELINE = ("latent_height", "latent_width", "img_height", "img_width", "dtype", "name")
# Settings that count blocks, and the keys that show the count in the weights: their prefix, followed by
# the block number, and the blocks the model has beyond the setting. A model of another count would
# fail only in loading, after taking long to build.
BLOCK_COUNTS = {("text_encoder", "num_layers"): ("encoder.layers.", 0),
                ("text_encoder_2", "num_layers"): ("encoder.layers.", 0),
                ("diffusion_model", "layers_per_block"): ("down_blocks.0.resnets.", 0),
                ("diffusion_model", "transformer_depth"): ("mid_block.attentions.0.transformer_blocks.", 0),
                ("encoder", "layers_per_block"): ("encoder.down_blocks.0.resnets.", 0),
                ("decoder", "layers_per_block"): ("decoder.up_blocks.0.resnets.", 1)}
PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score", "force_upcast")  # "pipeline"
MAX_SIZE = 2**16  # image sizes and training timesteps: far above any of the family's (768 px, 1000 steps)


def fits(value, default):
    """Whether `value` has the form of a setting whose default is `default`: a bool, a positive int (or 0
    where the default is 0), a finite number, a string, or a non-empty list of what the tuple holds."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return type(value) is int and value >= min(default, 1)
    if isinstance(default, float):
        return type(value) in (int, float) and math.isfinite(value)
    if isinstance(default, str):
        return isinstance(value, str)
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(fits(v, default[0]) for v in value)


def arguments(name, settings):
    """The arguments model `name` is built with: its defaults, updated with `settings`."""
    return {key: p.default for key, p in inspect.signature(MODELS[name]).parameters.items()} | settings


def check_model(name, settings, tensors, source):
    """CheckpointError naming `source` (or the weights file) unless model `name` can be built with
    `settings` and take the weights `tensors`: known settings, of the form of their defaults, sizes
    within the weights' largest dimension, the block counts of the weights, heads and norm groups that
    divide the channels, one value per level, a known activation."""
    def refuse(reason):
        raise CheckpointError(f"{source}: {name} {reason}.")

    defaults = arguments(name, {})
    largest = max((n for shape in tensors.shapes.values() for n in shape), default=0)
    for key, value in settings.items():
        if key not in defaults or key in SET_BY_THE_PIPELINE:
            refuse(f"has no setting {key!r}")
        per_level = key in ("num_heads", "transformer_depth") and isinstance(value, (list, tuple))  # or one for all
        if not fits(value, (defaults[key],) if per_level else defaults[key]):
            refuse(f"{key}={value!r:.80} does not have the form of its default {defaults[key]!r}")
        if any(type(n) is int and n > largest for n in (value if isinstance(value, (list, tuple)) else [value])):
            refuse(f"{key}={value!r:.80} is larger than any dimension of its weights ({tensors.source})")
    given = arguments(name, settings)
    for (model, key), (prefix, beyond) in BLOCK_COUNTS.items():
        if model != name:
            continue
        found = ldm.count(tensors.shapes, prefix, prefix.count("."))
        if not found:  # the weights of another model
            raise CheckpointError(f"{tensors.source} does not fit the {name} model: it has no {prefix}* tensors.")
        count = given[key][-1] if isinstance(given[key], (list, tuple)) else given[key]  # per level: the middle's
        if count != found - beyond:
            refuse(f"{key}={given[key]}, its weights ({tensors.source}) have {found - beyond}")
    channels = list(given.get("channels", [given.get("width")]))  # the text encoder: one level of its width
    heads, depths, groups = given.get("num_heads", 1), given.get("transformer_depth", 1), given.get("norm_groups", 1)
    heads, depths = (list(v) if isinstance(v, (list, tuple)) else [v] * len(channels) for v in (heads, depths))
    if any(len(values) != len(channels) for values in (heads, depths, given.get("attention_levels", channels))):
        refuse(f"num_heads, transformer_depth and attention_levels do not give one value per level of its "
               f"channels {channels}")
    if any(c % h or c % groups for c, h in zip(channels, heads)):
        refuse(f"channels {channels} are not multiples of num_heads {heads} and norm_groups {groups}")
    if given.get("activation", "gelu") not in ACTIVATIONS:
        refuse(f"activation {given['activation']!r} is not one of {sorted(ACTIVATIONS)}")


def check_sdxl(config, sources):
    """CheckpointError naming the UNet's config unless its text inputs are what the text encoders give: SDXL's
    (a "text_time" embedding, `pooled_dim`) the widths of the encoders it has together (the refiner: the second's
    alone) and the second's projection, and 5 time ids with the pipeline option `requires_aesthetics_score` (the
    refiner's), else 6; another UNet the text encoder's width, and no second encoder. The pipeline's settings (naming
    its file): `PIPELINE_OPTIONS`, true or false."""
    unet = arguments("diffusion_model", config["diffusion_model"])
    encoders = [arguments(name, config[name]) for name in ("text_encoder", "text_encoder_2") if config.get(name)
                is not None]
    second, options = config.get("text_encoder_2") is not None, config.get("pipeline", {})
    if not encoders:
        raise CheckpointError(f"{sources['diffusion_model']}: the pipeline has no text encoder.")
    widths, pooled = sum(encoder["width"] for encoder in encoders), encoders[-1]["projection_dim"] if second else 0
    if (unet["context_dim"], unet["pooled_dim"]) != (widths, pooled):
        ids = f" (beside {unet['num_time_ids']} time ids)" if unet["pooled_dim"] else ""
        raise CheckpointError(f"{sources['diffusion_model']}: the UNet takes context_dim={unet['context_dim']} and "
                              f"pooled_dim={unet['pooled_dim']}{ids}, but its text encoders give {widths} and {pooled} "
                              f"({'SDXL: the widths together, the second projection' if second else 'one CLIP'}).")
    if set(options) - set(PIPELINE_OPTIONS) or not all(isinstance(v, bool) for v in options.values()):
        raise CheckpointError(f"{sources.get('pipeline', sources['diffusion_model'])}: the pipeline settings "
                              f"{options!r:.80} are not {', '.join(PIPELINE_OPTIONS)} (true or false).")
    aesthetic = options.get("requires_aesthetics_score", False)
    if aesthetic and not second:
        raise CheckpointError(f"{sources.get('pipeline', sources['diffusion_model'])}: requires_aesthetics_score is "
                              f"for SDXL refiners, whose UNet takes time ids; this one takes none.")
    if second and unet["num_time_ids"] != (5 if aesthetic else 6):
        raise CheckpointError(f"{sources['diffusion_model']}: the UNet takes {unet['num_time_ids']} time ids, but "
                              f"requires_aesthetics_score={aesthetic} gives {5 if aesthetic else 6} (SDXL's base: 6, "
                              f"sizes and crop; its refiner: 5, with an aesthetic score).")


def check_scheduler(settings, source):
    """CheckpointError naming `source` unless the scheduler can be built from `settings` (a diffusers
    scheduler config): the settings it takes of the form of their defaults, ints at most `MAX_SIZE`."""
    defaults = inspect.signature(schedulers.Scheduler).parameters
    for key, value in settings.items():
        default = defaults[key].default if key in defaults and key != "config" else None
        if default is not None and not (fits(value, default) and (type(value) is not int or value <= MAX_SIZE)):
            raise CheckpointError(f"{source}: the scheduler's {key}={value!r:.80} does not have the form of its "
                                  f"default {default!r} (at most {MAX_SIZE}).")
    try:
        schedulers.create("ddim", settings)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: the scheduler cannot be built: {error}") from error


def check(checkpoint):
    """Refuses the settings of a `checkpoints.Checkpoint` the models or the scheduler cannot be built from
    or the weights cannot fit, and image sizes the models do not take: CheckpointError naming the file
    the setting comes from (`checkpoint.sources`)."""
    config, sources = checkpoint.config, checkpoint.sources
    for name in MODELS:
        if config.get(name) is not None:
            check_model(name, config[name], checkpoint.tensors[name], sources[name])
    check_sdxl(config, sources)
    check_scheduler(config["scheduler"], sources["scheduler"])
    grammar = config.get("grammar", {})
    if grammar and not (sorted(grammar) == sorted(data.GRAMMAR) and all(
            isinstance(words, list) and all(isinstance(word, str) for word in words) for words in grammar.values())):
        raise CheckpointError(f"{sources['grammar']}: the grammar {grammar!r:.80} is not a list of words for each "
                              f"of the slots {list(data.GRAMMAR)}.")
    levels = [len(arguments(name, config[name])["channels"]) for name in ("decoder", "diffusion_model")]
    factor = 2 ** (sum(levels) - 2)  # the VAE's and the UNet's downsampling
    for size in (checkpoint.img_height, checkpoint.img_width):
        if not (type(size) is int and 0 < size <= MAX_SIZE and size % 8 == 0 and size % factor == 0):
            raise CheckpointError(f"{sources['size']}: the image size {size!r:.60} is not a positive multiple "
                                  f"of 8 and of {factor} (the VAE's and UNet's downsampling) up to {MAX_SIZE}.")
