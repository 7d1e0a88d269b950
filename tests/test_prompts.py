"""Prompt control: A1111's emphasis syntax (parser, token weights, the weighting of CLIP's hidden states) and
clip_skip, against A1111's documented parser examples, hand computations with transformers' CLIPTextModel and
diffusers' pipelines fed those hand-computed prompt and negative-prompt embeddings (tolerance: uint8 +-1)."""
import numpy as np
import pytest
import torch

from reference import nchw, to_numpy
from stable_diffusion.emphasis import parse
from test_editing import assert_close, mask, picture

# A1111's `parse_prompt_attention` docstring (modules/prompt_parser.py): input -> output, exactly.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES + [
    ("", [("", 1.0)]),
    ("[[a]] b", [("a", 1 / 1.1 / 1.1), (" b", 1.0)]),
    ("(a: 1.5 ) (b:.5) c)", [("a", 1.5), (" ", 1.0), ("b", 0.5), (" c)", 1.0)]),  # spaces; an unmatched ")"
    (r"a\\(b) \x :2", [("a\\", 1.0), ("b", 1.1), (" x :2", 1.0)]),  # an escaped backslash; others dropped
])
def test_parser_equals_a1111(prompt, expected):
    assert parse(prompt) == expected


def test_token_weights(ours):
    """Each token takes its text's weight; start, end and padding tokens 1; the ids are the plain text's."""
    sd = ours("sd1")
    ids, weights = sd.tokenizer(["a (red:1.5) [big square]", "plain"], prompt_weighting=True, return_weights=True)
    np.testing.assert_array_equal(ids, sd.tokenize(["a red big square", "plain"]))
    np.testing.assert_allclose(weights[0, :7], [1, 1, 1.5, 1 / 1.1, 1 / 1.1, 1, 1], rtol=1e-7)
    assert weights.dtype == np.float32 and (weights[0, 7:] == 1).all() and (weights[1] == 1).all()
    long_ids, long_weights = sd.tokenizer("x " * 80 + "(y:2)", long_prompts=True, prompt_weighting=True,
                                          return_weights=True)
    assert long_ids.shape == long_weights.shape == (1, 154)
    assert long_ids[0, 77 + 6] == sd.tokenize("y")[0, 1]  # after 5 of the 80 x's in the second chunk
    assert np.flatnonzero(long_weights[0] != 1).tolist() == [77 + 6]


def hand_weighted_states(pipe, pieces, chunks=1):
    """A1111's emphasis by hand: each piece tokenized by transformers' CLIPTokenizer, every token of it weighted as
    the piece, chunks of 75 with start/end/padding (weight 1), CLIPTextModel's states times the weights, then each
    chunk scaled back to its mean."""
    tokenizer = pipe.tokenizer
    ids = [(i, weight) for text, weight in pieces for i in tokenizer(text, add_special_tokens=False).input_ids]
    rows, weights = [], []
    for k in range(chunks):
        part = ids[k * 75:(k + 1) * 75]
        padding = [tokenizer.pad_token_id] * (75 - len(part))
        rows.append([tokenizer.bos_token_id, *(i for i, _ in part), tokenizer.eos_token_id, *padding])
        weights.append([1.0, *(w for _, w in part), 1.0, *[1.0] * len(padding)])
    with torch.no_grad():
        z = pipe.text_encoder(torch.tensor(rows)).last_hidden_state
        weighted = z * torch.tensor(weights)[..., None]
        weighted = weighted * (z.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    return to_numpy(weighted).reshape(1, chunks * 77, -1)


def test_weighting_equals_a_hand_computation(reference, ours):
    pipe, _ = reference("sd1")
    sd = ours("sd1")
    got = sd.encode_text("a (red:1.4) circle on a [[white]] background", prompt_weighting=True)
    expected = hand_weighted_states(pipe, [("a ", 1), ("red", 1.4), (" circle on a ", 1), ("white", 1 / 1.21),
                                           (" background", 1)])
    assert np.abs(got - expected).max() <= 1e-4, "vs CLIPTextModel states weighted by hand (tolerance 1e-4)"
    assert np.abs(got - sd.encode_text("a red circle on a white background")).max() > 0.01, "weights changed nothing"
    long = "a small red circle, " * 16
    got = sd.encode_text(f"{long}(big:0.7)", long_prompts=True, prompt_weighting=True)
    expected = hand_weighted_states(pipe, [(long, 1), ("big", 0.7)], chunks=2)
    assert np.abs(got - expected).max() <= 1e-4, "long prompt vs CLIPTextModel states weighted by hand"


def test_plain_prompts_are_unchanged_bit_exactly(ours):
    sd = ours("sd2")
    prompts = ["a red circle, a blue square! " * 8, "x"]  # 2 chunks
    plain = sd.encode_text(prompts, long_prompts=True)
    np.testing.assert_array_equal(plain, sd.encode_text(prompts, long_prompts=True, prompt_weighting=False))
    np.testing.assert_array_equal(plain, sd.encode_text(prompts, long_prompts=True, prompt_weighting=True))


def skipped_states(pipe, prompts, clip_skip):
    """transformers' CLIPTextModel hidden state `clip_skip` layers before the last, through its final layer norm."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        return pipe.text_encoder.final_layer_norm(hidden[-1 - clip_skip])


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_clip_skip_encodings_equal_transformers(kind, reference, ours):
    pipe, _ = reference(kind)
    sd = ours(kind)
    prompts = ["a red circle", "", "a blue square!"]
    layers = pipe.text_encoder.config.num_hidden_layers
    for clip_skip in range(layers + 1):
        got = sd.encode_text(prompts, clip_skip=clip_skip)
        expected = to_numpy(skipped_states(pipe, prompts, clip_skip))
        assert np.abs(got - expected).max() <= 1e-4, f"clip_skip={clip_skip} vs CLIPTextModel (tolerance 1e-4)"
    for bad in (-1, layers + 1, 1.0, "1", [1]):
        with pytest.raises(ValueError, match="clip_skip must be None or an integer from 0 to"):
            sd.encode_text("a cat", clip_skip=bad)


@pytest.mark.parametrize("kind, clip_skip", [("sd1", 1), ("sd2", 2)])
def test_clip_skip_images_equal_diffusers_with_hand_computed_embeddings(kind, clip_skip, reference, ours):
    """Prompt and negative prompt alike (diffusers' own clip_skip skips the prompt only)."""
    pipe, _ = reference(kind)
    prompts, negative = ["a red circle", "a blue square"], ["green", "a triangle"]
    noise = np.random.default_rng(4).standard_normal((2, 8, 8, 4), dtype=np.float32)
    expected = pipe(prompt_embeds=skipped_states(pipe, prompts, clip_skip), num_inference_steps=2, guidance_scale=7.5,
                    negative_prompt_embeds=skipped_states(pipe, negative, clip_skip), height=64, width=64,
                    latents=nchw(noise), output_type="np").images
    got = ours(kind).text_to_image(prompts, negative_prompt=negative, num_steps=2, diffusion_noise=noise,
                                   clip_skip=clip_skip, verbose=False)
    assert_close(got, expected, f"StableDiffusionPipeline with clip_skip={clip_skip} embeddings")
    plain = ours(kind).text_to_image(prompts, negative_prompt=negative, num_steps=2, diffusion_noise=noise,
                                     verbose=False)
    assert np.abs(plain.astype(int) - got).max() > 1, "without clip_skip the test would pass as well"


@pytest.mark.parametrize("task", ["text_to_image", "image_to_image", "inpaint"])
def test_every_task_encodes_prompt_and_negative_prompt_alike(task, ours, monkeypatch):
    """clip_skip and prompt_weighting reach encode_text for the prompt, the negative prompt and the empty chunks
    that pad the shorter of them (whose states the tests above compare with diffusers')."""
    sd, calls = ours("sd1"), []
    encode_text = sd.encode_text
    monkeypatch.setattr(sd, "encode_text", lambda prompt, **options: calls.append((prompt, options))
                        or encode_text(prompt, **options))
    inputs = {"text_to_image": (), "image_to_image": (picture(),), "inpaint": (picture(), mask())}[task]
    getattr(sd, task)("a (cat:1.2)", *inputs, negative_prompt="x " * 80, long_prompts=True, clip_skip=1,
                      prompt_weighting=True, num_steps=2, seed=0, verbose=False)
    assert [prompt for prompt, _ in calls] == ["a (cat:1.2)", "x " * 80, ""]  # "": the prompt's second chunk
    assert all((options["clip_skip"], options["prompt_weighting"]) == (1, True) for _, options in calls)


def test_generate_image_encodes_the_negative_prompt_alike(ours):
    sd = ours("sd1")
    arguments = dict(negative_prompt="(green:1.5)", num_steps=2, seed=3, verbose=False)
    text = dict(clip_skip=1, prompt_weighting=True)
    expected = sd.text_to_image("a (red:0.8) circle", **arguments, **text)
    got = sd.generate_image(sd.encode_text("a (red:0.8) circle", **text), **arguments, **text)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(sd.generate_image(sd.encode_text("a (red:0.8) circle", **text), **arguments).astype(int)
                  - expected).max() > 0, "the negative prompt's encoding did not change"
