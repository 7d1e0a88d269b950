"""Synthetic captioned shapes for training and checking a tiny Stable Diffusion.

Every image is one filled, axis-aligned shape on a plain background, described by a caption of
the grammar

    a [small |large ]{color} {shape} on a {background} background

so prompt adherence can be measured exactly (see `stable_diffusion/adherence.py`). A model trained
on them carries the grammar's words, `GRAMMAR`, in its config, and `warn_outside_grammar` tells the
user of such a model (the demo model) when a prompt leaves the grammar. The folder
format written by `write_folder` (PNGs plus `captions.jsonl`) follows the Hugging Face
`imagefolder` convention: https://huggingface.co/docs/datasets/image_dataset#imagefolder
"""

import itertools
import json
import os
import re
import warnings

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
# Colours drawn and read back (`draw_shape`, `parse_caption`, `adherence.classify`) that `random_caption` never
# draws, as `NEW_SHAPES`: for teaching a model trained on them a new one (a textual-inversion token).
NEW_COLORS = {"pink": (240, 100, 180)}  # a hot pink, >= 110 from every colour and background in RGB
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Shapes drawn and read back (`draw_shape`, `parse_caption`, `adherence.classify`) that `random_caption` never
# draws, so its datasets stay as they were: for teaching a model trained on them a new one (a LoRA).
# The diamond: a square turned 45 degrees, its corners on the middles of the box's sides; the rectangle: the
# box's middle half, twice as wide as tall.
NEW_SHAPES = ("diamond", "rectangle")
SIZES = ("small", "large")

# Side of the shape's bounding box as a fraction of the image side; `None` is "no size word".
SIZE_RANGES = {"small": (0.20, 0.35), "large": (0.55, 0.80), None: (0.20, 0.80)}
COLOR_JITTER = 10  # Per-channel, per-image offset in [-10, 10] on both colours.

# The words each slot of a caption takes; the "grammar" of a model's config (`StableDiffusion(config=...)`).
GRAMMAR = dict(size=list(SIZES), color=list(COLORS), shape=list(SHAPES), background=list(BACKGROUNDS))
FORM = "a [{size} ]{color} {shape} on a {background} background"


def _captions(grammar):
    """The regex of the captions whose slots hold words of `grammar` ({slot: words}; None: any word)."""
    slot = lambda name: "(?P<{}>{})".format(name, "|".join(map(re.escape, grammar[name])) if grammar else r"\S+")
    return re.compile("a (?:{} )?{} {} on a {} background".format(*map(slot, GRAMMAR)))


_CAPTION = _captions(dict(GRAMMAR, color=[*COLORS, *NEW_COLORS], shape=[*SHAPES, *NEW_SHAPES]))


def format_caption(attributes):
    """Writes the caption for a dict with `color`, `shape`, `background` and `size` (or None)."""
    size = f"{attributes['size']} " if attributes["size"] else ""
    return (
        f"a {size}{attributes['color']} {attributes['shape']} "
        f"on a {attributes['background']} background"
    )


def parse_caption(caption):
    """Reads the attributes back from a caption (of `GRAMMAR`, or a colour of `NEW_COLORS` or a shape of
    `NEW_SHAPES`); `size` is None when the caption names none.

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


def outside_grammar(prompt, grammar=GRAMMAR):
    """What of `prompt` a caption of `grammar` ({slot: words}, as `GRAMMAR`) cannot hold: "'yellow' as a
    background" (a word in a slot that does not take it), "the words 'photo', 'cat'" (words, or punctuation, of
    no slot) or the prompt itself (known words, another form); None for a caption or the empty prompt. Case and
    spacing are ignored, as by the tokenizer; "an" passes for "a"."""
    # Punctuation apart, as the tokenizer reads it; the demo model follows "an orange ..." as it does the
    # "a orange ..." of its captions (30 images each).
    words = ["a" if word == "an" else word for word in re.findall(r"\w+|[^\w\s]", prompt.lower())]
    text = " ".join(words)
    if not text or _captions(grammar).fullmatch(text):
        return None
    slots = _captions(None).fullmatch(text)
    if slots:  # the form, with words in slots that do not take them
        return ", ".join(f"{word!r} as a {name}" for name, word in slots.groupdict().items()
                         if word is not None and word not in grammar[name])
    known = {"a", "on", "background", *itertools.chain(*grammar.values())}  # the form's words and the slots'
    unknown = [repr(word) for word in dict.fromkeys(words) if word not in known]
    return f"the word{'s' * (len(unknown) > 1)} {', '.join(unknown)}" if unknown else repr(prompt)


def warn_outside_grammar(prompt, grammar):
    """Warns (`UserWarning`, one line) for each prompt outside `grammar` (see `outside_grammar`), naming the
    words the grammar knows; nothing if `grammar` is empty (a model not trained on the shapes). Python's
    default warning filter shows each distinct message once per calling line: from `text_to_image`, once
    per set of unknown words.

    Args:
        prompt: a string or a list of strings (anything else, e.g. encoded prompts, is not checked).
        grammar: {slot: words}, as `GRAMMAR`; a model's `config["grammar"]`.
    """
    for text in [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, (list, tuple)) else []:
        reason = outside_grammar(text, grammar) if grammar else None
        if reason:
            known = "; ".join(f"{name}: {', '.join(words)}" for name, words in grammar.items())
            warnings.warn(f"This model knows only prompts of the form {FORM!r} ({known}), not {reason}.",
                          stacklevel=2)


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
    fill = jittered({**COLORS, **NEW_COLORS}[attributes["color"]])
    if attributes["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif attributes["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif attributes["shape"] == "triangle":  # Upright isosceles: apex centred on the top edge.
        draw.polygon(((x0, y1), (x1, y1), ((x0 + x1) / 2, y0)), fill=fill)
    elif attributes["shape"] == "rectangle":
        draw.rectangle((x0, y0 + (y1 - y0) / 4, x1, y1 - (y1 - y0) / 4), fill=fill)
    elif attributes["shape"] == "diamond":
        middle_x, middle_y = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon(((middle_x, y0), (x1, middle_y), (middle_x, y1), (x0, middle_y)), fill=fill)
    else:
        raise ValueError(f"Unknown shape {attributes['shape']!r}; expected one of {SHAPES + NEW_SHAPES}.")
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
