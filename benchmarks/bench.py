"""Speed and memory of our pipeline vs diffusers (and OpenVINO) on the same random weights, in one process.

Builds a random-weight diffusers pipeline (`--config sd-1.5 | sd-2.1 | sdxl-base | tiny | tiny-sdxl`), saves it
(SDXL base in float16: 6.9 GB, created in float16), loads it into diffusers and into ours through our converter,
timing each load once and the resident memory it adds (at its peak and after), then times each part interleaved
(ours, diffusers, ours, ...) after a first call of each, and reports the minimum and median of each runtime and the
ratio of minima against diffusers. The UNet part (one guided step: batch 2; SDXL's with pooled text embeddings and
time ids) also times ours in int8 (`--int8`: the pipeline loaded with `quantize="int8"`) and, on CPU, OpenVINO running
diffusers' UNet converted with `openvino.convert_model`, in float32 (not SDXL's); for SD 1.5 at 256x256 (32x32
latents) it gives GFLOP/s at the 0.34 TFLOP of one call. The first call of ours (compilation) is reported separately.
Appends the table to benchmarks/RESULTS.md with the CPU model, its flags and the load average. On CPU, the peak
resident memory reported is the process' once the pipeline was made (making it, in the same run, is not counted).

    python benchmarks/bench.py --config sd-1.5 --size 256 --steps 10
    python benchmarks/bench.py --backend openvino --config sd-1.5 --int8 --parts unet text_to_image --steps 3
    python benchmarks/bench.py --backend jax --config tiny
    python -m benchmarks.bench --config sdxl-base --size 1024 --parts unet --dtype-policy bfloat16 \
        --reference-dtype bfloat16 --no-xla --folder /tmp/sdxl-random
    python benchmarks/bench.py --backend jax --config sd-1.5 --size 512 --device cuda \
        --dtype-policy mixed_float16 --reference-dtype float16 --folder /tmp/sd15-random

`--backend` sets KERAS_BACKEND before Keras is imported. On a GPU, ours runs wherever Keras' backend
puts it (JAX: the GPU) and diffusers on `--device`; each diffusers call ends with
`torch.cuda.synchronize()`, ours returns NumPy, so both are timed to completion.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.memory import ResidentMemory  # after the path set-up; these import no Keras
from benchmarks.results import append_entry, cpu

BACKENDS = ("tensorflow", "jax", "torch", "openvino")
PARTS = ("unet", "text_encoder", "vae", "text_to_image")
CONFIGS = ("tiny", "tiny-sdxl", "sd-1.5", "sd-2.1", "sdxl-base")
UNET_GFLOP = {("sd-1.5", 256): 340}  # one UNet call at batch 2, by config and image size (issue 18)
REFERENCE = "diffusers"


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name, runtimes, repeats, per=1):
    """Times the callables `runtimes` ({runtime: fn}, ours first) interleaved: one first call each, then
    `repeats` rounds of one call each. One row per runtime: seconds (divided by `per`) of the first call,
    minimum and median, and the ratio of the minimum to `REFERENCE`'s."""
    first = {runtime: timed(fn) / per for runtime, fn in runtimes.items()}
    times = {runtime: [] for runtime in runtimes}
    for _ in range(repeats):
        for runtime, fn in runtimes.items():
            times[runtime].append(timed(fn) / per)
    rows = [dict(part=name, runtime=runtime, first_call=first[runtime], min=min(seconds),
                 median=statistics.median(seconds)) for runtime, seconds in times.items()]
    for row in rows:
        row["ratio"] = row["min"] / min(times[REFERENCE])
        print(f"{name:36s} {row['runtime']:28s} min {row['min']:8.3f} s  median {row['median']:8.3f} s  "
              f"vs {REFERENCE} {row['ratio']:5.2f}  first call {row['first_call']:.1f} s", flush=True)
    return rows


def machine(load):
    """The machine and software, with the load average `load` at the start and the one now."""
    import keras

    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (f"{gpu}{cpu()}, {os.cpu_count()} cores, load average {load:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end, "
            f"Python {platform.python_version()}, torch {torch.__version__}, keras {keras.__version__}")


def reference_folder(args):
    """The folder of the random-weight diffusers pipeline of `args.config`: `args.folder` where it holds one, else
    made and saved there (or in a new temporary folder)."""
    from reference import make_full_size_pipeline, make_full_size_sdxl_pipeline, make_pipeline, make_sdxl_pipeline

    folder = Path(args.folder or tempfile.mkdtemp())
    if not (folder / "model_index.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        makers = {"tiny": lambda: make_pipeline("sd1", folder), "tiny-sdxl": lambda: make_sdxl_pipeline(folder),
                  "sdxl-base": lambda: make_full_size_sdxl_pipeline(folder)}
        makers.get(args.config, lambda: make_full_size_pipeline(args.config, folder))()
    return folder


def loaded(load, memory):
    """(what `load()` returns, {seconds, peak_gb, after_gb}): its time and the resident memory it added, at the
    peak while loading (sampled by `memory`, a `ResidentMemory`) and once loaded."""
    memory.reset()
    before, start = ResidentMemory.now(), time.perf_counter()
    result = load()
    seconds, after = time.perf_counter() - start, ResidentMemory.now()
    return result, dict(seconds=seconds, peak_gb=max(memory.peak, after) - before, after_gb=after - before)


def reference_pipeline(folder, args):
    """The diffusers pipeline saved in `folder`, in `args.reference_dtype` on `args.device`, running DDIM as ours."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, args.reference_dtype))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.to(args.device)


def openvino_unet(unet, inputs):
    """A call of diffusers' `unet` converted with `openvino.convert_model` (on the torch `inputs`) and
    compiled for the CPU in float32 (the CPU plugin otherwise computes in bfloat16 where the CPU has it)."""
    import openvino

    class Traced(torch.nn.Module):  # a tensor out, not diffusers' output class
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, *args):
            return self.unet(*args, return_dict=False)[0]

    with torch.no_grad():
        model = openvino.convert_model(Traced(), example_input=inputs)
    compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    arrays = [x.numpy() for x in inputs]
    return lambda: compiled(arrays)


def peak_memory(args, memory):
    """Peak memory: on CPU, the process' resident memory since the pipeline was made (sampled by `memory`, a
    `ResidentMemory`); on a GPU, what each side held on the device."""
    import keras

    if args.device == "cpu":
        return f"peak RSS of the process once the pipeline was made (every runtime loaded): {memory.peak:.2f} GiB"
    ours = "not reported by this backend"
    if keras.backend.backend() == "jax":
        import jax

        ours = f"{jax.devices()[0].memory_stats().get('peak_bytes_in_use', float('nan')) / 2**30:.2f} GB"
    return f"peak GPU memory: ours {ours}, diffusers {torch.cuda.max_memory_allocated() / 2**30:.2f} GB"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default=os.environ.get("KERAS_BACKEND", "tensorflow"),
                        help="Keras backend of ours (sets KERAS_BACKEND; default: KERAS_BACKEND or tensorflow)")
    parser.add_argument("--config", default="tiny", choices=CONFIGS)
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of the full pipeline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to time")
    parser.add_argument("--int8", action="store_true", help='also ours loaded with quantize="int8"')
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
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    load = os.getloadavg()[0]
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported, here and below
    import keras
    from reference import nchw
    from stable_diffusion import StableDiffusion

    if keras.backend.backend() != args.backend:
        sys.exit(f"--backend {args.backend}: Keras was imported before the flag was read")
    torch.set_num_threads(os.cpu_count())
    if args.strict_float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        if args.backend == "jax":
            import jax

            jax.config.update("jax_default_matmul_precision", "highest")

    folder = reference_folder(args)
    resident, loads = dict(run=ResidentMemory(), load=ResidentMemory()), {}  # from here on; of each load
    options = dict(img_height=args.size, img_width=args.size, jit_compile=not args.no_xla, dtype=args.dtype_policy,
                   scheduler="ddim")  # as the reference's
    pipe, loads[REFERENCE] = loaded(lambda: reference_pipeline(folder, args), resident["load"])
    sd, loads["ours"] = loaded(lambda: StableDiffusion.from_checkpoint(folder, **options), resident["load"])
    ours = {"ours": sd}
    if args.int8:
        ours["ours int8"] = StableDiffusion.from_checkpoint(folder, quantize="int8", **options)
    for name, m in loads.items():
        print(f"load {name:31s} {m['seconds']:8.1f} s  resident memory added: {m['peak_gb']:.2f} GiB at the peak, "
              f"{m['after_gb']:.2f} GiB after", flush=True)
    for model in ours.values():  # the UNet timed alone compiles as the pipeline's denoising step does
        model.diffusion_model.compile(jit_compile=model.denoise_step.jit_compile)

    def to_torch(array, dtype=None):
        return torch.as_tensor(array).to(args.device, dtype or getattr(torch, args.reference_dtype))

    def synchronized(fn):
        return (lambda: (fn(), torch.cuda.synchronize())) if args.device == "cuda" else fn

    latent = args.size // 8
    rng = np.random.default_rng(0)
    rows = []
    with torch.no_grad():
        if "unet" in args.parts:
            inputs = unet_inputs(sd.diffusion_model, args.size, rng)
            torch_args, torch_kwargs = reference_unet_arguments(inputs, to_torch)
            runtimes = {name: (lambda model=model.diffusion_model: model.predict_on_batch(inputs))
                        for name, model in ours.items()}
            runtimes[REFERENCE] = synchronized(lambda: pipe.unet(*torch_args, **torch_kwargs))
            if args.device == "cpu" and args.reference_dtype == "float32" and not torch_kwargs:  # not SDXL's UNet
                runtimes["OpenVINO (diffusers' UNet)"] = openvino_unet(pipe.unet, torch_args)
            rows += compare("UNet call, batch 2", runtimes, args.repeats)
        if "text_encoder" in args.parts:
            ids = sd.tokenize(["a photograph of an astronaut riding a horse"] * 2)
            rows += compare("text encoder, batch 2", {"ours": lambda: sd.text_encoder.predict_on_batch(ids),
                            REFERENCE: synchronized(lambda: pipe.text_encoder(to_torch(ids, torch.long)))},
                            args.repeats)
        latents = rng.standard_normal((1, latent, latent, 4), dtype=np.float32)
        if "vae" in args.parts:
            scale = pipe.vae.config.scaling_factor
            rows += compare("VAE decode, batch 1", {"ours": lambda: sd.decoder.predict_on_batch(latents),
                            REFERENCE: synchronized(lambda: pipe.vae.decode(to_torch(nchw(latents)) / scale))},
                            args.repeats)
    if "text_to_image" in args.parts:
        pipe.set_progress_bar_config(disable=True)
        runtimes = {name: (lambda model=model: model.text_to_image("an astronaut", num_steps=args.steps,
                                                                     diffusion_noise=latents, verbose=False))
                    for name, model in ours.items()}
        runtimes[REFERENCE] = lambda: pipe("an astronaut", num_inference_steps=args.steps, height=args.size,
                                           width=args.size, latents=to_torch(nchw(latents)), output_type="np")
        rows += compare(f"text_to_image, {args.steps} steps, per step", runtimes, max(1, args.repeats - 1),
                        per=args.steps)
    memory = peak_memory(args, resident["run"])
    print(memory)
    if not args.no_record:
        record(args, rows, memory, load, loads)


def unet_inputs(unet, size, rng):
    """Random inputs of one guided call (batch 2) of our `unet` at `size` pixels: latents, timesteps, context and,
    for SDXL, pooled text embeddings and the time ids of a `size` image (original and target size, crop (0, 0))."""
    latent = size // 8
    inputs = [rng.standard_normal((2, latent, latent, 4), dtype=np.float32), np.full((2,), 500.0, dtype=np.float32),
              rng.standard_normal((2, 77, unet.inputs[2].shape[-1]), dtype=np.float32)]
    if len(unet.inputs) > 3:
        ids = [size, size, 0, 0, size, size][:unet.inputs[4].shape[-1]]
        inputs += [rng.standard_normal((2, unet.inputs[3].shape[-1]), dtype=np.float32),
                   np.tile(np.float32(ids), (2, 1))]
    return inputs


def reference_unet_arguments(inputs, to_torch):
    """(args, kwargs) of diffusers' UNet2DConditionModel for our UNet's `inputs` (`unet_inputs`), each array made a
    torch tensor by `to_torch`: sample (NCHW), timestep, encoder_hidden_states and SDXL's added_cond_kwargs."""
    from reference import nchw  # imports Keras: here, once main has set the backend

    args = (to_torch(nchw(inputs[0])), *map(to_torch, inputs[1:3]))
    added = dict(zip(("text_embeds", "time_ids"), map(to_torch, inputs[3:])))
    return args, dict(added_cond_kwargs=added) if added else {}


def record(args, rows, memory, load, loads):
    gflop = UNET_GFLOP.get((args.config, args.size))
    diffusers_side = args.device != "cpu" or args.reference_dtype != "float32"
    lines = [f"\n### {args.config}, {args.size}x{args.size}, backend {args.backend}"
             f"{', ' + args.dtype_policy if args.dtype_policy else ', float32'}{', XLA off' if args.no_xla else ''}"
             f"{f', diffusers {args.reference_dtype} on {args.device}' if diffusers_side else ''}"
             f"{', TF32 off' if args.strict_float32 else ''}"
             f" — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n",
             f"Machine: {machine(load)}. Minimum and median of {args.repeats} interleaved runs after a "
             f"first call each (text_to_image: {max(1, args.repeats - 1)}); ratio = minimum / diffusers' minimum "
             f"({args.reference_dtype}, torch {args.device}); {memory}. Loading, once each, diffusers first: "
             + "; ".join(f"{name} {m['seconds']:.1f} s, resident memory +{m['peak_gb']:.2f} GiB at the peak, "
                         f"+{m['after_gb']:.2f} GiB after" for name, m in loads.items()) + ".\n",
             "| part | runtime | min (s) | median (s) | vs diffusers | GFLOP/s | first call (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gflops = f"{gflop / r['min']:.0f}" if gflop and r["part"].startswith("UNet") else "-"
        lines.append(f"| {r['part']} | {r['runtime']} | {r['min']:.3f} | {r['median']:.3f} | {r['ratio']:.2f} | "
                     f"{gflops} | {r['first_call']:.1f} |")
    append_entry("## Speed against diffusers (`benchmarks/bench.py`)", "\n".join(lines))


if __name__ == "__main__":
    main()
