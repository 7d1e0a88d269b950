"""Peak memory of one full-size generation (ours only), for the ≤ 6 GB target at 512x512 in float32.

    python -m benchmarks.memory [--checkpoint PATH] [--size 512] [--steps 2] [--no-xla] [--vae-tiling 512]

Loads a full-size checkpoint (default: the random-weight SD 1.5 bundle that `python -m
benchmarks.convert` leaves in /tmp/sd-convert-bench) and makes one image with guidance (UNet batch 2),
sampling the process' resident memory every 20 ms: after loading, and the peak while generating
(text encoder, denoising steps, VAE decode). More steps repeat the same step, so 2 are enough for the
peak. Appends a row to benchmarks/RESULTS.md.
"""
import argparse
import datetime
import os
import resource
import threading
import time
from pathlib import Path

import keras

from benchmarks.results import append_table_row
from stable_diffusion import StableDiffusion

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/sd-convert-bench/bundle-safetensors"))
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-xla", action="store_true", help="run eagerly instead of compiling with XLA")
    parser.add_argument("--vae-tiling", type=int, metavar="PIXELS",
                        help="decode in tiles of this size (`StableDiffusion.enable_vae_tiling`)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    if not args.checkpoint.exists():
        parser.error(f"{args.checkpoint} does not exist: run `python -m benchmarks.convert` first, or pass "
                     "--checkpoint PATH (any full-size checkpoint).")
    memory = ResidentMemory()
    sd = StableDiffusion.from_checkpoint(args.checkpoint, args.size, args.size, jit_compile=not args.no_xla)
    if args.vae_tiling:
        sd.enable_vae_tiling(args.vae_tiling)
    after_load = ResidentMemory.now()
    memory.reset()
    start = time.perf_counter()
    sd.text_to_image("a photograph of an astronaut riding a horse", num_steps=args.steps, seed=0)
    seconds = time.perf_counter() - start
    peak = max(memory.peak, ResidentMemory.now())
    xla = "off" if args.no_xla else "on"
    if not args.no_xla and os.environ.get("XLA_FLAGS"):
        xla += f" (XLA_FLAGS={os.environ['XLA_FLAGS']})"
    size = f"{args.size}x{args.size}" + (f", VAE tiles of {args.vae_tiling}" if args.vae_tiling else "")
    row = (f"| {datetime.date.today()} | {args.checkpoint.name} | {size} | {args.steps} | "
           f"{xla} | {keras.backend.backend()} | {after_load:.2f} | {peak:.2f} | "
           f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} | {seconds:.0f} |")
    print("\n".join(HEADER + [row]))
    if not args.no_record:
        append_table_row(SECTION, HEADER, row)


if __name__ == "__main__":
    main()
