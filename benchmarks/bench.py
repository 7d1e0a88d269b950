"""Speed and memory of our pipeline vs diffusers on the same random weights, in one process.

Builds a random-weight diffusers pipeline (`--config sd-1.5 | sd-2.1 | tiny`), saves it, loads it
into ours through our converter, then times each part interleaved (ours, theirs, ours, ...) after a
warm-up and reports medians and ratios ours / diffusers. The first call of ours (XLA compilation)
is reported separately. Appends the table to benchmarks/RESULTS.md.

    python benchmarks/bench.py --config sd-1.5 --size 256 --steps 10
    KERAS_BACKEND=jax python benchmarks/bench.py --config tiny
    KERAS_BACKEND=jax python benchmarks/bench.py --config sd-1.5 --size 512 --device cuda \
        --dtype-policy mixed_float16 --reference-dtype float16 --folder /tmp/sd15-random

On a GPU, ours runs wherever Keras' backend puts it (JAX: the GPU) and diffusers on `--device`;
each diffusers call ends with `torch.cuda.synchronize()`, ours returns NumPy, so both are timed to
completion.
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
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from reference import make_full_size_pipeline, make_pipeline, nchw  # noqa: E402
from benchmarks.results import append_entry  # noqa: E402
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
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (f"{gpu}{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"keras {keras.__version__}")


def reference_pipeline(args):
    """The random-weight diffusers pipeline: made and saved to `args.folder`, or loaded from it."""
    folder = Path(args.folder or tempfile.mkdtemp())
    if not (folder / "model_index.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        if args.config == "tiny":
            make_pipeline("sd1", folder)
        else:
            make_full_size_pipeline(args.config, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, args.reference_dtype))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as ours
    return folder, pipe.to(args.device)


def peak_memory(args):
    """Peak memory: the process' RSS on CPU; on a GPU, what each side held on the device."""
    if args.device == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return f"peak RSS of the process (both pipelines loaded): {rss:.2f} GB"
    ours = "not reported by this backend"
    if keras.backend.backend() == "jax":
        import jax

        ours = f"{jax.devices()[0].memory_stats().get('peak_bytes_in_use', float('nan')) / 2**30:.2f} GB"
    return f"peak GPU memory: ours {ours}, diffusers {torch.cuda.max_memory_allocated() / 2**30:.2f} GB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=["tiny", "sd-1.5", "sd-2.1"])
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the full pipeline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype-policy", default=None, help="e.g. mixed_bfloat16 (ours only)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where diffusers runs")
    parser.add_argument("--reference-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="diffusers' dtype")
    parser.add_argument("--folder", help="save the random pipeline here, or reuse the one saved here")
    parser.add_argument("--strict-float32", action="store_true", help="no TF32 on the GPU, either side (JAX "
                        "multiplies float32 in TF32 by default there, torch convolves in TF32)")
    parser.add_argument("--no-xla", action="store_true", help="ours as TensorFlow graphs (oneDNN kernels) "
                        "instead of XLA")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    if args.strict_float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        if keras.backend.backend() == "jax":
            import jax

            jax.config.update("jax_default_matmul_precision", "highest")

    folder, pipe = reference_pipeline(args)
    sd = StableDiffusion.from_checkpoint(folder, img_height=args.size, img_width=args.size,
                                         jit_compile=not args.no_xla, dtype=args.dtype_policy)

    def to_torch(array, dtype=None):
        return torch.as_tensor(array).to(args.device, dtype or getattr(torch, args.reference_dtype))

    def synchronized(fn):
        return (lambda: (fn(), torch.cuda.synchronize())) if args.device == "cuda" else fn

    latent = args.size // 8
    rng = np.random.default_rng(0)
    context_dim = sd.diffusion_model.inputs[2].shape[-1]
    rows = []
    for batch in (1, 2):
        latents = rng.standard_normal((batch, latent, latent, 4), dtype=np.float32)
        context = rng.standard_normal((batch, 77, context_dim), dtype=np.float32)
        steps = np.full((batch,), 500.0, dtype=np.float32)
        torch_args = (to_torch(nchw(latents)), to_torch(steps), to_torch(context))
        with torch.no_grad():
            rows.append(compare(f"UNet step, batch {batch}",
                                lambda: sd.diffusion_model.predict_on_batch([latents, steps, context]),
                                synchronized(lambda: pipe.unet(*torch_args)), args.repeats))
    ids = sd.tokenize(["a photograph of an astronaut riding a horse"] * 2)
    latents = rng.standard_normal((1, latent, latent, 4), dtype=np.float32)
    with torch.no_grad():
        rows.append(compare("text encoder, batch 2", lambda: sd.text_encoder.predict_on_batch(ids),
                            synchronized(lambda: pipe.text_encoder(to_torch(ids, torch.long))), args.repeats))
        scale = pipe.vae.config.scaling_factor
        rows.append(compare("VAE decode, batch 1", lambda: sd.decoder.predict_on_batch(latents),
                            synchronized(lambda: pipe.vae.decode(to_torch(nchw(latents)) / scale)), args.repeats))
    pipe.set_progress_bar_config(disable=True)
    rows.append(compare(
        f"text_to_image, {args.steps} steps",
        lambda: sd.text_to_image("an astronaut", num_steps=args.steps, diffusion_noise=latents, verbose=False),
        lambda: pipe("an astronaut", num_inference_steps=args.steps, height=args.size, width=args.size,
                     latents=to_torch(nchw(latents)), output_type="np"),
        max(1, args.repeats - 1)))
    print(f"images per second, text_to_image batch 1: ours {1 / rows[-1]['ours']:.2f}, "
          f"diffusers {1 / rows[-1]['theirs']:.2f}")
    memory = peak_memory(args)
    print(memory)
    if not args.no_record:
        record(args, rows, memory)


def record(args, rows, memory):
    backend = keras.backend.backend()
    lines = [f"\n### {args.config}, {args.size}x{args.size}, backend {backend}"
             f"{', ' + args.dtype_policy if args.dtype_policy else ', float32'}{', XLA off' if args.no_xla else ''}"
             f"{'' if args.device == 'cpu' else f', diffusers {args.reference_dtype} on {args.device}'}"
             f"{', TF32 off' if args.strict_float32 else ''}"
             f" — {datetime.date.today()}\n",
             f"Machine: {machine()}. Medians of {args.repeats} interleaved runs; ratio = ours / diffusers "
             f"({args.reference_dtype}, torch {args.device}). Images per second (text_to_image, batch 1): "
             f"ours {1 / rows[-1]['ours']:.2f}, diffusers {1 / rows[-1]['theirs']:.2f}; {memory}.\n",
             "| part | ours (s) | diffusers (s) | ratio | first call of ours (s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['ours']:.3f} | {r['theirs']:.3f} | {r['ratio']:.2f} | {r['first_call']:.1f} |"
              for r in rows]
    append_entry("## Speed against diffusers (`benchmarks/bench.py`)", "\n".join(lines))


if __name__ == "__main__":
    main()
