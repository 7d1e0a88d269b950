"""Tests for the synthetic shapes (`data.py`), their pixel classifier (`adherence.py`) and the warning
for prompts outside their grammar."""

import hashlib
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from reference import TINY_CONFIG
from stable_diffusion import StableDiffusion, checkpoints
from stable_diffusion.adherence import classify, score
from stable_diffusion.data import (
    BACKGROUNDS,
    GRAMMAR,
    NEW_SHAPES,
    SHAPES,
    SIZE_RANGES,
    draw_shape,
    format_caption,
    make_dataset,
    outside_grammar,
    parse_caption,
    random_caption,
    warn_outside_grammar,
    write_folder,
)

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(300, seed=0, image_size=IMAGE_SIZE)


@pytest.mark.parametrize("shapes", [SHAPES, SHAPES + NEW_SHAPES])
def test_classifier_recovers_every_claimed_attribute(dataset, shapes):
    accuracies = score(*dataset, shapes)
    assert all(accuracy >= 0.99 for accuracy in accuracies.values()), accuracies


def test_captions_parse_and_cover_the_grammar(dataset):
    attributes = [parse_caption(caption) for caption in dataset[1]]
    assert [format_caption(a) for a in attributes] == dataset[1]
    assert {a["size"] for a in attributes} == {"small", "large", None}
    caption, drawn = random_caption(np.random.default_rng(1))
    assert parse_caption(caption) == drawn


def test_shapes_have_the_stated_size_and_lie_inside_the_image(dataset):
    for image, caption in zip(*dataset):
        attributes = parse_caption(caption)
        # Background pixels are within the jitter (10) of the palette, shapes much farther.
        background = np.asarray(BACKGROUNDS[attributes["background"]])
        rows, cols = np.nonzero(np.abs(image - background).max(axis=-1) > 20)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert height == width, caption  # Not cut by the image border.
        low, high = SIZE_RANGES[attributes["size"]]
        assert low * IMAGE_SIZE - 0.5 <= height <= high * IMAGE_SIZE + 0.5, caption  # Rounded.


def test_dataset_is_deterministic_for_a_seed():
    images, captions = make_dataset(20, seed=5)
    again_images, again_captions = make_dataset(20, seed=5)
    other_images, _ = make_dataset(20, seed=6)
    assert images.dtype == np.uint8 and images.shape == (20, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(images, again_images)
    assert captions == again_captions
    assert not np.array_equal(images, other_images)


def test_write_folder_writes_pngs_and_captions_jsonl(tmp_path):
    images, captions = make_dataset(4, seed=2)
    write_folder(tmp_path / "shapes", images, captions)
    lines = (tmp_path / "shapes" / "captions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["text"] for record in records] == captions
    for image, record in zip(images, records):
        written = Image.open(tmp_path / "shapes" / record["file_name"])
        np.testing.assert_array_equal(np.asarray(written), image)


@pytest.mark.parametrize(
    "caption",
    [
        "a magenta circle on a white background",
        "a red hexagon on a white background",
        "a huge red circle on a white background",
        "a red circle on a blue background",
        "a red circle",
        "a small large red circle on a white background",
        "",
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="is not of the form"):
        parse_caption(caption)


@pytest.mark.parametrize("shape", NEW_SHAPES)
def test_new_shapes_are_read_back_and_leave_the_datasets_as_they_were(shape):
    """The shapes of `NEW_SHAPES`: parsed, drawn and classified (>= 99% of 300 of every size; the first test
    shows no grammar shape read as one), words outside the grammar; `random_caption` never draws them, so
    datasets are those made before they existed (sha256 of `make_dataset(50, seed=7)`'s pixels and captions,
    computed with the code of before, 72adc03)."""
    rng = np.random.default_rng(4)
    attributes = [dict(random_caption(rng)[1], shape=shape) for _ in range(300)]
    images = [draw_shape(a, rng) for a in attributes]
    captions = [format_caption(a) for a in attributes]
    assert all(parse_caption(caption) == a for caption, a in zip(captions, attributes))
    assert score(images, captions)["shape"] >= 0.99
    assert outside_grammar(captions[0]) == f"'{shape}' as a shape"
    images, captions = make_dataset(50, seed=7)
    digest = hashlib.sha256(images.tobytes() + "|".join(captions).encode()).hexdigest()
    assert digest == "b643c5b273c9e72e94b55470e38549e29ac738f26c0a3f6a2d88c0f10636d9b7"


def test_pink_is_read_back_and_never_drawn_by_random_caption():
    """The pink of `NEW_COLORS`: parsed, drawn and classified (>= 99% of 300 of every shape, size and background,
    the new shapes included; the first test shows no grammar colour read as pink), a word outside the grammar, and
    never drawn by `random_caption` (the datasets' sha256: the test above)."""
    rng = np.random.default_rng(5)
    attributes = [dict(random_caption(rng)[1], color="pink") for _ in range(300)]
    attributes = [dict(a, shape=NEW_SHAPES[i % 4]) if i % 4 < len(NEW_SHAPES) else a for i, a in enumerate(attributes)]
    images = [draw_shape(a, rng) for a in attributes]
    captions = [format_caption(a) for a in attributes]
    assert all(parse_caption(caption) == a for caption, a in zip(captions, attributes))
    assert score(images, captions)["color"] >= 0.99
    assert outside_grammar("a pink circle on a white background") == "'pink' as a color"
    assert "pink" not in {random_caption(rng)[1]["color"] for _ in range(1000)}


def test_classify_plain_background_finds_no_shape():
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 15, dtype=np.uint8)
    assert classify(image) == dict(color=None, shape=None, background="black", size=None)
    assert score([image], ["a blue square on a black background"]) == dict(
        color=0.0, shape=0.0, background=1.0, size=None, all=0.0
    )


@pytest.mark.parametrize("prompt, reason", [
    ("a large red circle on a white background", None),
    ("A  Small BLUE square on a black background", None),  # case and spacing, as the tokenizer reads them
    ("an orange square on a gray background", None),
    ("", None),  # the unconditional prompt, which the model trained on
    ("a large red circle on a yellow background", "'yellow' as a background"),  # a colour, not a background
    ("a huge red circle on a white background", "'huge' as a size"),
    ("a photo of a cat", "the words 'photo', 'of', 'cat'"),
    ("a red circle on a white background.", "the word '.'"),
    ("red circle", "'red circle'"),  # known words, another form
])
def test_outside_grammar_names_what_a_caption_cannot_hold(prompt, reason):
    assert outside_grammar(prompt) == reason


def grammar_warnings(caught):
    """The reasons of the grammar warnings among caught warnings."""
    return [str(w.message).rsplit(", not ", 1)[1] for w in caught if "knows only prompts" in str(w.message)]


def test_warning_names_the_known_words_once_per_set_of_unknown_words():
    prompts = ["a large red circle on a yellow background", "a red circle on a white background", "a photo",
               "a small blue square on a yellow background", ["a photo", "a red circle on a white background"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default
        for prompt in prompts:
            warn_outside_grammar(prompt, GRAMMAR)
        warn_outside_grammar("a cat", {})  # a model without a grammar
    assert grammar_warnings(caught) == ["'yellow' as a background.", "the word 'photo'."]
    message = str(caught[0].message)
    assert "\n" not in message and caught[0].category is UserWarning
    assert message.startswith("This model knows only prompts of the form "
                              "'a [{size} ]{color} {shape} on a {background} background' (size: small, large; "
                              "color: red, green, blue, yellow, purple, orange; shape: circle, square, triangle; "
                              "background: white, black, gray)")


def test_text_to_image_warns_for_a_model_with_a_grammar_which_save_keeps(tmp_path):
    assert checkpoints.read().config["grammar"] == GRAMMAR  # the shipped demo model has one
    sd = StableDiffusion(32, 32, config={**TINY_CONFIG, "grammar": GRAMMAR}, jit_compile=False)
    sd.save(tmp_path / "model")
    assert checkpoints.read(tmp_path / "model").config["grammar"] == GRAMMAR
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for prompt in ["a large red circle on a yellow background", "a red circle on a white background",
                       "a large red circle on a yellow background", "a cat"]:
            sd.text_to_image(prompt, num_steps=1, verbose=False)
    assert grammar_warnings(caught) == ["'yellow' as a background.", "the word 'cat'."]
