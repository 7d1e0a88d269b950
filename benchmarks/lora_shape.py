"""Teaching the shipped demo model a shape it has never seen (`data.NEW_SHAPES`: a diamond, a rectangle) with a LoRA.

Writes a folder of at most 40 captioned 64x64 images (the new shape, and shapes of the grammar so that a square
stays a square), trains a LoRA of the demo model on it (`train.train_lora`, as `python -m
stable_diffusion.train lora`), timed, with the machine's load; then generates prompts naming the new shape
with the LoRA merged in, reads the shapes back (`adherence.classify`) and appends the figures to
`benchmarks/RESULTS.md`. The adherence on the original grammar, before and after:
`python -m benchmarks.adherence [--lora OUTPUT]`.

    python -m benchmarks.lora_shape --shape rectangle --output /tmp/rectangle.safetensors

Seeds: the training images from `default_rng(SEED)` (the new shape) and `make_dataset(..., SEED + 1)` (the
others), the test prompts from `default_rng(SEED + 2)`, image k seeded with SEED + 2 + k: none of them used
by the demo model's recipe or the adherence benchmark's sets.
"""
import argparse
import json
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.adherence import HELD_OUT_SEED, generate, machine, prompts, scores_by_size, table
from benchmarks.results import RESULTS, append_entry, command_line
from stable_diffusion import StableDiffusion
from stable_diffusion.data import NEW_SHAPES, SHAPES, draw_shape, format_caption, make_dataset, random_caption, write_folder
from stable_diffusion.train import train_lora

SEED = 25_000
TARGET = 0.8  # of the images read as the new shape
# The UNet's attention projections, feed-forward layers and ResBlock convolutions: attention alone reached 0% of
# diamonds in 200 steps (RESULTS.md), the demo UNet having no attention at its first level.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


def new_shapes(shape, count, rng):
    """`count` images and captions of `shape` (a name, or names taken in turn), of the grammar's colours,
    backgrounds and size words."""
    shapes = (shape,) if isinstance(shape, str) else tuple(shape)
    attributes = [dict(random_caption(rng)[1], shape=shapes[k % len(shapes)]) for k in range(count)]
    return np.stack([draw_shape(a, rng) for a in attributes]), [format_caption(a) for a in attributes]


def training_folder(folder, shape, num_new, num_others, num_prior=0, others_shapes=None):
    """Writes `num_new` images of `shape`, `num_others` of the grammar (`data.make_dataset`'s, or of `others_shapes`
    taken in turn: the shapes the new one must stay apart from) and `num_prior` the demo model generates from grammar
    prompts (`prompts(num_prior, SEED + 3)`, image k seeded with SEED + 3 + k: prior preservation,
    as DreamBooth's class images), shuffled, to `folder`."""
    images, captions = new_shapes(shape, num_new, np.random.default_rng(SEED))
    if num_others:
        others, other_captions = (make_dataset(num_others, SEED + 1) if others_shapes is None
                                  else new_shapes(others_shapes, num_others, np.random.default_rng(SEED + 1)))
        images, captions = np.concatenate([images, others]), captions + other_captions
    if num_prior:
        prior_captions = prompts(num_prior, SEED + 3)
        prior = generate(StableDiffusion.from_checkpoint(jit_compile=False), prior_captions, 10, SEED + 3)
        images, captions = np.concatenate([images, prior]), captions + prior_captions
    order = np.random.default_rng(SEED).permutation(len(captions))
    write_folder(folder, images[order], [captions[i] for i in order])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="the LoRA file to write")
    parser.add_argument("--shape", choices=NEW_SHAPES, required=True, help="the shape to teach")
    parser.add_argument("--new", type=int, default=32, help="images of the new shape to train on")
    parser.add_argument("--others", type=int, default=8, help="images of the grammar's shapes to train on")
    parser.add_argument("--others-shapes", nargs="+", choices=SHAPES, metavar="SHAPE", help="the others' shapes, "
                        "taken in turn (default: the grammar's dataset), e.g. the shape the new one resembles")
    parser.add_argument("--prior", type=int, default=0, help="images the demo model generates from grammar "
                        "prompts, trained on too (prior preservation)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=TARGETS, metavar="MODULE")
    parser.add_argument("--no-text-encoder", action="store_true", help="adapt the UNet only")
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--num-images", type=int, default=50, help="images of the new shape to generate and classify")
    parser.add_argument("--grammar-images", type=int, default=100, help="grammar prompts of the held-out set "
                        "generated with and without the LoRA")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    args = parser.parse_args(argv)
    if args.new + args.others > 40:
        parser.error("--new and --others: at most 40 images in all.")

    folder = args.output.with_name(f"{args.output.stem}.data")
    host = machine()  # before training, so the load average is the other jobs'
    start = time.perf_counter()
    training_folder(folder, args.shape, args.new, args.others, args.prior, args.others_shapes)
    result = train_lora(None, folder, args.output, rank=args.rank, targets=args.targets,
                        train_text_encoder=not args.no_text_encoder, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, caption_dropout=args.caption_dropout,
                        work_dir=folder.with_name(f"{folder.name}.work"), verbose=2)
    minutes = (time.perf_counter() - start) / 60
    load = os.getloadavg()[0]

    sd = StableDiffusion.from_checkpoint(jit_compile=False)
    sd.load_lora(args.output)
    _, captions = new_shapes(args.shape, args.num_images, np.random.default_rng(SEED + 2))
    with warnings.catch_warnings():  # the demo model's grammar has no such shape: the point of the LoRA
        warnings.filterwarnings("ignore", message="This model knows only prompts")
        scores = scores_by_size(generate(sd, captions, 10, SEED + 2), captions)
        grammar = prompts(args.grammar_images, HELD_OUT_SEED)  # what the LoRA may have cost, read as above
        after = scores_by_size(generate(sd, grammar, 10, HELD_OUT_SEED), grammar, SHAPES + (args.shape,))
        sd.unload_lora()
        before = scores_by_size(generate(sd, grammar, 10, HELD_OUT_SEED), grammar, SHAPES + (args.shape,))

    steps = args.epochs * -(-(args.new + args.others + args.prior) // args.batch_size)
    command = command_line("benchmarks.lora_shape", argv)
    entry = "\n".join([
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {args.new} {args.shape}s + {args.others} "
        f"{'/'.join(args.others_shapes) + 's' if args.others_shapes else 'others'}"
        f"{f' + {args.prior} generated' if args.prior else ''}, "
        f"rank {args.rank}, {steps} steps",
        "",
        f"- Command: `{command}`",
        f"- Training: `train_lora` of the demo model, {json.dumps(result)}; targets {' '.join(args.targets)}"
        f"{'' if args.no_text_encoder else ' and the text encoder attention projections'}; {args.epochs} epochs of "
        f"batches of {args.batch_size}, learning rate {args.learning_rate} (cosine to a tenth), caption dropout "
        f"{args.caption_dropout}, TensorFlow, XLA off. "
        f"Wall time {minutes:.1f} min with loading and encoding (target ≤ 10 min on 2 cores); load average "
        f"{load:.1f} at the end.",
        f"- Machine: {host}",
        f"- Generated: {args.num_images} {args.shape} prompts of the grammar's colours, backgrounds and size words, "
        f"50 DDIM steps, guidance 7.5, image k seeded with {SEED + 2} + k. Shape column: the fraction read as a "
        f"{args.shape} (target ≥ {TARGET:.0%}).",
        "",
        table(scores),
        "",
        f"The grammar, {args.grammar_images} held-out prompts (`benchmarks.adherence --held-out`'s first), read with "
        f"the grammar's shapes and the {args.shape}: without the LoRA, then with it.",
        "",
        table({"without": before["all"], "with": after["all"]}),
    ])
    print(entry)
    append_entry("## Teaching the demo model a new shape (LoRA)", entry, args.results)
    print(f"Appended to {args.results}")


if __name__ == "__main__":
    main()
