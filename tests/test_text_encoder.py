"""Text encoder parity: ours vs transformers' CLIPTextModel on the same weights and token ids."""
import numpy as np
import pytest
import torch

from reference import to_numpy

PROMPTS = ["a red circle on a white background", "", "An astronaut riding a horse, 4k, trending!"]


@pytest.mark.parametrize("kind", ["sd1", "sd2", "deep"])  # quick_gelu, gelu (pad "!"), 1 layer
def test_equals_transformers(kind, reference, ours):
    pipe, _ = reference(kind)
    sd = ours(kind)
    ids = sd.tokenize(PROMPTS)
    with torch.no_grad():
        expected = to_numpy(pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state)
    got = sd.encode_text(PROMPTS)
    assert got.shape == expected.shape == (3, 77, 32)
    diff = np.abs(got - expected).max()
    assert diff <= 1e-4, f"max abs diff {diff} vs CLIPTextModel (tolerance 1e-4)"


def test_single_prompt_gives_batch_of_one(ours):
    assert ours("sd1").encode_text("a blue square").shape == (1, 77, 32)
