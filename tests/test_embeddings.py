"""Textual-inversion embeddings (`embeddings.py`, `StableDiffusion.load_textual_inversion`): the three file formats,
written here with torch / safetensors, and one we train (`python -m stable_diffusion.train textual-inversion`), give
the images of diffusers' `load_textual_inversion` (tolerance: uint8 +-1); bad files raise one clear error each and
leave the model as it was."""
import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from reference import TINY_CONFIG, nchw
from stable_diffusion import StableDiffusion, embeddings, train
from stable_diffusion.data import make_dataset, write_folder
from stable_diffusion.weights import named_variables
from test_editing import assert_close

FC1, TOKEN = "encoder.layers.0.mlp.fc1.weight", "embeddings.token_embedding.weight"


def write_embeddings(folder, width, seed=0):
    """One file of each format: {path: (token diffusers loads it as, vectors (n, width))}. The A1111 `.pt` is
    written as A1111 saves it (a tensor that requires grad, with its bookkeeping entries)."""
    generator = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(n, width, generator=generator) for n in (1, 3, 2)]
    diffusers_file, a1111_pt, a1111_safetensors = (folder / "learned_embeds.safetensors", folder / "charturner.pt",
                                                   folder / "badhands.safetensors")
    save_file({"<cat-toy>": vectors[0][0]}, diffusers_file)
    parameter = vectors[1].clone().requires_grad_(True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": parameter}, "name": "charturner",
                "step": 500, "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned"}, a1111_pt)
    save_file({"emb_params": vectors[2]}, a1111_safetensors)
    return {diffusers_file: ("<cat-toy>", vectors[0]), a1111_pt: ("charturner", vectors[1]),
            a1111_safetensors: ("badhands", vectors[2])}


def test_files_read_as_written(tmp_path):
    for path, (token, vectors) in write_embeddings(tmp_path, 8).items():
        name, got = embeddings.read(path)
        assert name == token, "diffusers: the key; A1111: the file name"
        np.testing.assert_array_equal(got["text_encoder"], vectors.detach().numpy())
        assert embeddings.read(path, token="other")[0] == "other"
    parameter = torch.nn.Parameter(torch.randn(2, 8, dtype=torch.float16))  # pickled by _rebuild_parameter
    torch.save({"string_to_param": {"*": parameter}, "name": "ignored"}, tmp_path / "half.pt")
    name, got = embeddings.read(tmp_path / "half.pt")
    assert name == "half" and list(got) == ["text_encoder"] and got["text_encoder"].dtype == np.float32
    np.testing.assert_array_equal(got["text_encoder"], parameter.detach().float().numpy())


@pytest.fixture
def own(ours):
    """own(kind): the shared `ours(kind)` pipeline, its tokenizer, text encoder and config put back afterwards."""
    changed = []

    def get(kind):
        changed.append((ours(kind), ours(kind).tokenizer, ours(kind).text_encoder, ours(kind).config))
        return ours(kind)
    yield get
    for sd, tokenizer, text_encoder, config in changed:
        sd.tokenizer, sd.text_encoder, sd.config = tokenizer, text_encoder, config


def copied(pipe):
    """A pipeline sharing `pipe`'s UNet and VAE, with copies of what loading embeddings changes (tokenizer, text
    encoder) and of its scheduler."""
    copy_ = StableDiffusionPipeline(**dict(pipe.components, **{
        name: copy.deepcopy(getattr(pipe, name)) for name in ("text_encoder", "tokenizer", "scheduler")}))
    copy_.scheduler = copy.deepcopy(pipe.scheduler)  # __init__ changed its copy's clip_sample to False
    return copy_


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_images_equal_diffusers_load_textual_inversion(kind, reference, own, tmp_path):
    pipe = copied(reference(kind)[0])
    sd = own(kind)
    files = write_embeddings(tmp_path, pipe.text_encoder.config.hidden_size)
    prompt, negative = "a <cat-toy> next to charturner, badhands", "blurry badhands"
    noise = np.random.default_rng(5).standard_normal((1, 8, 8, 4), dtype=np.float32)
    arguments = dict(negative_prompt=negative, num_steps=2, diffusion_noise=noise, verbose=False)
    without = sd.encode_text([prompt, negative])
    for path, (token, _) in files.items():
        pipe.load_textual_inversion(str(path), token=token)
        sd.load_textual_inversion(path)
    assert sd.tokenize("charturner")[0, 1:5].tolist() == pipe.tokenizer.convert_tokens_to_ids(
        ["charturner", "charturner_1", "charturner_2"]) + [sd.tokenizer.bpe.end_token_id]
    with torch.no_grad():
        expected = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    got = sd.encode_text([prompt, negative])
    assert np.abs(got - torch.cat(expected).numpy()).max() <= 1e-4, "vs diffusers' encode_prompt (tolerance 1e-4)"
    assert np.abs(got - without).max() > 0.1, "the embeddings changed nothing"
    ids = torch.from_numpy(sd.tokenize([prompt, negative])).long()
    with torch.no_grad():  # the text encoder with more rows, stopping a layer early
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = pipe.text_encoder.final_layer_norm(hidden[-2]).numpy()
    assert np.abs(sd.encode_text([prompt, negative], clip_skip=1) - expected).max() <= 1e-4, "with clip_skip=1"
    expected = pipe(prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
                    latents=nchw(noise), output_type="np").images
    got = sd.text_to_image(prompt, **arguments)
    assert_close(got, expected, f"StableDiffusionPipeline.load_textual_inversion ({kind})")


@pytest.mark.training
def test_trained_embedding_loads_in_diffusers_as_in_ours(reference, own, tmp_path):
    """An embedding of two vectors learned on the SD 1.x pipeline by the CLI (a few steps from "red"): diffusers'
    `load_textual_inversion` and ours read it as `<new>`, `<new>_1` and make the same images (one uint8 level);
    the file is all that training leaves in its folder."""
    pipe, folder = reference("sd1")
    images, captions = make_dataset(2, seed=3)
    write_folder(tmp_path / "data", images, [caption.replace(" on ", " <new> on ") for caption in captions])
    output = tmp_path / "out" / "learned_embeds.safetensors"
    train.main(["textual-inversion", "--checkpoint", str(folder), "--data", str(tmp_path / "data"), "--output",
                str(output), "--token", "<new>", "--initializer-token", "red", "--num-vectors", "2", "--epochs", "2",
                "--batch-size", "2", "--learning-rate", "0.05", "--verbose", "0"])
    assert list(output.parent.iterdir()) == [output]
    vectors = load_file(output)["<new>"]
    red = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("red</w>")]
    assert vectors.shape == (2, 32) and (vectors - red).abs().min() > 1e-3, "not trained from the initializer"
    pipe, sd = copied(pipe), own("sd1")
    pipe.load_textual_inversion(str(output))
    sd.load_textual_inversion(output)
    prompt, negative = "a <new> circle", "a red <new> square"
    expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # "a <new> <new>_1 circle"
    assert sd.tokenize(prompt)[0, 1:5].tolist() == pipe.tokenizer(expanded).input_ids[1:5] == [320, 49408, 49409, 7117]
    assert np.abs(sd.encode_text(prompt) - sd.encode_text("a red red circle")).max() > 0.1, "the embedding did nothing"
    noise = np.random.default_rng(6).standard_normal((1, 8, 8, 4), dtype=np.float32)
    expected = pipe(prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
                    latents=nchw(noise), output_type="np").images
    got = sd.text_to_image(prompt, negative_prompt=negative, num_steps=2, diffusion_noise=noise, verbose=False)
    assert_close(got, expected, "a trained embedding in StableDiffusionPipeline.load_textual_inversion")


def test_saved_bundle_keeps_the_embedding(tmp_path):
    sd = StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=False)
    path = next(iter(write_embeddings(tmp_path, 8)))
    sd.load_textual_inversion(path, token="<Cat-Toy>")
    sd.save(tmp_path / "bundle")
    again = StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)
    prompt = "a photo of a <cat-toy>, <CAT-TOY>!"
    assert again.tokenize(prompt)[0, 5] == 49408
    np.testing.assert_array_equal(again.encode_text(prompt), sd.encode_text(prompt))


def test_unload_lora_after_an_embedding_restores_the_text_encoder(tmp_path):
    """The embedding's text encoder shares the layers LoRAs change, so `unload_lora` restores them."""
    sd = StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=False)
    before = {key: variable.numpy() for key, variable in named_variables(sd.text_encoder).items()}
    tensors = {f"text_encoder.encoder.layers.0.mlp.fc1.lora_{part}.weight": torch.randn(shape)
               for part, shape in (("A", (2, 8)), ("B", (16, 2)))}
    save_file(tensors, tmp_path / "lora.safetensors")
    sd.load_lora(tmp_path / "lora.safetensors")
    sd.load_textual_inversion(next(iter(write_embeddings(tmp_path, 8))))
    assert not np.array_equal(named_variables(sd.text_encoder)[FC1].numpy(), before[FC1])
    sd.unload_lora()
    after = named_variables(sd.text_encoder)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key].numpy()[:len(value)], value, err_msg=key)
    assert after[TOKEN].shape == (49409, 8)


@pytest.fixture(scope="module")
def with_embedding(tmp_path_factory):
    """A tiny model with the embedding "taken_1", and its encoding of "taken_1 a photo"."""
    sd = StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=False)
    path = tmp_path_factory.mktemp("embedding") / "taken_1.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 8)}}, path)
    sd.load_textual_inversion(path)
    return sd, sd.encode_text("taken_1 a photo")


def safetensors(**tensors):
    """Makes folder/embedding.safetensors holding `tensors`."""
    def make(folder):
        save_file(tensors, folder / "embedding.safetensors")
        return folder / "embedding.safetensors"
    return make


def truncated(folder):
    path = safetensors(emb_params=torch.zeros(2, 8))(folder)
    path.write_bytes(path.read_bytes()[:-16])
    return path


def not_a_zip(folder):
    (folder / "embedding.pt").write_bytes(b"not a zip")
    return folder / "embedding.pt"


def parameter_dict(folder):
    """The original textual_inversion repository's layout: `string_to_param` a torch ParameterDict (a module)."""
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 8))})},
               folder / "embedding.pt")
    return folder / "embedding.pt"


@pytest.mark.parametrize("make, token, message", [
    (safetensors(emb_params=torch.zeros(1, 16)), None, "of width 16; this model's text encoder is 8 wide"),
    (truncated, None, "not a readable safetensors file"),
    (not_a_zip, None, "not a readable .ckpt"),
    (parameter_dict, None, "refuses to load torch.nn.modules.container.ParameterDict"),
    (safetensors(a=torch.zeros(1, 8), b=torch.zeros(1, 8)), None, "not a textual-inversion embedding"),
    (safetensors(emb_params=torch.zeros(0, 8)), None, "not a textual-inversion embedding"),
    (safetensors(emb_params=torch.full((1, 8), float("nan"))), None, "not finite"),
    (safetensors(emb_params=torch.zeros(1, 8)), "a</w>", "'a</w>' is already in the"),
    (safetensors(emb_params=torch.zeros(2, 8)), "TAKEN", "'TAKEN_1' is already in the"),
    (safetensors(emb_params=torch.zeros(1, 8)), "", "token must be None or a non-empty string"),
])
def test_bad_files_leave_the_model_unchanged(make, token, message, with_embedding, tmp_path):
    sd, states = with_embedding
    before = (sd.text_encoder, sd.tokenizer, sd.config)
    with pytest.raises(ValueError, match=message):
        sd.load_textual_inversion(make(tmp_path), token=token)
    assert all(now is then for now, then in zip((sd.text_encoder, sd.tokenizer, sd.config), before))
    assert sd.tokenizer.added_tokens == {"taken_1": 49408}
    np.testing.assert_array_equal(sd.encode_text("taken_1 a photo"), states)
