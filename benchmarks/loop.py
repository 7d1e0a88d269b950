"""The denoising loop step by step (one compiled step per call, the numpy sampler on the host) against one
compiled program (`stable_diffusion/compiled_loop.py`): seconds per step of `denoise` on one pipeline with
XLA, in one process, the two loops alternating after a first call of each (which compiles); min and median of
the rounds go to benchmarks/RESULTS.md with the machine.

    KERAS_BACKEND=jax python -m benchmarks.loop                  # the demo model, 20 DDIM steps, batch 1
    python -m benchmarks.loop --scheduler dpmpp_2m --rounds 9     # TensorFlow: jit_compile=True
"""
import argparse
import statistics
import time
from datetime import datetime, timezone

from benchmarks.results import append_entry
from benchmarks.xla import PROMPT, machine

HEADING = "## One compiled loop or step by step (`benchmarks/loop.py`)"


def seconds_per_step(sd, compiled, steps, scheduler, batch_size):
    """Seconds per step of one `sd.denoise` call, with the compiled loop or step by step."""
    loop = sd.denoise_loop
    sd.denoise_loop = loop if compiled else None
    setup = sd._prepare(PROMPT, negative_prompt=None, batch_size=batch_size, num_steps=steps, seed=0,
                        diffusion_noise=None, scheduler=scheduler, long_prompts=False, clip_skip=None,
                        prompt_weighting=False)
    start = time.perf_counter()
    sd.denoise(setup.noise * setup.sampler.init_noise_sigma, setup, guidance=7.5, verbose=False)
    seconds = (time.perf_counter() - start) / len(setup.sampler.timesteps)
    sd.denoise_loop = loop
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7, help="timed calls of each loop, alternating")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    from stable_diffusion import StableDiffusion

    host = machine()
    sd = StableDiffusion.from_checkpoint(jit_compile=True)  # the demo model
    measure = lambda compiled: seconds_per_step(sd, compiled, args.steps, args.scheduler, args.batch_size)
    first = {compiled: measure(compiled) * args.steps for compiled in (False, True)}  # compiles
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for compiled in (False, True):
            times[compiled].append(measure(compiled))
    rows = [f"| {name} | {first[compiled]:.1f} s | {min(times[compiled]) * 1e3:.2f} ms | "
            f"{statistics.median(times[compiled]) * 1e3:.2f} ms | {1 / min(times[compiled]):.0f} |"
            for name, compiled in (("step by step (numpy sampler)", False), ("one compiled program", True))]
    ratio = min(times[True]) / min(times[False])
    entry = "\n".join([
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: demo model, {args.steps} {args.scheduler} steps, "
        f"batch {args.batch_size}, {args.rounds} rounds",
        "", host, "",
        "| loop | first call (compiling) | per step, min | per step, median | steps/s (min) |",
        "|---|---|---|---|---|", *rows, "",
        f"One program / step by step, per step (min): {ratio:.2f}x."])
    print(entry)
    if not args.no_record:
        append_entry(HEADING, entry)


if __name__ == "__main__":
    main()
