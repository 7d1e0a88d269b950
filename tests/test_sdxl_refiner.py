"""SDXL's refiner against diffusers' StableDiffusionXLImg2ImgPipeline on a tiny random refiner saved with
`save_pretrained` (`reference.make_sdxl_refiner_pipeline`: no first text encoder, five time ids with the aesthetic
scores, no zero states for no negative prompt): image-to-image, the ensemble of experts with the SDXL base
(`denoising_end`, then `denoising_start` from the base's latents), bundles, original single files, and refusals.

diffusers samples the VAE posterior with its generator and draws its own noise; to compare, its `retrieve_latents`
returns the posterior's mean and its `randn_tensor` our noise (as `test_editing.py`).
"""
import json
import shutil

import numpy as np
import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.loaders import single_file_utils
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img
from PIL import Image

import ldm_reference
from reference import assert_same_generation, make_sdxl_refiner_pipeline, nchw, nhwc, relative_difference
from test_convert import assert_same_weights
from test_editing import patch_diffusers, picture
from stable_diffusion import StableDiffusion, checkpoints
from stable_diffusion.weights import CheckpointError

PROMPTS, NEGATIVES = ["a red circle", "a blue square"], ["green", "a triangle"]
SCORES = dict(aesthetic_score=7.5, negative_aesthetic_score=1.0)
SIZES = dict(original_size=(40, 56), crops_coords_top_left=(8, 16), negative_original_size=(24, 32),
             negative_crops_coords_top_left=(0, 8))
MODELS = ("text_encoder_2", "diffusion_model", "decoder", "encoder")  # a refiner's
SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    """(the diffusers refiner, its folder, our pipeline loaded from it)."""
    folder = tmp_path_factory.mktemp("refiner")
    pipe = make_sdxl_refiner_pipeline(folder)
    return pipe, folder, StableDiffusion.from_checkpoint(folder, jit_compile=False)


@pytest.fixture(scope="module")
def base(sdxl):
    """(the diffusers SDXL base, its folder, our pipeline loaded from it): conftest's, shared with test_sdxl.py."""
    pipe, folder, ours = sdxl
    return pipe, folder, ours(False)


def with_scheduler(pipe, name, config):
    """A copy of the diffusers pipeline `pipe` (its settings too) stepping with the diffusers scheduler of our sampler
    `name`, built from our pipeline's scheduler `config` (diffusers' `from_config` of another class's config would
    give the keys that config left at their defaults this class's defaults: "linspace" timesteps for Euler)."""
    settings = {key: pipe.config[key] for key in ("requires_aesthetics_score", "force_zeros_for_empty_prompt")
                if key in pipe.config}
    scheduler = SCHEDULERS[name].from_config(config)
    return type(pipe)(**{**pipe.components, "scheduler": scheduler}, **settings, add_watermarker=False)


def recorder(timesteps):
    """A diffusers `callback_on_step_end` that appends each step's timestep, as an int, to `timesteps`."""
    def record(pipe, step, timestep, tensors):
        timesteps.append(int(timestep))
        return tensors
    return record


@pytest.mark.slow  # the default run compares the refiner in the ensemble below
@pytest.mark.parametrize("prompts, negative, options", [
    (PROMPTS, NEGATIVES, dict(strength=0.8, guidance=5.0, **SCORES, **SIZES)),
    (PROMPTS[:1], NEGATIVES[:1], dict(strength=0.6)),  # the default scores
    (PROMPTS, None, dict(strength=0.7, scheduler="dpmpp_2m", **SCORES, **SIZES)),
])
def test_image_to_image_equals_diffusers(prompts, negative, options, refiner, monkeypatch):
    """Image-to-image from a picture (VAE-encoded to the posterior's mean, noised `strength` of the way)."""
    pipe, _, sd = refiner
    options = dict(options)
    guidance, scheduler = options.pop("guidance", 7.5), options.pop("scheduler", "ddim")
    noise = np.random.default_rng(8).standard_normal((len(prompts), 8, 8, 4), dtype=np.float32)
    patch_diffusers(pipeline_stable_diffusion_xl_img2img, monkeypatch, noise)
    expected = with_scheduler(pipe, scheduler, sd.config["scheduler"])(
        prompts, image=Image.fromarray(picture()), negative_prompt=negative, num_inference_steps=5,
        guidance_scale=guidance, output_type="latent", **options).images
    got = sd.image_to_image(prompts, picture(), negative_prompt=negative, num_steps=5, diffusion_noise=noise,
                            unconditional_guidance_scale=guidance, scheduler=scheduler, return_latents=True,
                            verbose=False, **options)
    assert_same_generation(pipe, sd, got, expected, f"StableDiffusionXLImg2ImgPipeline {options}")


@pytest.mark.parametrize("scheduler, fraction", [
    ("ddim", 0.667),  # the cutoff 333 is a timestep: the base's last, not the refiner's
    pytest.param("euler", 0.8, marks=pytest.mark.slow), pytest.param("dpmpp_2m", 0.8, marks=pytest.mark.slow)])
def test_ensemble_of_experts_equals_diffusers(scheduler, fraction, base, refiner):
    """The base's first part of the schedule (`denoising_end`, e.g. 0.8: here 4 of 6 steps, 831 ... 333, at or above
    the cutoff round(1000 (1 - fraction))), its latents, then the refiner's rest from them (`denoising_start`: 167
    and 1, no noise added): each stage's latents vs diffusers' `StableDiffusionXLPipeline(denoising_end=...,
    output_type="latent")` and then `StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=...)`; the
    refiner with aesthetic scores, sizes and crops, the negative ones its own. No negative prompt: zero states for
    the base, the empty prompt's for the refiner (force_zeros_for_empty_prompt False)."""
    base_pipe, _, base_sd = base
    pipe, _, sd = refiner
    noise = np.random.default_rng(5).standard_normal((2, 8, 8, 4), dtype=np.float32)
    theirs, steps, cutoff = [], [], round(1000 * (1 - fraction))
    expected = with_scheduler(base_pipe, scheduler, base_sd.config["scheduler"])(
        PROMPTS, num_inference_steps=6, guidance_scale=7.5, height=64, width=64, latents=nchw(noise),
        denoising_end=fraction, output_type="latent", callback_on_step_end=recorder(theirs)).images
    latents = base_sd.text_to_image(PROMPTS, num_steps=6, diffusion_noise=noise, scheduler=scheduler,
                                    denoising_end=fraction, return_latents=True, verbose=False,
                                    callback=lambda step, t, x: steps.append(int(t)))
    assert steps == theirs and min(steps) >= cutoff and (len(steps) == 4 or scheduler != "ddim")
    diff = relative_difference(latents, nhwc(expected))
    assert diff <= 1e-4, f"the base's latents: max abs diff {diff:.2e} of their scale vs StableDiffusionXLPipeline"
    theirs.clear()
    steps.clear()
    expected = with_scheduler(pipe, scheduler, sd.config["scheduler"])(
        PROMPTS, image=expected, num_inference_steps=6, guidance_scale=7.5, denoising_start=fraction,
        output_type="latent", callback_on_step_end=recorder(theirs), **SCORES, **SIZES).images
    got = sd.image_to_image(PROMPTS, latents, num_steps=6, denoising_start=fraction, scheduler=scheduler,
                            return_latents=True, verbose=False, callback=lambda step, t, x: steps.append(int(t)),
                            **SCORES, **SIZES)
    assert steps == theirs and max(steps) < cutoff and (len(steps) == 2 or scheduler != "ddim")
    assert_same_generation(pipe, sd, got, expected, "the refiner's StableDiffusionXLImg2ImgPipeline")


def test_what_each_input_changes(refiner):
    """The comparisons above could pass with an input ignored only if diffusers ignored it too: each changes the
    final latents here by far more than float32 rounding (~1e-6); no scores are diffusers' defaults, 6.0 and 2.5."""
    sd = refiner[2]
    run = lambda **options: sd.image_to_image(PROMPTS, picture(), num_steps=4, strength=0.5, seed=1,
                                              return_latents=True, verbose=False, **options)
    first = run()
    for options in (dict(aesthetic_score=3.0), dict(negative_aesthetic_score=5.0), dict(original_size=(32, 32)),
                    dict(crops_coords_top_left=(8, 0)), dict(negative_original_size=(8, 8)),
                    dict(negative_crops_coords_top_left=(0, 8)), dict(negative_prompt="green")):
        assert relative_difference(run(**options), first) > 1e-3, f"{options} changed nothing"
    np.testing.assert_array_equal(run(aesthetic_score=6.0, negative_aesthetic_score=2.5), first)


def test_folder_settings_and_bundle_round_trip(refiner, tmp_path):
    """The folder's refiner settings (no first text encoder, the refiner's tokenizer as `sd.tokenizer`, 5 time ids,
    requires_aesthetics_score, no zero states, the VAE's force_upcast), and a bundle that keeps them and every weight."""
    _, _, sd = refiner
    assert sd.text_encoder is None and sd.tokenizer is sd.tokenizer_2 and sd.tokenizer.pad_token_id == 0
    assert sd.config["text_encoder"] is None and sd.config["diffusion_model"]["num_time_ids"] == 5
    assert sd.config["pipeline"] == dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True,
                                         force_upcast=True)
    states, text_embeds = sd.encode_text(PROMPTS)
    assert states.shape == (2, 77, 32) and text_embeds.shape == (2, 24)
    np.testing.assert_array_equal(sd.tokenize(PROMPTS), sd.tokenizer_2(PROMPTS))
    sd.save(tmp_path / "bundle")
    assert sorted(path.name for path in (tmp_path / "bundle").iterdir()) == [
        "config.json", "decoder.safetensors", "diffusion_model.safetensors", "encoder.safetensors",
        "text_encoder_2.safetensors", "tokenizer_2"]
    again = StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)
    assert again.config == json.loads(json.dumps(sd.config)) and again.text_encoder is None
    assert again.tokenizer is again.tokenizer_2 and again.tokenizer.pad_token_id == 0
    assert_same_weights(again, sd, MODELS)


def test_single_file_loads_as_the_folder(refiner, tmp_path):
    """An original refiner file (sgm's layout, `ldm_reference`) of the same weights: diffusers' `from_single_file`
    settings for it (its scheduler config, 1024 pixels, the "!" tokenizer, requires_aesthetics_score, no zero
    states) and every weight of the folder's pipeline (which equals diffusers' above); generating with it:
    `test_single_file_generates_as_diffusers` (slow)."""
    pipe, _, sd = refiner
    path = ldm_reference.write(ldm_reference.ldm_state_dict(pipe, "sdxl_refiner"), tmp_path / "refiner.safetensors")
    checkpoint = checkpoints.read(path, config=ldm_reference.overrides(pipe))
    scheduler = {key: checkpoint.config["scheduler"][key] for key in single_file_utils.SCHEDULER_DEFAULT_CONFIG}
    assert scheduler == single_file_utils.SCHEDULER_DEFAULT_CONFIG
    assert (checkpoint.img_height, checkpoint.img_width) == (single_file_utils.DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP
                                                             ["xl_refiner"],) * 2 == (1024, 1024)
    assert checkpoint.config["pipeline"] == sd.config["pipeline"]
    assert checkpoint.config["text_encoder"] is None and checkpoint.tokenizer is None
    loaded = StableDiffusion.from_checkpoint(path, img_height=64, img_width=64, jit_compile=False,
                                             config=ldm_reference.overrides(pipe))
    assert loaded.text_encoder is None and loaded.tokenizer.pad_token_id == pipe.tokenizer_2.pad_token_id == 0
    assert_same_weights(loaded, sd, MODELS)


@pytest.mark.slow
def test_single_file_generates_as_diffusers(refiner, tmp_path, monkeypatch):
    """The file's pipeline (DDIM from its scheduler config) vs the diffusers refiner on the same weights."""
    pipe, _, _ = refiner
    path = ldm_reference.write(ldm_reference.ldm_state_dict(pipe, "sdxl_refiner"), tmp_path / "refiner.ckpt")
    sd = StableDiffusion.from_checkpoint(path, img_height=64, img_width=64, jit_compile=False,
                                         config=ldm_reference.overrides(pipe))
    noise = np.random.default_rng(3).standard_normal((1, 8, 8, 4), dtype=np.float32)
    patch_diffusers(pipeline_stable_diffusion_xl_img2img, monkeypatch, noise)
    expected = with_scheduler(pipe, "ddim", sd.config["scheduler"])(
        "a red circle", image=Image.fromarray(picture()), strength=0.7, num_inference_steps=6, guidance_scale=7.5,
        output_type="latent", **SCORES).images
    got = sd.image_to_image("a red circle", picture(), strength=0.7, num_steps=6, diffusion_noise=noise,
                            return_latents=True, verbose=False, **SCORES)
    assert_same_generation(pipe, sd, got, expected, "StableDiffusionXLImg2ImgPipeline on the file's weights")


@pytest.mark.parametrize("model, call, message", [
    ("base", lambda sd: sd.text_to_image("a", aesthetic_score=6.0),
     r"^aesthetic_score is not in this SDXL pipeline's time ids"),
    ("refiner", lambda sd: sd.image_to_image("a", picture(), target_size=(64, 64)),
     r"^target_size is not in this SDXL pipeline's time ids"),
    ("base", lambda sd: sd.image_to_image("a", picture(), negative_crops_coords_top_left=(0, 8)),
     r"^negative_crops_coords_top_left is not in this SDXL pipeline's time ids, which take original_size, "
     r"crops_coords_top_left, target_size, negative_original_size, negative_target_size \(.* its image-to-image and "
     r"inpainting take the prompt's crop for the negative prompt\)"),
    ("refiner", lambda sd: sd.image_to_image("a", picture(), negative_aesthetic_score=float("nan")),
     r"^negative_aesthetic_score must be a finite number"),
    ("refiner", lambda sd: sd.image_to_image("a", picture(), denoising_start=1.0),
     r"^denoising_start must be None or a float in \(0, 1\), got 1.0"),
    ("refiner", lambda sd: sd.image_to_image("a", picture(), denoising_start=0),
     r"^denoising_start must be None or a float in \(0, 1\), got 0"),
    ("base", lambda sd: sd.text_to_image("a", denoising_end=-0.2),
     r"^denoising_end must be None or a float in \(0, 1\), got -0.2"),
    ("refiner", lambda sd: sd.image_to_image("a", picture(), denoising_start=0.8, denoising_end=0.5),
     r"^denoising_start=0.8 must be below denoising_end=0.5"),
    ("refiner", lambda sd: sd.image_to_image("a", picture(), num_steps=4, denoising_start=0.999),
     r"^denoising_start=0.999, denoising_end=None leave no step of 4"),
    ("base", lambda sd: sd.text_to_image("a", denoising_start=0.8), r"^denoising_start is not an argument of this "
                                                                     r"task \(denoising_start: image_to_image;"),
    ("refiner", lambda sd: sd.inpaint("a", picture(), picture()[..., 0], denoising_end=0.5),
     r"^denoising_end is not an argument of this task"),
    ("refiner", lambda sd: sd.image_to_image("a", np.zeros((1, 4, 8, 4), "float32"), denoising_start=0.8),
     r"^image as latents must be \(B, h, w, C\) = \(B, 8, 8, 4\) for this pipeline, got \(1, 4, 8, 4\)"),
])
def test_bad_arguments_are_refused_before_any_model_work(model, call, message, base, refiner, monkeypatch):
    sd = dict(base=base, refiner=refiner)[model][2]
    monkeypatch.setattr(sd, "_prepare", lambda *args, **kwargs: pytest.fail("model work began"))
    with pytest.raises(ValueError, match=message):
        call(sd)


def test_refiner_setting_that_does_not_fit_the_unet_is_refused(base, refiner, tmp_path):
    """requires_aesthetics_score on a base folder (its UNet's add_embedding, read as taking 5 time ids, leaves more
    pooled text than text_encoder_2 gives), or turned off in a refiner's bundle (its UNet takes 5 ids, not 6): one
    CheckpointError naming the UNet's config and the time ids."""
    folder = tmp_path / "base"
    shutil.copytree(base[1], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, requires_aesthetics_score=True)))
    with pytest.raises(CheckpointError, match=r"unet/config.json: the UNet takes context_dim=32 and pooled_dim=32 "
                                              r"\(beside 5 time ids\), but its text encoders give 32 and 24"):
        checkpoints.read(folder)
    refiner[2].save(tmp_path / "bundle")
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    config["pipeline"]["requires_aesthetics_score"] = False
    (tmp_path / "bundle" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: the UNet takes 5 time ids, but "
                                              r"requires_aesthetics_score=False gives 6"):
        checkpoints.read(tmp_path / "bundle")
