"""Peak memory of one full-size generation (ours only), for the ≤ 6 GB target at 512x512 in float32 and the
≤ 2.5 GB target in int8 (`--int8`: loaded with `quantize="int8"`).

    python -m benchmarks.memory [--checkpoint PATH] [--size 512] [--steps 2] [--no-xla] [--vae-tiling 512]
                                [--int8] [--memory-limit GB]

Loads a full-size checkpoint (default: the random-weight SD 1.5 bundle that `python -m
benchmarks.convert` leaves in /tmp/sd-convert-bench) and makes one image with guidance (UNet batch 2),
sampling the process' resident memory every 20 ms: after loading, and the peak while generating
(text encoder, denoising steps, VAE decode). More steps repeat the same step, so 2 are enough for the
peak. Appends a row to benchmarks/RESULTS.md.

`--memory-limit GB` runs it in a new memory cgroup of that size (root; cgroup v1 or v2), with the page
cache dropped first so that every page the run reads is charged to it: the test of fitting in a machine
of that size, where the kernel must evict pages of mapped files (a bundle's weights) to stay under it.
"""
import argparse
import datetime
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.results import append_table_row

SECTION = "## Peak memory of one generation (full size, float32, CPU)"
HEADER = ["| date | checkpoint | size | steps | XLA | backend | after load GiB | peak GiB | ru_maxrss GiB | seconds |",
          "|---|---|---|---|---|---|---|---|---|---|"]


class ResidentMemory:
    """Samples this process' resident memory (VmRSS) in a thread; `peak` is the largest since `reset`."""

    def __init__(self, interval=0.02):
        self.peak = 0.0
        self.interval = interval
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def now():
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
        return int(line.split()[1]) / 2**20

    def reset(self):
        self.peak = self.now()

    def _sample(self):
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)


def cgroup_with_limit(limit_bytes, name="sd-memory-benchmark"):
    """A new memory cgroup limited to `limit_bytes`, with the page cache dropped so that what a run
    reads is charged to it: (its folder, the file of its peak usage, a `preexec_fn` moving a child
    process into it). Needs root and a cgroup memory controller (v1 or v2); OSError otherwise."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        group, limit, peak = Path("/sys/fs/cgroup", name), "memory.max", "memory.peak"
    else:
        group, limit, peak = Path("/sys/fs/cgroup/memory", name), "memory.limit_in_bytes", "memory.max_usage_in_bytes"
    if group.exists():
        group.rmdir()
    group.mkdir()
    (group / limit).write_text(str(limit_bytes))
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
    return group, group / peak, lambda: (group / "cgroup.procs").write_text(str(os.getpid()))


def run_limited(args, argv):
    """Reruns this benchmark in a memory cgroup of `args.memory_limit` GB, the page cache dropped first;
    records a row for a run the limit killed (the run records its own otherwise)."""
    try:
        group, peak_file, enter = cgroup_with_limit(int(args.memory_limit * 1e9))
    except OSError as error:
        sys.exit(f"--memory-limit needs root and a cgroup memory controller: {error}")
    run = subprocess.run([sys.executable, "-m", "benchmarks.memory", *argv, "--inside-cgroup"], preexec_fn=enter)
    print(f"cgroup peak usage {int(peak_file.read_text()) / 1e9:.2f} GB (limit {args.memory_limit} GB)")
    if run.returncode:
        row = row_cells(args, "killed", "killed", "killed", "")
        print(f"the run ended with {run.returncode} (-9, 137: killed at the limit)\n{row}")
        if run.returncode in (-9, 137) and not args.no_record:
            append_table_row(SECTION, HEADER, row)
    group.rmdir()


def row_cells(args, after_load, peak, maxrss, seconds):
    import keras

    xla = "off" if args.no_xla else "on"
    if not args.no_xla and os.environ.get("XLA_FLAGS"):
        xla += f" (XLA_FLAGS={os.environ['XLA_FLAGS']})"
    size = f"{args.size}x{args.size}" + (f", VAE tiles of {args.vae_tiling}" if args.vae_tiling else "")
    checkpoint = (args.checkpoint.name + (", int8" if args.int8 else "")
                  + (f" (in a {args.memory_limit} GB cgroup)" if args.memory_limit else ""))
    return (f"| {datetime.date.today()} | {checkpoint} | {size} | {args.steps} | {xla} | "
            f"{keras.backend.backend()} | {after_load} | {peak} | {maxrss} | {seconds} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/sd-convert-bench/bundle-safetensors"))
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-xla", action="store_true", help="run eagerly instead of compiling with XLA")
    parser.add_argument("--vae-tiling", type=int, metavar="PIXELS",
                        help="decode in tiles of this size (`StableDiffusion.enable_vae_tiling`)")
    parser.add_argument("--int8", action="store_true", help='load the pipeline with quantize="int8"')
    parser.add_argument("--memory-limit", type=float, metavar="GB",
                        help="run in a memory cgroup of this many GB (10^9 bytes), page cache dropped first")
    parser.add_argument("--inside-cgroup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    if not args.checkpoint.exists():
        parser.error(f"{args.checkpoint} does not exist: run `python -m benchmarks.convert` first, or pass "
                     "--checkpoint PATH (any full-size checkpoint).")
    if args.memory_limit and not args.inside_cgroup:
        return run_limited(args, sys.argv[1:])
    from stable_diffusion import StableDiffusion  # here: a run in a cgroup loads TensorFlow inside it

    memory = ResidentMemory()
    sd = StableDiffusion.from_checkpoint(args.checkpoint, img_height=args.size, img_width=args.size,
                                         jit_compile=not args.no_xla, quantize="int8" if args.int8 else None)
    if args.vae_tiling:
        sd.enable_vae_tiling(args.vae_tiling)
    after_load = ResidentMemory.now()
    memory.reset()
    start = time.perf_counter()
    sd.text_to_image("a photograph of an astronaut riding a horse", num_steps=args.steps, seed=0)
    seconds = time.perf_counter() - start
    peak = max(memory.peak, ResidentMemory.now())
    row = row_cells(args, f"{after_load:.2f}", f"{peak:.2f}",
                    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}", f"{seconds:.0f}")
    print("\n".join(HEADER + [row]))
    if not args.no_record:
        append_table_row(SECTION, HEADER, row)


if __name__ == "__main__":
    main()
