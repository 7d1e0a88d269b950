"""The pipeline's and the trainers' arguments, checked where they enter, before any model work. Each helper
raises one ValueError naming the argument by its keyword (a command line translates keywords into its flags,
`in_flags`) and what it expected. `checked` applies them to a generating method of `StableDiffusion`.

Memory: image sizes and batches whose activations cannot fit are refused up front (`check_memory`). The
estimate is a lower bound: the float32 tensors that must coexist at the UNet's first level (the skip
connections, the largest intermediate, twice for guidance) and at the VAE decoder's last level (or one tile
of it, see `enable_vae_tiling`). It is compared with the memory available: Linux's MemAvailable, within a
cgroup's limit, else the free physical pages (POSIX). The environment variable STABLE_DIFFUSION_MEMORY_GIB
overrides it: the GiB to assume available, "inf" for no check.
"""
import functools
import inspect
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np

from . import schedulers, sdxl

MEMORY_VARIABLE = "STABLE_DIFFUSION_MEMORY_GIB"
DENOISING = ("denoising_start", "denoising_end")  # the fraction of the schedule a task starts or ends at
GIB = 2**30


def integer(value, name, minimum):
    """`value` as an int, if it is an integer (Python or numpy, not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def positive_number(value, name, zero=False):
    """`value` as a float, if it is a finite number (Python or numpy, not a bool) > 0 (>= 0 with `zero`)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not (0 <= value if zero else 0 < value):
        raise ValueError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {value!r}.")
    return float(value)


def non_empty_string(value, name):
    """`value`, if it is a string with more than whitespace."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}.")
    return value


def in_flags(message, parser):
    """An error message of the function a command line calls, in the command line's words: each keyword that an
    option of `parser` sets (its dest) as the option's flag, but not within a path or a quote (right after "/",
    ".", "-" or a quote, or right before "/", "." or "-" and more). A keyword of one word, which may be an English
    word ("token", "data"), is translated only where it starts the message; one with an underscore anywhere."""
    # argparse lists a parser's options in `_actions` only (no public accessor).
    flags = {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}

    def flag(match):
        keyword = match[1]
        return flags[keyword] if keyword in flags and ("_" in keyword or match.start() == 0) else keyword
    return re.sub(r"(?<![\w/.'-])(\w+)\b(?![/.-]\w)", flag, str(message))


def check_seed(seed):
    """None (a random seed), or the seed as an int >= 0."""
    return None if seed is None else integer(seed, "seed", 0)


def finite_number(value, name):
    """`value` as a float, if it is a finite number (Python or numpy, not a bool)."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def check_guidance(scale):
    """The classifier-free guidance scale as a float, if it is a finite number."""
    return finite_number(scale, "unconditional_guidance_scale")


def check_image_size(name, size, multiple=8):
    """An image size in pixels: a positive multiple of 8 and of `multiple` (the model's VAE and UNet depth)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % math.lcm(8, multiple):
        depth = f" (of {multiple} for this model's VAE and UNet depth)" if multiple > 8 else ""
        raise ValueError(f"{name} must be a positive multiple of 8{depth}, got {size!r}.")


def check_compiling(jit_compile, compiled_loop):
    """Checks the pipeline's compilation switches: jit_compile None, True or False; compiled_loop True or False."""
    if jit_compile is not None and not isinstance(jit_compile, (bool, np.bool_)):
        raise ValueError(f"jit_compile must be None, True or False, got {jit_compile!r}.")
    if not isinstance(compiled_loop, (bool, np.bool_)):
        raise ValueError(f"compiled_loop must be True or False, got {compiled_loop!r}.")


def check_steps(scheduler, config, num_steps, strength=1.0, **denoising):
    """Checks `num_steps`, `strength` and `denoising` (`denoising_start`, `denoising_end`) (ValueError) on a sampler
    `scheduler` made from `config` (`Scheduler.set_timesteps`), and warns once when the sampler is used below the
    step count where it is reliable. `scheduler` None: a model's default, not known yet: the checks alone."""
    sampler = schedulers.create(scheduler, config) if scheduler else schedulers.Scheduler(**config)
    sampler.set_timesteps(num_steps, strength=strength, **denoising)
    if scheduler and num_steps < sampler.reliable_steps:
        warn_few_steps(scheduler, num_steps, sampler.reliable_steps)


@functools.cache
def warn_few_steps(scheduler, num_steps, reliable_steps):
    warnings.warn(f"scheduler={scheduler!r} with num_steps={num_steps} gives poor images; it needs about "
                  f"{reliable_steps} steps or more (or use another scheduler).", stacklevel=4)


def check_prompts(prompts, name="prompt"):
    """A prompt string or a non-empty list of them, as a list."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompts!r}.")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"{name} must hold strings only, got {prompt!r} ({type(prompt).__name__}).")
    return list(prompts)


def is_encoded(prompt):
    """Whether `prompt` is `encode_text` output: states (B, L, dim) or (L, dim), or SDXL's (states, text_embeds)."""
    if isinstance(prompt, tuple) and prompt and not isinstance(prompt[0], str):
        return np.ndim(prompt[0]) >= 2
    return np.ndim(prompt) >= 2


def prompt_count(prompt):
    """How many prompts `prompt` holds: a list of strings, or encoded prompts (see `is_encoded`)."""
    if is_encoded(prompt):
        states = prompt[0] if isinstance(prompt, tuple) else prompt
        return np.shape(states)[0] if np.ndim(states) == 3 else 1
    return len(prompt) if isinstance(prompt, (list, tuple)) else 1


def check_micro_conditioning(micro_conditioning, accepted):
    """TypeError for a keyword that is not one of `sdxl.KEYWORDS` (nor a task's `denoising_start` / `denoising_end`);
    ValueError, naming it, for one a task or pipeline does not take (`accepted`: `sdxl.keywords` of the pipeline), or
    whose value is not None, a pair of integers (sizes > 0, a crop's corner >= 0) or (scores) a finite number."""
    for name, value in micro_conditioning.items():
        if name in DENOISING:
            raise ValueError(f"{name} is not an argument of this task (denoising_start: image_to_image; "
                             f"denoising_end: text_to_image, image_to_image).")
        if name not in sdxl.KEYWORDS:
            raise TypeError(f"got an unexpected keyword argument {name!r} (SDXL's micro-conditioning: "
                            f"{', '.join(sdxl.KEYWORDS)}).")
        if not accepted:
            raise ValueError(f"{name} is SDXL's micro-conditioning; this pipeline's UNet takes no time ids.")
        if name not in accepted:
            raise ValueError(f"{name} is not in this SDXL pipeline's time ids, which take {', '.join(accepted)} "
                             f"(aesthetic scores: the refiner's, requires_aesthetics_score; target sizes: the base's; "
                             f"its image-to-image and inpainting take the prompt's crop for the negative prompt).")
        if value is not None and name in sdxl.SCORES:
            finite_number(value, name)
        elif value is not None and (not isinstance(value, (tuple, list)) or len(value) != 2):
            raise ValueError(f"{name} must be a (height, width) pair of integers or None, got {value!r}.")
        for number in value if isinstance(value, (tuple, list)) else ():
            integer(number, name, 0 if name.endswith("crops_coords_top_left") else 1)


def check_batch(batch_size, prompts):
    """The number of images a call makes: `batch_size` per prompt string, or one per prompt of a list."""
    batch_size = integer(batch_size, "batch_size", 1)
    if prompts not in (1, batch_size) and batch_size != 1:
        raise ValueError(f"batch_size={batch_size} does not match {prompts} prompts.")
    return max(batch_size, prompts)


def check_count(count, batch, what):
    """`count` inputs (negative prompts, pictures) for `batch` images: one for all, or one each."""
    if count not in (1, batch):
        raise ValueError(f"Got {count} {what} for a batch of {batch}.")


def check_noise(noise, batch, latent_shape):
    """`diffusion_noise`: None, or latents (B, h, w, C), (1, h, w, C) or (h, w, C) of `latent_shape`."""
    if noise is not None and np.shape(noise) not in ((batch, *latent_shape), tuple(latent_shape), (1, *latent_shape)):
        raise ValueError(f"diffusion_noise must have shape {(batch, *latent_shape)}, got {np.shape(noise)}.")


def available_memory():
    """Bytes of memory available to this process (see the module's docstring), or None if unknown."""
    if os.environ.get(MEMORY_VARIABLE):
        try:
            return float(os.environ[MEMORY_VARIABLE]) * GIB
        except ValueError:
            raise ValueError(f"{MEMORY_VARIABLE} must be a number of GiB or 'inf', got "
                             f"{os.environ[MEMORY_VARIABLE]!r}.") from None
    meminfo, cgroup = Path("/proc/meminfo"), Path("/sys/fs/cgroup")
    if meminfo.exists():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields.get("MemAvailable", fields["MemFree"]).split()[0]) * 1024  # in kB
        if (cgroup / "memory.max").exists() and (cgroup / "memory.max").read_text().strip() != "max":
            limit = int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text())
            available = min(available, limit)
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def model_setting(model, config, key):
    """A model's constructor argument `key`: from `config`, else its default."""
    from . import decoder, diffusion_model  # the models import Keras: only once a pipeline exists
    model = dict(diffusion_model=diffusion_model.DiffusionModel, decoder=decoder.Decoder)[model]
    return config.get(key, inspect.signature(model).parameters[key].default)


def memory_needed(config, height, width, batch_size=1, decoded=0):
    """A lower bound of the bytes of activations to denoise `batch_size` images of height x width pixels
    (a pipeline's `config`) and decode `decoded` pixels of each at once (the image, or one tile)."""
    unet, vae = config.get("diffusion_model", {}), config.get("decoder", {})
    vae_channels = model_setting("decoder", vae, "channels")
    unet_channels = model_setting("diffusion_model", unet, "channels")
    latent_pixels = height * width // 4 ** (len(vae_channels) - 1)
    largest = 8 if model_setting("diffusion_model", unet, "attention_levels")[0] else 2  # GEGLU's 8 C, a ResBlock's 2 C
    skips = model_setting("diffusion_model", unet, "layers_per_block") + 1
    denoising = 2 * latent_pixels * unet_channels[0] * (skips + largest)  # [unconditional, conditional]
    decoding = decoded * 2 * vae_channels[min(1, len(vae_channels) - 1)]  # the last upsampling's output and its conv's
    return 4 * batch_size * max(denoising, decoding)


def check_memory(config, height, width, batch_size=1, decoded=0):
    """Raises ValueError when `memory_needed` is more than `available_memory`."""
    needed, available = memory_needed(config, height, width, batch_size, decoded), available_memory()
    if available is not None and needed > available:
        images = f"batch_size={batch_size} images" if batch_size > 1 else "an image"
        tiling = ", enable_vae_tiling" if decoded else ""
        raise ValueError(f"{images} of img_height={height}, img_width={width} needs at least {in_words(needed)} "
                         f"of memory, more than the {in_words(available)} available; make fewer or smaller images"
                         f"{tiling}, or set {MEMORY_VARIABLE} to the GiB to assume available.")


def in_words(size):
    """Bytes in TiB, GiB or MiB."""
    unit, scale = next((unit, scale) for unit, scale in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20))
                       if size >= scale or unit == "MiB")
    return f"{size / scale:.1f} {unit}"


def checked(task):
    """Decorates a generating method of `StableDiffusion` (prompt or encoded text first): checks its
    arguments by name before it runs, and passes `seed` on as an int and the guidance as a float."""
    signature = inspect.signature(task)

    @functools.wraps(task)
    def run(sd, *args, **kwargs):
        bound = signature.bind(sd, *args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        values["seed"] = check_seed(values["seed"])
        values["unconditional_guidance_scale"] = check_guidance(values["unconditional_guidance_scale"])
        if not is_encoded(values["prompt"]):
            check_prompts(values["prompt"])
        check_micro_conditioning(values.get("micro_conditioning", {}), sdxl.keywords(
            sd.text_encoder_2 is not None,
            requires_aesthetics_score=sd.config["pipeline"].get("requires_aesthetics_score", False),
            editing="image" in values))
        batch = check_batch(values["batch_size"], prompt_count(bound.args[1]))
        if values["negative_prompt"] is not None:
            check_count(len(check_prompts(values["negative_prompt"], "negative_prompt")), batch, "negative prompts")
        if np.ndim(values.get("image")) == 4:  # a batch of pictures
            check_count(len(values["image"]), batch, "images")
        check_steps(values["scheduler"] or sd.scheduler_name, sd.config["scheduler"], values["num_steps"],
                    values.get("strength", 1.0), **{name: values[name] for name in DENOISING if name in values})
        check_noise(values["diffusion_noise"], batch, sd.latent_shape)
        if values["clip_skip"] is not None:
            integer(values["clip_skip"], "clip_skip", 0)
        if values["callback"] is not None and not callable(values["callback"]):
            raise ValueError(f"callback must be callable or None, got {values['callback']!r}.")
        tile = sd.vae_tile_size or max(sd.img_height, sd.img_width)
        decoded = 0 if values["return_latents"] else min(tile, sd.img_height) * min(tile, sd.img_width)
        check_memory(sd.config, sd.img_height, sd.img_width, batch, decoded)
        return task(*bound.args, **bound.kwargs)
    return run
