"""End-to-end parity with diffusers' StableDiffusionPipeline (DDIM), bundles and bad input."""
import json
import shutil

import numpy as np
import pytest

from reference import nchw
from stable_diffusion import StableDiffusion


def reference_images(pipe, prompt, negative_prompt, noise, steps, guidance):
    images = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                  guidance_scale=guidance, height=noise.shape[1] * 8, width=noise.shape[2] * 8,
                  latents=nchw(noise), output_type="np").images
    return np.round(images * 255).astype("uint8")


@pytest.mark.parametrize("kind, height, width", [("sd1", 64, 48), ("sd2", 64, 64)])  # epsilon, v
def test_text_to_image_equals_diffusers(kind, height, width, reference, ours):
    pipe, _ = reference(kind)
    sd = ours(kind, height, width)
    prompts, negative = ["a red circle", "a blue square"], ["green", "a triangle"]
    noise = np.random.default_rng(4).standard_normal((2, height // 8, width // 8, 4), dtype=np.float32)
    expected = reference_images(pipe, prompts, negative, noise, steps=8, guidance=7.5)
    got = sd.text_to_image(prompts, negative_prompt=negative, num_steps=8, diffusion_noise=noise,
                           verbose=False)
    assert got.dtype == np.uint8 and got.shape == expected.shape == (2, height, width, 3)
    assert expected.std() > 10, "the reference images are flat: the comparison would prove little"
    diff = np.abs(got.astype(int) - expected).max()
    assert diff <= 1, f"max pixel difference {diff} vs StableDiffusionPipeline (tolerance 1/255)"


def test_generate_image_repeats_one_prompt_and_seeds_reproduce(ours):
    sd = ours("sd1")
    encoded = sd.encode_text("a red circle")
    first = sd.generate_image(encoded, batch_size=2, num_steps=2, seed=7, verbose=False)
    again = sd.text_to_image("a red circle", batch_size=2, num_steps=2, seed=7, verbose=False)
    assert first.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1]), "the two images of a batch got the same noise"


def test_bundle_reloads_bit_exact(ours, tmp_path):
    sd = ours("sd2")
    sd.save(tmp_path / "bundle")
    assert not list(tmp_path.glob(".*partial*")), "the temporary folder was left behind"
    again = StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)
    assert (again.img_height, again.img_width) == (64, 64)
    assert again.tokenizer.pad_token_id == 0  # SD 2.x pads with "!"
    for name in ("text_encoder", "diffusion_model", "decoder", "encoder"):
        for a, b in zip(getattr(sd, name).weights, getattr(again, name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    images = [model.text_to_image("a cat", num_steps=2, seed=1, verbose=False) for model in (sd, again)]
    assert np.abs(images[0].astype(int) - images[1]).max() <= 1  # XLA (sd) and eager (again) differ by ~1e-6
    with pytest.raises(FileExistsError, match="overwrite"):
        sd.save(tmp_path / "bundle")


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


def test_checkpoint_with_mismatched_shapes(reference, tmp_path):
    folder = copy_checkpoint(reference, tmp_path)
    config = json.loads((folder / "unet/config.json").read_text())
    config["cross_attention_dim"] = 64  # the weights have 32
    (folder / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"attn2.to_k.weight has shape \(32, 32\)"):
        StableDiffusion.from_checkpoint(folder)


def test_unsupported_or_unknown_checkpoints(reference, tmp_path):
    folder = copy_checkpoint(reference, tmp_path)
    config = json.loads((folder / "unet/config.json").read_text())
    config["addition_embed_type"] = "text_time"  # SDXL
    (folder / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unsupported UNet"):
        StableDiffusion.from_checkpoint(folder)
    with pytest.raises(FileNotFoundError):
        StableDiffusion.from_checkpoint(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="not a checkpoint"):
        StableDiffusion.from_checkpoint(tmp_path)
