"""Prompt adherence of a checkpoint on the synthetic shapes grammar of `stable_diffusion/data.py`.

Generates N images for random grammar prompts (fixed seeds), reads colour, shape, background and
size back from the pixels with `stable_diffusion.adherence`, times one image, prints a table and
appends it, with the date, machine and settings, to `benchmarks/RESULTS.md`.

    python -m benchmarks.adherence                      # the built-in demo model, 100 images
    python -m benchmarks.adherence --checkpoint PATH --num-images 20 --steps 20
"""
import argparse
import importlib
import inspect
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np

from benchmarks.results import RESULTS, append_entry
from stable_diffusion import StableDiffusion
from stable_diffusion.adherence import score
from stable_diffusion.data import random_caption
from stable_diffusion.schedulers import SCHEDULERS

# The targets for the shipped demo model at its default settings.
TARGETS = dict(color=0.95, shape=0.85, background=0.95, size=0.85)
COLUMNS = ("color", "shape", "background", "size", "all")
DEFAULTS = inspect.signature(StableDiffusion.text_to_image).parameters


def prompts(num_images, seed):
    """`num_images` grammar captions drawn with `numpy.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return [random_caption(rng)[0] for _ in range(num_images)]


def generate(sd, captions, batch_size, seed, **settings):
    """Images (N, H, W, 3) for the captions, image k seeded with `seed + k` (the pipeline seeds image i
    of a call with its seed + i); the last batch is padded to full size, for one batch shape."""
    padded = captions + captions[-1:] * (-len(captions) % batch_size)
    progress = keras.utils.Progbar(len(padded), unit_name="image")
    images = []
    for start in range(0, len(padded), batch_size):
        images.append(sd.text_to_image(padded[start:start + batch_size], seed=seed + start, verbose=False,
                                       **settings))
        progress.add(batch_size)
    return np.concatenate(images)[:len(captions)]


def time_one_image(sd, caption, seed, repeats=3, **settings):
    """Median seconds of `repeats` single-image calls; call once before, to leave out one-time costs."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        sd.text_to_image(caption, seed=seed, verbose=False, **settings)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def machine():
    """One line: OS, CPU model, usable cores and their load, Keras backend and versions."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = models[0] if models else platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f" (load average {os.getloadavg()[0]:.1f} at the start)" if hasattr(os, "getloadavg") else ""
    backend = keras.backend.backend()
    return (f"{platform.system()} {platform.machine()}, {cpu}, {cores} CPU cores{load}; Python "
            f"{platform.python_version()}, Keras {keras.__version__} "
            f"({backend} {importlib.import_module(backend).__version__})")


def table(scores, seconds, load_seconds, is_demo):
    """A markdown table of the accuracies and timings, with the targets for the demo model."""
    percent = lambda value: "-" if value is None else f"{100 * value:.0f}%"
    rows = [["", "colour", "shape", "background", "size", "all", "one image", "load + first image"],
            ["---"] * 8,
            ["measured", *(percent(scores[c]) for c in COLUMNS), f"{seconds:.2f} s", f"{load_seconds:.1f} s"]]
    if is_demo:
        rows.append(["target", *(f"≥ {percent(TARGETS[c])}" if c in TARGETS else "" for c in COLUMNS),
                     "≤ 3 s", ""])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="default: the built-in demo model")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=DEFAULTS["num_steps"].default)
    parser.add_argument("--guidance", type=float, default=DEFAULTS["unconditional_guidance_scale"].default)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=10, help="images per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and the noise")
    parser.add_argument("--xla", action="store_true", help="compile with XLA, as the CLI's --xla")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    args = parser.parse_args(argv)
    if min(args.num_images, args.steps, args.batch_size) < 1:
        parser.error("--num-images, --steps and --batch-size must be at least 1.")
    args.batch_size = min(args.batch_size, args.num_images)
    settings = dict(num_steps=args.steps, unconditional_guidance_scale=args.guidance, scheduler=args.scheduler)

    host = machine()  # before the run, so the load average is the other jobs'
    start = time.perf_counter()
    sd = StableDiffusion.from_checkpoint(args.checkpoint, jit_compile=args.xla)
    captions = prompts(args.num_images, args.seed)
    sd.text_to_image(captions[0], seed=args.seed, verbose=False, **settings)
    load_seconds = time.perf_counter() - start
    seconds = time_one_image(sd, captions[0], args.seed, **settings)
    scores = score(generate(sd, captions, args.batch_size, args.seed, **settings), captions)

    model = "assets/demo" if args.checkpoint is None else args.checkpoint
    command = shlex.join(["python", "-m", "benchmarks.adherence", *(sys.argv[1:] if argv is None else argv)])
    entry = "\n".join([
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {model}, {args.num_images} prompts",
        "",
        f"- Command: `{command}`",
        f"- Settings: {sd.img_width}x{sd.img_height}, {args.steps} steps, guidance {args.guidance}, "
        f"{args.scheduler or sd.scheduler_name} sampler, prompts from `data.random_caption` with seed {args.seed}, image k "
        f"seeded with {args.seed} + k, batches of {args.batch_size}; size accuracy over the prompts naming one.",
        f"- Machine: {host}",
        f"- One image: median of 3 warm single-image calls. XLA {'on' if args.xla else 'off'} (--xla; off is "
        f"the CLI's default), so load + first image {'includes' if args.xla else 'has no'} XLA compilation.",
        "",
        table(scores, seconds, load_seconds, args.checkpoint is None),
    ])
    print(entry)
    append_entry(f"## Prompt adherence ({'demo model' if args.checkpoint is None else model})", entry,
                 args.results)
    print(f"Appended to {args.results}")


if __name__ == "__main__":
    main()
