"""Command line text-to-image: `python -m stable_diffusion "a red circle on a white background"`;
image-to-image with `--init-image PATH [--strength S]`, inpainting with `--init-image PATH --mask PATH`.

Argument parsing and PNG writing only; `StableDiffusion` does the work. Each PNG stores the prompt,
negative prompt, seed, steps, guidance, sampler, size and model as PNG text chunks (read them with
`PIL.Image.open(path).text`), so any image can be made again, alone (to within one pixel level): image i
of a batch has seed + i. Bad arguments end the program with one line on stderr and exit status 2, before
any file is written; warnings (e.g. the demo model's, for words outside its grammar) are one line each.
"""
import argparse
import contextlib
import inspect
import math
import secrets
import sys
import warnings
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .schedulers import SCHEDULERS
from .stable_diffusion import StableDiffusion

CHECKPOINTS = "a diffusers folder, an SD 1.x / 2.x .safetensors or .ckpt file, or a saved bundle"
DEMO_NOTICE = ("Using the built-in demo model: 64x64 images of one shape on a plain background, prompted "
               "like 'a large red circle on a white background'. For real images pass --checkpoint PATH: "
               f"{CHECKPOINTS}.")
PIPELINE_DEFAULTS = inspect.signature(StableDiffusion.text_to_image).parameters
PROG = "python -m stable_diffusion"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `prog: error: message (see --help)`."""

    def error(self, message):
        message = " ".join(str(message).split()).rstrip(".")
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, minimum, multiple=1):
    """An argparse type: a finite `kind` (int or float) >= `minimum`, a multiple of `multiple`."""
    what = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or value % multiple:
            multiple_of = f" and a multiple of {multiple}" if multiple != 1 else ""
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}{multiple_of}, got {text!r}")
        return value
    return parse


def build_parser():
    parser = Parser(prog=PROG, description="Generates images for a prompt and "
                    "writes them as PNGs with their settings as PNG text metadata.")
    parser.add_argument("prompt", help="what the image shows")
    parser.add_argument("-o", "--output", default="out.png", type=Path,
                        help="PNG file (default: %(default)s); with --batch-size B > 1: out-0.png, "
                        "out-1.png, ...")
    parser.add_argument("--negative-prompt", default="", help="what the image should not show")
    parser.add_argument("--steps", type=number(int, 1), default=PIPELINE_DEFAULTS["num_steps"].default,
                        help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance", type=number(float, 0),
                        default=PIPELINE_DEFAULTS["unconditional_guidance_scale"].default,
                        help="classifier-free guidance scale, 1 for none (default: %(default)s)")
    parser.add_argument("--seed", type=number(int, 0), help="noise seed; image i of a batch gets seed + i "
                        "(default: random, printed and stored in each PNG)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's)")
    parser.add_argument("--init-image", type=Path, help="start from this picture (image-to-image, "
                        "or inpainting with --mask); the image's size must be the model's or --height/--width")
    parser.add_argument("--mask", type=Path, help="inpaint the white part of this mask of --init-image")
    parser.add_argument("--strength", type=float, help="in (0, 1]: how far to noise --init-image "
                        "(default: 0.8; inpainting: 1)")
    parser.add_argument("--batch-size", type=number(int, 1), default=1, help="images (default: 1)")
    parser.add_argument("--height", type=number(int, 8, 8), help="pixels (default: the model's)")
    parser.add_argument("--width", type=number(int, 8, 8), help="pixels (default: the model's)")
    parser.add_argument("--checkpoint", type=Path,
                        help=f"{CHECKPOINTS} (default: the built-in demo model)")
    parser.add_argument("--xla", action="store_true", help="compile with XLA: a slower start, for faster "
                        "steps on large models and many images")
    parser.add_argument("--int8", action="store_true", help="int8 weights and activations in the UNet and text "
                        "encoder: less memory, faster on some CPUs, images close to float32 (see quantization.py)")
    parser.add_argument("--vae-tiling", type=int, metavar="PIXELS", help="decode images larger than this "
                        "in overlapping tiles of this size, to bound memory (e.g. 512; see enable_vae_tiling)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def output_paths(output, batch_size):
    """The PNG file of each image: `output` itself, or `stem-i.png` for a batch."""
    if batch_size == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(batch_size)]


def check_arguments(args):
    """The error message for arguments argparse accepts but cannot work, or None."""
    if not args.prompt.strip():
        return "the prompt is empty"
    if args.output.suffix.lower() != ".png":
        return f"--output must be a .png file, got {str(args.output)!r}"
    if not args.output.parent.is_dir():
        return f"the folder of --output {str(args.output)!r} does not exist"
    if args.checkpoint is not None and not args.checkpoint.exists():
        return f"no checkpoint at {str(args.checkpoint)!r}"
    if (args.mask or args.strength is not None) and args.init_image is None:
        return "--mask and --strength need --init-image"
    if args.strength is not None and not 0 < args.strength <= 1:
        return f"--strength must be in (0, 1], got {args.strength}"
    existing = [str(path) for path in output_paths(args.output, args.batch_size) if path.exists()]
    if existing and not args.overwrite:
        return f"{', '.join(existing)} exists; pass --overwrite to replace it"
    return None


@contextlib.contextmanager
def one_line_warnings():
    """Shows each warning as one line on stderr, `prog: warning: message`, within the block or function."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_: print(f"{PROG}: warning: {' '.join(str(message).split())}",
                                                         file=sys.stderr)
        yield


@one_line_warnings()
def main(argv=None):
    """Runs the command line on `argv` (default: `sys.argv[1:]`); bad arguments exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = check_arguments(args)
    if problem:
        parser.error(problem)
    try:
        sd = StableDiffusion.from_checkpoint(args.checkpoint, img_height=args.height, img_width=args.width,
                                             jit_compile=args.xla, quantize="int8" if args.int8 else None)
        if args.vae_tiling is not None:
            sd.enable_vae_tiling(args.vae_tiling)
    except FileNotFoundError as error:
        if args.checkpoint is None:
            parser.error(f"the built-in demo model is not installed ({str(error).rstrip('.')}); "
                         f"pass --checkpoint PATH: {CHECKPOINTS}")
        parser.error(error)
    except (OSError, ValueError) as error:
        parser.error(error)
    if args.checkpoint is None:
        print(DEMO_NOTICE, file=sys.stderr)
    seed = secrets.randbelow(2**32) if args.seed is None else args.seed
    scheduler = args.scheduler or sd.scheduler_name
    print(f"Seed {seed}; {args.steps} {scheduler} steps, guidance {args.guidance}, "
          f"{sd.img_width}x{sd.img_height}.")
    arguments = dict(negative_prompt=args.negative_prompt, batch_size=args.batch_size, num_steps=args.steps,
                     unconditional_guidance_scale=args.guidance, seed=seed, scheduler=scheduler)
    if args.strength is not None:
        arguments["strength"] = args.strength
    try:  # bad pictures (unreadable, wrong size) raise ValueError before any step runs
        if args.init_image is None:
            images = sd.text_to_image(args.prompt, **arguments)
        elif args.mask is None:
            images = sd.image_to_image(args.prompt, args.init_image, **arguments)
        else:
            images = sd.inpaint(args.prompt, args.init_image, args.mask, **arguments)
    except ValueError as error:
        parser.error(error)
    editing = dict(init_image=args.init_image, mask=args.mask, strength=args.strength)
    settings = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                    guidance=args.guidance, scheduler=scheduler, height=sd.img_height, width=sd.img_width,
                    model=str(args.checkpoint or "built-in demo") + (", int8" if args.int8 else ""),
                    **{key: value for key, value in editing.items() if value is not None})
    for index, (image, path) in enumerate(zip(images, output_paths(args.output, args.batch_size))):
        info = PngInfo()
        for key, value in {**settings, "seed": seed + index}.items():  # the pipeline seeds image i with seed + i
            info.add_text(key, str(value))
        try:
            with open(path, "wb" if args.overwrite else "xb") as file:
                Image.fromarray(image).save(file, format="PNG", pnginfo=info)
        except FileExistsError:
            parser.error(f"{path} appeared while generating; pass --overwrite to replace it")
        print(f"Wrote {path}")


if __name__ == "__main__":
    main()
