"""SDXL's pipeline against diffusers' StableDiffusionXLPipeline on one tiny random-weight model saved with
`save_pretrained` (`reference.make_sdxl_pipeline`): two text encoders, pooled text embeddings, the time ids of sizes
and crop, the zero negative states of `force_zeros_for_empty_prompt`, no guidance at a scale of 1, bundles, the
default sampler a folder's scheduler config names (Turbo's); the VAE's `force_upcast` setting; image-to-image
against StableDiffusionXLImg2ImgPipeline (its negative time ids)."""
import json
import shutil

import numpy as np
import pytest
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from PIL import Image

import ldm_reference
from reference import assert_same_generation, nchw, nhwc, relative_difference
from test_editing import patch_diffusers, picture
from stable_diffusion import StableDiffusion, checkpoints
from stable_diffusion.train import train_lora, train_textual_inversion
from stable_diffusion.weights import CheckpointError

SIZES = dict(original_size=(40, 56), crops_coords_top_left=(8, 16), target_size=(48, 32))
# diffusers 0.42 concatenates [negative, prompt] time ids before repeating them per image, so for batches of more than
# one image, negative sizes of their own reach other images' rows than their states: compared with one image.
NEGATIVE_SIZES = dict(SIZES, negative_original_size=(24, 24), negative_target_size=(64, 64))


@pytest.mark.parametrize("prompts, negative, guidance, sizes, jit", [
    (["a red circle", "a blue square"], ["green", "a triangle"], 7.5, {}, False),
    (["a red circle", "a blue square"], None, 7.5, {}, False),  # force_zeros_for_empty_prompt: zero states
    pytest.param(["a red circle", "a blue square"], ["green", "a triangle"], 5.0, SIZES, False,
                 marks=pytest.mark.slow),  # sizes as below, a batch of two
    (["a red circle"], ["green"], 5.0, NEGATIVE_SIZES, False),
    pytest.param(["a red circle", "a blue square"], ["green", "a triangle"], 1.0, SIZES, False,
                 marks=pytest.mark.slow),  # no guidance: the prompt's
    pytest.param(["a red circle"], ["green"], 7.5, NEGATIVE_SIZES, True, marks=pytest.mark.compiled),  # XLA's loop
])
def test_text_to_image_equals_diffusers(prompts, negative, guidance, sizes, jit, sdxl):
    """The final latents within 1e-4 of their scale (float32 rounding: ~1e-6; the original and target sizes
    swapped: 4e-3), the images within one uint8 level."""
    pipe, _, ours = sdxl
    noise = np.random.default_rng(4).standard_normal((len(prompts), 8, 8, 4), dtype=np.float32)
    expected = pipe(prompts, negative_prompt=negative, num_inference_steps=8, guidance_scale=guidance, height=64,
                    width=64, latents=nchw(noise), output_type="latent", **sizes).images
    got = ours(jit).text_to_image(prompts, negative_prompt=negative, num_steps=8, diffusion_noise=noise,
                                  unconditional_guidance_scale=guidance, return_latents=True, verbose=False, **sizes)
    assert_same_generation(pipe, ours(jit), got, expected, "StableDiffusionXLPipeline")


@pytest.mark.parametrize("prompts, negative, sizes", [  # the first: the target size and crop corner the prompt's
    (["a red circle", "a blue square"], ["green", "a triangle"], dict(SIZES, negative_original_size=(24, 24))),
    pytest.param(["a red circle"], None, NEGATIVE_SIZES, marks=pytest.mark.slow),
    pytest.param(["a red circle", "a blue square"], ["green", "a triangle"], SIZES, marks=pytest.mark.slow),
])
def test_image_to_image_equals_diffusers(prompts, negative, sizes, sdxl, monkeypatch):
    """SDXL base image-to-image against StableDiffusionXLImg2ImgPipeline of the same models, whose negative time ids
    are not text-to-image's: each negative size the prompt's unless given (one alone counts), the crop corner always
    the prompt's. diffusers' VAE posterior sample and noise replaced by its mean and our noise (`patch_diffusers`);
    the final latents within 1e-4 of their scale, the images within one uint8 level (`assert_same_generation`)."""
    pipe, _, ours = sdxl
    noise = np.random.default_rng(7).standard_normal((len(prompts), 8, 8, 4), dtype=np.float32)
    patch_diffusers(pipeline_stable_diffusion_xl_img2img, monkeypatch, noise)
    img2img = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False,
                                               force_zeros_for_empty_prompt=True, add_watermarker=False)
    expected = img2img(prompts, image=Image.fromarray(picture()), negative_prompt=negative, strength=0.7,
                       num_inference_steps=5, guidance_scale=5.0, output_type="latent", **sizes).images
    got = ours(False).image_to_image(prompts, picture(), negative_prompt=negative, strength=0.7, num_steps=5,
                                     diffusion_noise=noise, unconditional_guidance_scale=5.0, return_latents=True,
                                     verbose=False, **sizes)
    assert_same_generation(pipe, ours(False), got, expected, f"StableDiffusionXLImg2ImgPipeline {sizes}")


def test_what_each_input_changes(sdxl):
    """The comparisons above could pass with an input ignored only if diffusers ignored it too: each changes the
    final latents here by far more than float32 rounding (~1e-6)."""
    sd = sdxl[2](False)
    run = lambda **options: sd.text_to_image("a red circle", num_steps=2, seed=1, return_latents=True, verbose=False,
                                             **options)
    base = run()
    for options in (dict(negative_prompt=""), dict(original_size=(32, 32)), dict(crops_coords_top_left=(8, 0)),
                    dict(target_size=(32, 64)), dict(negative_original_size=(8, 8), negative_target_size=(8, 8)),
                    dict(unconditional_guidance_scale=1.0)):
        assert relative_difference(run(**options), base) > 1e-3, f"{options} changed nothing"
    assert np.array_equal(run(negative_original_size=(8, 8)), base), "diffusers needs both negative sizes"


def test_encoded_prompt_and_bundle_give_the_same_images(sdxl, tmp_path):
    sd = sdxl[2](False)
    states, text_embeds = sd.encode_text("a red circle")
    assert states.shape == (1, 77, 32) and text_embeds.shape == (1, 24)
    first = sd.text_to_image("a red circle", num_steps=3, seed=2, verbose=False)
    np.testing.assert_array_equal(sd.text_to_image((states, text_embeds), num_steps=3, seed=2, verbose=False), first)
    sd.save(tmp_path / "bundle")
    again = StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)
    assert again.tokenizer_2.pad_token_id == sd.tokenizer_2.pad_token_id == 0
    np.testing.assert_array_equal(again.text_to_image("a red circle", num_steps=3, seed=2, verbose=False), first)


def test_force_upcast_is_read_from_the_vae_config(sdxl, tmp_path):
    """The VAE precision setting diffusers' SDXL pipelines read from the VAE's config, `force_upcast` (float32 under
    float16 policies: `test_mixed_precision.py`): a folder's (AutoencoderKL's default true; madebyollin's fp16-fix
    VAE: false; anything else refused, naming the file); a `vae=` file, which has no config, gets
    `AutoencoderKL.from_single_file`'s true. Original files have the hub's true, bundles keep it (`test_ldm_sdxl.py`,
    `test_sdxl_refiner.py`)."""
    pipe, folder, ours = sdxl
    assert ours(False).config["pipeline"]["force_upcast"] is True
    fixed = tmp_path / "fp16_fix"
    shutil.copytree(folder, fixed)
    vae_config = json.loads((fixed / "vae" / "config.json").read_text())
    (fixed / "vae" / "config.json").write_text(json.dumps(dict(vae_config, force_upcast=False)))
    assert checkpoints.read(fixed).config["pipeline"]["force_upcast"] is False
    vae = ldm_reference.write(ldm_reference.vae_state_dict(pipe.vae, prefix=""), tmp_path / "vae.safetensors")
    replaced = checkpoints.read(fixed, vae=vae, config=ldm_reference.overrides(pipe))
    assert replaced.config["pipeline"]["force_upcast"] is True
    (fixed / "vae" / "config.json").write_text(json.dumps(dict(vae_config, force_upcast="yes")))
    with pytest.raises(CheckpointError, match=r"vae/config.json: force_upcast='yes' is not true or false"):
        checkpoints.read(fixed)


@pytest.mark.parametrize("options, error, message", [
    (dict(original_size=(0, 64)), ValueError, "original_size must be an integer >= 1"),
    (dict(crops_coords_top_left=(-1, 0)), ValueError, "crops_coords_top_left must be an integer >= 0"),
    (dict(target_size=64), ValueError, "target_size must be a (height, width) pair"),
    (dict(orginal_size=(64, 64)), TypeError, "unexpected keyword argument 'orginal_size'"),
])
def test_bad_micro_conditioning_is_refused(options, error, message, sdxl):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        sdxl[2](False).text_to_image("a red circle", num_steps=2, verbose=False, **options)


@pytest.mark.parametrize("call", [
    lambda sd, folder, tmp: train_lora(folder, tmp, tmp / "lora.safetensors"),
    lambda sd, folder, tmp: train_textual_inversion(folder, tmp, tmp / "embeds.safetensors", token="<pink>"),
    lambda sd, folder, tmp: sd.export(tmp / "exported"),
])
def test_what_sdxl_does_not_do_yet_is_refused(call, sdxl, tmp_path):
    """Training and export: one ValueError saying SDXL, before any work."""
    with pytest.raises(ValueError, match="SDXL"):
        call(sdxl[2](False), sdxl[1], tmp_path)
    assert sorted(tmp_path.iterdir()) == []


def test_turbo_folder_samples_as_its_scheduler_config_says(sdxl, tmp_path, monkeypatch):
    """SDXL Turbo's way, from a folder whose scheduler diffusers wrote as Euler ancestral with "trailing" timesteps,
    no sampler passed: two steps, guidance 0 (none, as in diffusers: the prompt's prediction alone) equal diffusers'
    pipeline with that scheduler, given the same step noise (one step would add none: Euler's result)."""
    pipe, folder, _ = sdxl
    scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    shutil.copytree(folder, tmp_path / "turbo")
    scheduler.save_pretrained(tmp_path / "turbo" / "scheduler")
    sd = StableDiffusion.from_checkpoint(tmp_path / "turbo", jit_compile=False)
    assert (sd.scheduler_name, sd.config["scheduler"]["timestep_spacing"]) == ("euler_a", "trailing")
    seed, steps, prompts = 6, 2, ["a red circle", "a blue square"]
    generators = [np.random.default_rng(seed + i) for i in range(len(prompts))]  # image i's noise, as ours draws it
    draws = [np.stack([g.standard_normal((8, 8, 4), dtype=np.float32) for g in generators]) for _ in range(steps + 1)]
    step_noise = iter(nchw(draw) for draw in draws[1:])
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(step_noise))
    expected = StableDiffusionXLPipeline(**{**pipe.components, "scheduler": scheduler})(
        prompts, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64, latents=nchw(draws[0]),
        output_type="latent").images
    got = sd.text_to_image(prompts, num_steps=steps, unconditional_guidance_scale=0.0, seed=seed, return_latents=True,
                           verbose=False)
    assert_same_generation(pipe, sd, got, expected, "StableDiffusionXLPipeline + EulerAncestralDiscreteScheduler")
