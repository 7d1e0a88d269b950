"""Command line text-to-image: `python -m stable_diffusion "a red circle on a white background"`;
image-to-image with `--init-image PATH [--strength S]`, inpainting with `--init-image PATH --mask PATH`,
LoRAs merged with `--lora PATH[:SCALE]` (repeatable), SDXL's micro-conditioning with `--original-size HEIGHT WIDTH`
and the other keywords of `sdxl.py` as flags.

Argument checks and PNG writing only; `StableDiffusion` does the work. Each PNG stores the prompt,
negative prompt, seed, steps, guidance, sampler, size, model and LoRAs (and the editing inputs, embeddings,
clip skip and micro-conditioning used) as PNG text chunks (read them with
`PIL.Image.open(path).text`), so any image can be made again, alone (to within one pixel level): image i
of a batch has seed + i. Bad arguments, and outputs that could not be written, are reported before the
model loads (TensorFlow is imported only then): one line on stderr, exit status 2, nothing written.
Warnings (e.g. the demo model's, for words outside its grammar) are one line each, in flag names.
Each PNG appears whole or not at all (written under a temporary name, then renamed); one that cannot be
written after generation is saved in the temporary folder instead, the line on stderr says where, and
the exit status is 1. Ctrl-C: one line, exit status 130, no partial file. Progress goes to stderr.
TensorFlow's start-up log lines are kept off stderr (`TF_CPP_MIN_LOG_LEVEL=3` unless set otherwise).
"""
import argparse
import contextlib
import math
import os
import re
import secrets
import signal
import sys
import tempfile
import warnings
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import arguments, files, sdxl, tiling
from .schedulers import SCHEDULERS

PROG = "python -m stable_diffusion"
CHECKPOINTS = "a diffusers folder, an SD 1.x / 2.x / XL base .safetensors or .ckpt file, or a saved bundle"
DEMO_NOTICE = ("Using the built-in demo model: 64x64 images of one shape on a plain background, prompted "
               "like 'a large red circle on a white background'. For real images pass --checkpoint PATH: "
               f"{CHECKPOINTS}.")
# The pipeline's keywords, as the flags that set them, for its error messages.
FLAGS = {"img_height": "--height", "img_width": "--width", "num_steps": "--steps", "batch_size": "--batch-size",
         "unconditional_guidance_scale": "--guidance", "seed": "--seed", "negative_prompt": "--negative-prompt",
         "scheduler": "--scheduler", "strength": "--strength", "tile_size": "--vae-tiling",
         "enable_vae_tiling": "--vae-tiling", "overwrite": "--overwrite", "clip_skip": "--clip-skip",
         **{name: f"--{name.replace('_', '-')}" for name in sdxl.KEYWORDS}}
STEPS, GUIDANCE = 50, 7.5  # the pipeline's defaults (test_cli checks them), stated in --help
VAE_FACTOR = 8  # pixels per latent of the SD 1.x / 2.x VAEs: the unit of --vae-tiling before a model loads
# What TensorFlow's C++ libraries log while they load (absl INFO / WARNING lines, oneDNN, CUDA probing).
START_UP_LOG = re.compile(r"[IW]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `prog: error: message (see --help)`."""

    def error(self, message):
        message = " ".join(str(message).split()).rstrip(".")
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind):
    """An argparse type: the text as `kind` (int or float); what values are valid is the pipeline's
    concern (`check_arguments`)."""
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
    return parse


def lora_file(text):
    """An argparse type: `PATH[:SCALE]` -> (Path, SCALE), SCALE a finite number, default 1."""
    path, colon, scale = text.rpartition(":")
    try:
        value = float(scale) if colon else None
    except ValueError:  # the colon is the path's own
        value = None
    if value is not None and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected PATH[:SCALE] with a finite SCALE, got {text!r}")
    return (Path(text), 1.0) if value is None else (Path(path), value)


def build_parser():
    parser = Parser(prog=PROG, description="Generates images for a prompt and "
                    "writes them as PNGs with their settings as PNG text metadata.")
    parser.add_argument("prompt", help="what the image shows")
    parser.add_argument("-o", "--output", default="out.png", type=Path,
                        help="PNG file (default: %(default)s); with --batch-size B > 1: out-0.png, "
                        "out-1.png, ...")
    parser.add_argument("--negative-prompt", default="", help="what the image should not show")
    parser.add_argument("--steps", type=number(int), default=STEPS,
                        help="denoising steps, 1 to 1000 (default: %(default)s)")
    parser.add_argument("--guidance", type=number(float), default=GUIDANCE,
                        help="classifier-free guidance scale, 1 for none (default: %(default)s)")
    parser.add_argument("--seed", type=number(int), help="noise seed, >= 0; image i of a batch gets seed + i "
                        "(default: random, printed and stored in each PNG)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the one the checkpoint's "
                        "scheduler config names, else ddim)")
    parser.add_argument("--init-image", type=Path, help="start from this picture (image-to-image, "
                        "or inpainting with --mask); the image's size must be the model's or --height/--width")
    parser.add_argument("--mask", type=Path, help="inpaint the white part of this mask of --init-image")
    parser.add_argument("--strength", type=number(float), help="in (0, 1]: how far to noise --init-image "
                        "(default: 0.8; inpainting: 1)")
    parser.add_argument("--batch-size", type=number(int), default=1, help="images (default: 1)")
    parser.add_argument("--height", type=number(int), help="pixels, a multiple of 8 (default: the model's); "
                        f"sizes whose activations cannot fit in memory are refused ({arguments.MEMORY_VARIABLE} "
                        "sets the GiB to assume available)")
    parser.add_argument("--width", type=number(int), help="pixels, a multiple of 8 (default: the model's)")
    parser.add_argument("--checkpoint", type=Path,
                        help=f"{CHECKPOINTS} (default: the built-in demo model)")
    parser.add_argument("--lora", type=lora_file, action="append", default=[], metavar="PATH[:SCALE]",
                        help="merge this LoRA .safetensors file (kohya or diffusers) into the model, times SCALE "
                        "(default: 1); repeat the flag to stack LoRAs")
    parser.add_argument("--embedding", type=Path, action="append", default=[], metavar="PATH",
                        help="a textual-inversion embedding to load (A1111 .pt / .safetensors, diffusers "
                        "learned_embeds.safetensors, SDXL's clip_l / clip_g files), used in the prompt by its name; "
                        "repeatable")
    parser.add_argument("--clip-skip", type=number(int), metavar="K", help="condition on CLIP's hidden state K "
                        "layers before the last (1: the penultimate), for prompt and negative prompt")
    parser.add_argument("--xla", action="store_true", help="compile with XLA on TensorFlow too (always on on "
                        "JAX), all denoising steps as one program: each new image size, batch size, prompt length "
                        "or step count compiles first (seconds to minutes), then steps run faster; pays off for "
                        "many images of one shape")
    parser.add_argument("--numpy-loop", action="store_true", help="with XLA, compile one denoising step and run "
                        "the steps one by one, the sampler in numpy on the host (progress after each step)")
    parser.add_argument("--int8", action="store_true", help="int8 weights and activations in the UNet and text "
                        "encoder: less memory, faster on some CPUs, images close to float32 (see quantization.py)")
    parser.add_argument("--vae-tiling", type=number(int), metavar="PIXELS", help="decode images larger than this "
                        "in overlapping tiles of this size, a multiple of 8, to bound memory (e.g. 512; see "
                        "enable_vae_tiling)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    micro = parser.add_argument_group("SDXL micro-conditioning", "what SDXL's UNet is told of its training image "
                                      "(Podell et al., 2023), as diffusers' keywords of the same names; a pair is "
                                      "diffusers' (height, width) or (top, left) tuple, in pixels")
    size = dict(nargs=2, type=number(int), metavar=("HEIGHT", "WIDTH"))
    corner = dict(size, metavar=("TOP", "LEFT"))
    micro.add_argument("--original-size", **size, help="its size before resizing (default: the image's size)")
    micro.add_argument("--crops-coords-top-left", **corner, help="the top-left corner of its crop (default: 0 0)")
    micro.add_argument("--target-size", **size, help="SDXL base: the size asked for (default: the image's size)")
    micro.add_argument("--negative-original-size", **size, help="the negative prompt's --original-size (default: "
                       "the prompt's; SDXL base: with --negative-target-size, else the prompt's sizes and corner)")
    micro.add_argument("--negative-crops-coords-top-left", **corner, help="the negative prompt's corner (default: "
                       "0 0; SDXL base: with both negative sizes)")
    micro.add_argument("--negative-target-size", **size, help="SDXL base: the negative prompt's --target-size "
                       "(with --negative-original-size)")
    micro.add_argument("--aesthetic-score", type=number(float), metavar="SCORE", help="SDXL refiner: the aesthetic "
                       f"score to condition on (default: {sdxl.AESTHETIC_SCORE})")
    micro.add_argument("--negative-aesthetic-score", type=number(float), metavar="SCORE", help="SDXL refiner: the "
                       f"negative prompt's (default: {sdxl.NEGATIVE_AESTHETIC_SCORE})")
    return parser


def in_flag_names(message):
    """An error message of the pipeline in the command line's words: its keywords as the flags
    (`img_height=64` -> `--height 64`, `overwrite=True` -> `--overwrite`)."""
    def flag(match):
        return FLAGS[match[1]] + ("" if match[2] in (None, "True") else " ")
    return re.sub(rf"(?<![\w-])({'|'.join(FLAGS)})\b(?:=(True\b|))?", flag, str(message))


def micro_conditioning(args):
    """The SDXL micro-conditioning keywords (`sdxl.KEYWORDS`) the flags give."""
    return {name: getattr(args, name) for name in sdxl.KEYWORDS if getattr(args, name) is not None}


def output_paths(output, batch_size):
    """The PNG file of each image: `output` itself, or `stem-i.png` for a batch."""
    if batch_size == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(batch_size)]


def check_arguments(args):
    """Raises ValueError (in the pipeline's words) or OSError for arguments argparse accepts that
    cannot work, before any model loads."""
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    if args.output.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {str(args.output)!r}")
    if not args.output.parent.is_dir():
        raise ValueError(f"the folder of --output {str(args.output)!r} does not exist")
    if args.checkpoint is not None and not args.checkpoint.exists():
        raise ValueError(f"no checkpoint at {str(args.checkpoint)!r}")
    for path, _ in args.lora:
        if not path.is_file():
            raise ValueError(f"--lora: no file at {str(path)!r}")
    for path in args.embedding:
        if not path.is_file():
            raise ValueError(f"--embedding: no file at {str(path)!r}")
        with quiet_start_up():  # the file formats' module imports Keras
            from . import embeddings
        embeddings.read(path)
    if args.clip_skip is not None:
        arguments.integer(args.clip_skip, "clip_skip", 0)
    if (args.mask or args.strength is not None) and args.init_image is None:
        raise ValueError("--mask and --strength need --init-image")
    arguments.check_seed(args.seed)
    arguments.integer(args.batch_size, "batch_size", 1)
    arguments.check_guidance(args.guidance)
    for name, size in (("img_height", args.height), ("img_width", args.width)):
        if size is not None:
            arguments.check_image_size(name, size)
    arguments.check_steps(args.scheduler, {}, args.steps, 1.0 if args.strength is None else args.strength)
    arguments.check_micro_conditioning(micro_conditioning(args), sdxl.KEYWORDS)  # the values; the model takes which
    tiling.checked_tile_size(args.vae_tiling, VAE_FACTOR)
    paths = output_paths(args.output, args.batch_size)
    existing = [str(path) for path in paths if path.exists() and not path.is_dir()]
    if existing and not args.overwrite:
        raise ValueError(f"{', '.join(existing)} exists; pass --overwrite to replace it")
    for path in paths:
        files.check_writable(path)


@contextlib.contextmanager
def quiet_start_up():
    """Keeps TensorFlow's start-up log lines (`START_UP_LOG`) off stderr: file descriptor 2 is captured
    while the block runs, then what is not such a line is written to stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # after start-up; failures still raise exceptions
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not START_UP_LOG.match(line):
                    sys.stderr.write(line)


def load(args):
    """The pipeline the arguments ask for."""
    with quiet_start_up():
        from .stable_diffusion import StableDiffusion
    try:
        sd = StableDiffusion.from_checkpoint(args.checkpoint, img_height=args.height, img_width=args.width,
                                             jit_compile=args.xla or None, compiled_loop=not args.numpy_loop,
                                             quantize="int8" if args.int8 else None, scheduler=args.scheduler)
    except FileNotFoundError as error:
        if args.checkpoint is None:
            raise ValueError(f"the built-in demo model is not installed ({str(error).rstrip('.')}); "
                             f"pass --checkpoint PATH: {CHECKPOINTS}") from error
        raise
    if args.vae_tiling is not None:
        sd.enable_vae_tiling(args.vae_tiling)
    for path, scale in args.lora:
        sd.load_lora(path, scale=scale)
    for path in args.embedding:
        sd.load_textual_inversion(path)
    return sd


def generate(sd, args):
    """The images (B, H, W, 3) and the settings to store with image 0."""
    if args.init_image is None:
        task, inputs = sd.text_to_image, ()
    elif args.mask is None:
        task, inputs = sd.image_to_image, (args.init_image,)
    else:
        task, inputs = sd.inpaint, (args.init_image, args.mask)
    seed = secrets.randbelow(2**32) if args.seed is None else args.seed
    strength, micro = {} if args.strength is None else dict(strength=args.strength), micro_conditioning(args)
    print(f"Seed {seed}; {args.steps} {sd.scheduler_name} steps, guidance {args.guidance}, "
          f"{sd.img_width}x{sd.img_height}.", flush=True)
    images = task(args.prompt, *inputs, negative_prompt=args.negative_prompt, batch_size=args.batch_size,
                  num_steps=args.steps, unconditional_guidance_scale=args.guidance, seed=seed,
                  clip_skip=args.clip_skip, **strength, **micro)
    editing = dict(init_image=args.init_image, mask=args.mask, strength=args.strength, clip_skip=args.clip_skip,
                   embedding=" ".join(map(str, args.embedding)) or None,
                   **{name: " ".join(map(str, value)) if isinstance(value, list) else value
                      for name, value in micro.items()})  # as the flags take them
    settings = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=seed, steps=args.steps,
                    guidance=args.guidance, scheduler=sd.scheduler_name, height=sd.img_height, width=sd.img_width,
                    model=str(args.checkpoint or "built-in demo") + (", int8" if args.int8 else ""),
                    **({"lora": " ".join(f"{path}:{scale}" for path, scale in args.lora)} if args.lora else {}),
                    **{key: value for key, value in editing.items() if value is not None})
    return images, settings


def write_png(image, settings, file):
    """Writes `image` as a PNG, `settings` in its text chunks, to a path or binary file."""
    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    Image.fromarray(image).save(file, format="PNG", pnginfo=info)


def save_elsewhere(image, settings, path):
    """Saves an image that could not be written to `path` in the temporary folder; says where."""
    handle, fallback = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=".png")
    try:
        with os.fdopen(handle, "wb") as file:
            write_png(image, settings, file)
    except OSError as error:
        Path(fallback).unlink(missing_ok=True)
        return f"nor in {tempfile.gettempdir()} ({error.strerror or error}): the image is lost"
    return f"the image is saved as {fallback}"


def write_images(images, settings, args):
    """Writes each image to its PNG (`output_paths`); the one-line reports of those that failed."""
    failures = []
    for index, (image, path) in enumerate(zip(images, output_paths(args.output, args.batch_size))):
        image_settings = {**settings, "seed": settings["seed"] + index}  # the pipeline seeds image i with seed + i
        try:
            with files.staged(path, overwrite=args.overwrite) as temporary:
                write_png(image, image_settings, temporary)
            print(f"Wrote {path}")
        except OSError as error:
            reason = in_flag_names(error) if isinstance(error, FileExistsError) else error.strerror or error
            failures.append(f"cannot write {path} ({reason}); {save_elsewhere(image, image_settings, path)}")
    return failures


@contextlib.contextmanager
def one_line_warnings():
    """Shows each warning as one line on stderr, `prog: warning: message` in flag names, within the block
    or function."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_: print(
            f"{PROG}: warning: {' '.join(in_flag_names(message).split())}", file=sys.stderr)
        yield


@contextlib.contextmanager
def ctrl_c_exits_130(parser):
    """Ctrl-C within the block exits with status 130 and one line. Python's own SIGINT handler raises
    KeyboardInterrupt, but one raised inside TensorFlow's C++ (tracing a function) comes out as another
    error; so the handler here also notes the signal, and any error after it counts as the interrupt."""
    seen = []

    def interrupt(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    except Exception:
        if seen:
            parser.exit(130, f"{PROG}: interrupted\n")
        raise
    except KeyboardInterrupt:
        parser.exit(130, f"{PROG}: interrupted\n")
    finally:
        if signal.getsignal(signal.SIGINT) is interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)


@one_line_warnings()
def main(argv=None):
    """Runs the command line on `argv` (default: `sys.argv[1:]`). Exit status: 0 done, 1 an image not
    written where asked, 2 bad arguments (nothing written), 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with ctrl_c_exits_130(parser):
        try:
            check_arguments(args)
            sd = load(args)
            if args.checkpoint is None:
                print(DEMO_NOTICE, file=sys.stderr)
            images, settings = generate(sd, args)
        except (OSError, ValueError) as error:
            parser.error(in_flag_names(error))
        failures = write_images(images, settings, args)
    if failures:
        parser.exit(1, "".join(f"{PROG}: error: {failure}\n" for failure in failures))


if __name__ == "__main__":
    main()
