"""Mixed precision and int8 against float32: PSNR of the same images (same prompts, seeds and noise).

    python -m benchmarks.precision                                   # the demo model, 64x64
    python -m benchmarks.precision --checkpoint /tmp/sd-convert-bench/bundle-safetensors --size 256
    python -m benchmarks.precision --policies int8                   # `quantize="int8"` (quantization.py)

Generates `--num-images` images in float32, then under each mixed policy or int8, and appends the PSNR of
each policy's images against the float32 ones (mean over images, and the worst) and the relative
error of the final latents (|z - z32| / |z32|, mean over images) to benchmarks/RESULTS.md. The
latents matter where images do not tell: random full-size weights decode to a nearly flat gray.
The default full-size checkpoint is the random-weight SD 1.5 bundle that
`python -m benchmarks.convert` writes.
"""
import argparse
import datetime
import time

import keras
import numpy as np

from benchmarks.results import append_table_row
from stable_diffusion import StableDiffusion

SECTION = "## Mixed precision against float32 (`benchmarks/precision.py`)"
HEADER = ["| date | checkpoint | size | steps | images | policy | backend | PSNR mean dB | PSNR worst dB "
          "| latents rel. error | image std | s/image |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
PROMPTS = ["a large red circle on a white background", "a small blue square on a black background",
           "a green triangle on a gray background", "a photograph of an astronaut riding a horse"]


def psnr(a, b):
    mse = np.mean((a.astype("float64") - b) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-10))


def generate(checkpoint, size, steps, num_images, policy):
    """Images (N, H, W, 3) uint8, their final latents and seconds per image (after a warm-up image)
    under `policy`: a dtype policy, or "int8" (float32, quantized)."""
    int8 = policy == "int8"
    sd = StableDiffusion.from_checkpoint(checkpoint, img_height=size, img_width=size, dtype=None if int8 else policy,
                                         quantize="int8" if int8 else None)
    settings = dict(num_steps=steps, verbose=False, return_latents=True)
    sd.decode(sd.text_to_image(PROMPTS[0], seed=0, **settings))  # compiles
    start = time.perf_counter()
    latents = np.concatenate([sd.text_to_image(PROMPTS[i % len(PROMPTS)], seed=i, **settings)
                              for i in range(num_images)]).astype("float32")
    images = sd.decode(latents)
    return images, latents, (time.perf_counter() - start) / num_images


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="default: the built-in demo model")
    parser.add_argument("--size", type=int, help="image height and width (default: the model's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--policies", nargs="+", default=["mixed_bfloat16", "mixed_float16"])
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    reference, reference_latents, seconds = generate(args.checkpoint, args.size, args.steps, args.num_images, None)
    size = f"{reference.shape[2]}x{reference.shape[1]}"
    name = args.checkpoint.rstrip("/").split("/")[-1] if args.checkpoint else "demo model"
    rows = [("float32", "reference", "reference", "reference", reference.std(), seconds)]
    for policy in args.policies:
        images, latents, seconds = generate(args.checkpoint, args.size, args.steps, args.num_images, policy)
        scores = [psnr(image, expected) for image, expected in zip(images, reference)]
        errors = [np.linalg.norm(z - z32) / np.linalg.norm(z32) for z, z32 in zip(latents, reference_latents)]
        rows.append((policy, f"{np.mean(scores):.1f}", f"{min(scores):.1f}", f"{np.mean(errors):.1e}", images.std(),
                     seconds))
    for policy, mean, worst, error, image_std, seconds in rows:
        row = (f"| {datetime.date.today()} | {name} | {size} | {args.steps} | {args.num_images} | "
               f"{policy} | {keras.backend.backend()} | {mean} | {worst} | {error} | {image_std:.1f} | "
               f"{seconds:.2f} |")
        print(row, flush=True)
        if not args.no_record:
            append_table_row(SECTION, HEADER, row)


if __name__ == "__main__":
    main()
