"""benchmarks/adherence.py: the held-out set is new to the demo model's recipe and names every size;
the scores come per size word with the count of blank images. No generation here."""
import numpy as np
import pytest

from benchmarks.adherence import GROUPS, HELD_OUT_SEED, parse_args, prompts, scores_by_size
from stable_diffusion.data import BACKGROUNDS, make_dataset, parse_caption

# Seeds the recipe used (see benchmarks/adherence.py): the training and fine-tuning images
# (`make_dataset(8000, seed=0)`, `make_dataset(8000, seed=1)`), the tuned set's prompts and images
# (seed 0, images 0 to 99) and tests/test_demo_model.py's (seed 1, images 1 to 20).
TUNING_SEEDS = {0, 1, *range(100), *range(1, 21)}


def test_held_out_set_is_new_and_names_every_size():
    held_out, tuned = parse_args(["--held-out"]), parse_args([])
    assert (held_out.seed, held_out.num_images) == (HELD_OUT_SEED, 300)
    assert (tuned.seed, tuned.num_images) == (0, 100)
    seeds = range(held_out.seed, held_out.seed + held_out.num_images)  # image k is seeded with seed + k
    assert not TUNING_SEEDS & set(seeds)
    captions = prompts(held_out.num_images, held_out.seed)
    tuned_pairs = set(zip(prompts(tuned.num_images, tuned.seed), range(tuned.seed, tuned.seed + tuned.num_images)))
    assert not tuned_pairs & set(zip(captions, seeds))
    sizes = [parse_caption(caption)["size"] for caption in captions]
    assert min(sizes.count(size) for size in ("small", "large", None)) >= 80  # ~100 each


def test_held_out_set_takes_no_seed():
    with pytest.raises(SystemExit):
        parse_args(["--held-out", "--seed", "0"])


def test_scores_by_size_count_blank_images():
    images, captions = make_dataset(12, seed=3)
    images[0] = BACKGROUNDS[parse_caption(captions[0])["background"]]  # nothing drawn
    scores = scores_by_size(images, captions)
    assert list(scores) == list(GROUPS)
    size = parse_caption(captions[0])["size"]
    assert {group: row["blank"] for group, row in scores.items()} == {
        group: int(group in (size, "all")) for group in GROUPS}
    assert sum(scores[group]["count"] for group in ("small", "large", None)) == scores["all"]["count"] == 12
    assert scores["all"]["shape"] == pytest.approx(11 / 12)  # the drawn shapes are all read right
    assert scores[None]["size"] is None and scores["large"]["all"] == 1.0
