"""Checkpoints -> Keras models: `read` finds a checkpoint's format and hands it to the module of that
format: `diffusers_folder.py` (folders as `save_pretrained` writes them), `ldm.py` (original single-file
SD 1.x / 2.x / XL base and refiner `.safetensors` / `.ckpt`) or `bundle.py` (ours, `StableDiffusion.save`). Each
gives the model configs, the tokenizer, the default image size and loaders that set the models' variables
through the one strict name mapping of `weights.py`; `settings.py` checks the configs before any model
is built.
"""
from dataclasses import dataclass, field
from pathlib import Path

from . import bundle, diffusers_folder, ldm, settings
from .decoder import SCALING_FACTOR
from .presets import asset
from .tokenizer import Tokenizer
from .weights import CheckpointError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Checkpoint:
    """What `read` found: model configs, tokenizer, default image size, and how to load the weights."""

    config: dict
    tokenizer: Tokenizer  # None: SDXL's refiner has no first text encoder
    img_height: int
    img_width: int
    parts: dict  # {model names: load(models)}, e.g. {("encoder", "decoder"): ...}
    tokenizer_2: Tokenizer = None  # SDXL's second
    sources: dict = field(default_factory=dict)  # {config name, or "size": the file it comes from}
    tensors: dict = field(default_factory=dict)  # {model name: the `weights.Tensors` it loads}

    def load_into(self, sd):
        """Assigns the weights of `sd`'s models."""
        for names, load in self.parts.items():
            load([getattr(sd, name) for name in names])


def read(path=None, vae=None, prediction_type=None, use_ema=None, config=None):
    """Reads the checkpoint at `path`.

    Args:
        path: a diffusers folder, a bundle written by `StableDiffusion.save`, or an original single-file
            SD 1.x / 2.x / XL (base or refiner) checkpoint (`.safetensors`, or `.ckpt` read with PyTorch's
            weights-only unpickler); None: the demo model bundle shipped in the package's `assets/demo`.
        vae: a VAE file (`.safetensors` / `.ckpt` in the original layout, e.g. vae-ft-mse-840000)
            replacing the checkpoint's VAE; the latents keep the checkpoint's scaling factor (SDXL's 0.13025). SDXL
            runs it in float32 under float16 policies, as diffusers (`force_upcast`; an fp16-fix VAE can run in
            float16: `config={"pipeline": {"force_upcast": False}}`).
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
    if path.is_file() and path.suffix in ldm.SINGLE_FILES:
        checkpoint = Checkpoint(**ldm.read(path, vae is None, prediction_type, use_ema))
    elif use_ema is not None:
        raise ValueError(f"use_ema applies to single-file checkpoints ({', '.join(ldm.SINGLE_FILES)}), not {path}.")
    elif path.is_dir() and (path / "model_index.json").exists():
        checkpoint = Checkpoint(**diffusers_folder.read(path))
    elif path.is_dir() and (path / bundle.CONFIG).exists():
        checkpoint = Checkpoint(**bundle.read(path))
    else:
        raise CheckpointError(f"{path} is not a checkpoint this library reads: expected a diffusers folder "
                              f"(with model_index.json), a saved bundle (with {bundle.CONFIG}) or a "
                              f"{' / '.join(ldm.SINGLE_FILES)} file.")
    if vae is not None:  # its latents keep the checkpoint's scale, on which the UNet was trained
        latent_scaling = checkpoint.config["decoder"].get("scaling_factor", SCALING_FACTOR)
        vae_config, checkpoint.parts[("encoder", "decoder")], tensors = ldm.read_vae(Path(vae), latent_scaling)
        checkpoint.config.update(vae_config)
        if checkpoint.config.get("text_encoder_2") is not None:  # SDXL: AutoencoderKL.from_single_file's setting
            checkpoint.config["pipeline"] = dict(checkpoint.config["pipeline"], force_upcast=True)
        checkpoint.sources.update(encoder=Path(vae), decoder=Path(vae))
        checkpoint.tensors.update(encoder=tensors, decoder=tensors)
    if prediction_type is not None:
        checkpoint.config["scheduler"] = dict(checkpoint.config["scheduler"], prediction_type=prediction_type)
    for name, overrides in (config or {}).items():
        if checkpoint.config.get(name) is None:  # SDXL's refiner: "text_encoder" None
            raise ValueError(f"config has settings for {name!r}; the models are "
                             f"{sorted(key for key, value in checkpoint.config.items() if value is not None)}.")
        checkpoint.config[name] = dict(checkpoint.config[name], **overrides)
        checkpoint.sources[name] = f"{checkpoint.sources[name]} (with config={{{name!r}: ...}})"
    settings.check(checkpoint)
    return checkpoint
