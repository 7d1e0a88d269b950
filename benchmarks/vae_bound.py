"""What a checkpoint's VAE keeps of the synthetic shapes of `stable_diffusion/data.py`: the adherence of its
reconstructions, which bounds that of any UNet trained on its latents.

Encodes N images of `data.make_dataset(N, SEED)` to their posterior means, decodes them, reads colour, shape,
background and size back from the pixels (`stable_diffusion.adherence`) per size word, with the blank images,
and appends the table, with the date and machine, to `benchmarks/RESULTS.md`.

    python -m benchmarks.vae_bound                          # the built-in demo model
    python -m benchmarks.vae_bound --checkpoint PATH --num-images 300
"""
import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.adherence import machine, scores_by_size, table
from benchmarks.results import RESULTS, append_entry, command_line
from stable_diffusion import StableDiffusion
from stable_diffusion.data import make_dataset
from stable_diffusion.train import encode_latents

SEED = 31_000  # of the images: no training, tuning or other benchmark draws from it


def reconstruct(sd, images):
    """uint8 images (N, H, W, 3) through sd's VAE: decoded posterior means, uint8."""
    return sd.decode(encode_latents(sd.encoder, images, sd.decoder.scaling_factor))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="default: the built-in demo model")
    parser.add_argument("--num-images", type=int, default=600)
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    args = parser.parse_args(argv)
    host, start = machine(), time.perf_counter()  # the load average before the run: the other jobs'
    sd = StableDiffusion.from_checkpoint(args.checkpoint)
    images, captions = make_dataset(args.num_images, SEED, image_size=sd.img_height)
    scores = scores_by_size(reconstruct(sd, images), captions)
    command = command_line("benchmarks.vae_bound", argv)
    entry = "\n".join([
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {args.checkpoint or 'assets/demo'}, "
        f"{args.num_images} images",
        "",
        f"- Command: `{command}`",
        f"- Images: `data.make_dataset({args.num_images}, seed={SEED})`, encoded to the posterior means, decoded, "
        "read back with `adherence.classify`; size accuracy over the captions naming one.",
        f"- Machine: {host}; {time.perf_counter() - start:.0f} s.",
        "",
        table(scores),
    ])
    print(entry)
    append_entry("## What the VAE keeps (`benchmarks/vae_bound.py`)", entry, args.results)


if __name__ == "__main__":
    main()
