"""End-to-end parity with diffusers' StableDiffusionPipeline (DDIM; other samplers in
test_schedulers.py), long prompts, seeds and the step callback, bundles, the API's signatures and bad input."""
import inspect
import json
import shutil

import numpy as np
import pytest
import torch

from reference import TINY_CONFIG, nchw, reference_images
from stable_diffusion import StableDiffusion


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.compiled)])  # XLA's loop
@pytest.mark.parametrize("kind, height, width", [("sd1", 64, 48), ("sd2", 64, 64)])  # epsilon, v
def test_text_to_image_equals_diffusers(kind, height, width, jit_compile, reference, ours):
    pipe, _ = reference(kind)
    sd = ours(kind, height, width, jit_compile=jit_compile)
    prompts, negative = ["a red circle", "a blue square"], ["green", "a triangle"]
    noise = np.random.default_rng(4).standard_normal((2, height // 8, width // 8, 4), dtype=np.float32)
    expected = reference_images(pipe, prompts, negative_prompt=negative, noise=noise, steps=8)
    got = sd.text_to_image(prompts, negative_prompt=negative, num_steps=8, diffusion_noise=noise,
                           verbose=False)
    assert got.dtype == np.uint8 and got.shape == expected.shape == (2, height, width, 3)
    assert expected.std() > 10, "the reference images are flat: the comparison would prove little"
    diff = np.abs(got.astype(int) - expected).max()
    assert diff <= 1, f"max pixel difference {diff} vs StableDiffusionPipeline (tolerance 1/255)"


@pytest.mark.parametrize("guidance, jit_compile", [(1.0, False), pytest.param(0.0, True, marks=pytest.mark.compiled)])
def test_guidance_at_most_one_is_the_prompts_prediction_alone(guidance, jit_compile, reference, ours):
    """As diffusers: no classifier-free guidance (one UNet call per step on the prompt), numpy and compiled loops."""
    pipe, _ = reference("sd1")
    sd = ours("sd1", jit_compile=jit_compile)
    noise = np.random.default_rng(5).standard_normal((2, 8, 8, 4), dtype=np.float32)
    expected = reference_images(pipe, ["a red circle", "a blue square"], negative_prompt=["green", "a triangle"],
                                noise=noise, steps=8, guidance=guidance)
    got = sd.text_to_image(["a red circle", "a blue square"], negative_prompt=["green", "a triangle"], num_steps=8,
                           diffusion_noise=noise, unconditional_guidance_scale=guidance, verbose=False)
    assert np.abs(got.astype(int) - expected).max() <= 1, "vs StableDiffusionPipeline (tolerance 1/255)"


def test_generate_image_repeats_one_prompt_and_seeds_reproduce(ours):
    sd = ours("sd1")
    encoded = sd.encode_text("a red circle")
    first = sd.generate_image(encoded, batch_size=2, num_steps=2, seed=7, verbose=False)
    again = sd.text_to_image("a red circle", batch_size=2, num_steps=2, seed=7, verbose=False)
    assert first.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1]), "the two images of a batch got the same noise"


def test_seeds_are_per_image_and_callback_sees_every_step(ours):
    sd, calls = ours("sd1"), []
    batch = sd.text_to_image("a red circle", batch_size=2, num_steps=3, seed=5, verbose=False,
                             callback=lambda *args: calls.append(args))
    for i in range(2):  # image i of a batch is the single image of seed + i
        alone = sd.text_to_image("a red circle", num_steps=3, seed=5 + i, verbose=False)
        assert np.abs(batch[i].astype(int) - alone[0]).max() <= 1  # batch sizes differ by ~1e-6 in float
    assert [(step, t) for step, t, _ in calls] == [(0, 667), (1, 334), (2, 1)]
    latents = sd.text_to_image("a red circle", batch_size=2, num_steps=3, seed=5, verbose=False,
                               return_latents=True)
    assert latents.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(latents, calls[-1][2], atol=1e-5)
    np.testing.assert_array_equal(sd.decode(latents), batch)


def test_long_prompts_equal_diffusers_with_chunked_embeddings(reference, ours):
    """Chunks of 75 tokens with start and end tokens, encoded by transformers' CLIPTextModel one by
    one and concatenated, fed to StableDiffusionPipeline as prompt_embeds (tolerance 1/255)."""
    pipe, _ = reference("sd1")
    sd = ours("sd1")
    prompt, negative = "a small red circle on a white background, " * 12, "green"

    def chunked_embeddings(text, chunks):
        ids = pipe.tokenizer(text, truncation=False).input_ids[1:-1]
        start, end, pad = pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id
        rows = [[start, *ids[i * 75:(i + 1) * 75], end] for i in range(chunks)]
        rows = torch.tensor([row + [pad] * (77 - len(row)) for row in rows])
        with torch.no_grad():
            return pipe.text_encoder(rows)[0].reshape(1, -1, pipe.text_encoder.config.hidden_size)

    assert 77 < len(pipe.tokenizer(prompt, truncation=False).input_ids) <= 152  # 2 chunks
    noise = np.random.default_rng(6).standard_normal((1, 8, 8, 4), dtype=np.float32)
    expected = pipe(prompt_embeds=chunked_embeddings(prompt, 2), negative_prompt_embeds=chunked_embeddings(negative, 2),
                    num_inference_steps=4, latents=nchw(noise), height=64, width=64, output_type="np").images
    got = sd.text_to_image(prompt, negative_prompt=negative, num_steps=4, diffusion_noise=noise,
                           long_prompts=True, verbose=False)
    diff = np.abs(got.astype(int) - np.round(expected * 255)).max()
    assert diff <= 1, f"max pixel difference {diff} vs StableDiffusionPipeline with chunked prompt_embeds"
    assert sd.encode_text(prompt, long_prompts=True).shape == (1, 154, 32)
    with pytest.warns(UserWarning, match="truncated"):
        assert sd.encode_text(prompt).shape == (1, 77, 32)
    setup = sd._prepare(sd.encode_text("a cat", long_prompts=True), negative_prompt=prompt, batch_size=1, num_steps=1,
                        seed=0, diffusion_noise=None, scheduler=None, long_prompts=True, clip_skip=None,
                        prompt_weighting=False)
    (context,), (negative,) = setup.context, setup.negative
    assert context.shape == negative.shape == (1, 154, 32)  # the shorter prompt padded with an empty chunk
    np.testing.assert_allclose(context[:, 77:], chunked_embeddings("", 1).numpy(), atol=1e-5)


def test_bundle_reloads_bit_exact(ours, tmp_path):
    sd = ours("sd2")
    sd.save(tmp_path / "bundle")
    assert not list(tmp_path.glob(".*partial*")), "the temporary folder was left behind"
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [
        "config.json", "decoder.safetensors", "diffusion_model.safetensors", "encoder.safetensors",
        "text_encoder.safetensors", "tokenizer"]
    again = StableDiffusion.from_checkpoint(tmp_path / "bundle")
    assert (again.img_height, again.img_width) == (64, 64)
    assert again.scheduler_name == "ddim"  # the saved pipeline's sampler, not its folder's PNDMScheduler
    assert again.tokenizer.pad_token_id == 0  # SD 2.x pads with "!"
    for name in ("text_encoder", "diffusion_model", "decoder", "encoder"):
        for a, b in zip(getattr(sd, name).weights, getattr(again, name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    images = [model.text_to_image("a cat", num_steps=2, seed=1, verbose=False) for model in (sd, again)]
    assert np.abs(images[0].astype(int) - images[1]).max() <= 1  # XLA (sd) and eager (again) differ by ~1e-6
    with pytest.raises(FileExistsError, match="overwrite"):
        sd.save(tmp_path / "bundle")


def test_default_sampler_is_the_one_its_config_names():
    """No `scheduler`: the sampler of the scheduler config's diffusers class (`schedulers.default_name`: a folder's,
    or a bundle's, the saved pipeline's as above); a given one wins."""
    config = dict(TINY_CONFIG, scheduler={"_class_name": "EulerAncestralDiscreteScheduler"})
    names = [StableDiffusion(32, 32, config=config, **given).scheduler_name for given in ({}, dict(scheduler="pndm"))]
    assert names == ["euler_a", "pndm"]


@pytest.mark.parametrize("arguments, message", [
    (dict(img_height=60), "multiple of 8"),
    (dict(img_width=0), "multiple of 8"),
    (dict(img_height=72), "of 16 for this model"),  # 8 * 2 UNet levels of the tiny model
])
def test_bad_image_size(arguments, message, reference):
    with pytest.raises(ValueError, match=message):
        StableDiffusion.from_checkpoint(reference("sd1")[1], **arguments)


@pytest.mark.parametrize("arguments, message", [
    (dict(batch_size=0), "batch_size"),
    (dict(num_steps=0), "num_steps"),
    (dict(prompt=3), "3"),
    (dict(prompt=["a", None]), "None"),
    (dict(diffusion_noise=np.zeros((1, 4, 4, 4))), "diffusion_noise"),
    (dict(prompt=["a", "b"], batch_size=3), "batch_size"),
    (dict(negative_prompt=["a", "b", "c"]), "negative prompts"),
])
def test_bad_generation_arguments(arguments, message, ours):
    arguments = dict(dict(prompt="a cat", num_steps=1, verbose=False), **arguments)
    with pytest.raises(ValueError, match=message):
        ours("sd1").text_to_image(**arguments)


def test_generation_methods_share_one_keyword_only_order():
    """The prompt (and picture, mask) positional, every other argument keyword-only, in one order (the shared ones,
    then each task's own), then SDXL's `**micro_conditioning`."""
    methods = dict(text_to_image=["prompt"], generate_image=["prompt"], image_to_image=["prompt", "image"],
                   inpaint=["prompt", "image", "mask"])
    signatures = {name: inspect.signature(getattr(StableDiffusion, name)).parameters for name in methods}
    for name, positional in methods.items():
        kinds = [(p.name, p.kind) for p in signatures[name].values()]
        assert kinds[1:len(positional) + 1] == [(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                                for n in positional], name  # after the pipeline (self or sd)
        assert kinds[-1] == ("micro_conditioning", inspect.Parameter.VAR_KEYWORD), name
        assert all(kind == inspect.Parameter.KEYWORD_ONLY for _, kind in kinds[len(positional) + 1:-1]), name
    shared = [(p.name, p.default) for p in signatures["text_to_image"].values() if p.kind == p.KEYWORD_ONLY][:-1]
    assert [name for name, _ in shared[:3]] == ["negative_prompt", "batch_size", "num_steps"]
    start, end = ("denoising_start", None), ("denoising_end", None)  # SDXL's ensemble of experts, as diffusers
    own = dict(text_to_image=[end], generate_image=[end], inpaint=[("strength", 1.0), ("sample_latents", False)],
               image_to_image=[("strength", 0.8), ("sample_latents", False), start, end])
    for name in methods:
        keywords = [(p.name, p.default) for p in signatures[name].values() if p.kind == p.KEYWORD_ONLY]
        assert keywords == shared + own[name], name


@pytest.mark.parametrize("call", [
    lambda sd, tmp: sd.text_to_image("a cat", "a dog"),
    lambda sd, tmp: sd.generate_image(sd.encode_text("a cat"), None, 2),
    lambda sd, tmp: sd.image_to_image("a cat", np.zeros((64, 64, 3), "uint8"), 0.5),
    lambda sd, tmp: sd.inpaint("a cat", np.zeros((64, 64, 3), "uint8"), np.zeros((64, 64), "uint8"), 0.5),
    lambda sd, tmp: sd.tokenize("a cat", True),
    lambda sd, tmp: sd.encode_text("a cat", True),
    lambda sd, tmp: sd.save(tmp / "bundle", True),
    lambda sd, tmp: StableDiffusion(64, 64, False),
    lambda sd, tmp: StableDiffusion.from_checkpoint(None, 64),
    lambda sd, tmp: StableDiffusion.from_preset("sd-1.5", 64),
])
def test_keyword_only_arguments_refuse_positions(call, ours, tmp_path):
    with pytest.raises(TypeError, match="positional argument"):
        call(ours("sd1"), tmp_path)
    assert not (tmp_path / "bundle").exists()


def copy_checkpoint(reference, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(reference("sd1")[1], folder)
    return folder


@pytest.mark.parametrize("missing", ["unet", "vae/config.json", "text_encoder/model.safetensors",
                                     "scheduler"])
def test_checkpoint_missing_a_component(missing, reference, tmp_path):
    folder = copy_checkpoint(reference, tmp_path)
    target = folder / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=missing.split("/")[0]):
        StableDiffusion.from_checkpoint(folder)


@pytest.mark.parametrize("key, value, message", [
    ("out_channels", 8, r"conv_out.weight has shape \(4, 32, 3, 3\)"),  # the weights have 4
    ("cross_attention_dim", 64, r"the UNet takes context_dim=64 and pooled_dim=0, but its text encoders give 32"),
])
def test_checkpoint_with_mismatched_shapes(key, value, message, reference, tmp_path):
    folder = copy_checkpoint(reference, tmp_path)
    config = json.loads((folder / "unet/config.json").read_text())
    config[key] = value
    (folder / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        StableDiffusion.from_checkpoint(folder)


def test_checkpoint_whose_sample_size_is_no_integer(reference, tmp_path):
    """A UNet config with `"sample_size": null` (the image size comes from it): one error naming the file."""
    folder = copy_checkpoint(reference, tmp_path)
    config = json.loads((folder / "unet/config.json").read_text())
    (folder / "unet/config.json").write_text(json.dumps(dict(config, sample_size=None)))
    with pytest.raises(ValueError, match=r"unet.config\.json: 'NoneType' object cannot be interpreted as an integer"):
        StableDiffusion.from_checkpoint(folder)


def test_unsupported_or_unknown_checkpoints(reference, tmp_path):
    folder = copy_checkpoint(reference, tmp_path)
    config = json.loads((folder / "unet/config.json").read_text())
    config["addition_embed_type"] = "text_image"  # Kandinsky 2.1
    (folder / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unsupported UNet"):
        StableDiffusion.from_checkpoint(folder)
    with pytest.raises(FileNotFoundError):
        StableDiffusion.from_checkpoint(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="not a checkpoint"):
        StableDiffusion.from_checkpoint(tmp_path)
