"""Text encoder parity: ours vs transformers' CLIPTextModel and CLIPTextModelWithProjection on the same weights and
token ids."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from reference import make_projected_text_encoder, predicted, to_numpy
from stable_diffusion import diffusers_folder, settings
from stable_diffusion.text_encoder import TextEncoder, skipping
from stable_diffusion.tokenizer import Tokenizer
from stable_diffusion.weights import CheckpointError, strict_loader

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


def read_text_encoder(folder):
    """Our text encoder of a transformers model folder, as the diffusers-folder reader builds and loads it: the
    config translated and checked against the weights, the weights loaded strictly by name."""
    config = diffusers_folder.translated(folder / "config.json", diffusers_folder.text_encoder_config)
    tensors = diffusers_folder.text_weights(folder)
    settings.check_model("text_encoder", config, tensors, folder / "config.json")
    model = TextEncoder(**config)
    strict_loader(tensors, ("embeddings.position_ids",))([model])
    return model


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # SDXL's tokenizer and tokenizer_2
def test_projected_encoder_equals_transformers(pad, tmp_path):
    """SDXL's text_encoder_2: text_embeds (the pooled state, projected), the un-normed penultimate hidden state
    (and, with clip_skip 1, the one before it), and the final-layer-normed last one."""
    reference = make_projected_text_encoder(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"text_projection.weight", "text_model.final_layer_norm.weight"} <= keys, "transformers' key layout"
    ours = read_text_encoder(tmp_path)
    ids = Tokenizer.from_vendored(pad)(PROMPTS)
    assert (ids == 0).any() if pad == "!" else not (ids == 0).any()
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids).long(), output_hidden_states=True)
    last, text_embeds = predicted(ours, ids)
    for got, want, what in [(last, expected.last_hidden_state, "last_hidden_state"),
                            (text_embeds, expected.text_embeds, "text_embeds")]:
        diff = np.abs(got - to_numpy(want)).max()
        assert diff <= 1e-4, f"max abs diff {diff} of {what} vs CLIPTextModelWithProjection (tolerance 1e-4)"
    assert text_embeds.shape == (3, 24) and np.abs(text_embeds).std() > 0.1
    for k in (1, 2):  # SDXL's hidden_states[-2], and hidden_states[-(clip_skip + 2)] with clip_skip 1
        states, embeds = predicted(skipping(ours, k, normed=False), ids)
        diff = np.abs(states - to_numpy(expected.hidden_states[-1 - k])).max()
        assert diff <= 1e-4, f"max abs diff {diff} of hidden_states[{-1 - k}] vs transformers (tolerance 1e-4)"
        assert np.array_equal(embeds, text_embeds), "text_embeds stay the last layer's"


def test_unnormed_penultimate_state_equals_transformers(reference, ours):
    """SDXL's first text encoder (CLIPTextModel, ViT-L layout, end-token padding): hidden_states[-2], not normed."""
    pipe, sd = reference("sd1")[0], ours("sd1")
    ids = sd.tokenize(PROMPTS)
    with torch.no_grad():
        hidden = pipe.text_encoder(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states
    expected = to_numpy(hidden[-2])
    got = predicted(skipping(sd.text_encoder, 1, normed=False), ids)
    normed = predicted(skipping(sd.text_encoder, 1), ids)
    assert got.shape == expected.shape == (3, 77, 32) and np.abs(got - normed).max() > 0.1
    diff = np.abs(got - expected).max()
    assert diff <= 1e-4, f"max abs diff {diff} vs CLIPTextModel hidden_states[-2] (tolerance 1e-4)"


CLIP_CONFIG = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=37, hidden_act="gelu")  # a CLIPTextConfig's keys we read


@pytest.mark.parametrize("change, expected", [
    (dict(architectures=["CLIPTextModelWithProjection"], projection_dim=24), dict(projection_dim=24)),
    (dict(architectures=["CLIPTextModel"], projection_dim=512), {}),  # transformers writes projection_dim anyway
    (dict(), {}),
])
def test_text_encoder_config_reads_the_projection(change, expected):
    assert diffusers_folder.text_encoder_config(dict(CLIP_CONFIG, **change)) == dict(
        vocab_size=49408, max_length=77, width=32, num_layers=2, num_heads=2, intermediate_size=37, activation="gelu",
        **expected)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["CLIPModel"]), r"Unsupported text encoder architectures \['CLIPModel'\]"),
    (dict(architectures=["T5EncoderModel"]), "Unsupported text encoder architectures"),
    (dict(architectures=["CLIPTextModelWithProjection"]), "lacks the key 'projection_dim'"),
])
def test_unsupported_text_encoder_config_is_one_checkpoint_error(change, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(CLIP_CONFIG, **change)))
    with pytest.raises(CheckpointError, match=f"config.json.*{message}"):
        diffusers_folder.translated(tmp_path / "config.json", diffusers_folder.text_encoder_config)
