"""Teaching the shipped demo model a colour it has never seen, pink (`data.NEW_COLORS`), as a new token by textual
inversion.

Writes a folder of at most 40 captioned 64x64 pink shapes ("a large <pink> circle on a white background"), learns
the token's embedding (`train.train_textual_inversion`, as `python -m stable_diffusion.train textual-inversion`),
timed, with the machine's load; then generates prompts with the token, the embedding loaded, reads the colours
back (`adherence.classify`) and appends the figures to `benchmarks/RESULTS.md`, with, by background, the
fraction of the training images that the demo model's VAE reconstructs as pink: textual inversion leaves the VAE
as it is and trains the UNet toward the latents of those reconstructions. Textual inversion changes no weight,
so prompts without the token make the images they made before: the run checks it on prompts of the original
grammar (bit-identical images with and without the embedding loaded).

    python -m benchmarks.ti_pink --output /tmp/pink/learned_embeds.safetensors

Seeds: the training images from `default_rng(SEED)`, the pink prompts from `default_rng(SEED + 1)`, pink image k
seeded with SEED + 1 + k, the grammar prompts from `default_rng(SEED + 2)`: none of them used by the demo model's
recipe, the adherence benchmark's sets or the LoRA run (`lora_shape.py`).
"""
import argparse
import json
import os
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.adherence import generate, machine, prompts, scores_by_size, table
from benchmarks.results import RESULTS, append_entry, command_line
from stable_diffusion import StableDiffusion
from stable_diffusion.adherence import classify
from stable_diffusion.data import BACKGROUNDS, draw_shape, format_caption, parse_caption, random_caption, write_folder
from stable_diffusion.train import encode_latents, train_textual_inversion

SEED = 27_000
TARGET = 0.8  # of the pink images read as pink


def pinks(count, rng):
    """`count` pink shapes of the grammar's shapes, backgrounds and size words: images and captions."""
    attributes = [dict(random_caption(rng)[1], color="pink") for _ in range(count)]
    return np.stack([draw_shape(a, rng) for a in attributes]), [format_caption(a) for a in attributes]


def with_token(captions, token):
    """The captions with the token for the word "pink"."""
    return [caption.replace(" pink ", f" {token} ") for caption in captions]


def pink_by_background(images, captions):
    """"BACKGROUND k/n" for each background: of the n images whose captions name it, k read as pink."""
    pink = [(parse_caption(caption)["background"], classify(image)["color"] == "pink")
            for image, caption in zip(images, captions)]
    counts = {name: [hit for background, hit in pink if background == name] for name in BACKGROUNDS}
    return ", ".join(f"{name} {sum(hits)}/{len(hits)}" for name, hits in counts.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="the embedding file to write")
    parser.add_argument("--token", default="<pink>")
    parser.add_argument("--initializer-token", default="red")
    parser.add_argument("--num-vectors", type=int, default=4)
    parser.add_argument("--images", type=int, default=40, help="pink images to train on (at most 40)")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--num-images", type=int, default=50, help="pink images to generate and classify")
    parser.add_argument("--grammar-images", type=int, default=10, help="grammar prompts checked bit-identical")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to")
    args = parser.parse_args(argv)
    if not 0 < args.images <= 40:
        parser.error("--images: at most 40.")

    folder = args.output.with_name(f"{args.output.stem}.data")
    images, captions = pinks(args.images, np.random.default_rng(SEED))
    write_folder(folder, images, with_token(captions, args.token))
    host = machine()  # before training, so the load average is the other jobs'
    start = time.perf_counter()
    result = train_textual_inversion(None, folder, args.output, token=args.token,
                                     initializer_token=args.initializer_token, num_vectors=args.num_vectors,
                                     epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                     work_dir=folder.with_name(f"{folder.name}.work"), verbose=2)
    minutes = (time.perf_counter() - start) / 60
    load = os.getloadavg()[0]

    sd = StableDiffusion.from_checkpoint(jit_compile=False)
    reconstructed = sd.decode(encode_latents(sd.encoder, images, sd.decoder.scaling_factor))
    grammar = prompts(args.grammar_images, SEED + 2)
    before = generate(sd, grammar, 10, SEED + 2)
    sd.load_textual_inversion(args.output)
    identical = np.array_equal(generate(sd, grammar, 10, SEED + 2), before)
    _, generated_captions = pinks(args.num_images, np.random.default_rng(SEED + 1))
    with warnings.catch_warnings():  # the demo model's grammar has no token: the point of the embedding
        warnings.filterwarnings("ignore", message="This model knows only prompts")
        generated = generate(sd, with_token(generated_captions, args.token), 10, SEED + 1)
    scores = scores_by_size(generated, generated_captions)

    steps = args.epochs * -(-args.images // args.batch_size)
    command = command_line("benchmarks.ti_pink", argv)
    entry = "\n".join([
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {args.images} pink images, {args.num_vectors} "
        f"vector{'s' * (args.num_vectors > 1)} from {args.initializer_token!r}, {steps} steps",
        "",
        f"- Command: `{command}`",
        f"- Training: `train_textual_inversion` of the demo model, {json.dumps(result)}; token {args.token}, "
        f"{args.epochs} epochs of batches of {args.batch_size}, learning rate {args.learning_rate} (cosine to a "
        f"tenth), TensorFlow, XLA off. Wall time {minutes:.1f} min with loading and encoding (target ≤ 10 min on "
        f"2 cores); load average {load:.1f} at the end.",
        f"- Machine: {host}",
        f"- Generated: {args.num_images} prompts with {args.token} for the colour, of the grammar's shapes, "
        f"backgrounds and size words, 50 DDIM steps, guidance 7.5, image k seeded with {SEED + 1} + k. Colour "
        f"column: the fraction read as pink (target ≥ {TARGET:.0%}).",
        f"- Read as pink, by background: the generated images {pink_by_background(generated, generated_captions)}; "
        f"the VAE's reconstructions of the training images {pink_by_background(reconstructed, captions)}.",
        f"- The original grammar: {args.grammar_images} prompts make "
        f"{'bit-identical images' if identical else 'DIFFERENT images'} with and without the embedding loaded, "
        f"so its adherence is the demo model's (`python -m benchmarks.adherence`).",
        "",
        table(scores),
    ])
    print(entry)
    append_entry("## Teaching the demo model pink (textual inversion)", entry, args.results)
    print(f"Appended to {args.results}")


if __name__ == "__main__":
    main()
