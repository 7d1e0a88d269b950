"""Synthetic captioned shapes for training and checking a tiny Stable Diffusion.

Every image is one filled, axis-aligned shape on a plain background, described by a caption of
the grammar

    a [small |large ]{color} {shape} on a {background} background

so prompt adherence can be measured exactly (see `stable_diffusion/adherence.py`). The folder
format written by `write_folder` (PNGs plus `captions.jsonl`) follows the Hugging Face
`imagefolder` convention: https://huggingface.co/docs/datasets/image_dataset#imagefolder
"""

import json
import os
import re

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (230, 25, 25),
    "green": (30, 170, 60),
    "blue": (30, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")

# Side of the shape's bounding box as a fraction of the image side; `None` is "no size word".
SIZE_RANGES = {"small": (0.20, 0.35), "large": (0.55, 0.80), None: (0.20, 0.80)}
COLOR_JITTER = 10  # Per-channel, per-image offset in [-10, 10] on both colours.

_CAPTION = re.compile(
    "a (?:({}) )?({}) ({}) on a ({}) background".format(
        *("|".join(names) for names in (SIZES, COLORS, SHAPES, BACKGROUNDS))
    )
)


def format_caption(attributes):
    """Writes the caption for a dict with `color`, `shape`, `background` and `size` (or None)."""
    size = f"{attributes['size']} " if attributes["size"] else ""
    return (
        f"a {size}{attributes['color']} {attributes['shape']} "
        f"on a {attributes['background']} background"
    )


def parse_caption(caption):
    """Reads the attributes back from a caption; `size` is None when the caption names none.

    Raises:
        ValueError: if the caption is not in the grammar.
    """
    match = _CAPTION.fullmatch(caption)
    if match is None:
        raise ValueError(
            f"Caption {caption!r} is not of the form "
            "'a [small |large ]{color} {shape} on a {background} background'."
        )
    size, color, shape, background = match.groups()
    return dict(color=color, shape=shape, background=background, size=size)


def random_caption(rng):
    """Draws uniform attributes (size word optional) and returns `(caption, attributes)`.

    Args:
        rng: a `numpy.random.Generator`.
    """
    def pick(options):
        return list(options)[rng.integers(len(options))]

    attributes = dict(
        color=pick(COLORS),
        shape=pick(SHAPES),
        background=pick(BACKGROUNDS),
        size=pick((*SIZES, None)),
    )
    return format_caption(attributes), attributes


def draw_shape(attributes, rng, image_size=64):
    """Draws the shape described by `attributes` at a random size and position.

    Args:
        attributes: dict with `color`, `shape`, `background` and `size` (or None), as returned by
            `parse_caption`.
        rng: a `numpy.random.Generator`.
        image_size: side of the square image in pixels.

    Returns:
        uint8 array of shape (image_size, image_size, 3).
    """
    low, high = SIZE_RANGES[attributes["size"]]
    side = int(round(rng.uniform(low, high) * image_size))
    x0, y0 = rng.integers(0, image_size - side + 1, size=2)
    x1, y1 = x0 + side - 1, y0 + side - 1  # PIL boxes include both ends.

    def jittered(rgb):
        offset = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        return tuple(int(c) for c in np.clip(np.add(rgb, offset), 0, 255))

    background = jittered(BACKGROUNDS[attributes["background"]])
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    fill = jittered(COLORS[attributes["color"]])
    if attributes["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif attributes["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif attributes["shape"] == "triangle":  # Upright isosceles: apex centred on the top edge.
        draw.polygon(((x0, y1), (x1, y1), ((x0 + x1) / 2, y0)), fill=fill)
    else:
        raise ValueError(f"Unknown shape {attributes['shape']!r}; expected one of {SHAPES}.")
    return np.asarray(image)


def make_dataset(num_examples, seed, image_size=64):
    """Generates a deterministic dataset of captioned shapes.

    Args:
        num_examples: number of image-caption pairs.
        seed: seed of the `numpy.random.Generator`; the same seed gives the same dataset.
        image_size: side of the square images in pixels.

    Returns:
        `(images, captions)`: uint8 array (N, image_size, image_size, 3) and a list of N strings.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((num_examples, image_size, image_size, 3), dtype=np.uint8)
    captions = []
    for i in range(num_examples):
        caption, attributes = random_caption(rng)
        images[i] = draw_shape(attributes, rng, image_size)
        captions.append(caption)
    return images, captions


def write_folder(folder, images, captions):
    """Writes `00000.png, ...` and `captions.jsonl` (`{"file_name": ..., "text": ...}` per line).

    Args:
        folder: output directory, created if missing.
        images: uint8 array (N, H, W, 3).
        captions: list of N strings.
    """
    if len(images) != len(captions):
        raise ValueError(
            f"Got {len(images)} images and {len(captions)} captions; expected one per image."
        )
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "captions.jsonl"), "w") as lines:
        for i, (image, caption) in enumerate(zip(images, captions)):
            file_name = f"{i:05d}.png"
            Image.fromarray(image).save(os.path.join(folder, file_name))
            lines.write(json.dumps({"file_name": file_name, "text": caption}) + "\n")
