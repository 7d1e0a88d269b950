"""Does XLA pay off? First-image and steady per-image time of `text_to_image` with `jit_compile` on
and off, and what a new batch size or prompt length costs (a retrace, an XLA compilation) in each.

Each setting runs in a fresh process (one-time costs such as TensorFlow's start-up count once), the
two settings one after the other, twice in the order off, on, off, on; the medians go to
benchmarks/RESULTS.md with the machine.

    python -m benchmarks.xla                                  # the demo model, 20 steps
    python -m benchmarks.xla --config sd-1.5 --size 256 --steps 5 --repeats 1
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

from benchmarks.results import append_entry

PROMPT = "a large red circle on a white background"
LONG_PROMPT = ", ".join([PROMPT] * 12)  # over 77 tokens: encoded in two chunks with long_prompts
ROWS = (("load", "load (from_checkpoint / constructor)"), ("first", "first image, batch 1"),
        ("steady", "next images, batch 1 (median)"), ("batch2_first", "first call at batch 2"),
        ("batch2", "next calls at batch 2"), ("batch3_first", "first call at batch 3"),
        ("long_first", "first call with a 2-chunk prompt"))


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(config, size, steps, jit_compile, repeats):
    """The seconds of each row of ROWS in this process."""
    from stable_diffusion import StableDiffusion
    start = time.perf_counter()
    if config == "demo":
        sd = StableDiffusion.from_checkpoint(jit_compile=jit_compile)
    else:
        sd = StableDiffusion(size, size, jit_compile=jit_compile)
    seconds = dict(load=time.perf_counter() - start)
    run = lambda prompt=PROMPT, **kw: timed(lambda: sd.text_to_image(prompt, num_steps=steps, seed=0, verbose=False, **kw))
    seconds["first"] = run()
    seconds["steady"] = statistics.median(run() for _ in range(repeats))
    seconds["batch2_first"] = run(batch_size=2)
    seconds["batch2"] = statistics.median(run(batch_size=2) for _ in range(repeats))
    seconds["batch3_first"] = run(batch_size=3)
    seconds["long_first"] = run(LONG_PROMPT, long_prompts=True)
    return seconds


def machine():
    """The CPU, its vector extensions, cores, load, Keras and backend."""
    import keras
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    simd = " ".join(flag for flag in flags if flag.startswith(("avx", "amx", "fma")))
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores ({simd}), load average {os.getloadavg()[0]:.1f} at the "
            f"start; Keras {keras.__version__}, backend {keras.backend.backend()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", choices=["demo", "sd-1.5"],
                        help="the shipped demo model, or full-size SD 1.5 with random weights")
    parser.add_argument("--size", type=int, default=256, help="pixels (sd-1.5 only)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="calls per steady figure")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per setting")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.config, args.size, args.steps, args.child == "on", args.repeats)))
        return
    host = machine()
    runs = {"off": [], "on": []}
    for _ in range(args.rounds):
        for setting in runs:
            command = [sys.executable, "-m", "benchmarks.xla", "--child", setting, "--config", args.config,
                       "--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.splitlines()[-1]))
            print(setting, runs[setting][-1], flush=True)
    median = {setting: {key: statistics.median(run[key] for run in results) for key, _ in ROWS}
              for setting, results in runs.items()}
    model = "demo model (64x64)" if args.config == "demo" else f"sd-1.5 random weights, {args.size}x{args.size}"
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    lines = [f"### {model}, {args.steps} ddim steps, {backend} — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Machine: {host}. Command: `python -m benchmarks.xla {' '.join(argv if argv is not None else sys.argv[1:])}`. "
             f"Medians over {args.rounds} fresh processes per setting (order off, on, off, on); steady figures "
             f"are medians of {args.repeats} calls.", "",
             "| seconds | XLA off | XLA on | on / off |", "|---|---|---|---|"]
    for key, label in ROWS:
        off, on = median["off"][key], median["on"][key]
        lines.append(f"| {label} | {off:.2f} | {on:.2f} | {on / off:.2f} |")
    entry = "\n".join(lines)
    print(entry)
    if not args.no_record:
        append_entry("## XLA or not (`benchmarks/xla.py`)", entry)


if __name__ == "__main__":
    main()
