"""Speed and memory of our pipeline vs diffusers on the same random weights, in one process.

Builds a random-weight diffusers pipeline (`--config sd-1.5 | sd-2.1 | tiny`), saves it, loads it
into ours through our converter, then times each part interleaved (ours, theirs, ours, ...) after a
warm-up and reports medians and ratios ours / diffusers. The first call of ours (XLA compilation)
is reported separately. Appends the table to benchmarks/RESULTS.md.

    python benchmarks/bench.py --config sd-1.5 --size 256 --steps 10
    KERAS_BACKEND=jax python benchmarks/bench.py --config tiny
"""
import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import keras  # noqa: E402  (after the path set-up)
from reference import make_full_size_pipeline, make_pipeline, nchw  # noqa: E402
from benchmarks.adherence import append_results  # noqa: E402
from stable_diffusion import StableDiffusion  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name, ours, theirs, repeats):
    """Median seconds of `ours` and `theirs`, interleaved, after one warm-up call each."""
    compile_time = timed(ours)
    timed(theirs)
    times = {"ours": [], "theirs": []}
    for _ in range(repeats):
        times["ours"].append(timed(ours))
        times["theirs"].append(timed(theirs))
    row = dict(name=name, ours=statistics.median(times["ours"]), theirs=statistics.median(times["theirs"]),
               first_call=compile_time)
    row["ratio"] = row["ours"] / row["theirs"]
    print(f"{name:32s} ours {row['ours']:8.3f} s  diffusers {row['theirs']:8.3f} s  "
          f"ratio {row['ratio']:5.2f}  (first call of ours {compile_time:.1f} s)", flush=True)
    return row


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, keras {keras.__version__}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=["tiny", "sd-1.5", "sd-2.1"])
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the full pipeline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype-policy", default=None, help="e.g. mixed_bfloat16 (ours only)")
    parser.add_argument("--no-xla", action="store_true", help="ours as TensorFlow graphs (oneDNN kernels) "
                        "instead of XLA")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    folder = Path(tempfile.mkdtemp())
    pipe = make_pipeline("sd1", folder) if args.config == "tiny" else make_full_size_pipeline(args.config, folder)
    if args.dtype_policy:
        keras.mixed_precision.set_global_policy(args.dtype_policy)
    sd = StableDiffusion.from_checkpoint(folder, img_height=args.size, img_width=args.size,
                                         jit_compile=not args.no_xla)
    latent = args.size // 8
    rng = np.random.default_rng(0)
    context_dim = sd.diffusion_model.inputs[2].shape[-1]
    rows = []
    for batch in (1, 2):
        latents = rng.standard_normal((batch, latent, latent, 4), dtype=np.float32)
        context = rng.standard_normal((batch, 77, context_dim), dtype=np.float32)
        steps = np.full((batch,), 500.0, dtype=np.float32)
        torch_args = (nchw(latents), torch.from_numpy(steps), torch.from_numpy(context))
        with torch.no_grad():
            rows.append(compare(f"UNet step, batch {batch}",
                                lambda: sd.diffusion_model.predict_on_batch([latents, steps, context]),
                                lambda: pipe.unet(*torch_args), args.repeats))
    ids = sd.tokenize(["a photograph of an astronaut riding a horse"] * 2)
    latents = rng.standard_normal((1, latent, latent, 4), dtype=np.float32)
    with torch.no_grad():
        rows.append(compare("text encoder, batch 2", lambda: sd.text_encoder.predict_on_batch(ids),
                            lambda: pipe.text_encoder(torch.from_numpy(ids).long()), args.repeats))
        rows.append(compare("VAE decode, batch 1", lambda: sd.decoder.predict_on_batch(latents),
                            lambda: pipe.vae.decode(nchw(latents) / 0.18215), args.repeats))
    pipe.set_progress_bar_config(disable=True)
    rows.append(compare(
        f"text_to_image, {args.steps} steps",
        lambda: sd.text_to_image("an astronaut", num_steps=args.steps, diffusion_noise=latents, verbose=False),
        lambda: pipe("an astronaut", num_inference_steps=args.steps, height=args.size, width=args.size,
                     latents=nchw(latents), output_type="np"),
        max(1, args.repeats - 1)))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of the process (both pipelines loaded): {peak_rss:.2f} GB")
    if not args.no_record:
        record(args, rows, peak_rss)


def record(args, rows, peak_rss):
    backend = keras.backend.backend()
    lines = [f"\n### {args.config}, {args.size}x{args.size}, backend {backend}"
             f"{', ' + args.dtype_policy if args.dtype_policy else ', float32'}{', XLA off' if args.no_xla else ''}"
             f" — {datetime.date.today()}\n",
             f"Machine: {machine()}. Medians of {args.repeats} interleaved runs; ratio = ours / diffusers "
             f"(float32, torch CPU). Peak RSS of the process with both pipelines: {peak_rss:.2f} GB.\n",
             "| part | ours (s) | diffusers (s) | ratio | first call of ours (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['ours']:.3f} | {r['theirs']:.3f} | {r['ratio']:.2f} | {r['first_call']:.1f} |"
              for r in rows]
    append_results(ROOT / "benchmarks" / "RESULTS.md", "## Speed against diffusers (`benchmarks/bench.py`)",
                   "\n".join(lines))


if __name__ == "__main__":
    main()
