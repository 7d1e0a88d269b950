"""Time to the first image of a new process, with an empty cache of compiled models and again with the cache
the first process left (`stable_diffusion/runtime.py`), per backend, on the shipped demo model.

    python -m benchmarks.first_image [--backends openvino jax tensorflow] [--repeats 3] [--steps 50]

Each run is a new Python process that imports the package, loads `StableDiffusion.from_checkpoint()` (the demo
model, 64x64; XLA on where the backend has it) and makes one image (`steps` steps, seed 0). The time runs from
starting the process to having the image; the process also reports its CPU time (user + system, all its threads;
less dependent than the wall time on other jobs sharing the machine) and its import / load / first-image split.
Per repeat and backend: a new cache folder, a first process, then a second one; backends interleaved; medians.
Appends an entry to benchmarks/RESULTS.md with the CPU and its vector flags.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.results import append_entry

SECTION = "## Time to the first image of a new process (demo model, caches of compiled models)"
CHILD = """
import json, resource, sys, time
started = float(sys.argv[1])
imported = time.time()
from stable_diffusion import StableDiffusion
loading = time.time()
sd = StableDiffusion.from_checkpoint()
generating = time.time()
sd.text_to_image("a large red circle on a white background", num_steps=int(sys.argv[2]), seed=0, verbose=False)
done = time.time()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(total=done - started, cpu=usage.ru_utime + usage.ru_stime, start=imported - started,
                      imports=loading - imported, load=generating - loading, first_image=done - generating)))
"""


def run(backend, cache, steps):
    """The child's figures (seconds) for one process on `backend` with the cache folder `cache`."""
    env = dict(os.environ, KERAS_BACKEND=backend, KERAS_SD_CACHE=cache, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", CHILD, repr(time.time()), str(steps)], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu():
    """The CPU's model name and its vector-extension flags, from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as info:
        lines = info.read().splitlines()
    model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    return model, " ".join(flag for flag in flags if flag.startswith(("avx", "amx", "fma", "f16c")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["openvino", "jax", "tensorflow"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    runs = {(backend, which): [] for backend in args.backends for which in ("first", "second")}
    for repeat in range(args.repeats):
        for backend in args.backends:
            with tempfile.TemporaryDirectory() as cache:
                for which in ("first", "second"):
                    runs[backend, which].append(run(backend, cache, args.steps))
                    print(backend, which, repeat, runs[backend, which][-1], flush=True)
    median = lambda backend, which, key: statistics.median(r[key] for r in runs[backend, which])
    rows = [f"| {backend} | {which} process | {median(backend, which, 'total'):.1f} | "
            f"{median(backend, which, 'cpu'):.1f} | "
            + " | ".join(f"{median(backend, which, key):.2f}" for key in ("start", "imports", "load", "first_image"))
            + " |" for backend in args.backends for which in ("first", "second")]
    model, flags = cpu()
    import keras
    import openvino

    entry = "\n".join([
        f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- Command: `python -m benchmarks.first_image --backends {' '.join(args.backends)} --repeats "
        f"{args.repeats} --steps {args.steps}`",
        f"- Machine: {model}, {os.cpu_count()} cores (load average {load:.1f} at the start), "
        f"flags: {flags}; Python {platform.python_version()}, Keras {keras.__version__}, "
        f"OpenVINO {openvino.__version__.split('-')[0]}",
        f"- The demo model at 64x64, {args.steps} steps; each process new; the second reads the cache the first "
        f"wrote (OpenVINO's model cache, JAX's persistent compilation cache; TensorFlow has none: it compiles "
        f"again). Medians of {args.repeats}, backends interleaved. Seconds.",
        "",
        "| backend | run | start to image | CPU time | interpreter start | imports | load | first image |",
        "|---|---|---|---|---|---|---|---|",
        *rows])
    append_entry(SECTION, entry)
    print(entry)


if __name__ == "__main__":
    main()
