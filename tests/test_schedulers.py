"""The samplers against diffusers' schedulers built from the same config: timesteps, sigmas and whole
trajectories under a fixed stand-in model, then whole pipelines against `StableDiffusionPipeline` with
that scheduler; the same noise throughout (injected into diffusers' ancestral sampler); SDXL's refiner start; the
sampler a config's diffusers class names."""
import inspect
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionXLImg2ImgPipeline)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from reference import nchw, nhwc, relative_difference, to_numpy
from stable_diffusion import schedulers

REFERENCES = {  # our name -> the diffusers scheduler and the config keys that select the method
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                          use_karras_sigmas=True)),
    "pndm": (PNDMScheduler, dict(skip_prk_steps=True)),
}
TOLERANCE = 1e-4  # max abs difference of the latents (std ~1-15) over a whole trajectory
PIPELINE_TOLERANCE = 1e-3  # max abs difference of the final latents (std ~1) after the UNet in float32


def config(prediction_type, spacing):
    """SD's scheduler config, as checkpoints carry it."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type,
                timestep_spacing=spacing, clip_sample=False)


def stand_in_model(latents, t):
    """A fixed function of the latents and the timestep in place of the UNet, (B, h, w, C)."""
    return np.tanh(latents) * (0.5 + float(t) / 1000) + 0.1 * np.cos(latents * 3)


@pytest.mark.parametrize("num_steps", [7, 20])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_trajectory_equals_diffusers(name, prediction_type, spacing, num_steps, monkeypatch):
    reference, keys = REFERENCES[name]
    theirs = reference.from_config(dict(config(prediction_type, spacing), **keys))
    ours = schedulers.create(name, config(prediction_type, spacing))
    theirs.set_timesteps(num_steps)
    timesteps = ours.set_timesteps(num_steps)
    np.testing.assert_array_equal(timesteps, theirs.timesteps.numpy())
    if hasattr(theirs, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-5)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)

    draws = np.random.default_rng(0).standard_normal((len(timesteps), 2, 4, 4, 3), dtype=np.float32)
    theirs_noise = iter(nchw(draw) for draw in draws)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(theirs_noise))
    ours_noise = iter(draws).__next__
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 3), dtype=np.float32) * ours.init_noise_sigma
    y = nchw(x)
    worst = 0.0
    for t in timesteps:
        x = ours.step(stand_in_model(ours.scale_model_input(x), t), x, ours_noise)
        model_input = nhwc(theirs.scale_model_input(y, t))
        y = theirs.step(nchw(stand_in_model(model_input, t)), t, y).prev_sample
        worst = max(worst, np.abs(x - nhwc(y)).max())
    assert np.abs(nhwc(y)).max() > 0.1, "the trajectory collapsed: the comparison would prove little"
    assert worst <= TOLERANCE, f"max abs diff {worst} vs diffusers {reference.__name__} ({name})"


# Step counts at which diffusers raises or gives NaN, and the diffusers run ours equals instead:
# "leading" spacing puts the last DDIM / PLMS timestep at steps_offset + 999 = 1000, past the training
# timesteps (IndexError); DPM-Solver's n + 1 grid repeats a timestep (or sigma, clamped at 1000), so a
# step of length h = 0 divides by zero (NaN; the method needs distinct lambdas, Lu et al. 2022, eq. 5).
# Ours keeps every grid inside the training timesteps and free of repeats: with n = 1000 it is every
# training timestep (diffusers' "trailing" grid), for DPM-Solver n = 999 "leading" it is 999 ... 1 (run
# through diffusers as custom `timesteps`).
DIFFUSERS_FAILS = {("ddim", "leading", 1000), ("pndm", "leading", 1000), ("dpmpp_2m", "leading", 999),
                   ("dpmpp_2m", "leading", 1000), ("dpmpp_2m", "linspace", 1000)}
STEP_TOLERANCE = 1e-5  # max abs difference of the final latents, relative to their max abs
# Euler ancestral over ~1000 steps: the fresh noise of every step keeps float32 rounding from decaying
ANCESTRAL_TOLERANCE = 5e-5


def run(scheduler, timesteps, x, draw_noise, ours):
    """The latents after stepping `scheduler` (ours or diffusers') through `timesteps` under the stand-in model."""
    for t in timesteps:
        if ours:
            x = scheduler.step(stand_in_model(scheduler.scale_model_input(x), t), x, draw_noise)
        else:
            model_input = nhwc(scheduler.scale_model_input(x, t))
            x = scheduler.step(nchw(stand_in_model(model_input, t)), t, x).prev_sample
    return x if ours else nhwc(x)


@pytest.mark.parametrize("num_steps, strength", [(1, 1.0), (2, 1.0), (999, 1.0), (1000, 1.0),
                                                 (2, 0.5), (999, 0.5), (1000, 0.5)])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_every_step_count_equals_diffusers(name, spacing, num_steps, strength, monkeypatch):
    """Step counts 1 to 1000 (the extremes) and image-to-image's later start, against diffusers; where
    diffusers fails (`DIFFUSERS_FAILS`), against the diffusers run on the grid that we take instead."""
    reference, keys = REFERENCES[name]
    ours = schedulers.create(name, config("epsilon", spacing))
    timesteps = ours.set_timesteps(num_steps, strength=strength)
    draws = np.random.default_rng(0).standard_normal((len(timesteps), 1, 4, 4, 3), dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 3), dtype=np.float32) * ours.init_noise_sigma
    got = run(ours, timesteps, x, iter(draws).__next__, ours=True)
    assert np.isfinite(got).all()

    def diffusers_run(spacing, **set_timesteps):
        theirs = reference.from_config(dict(config("epsilon", spacing), **keys))
        theirs.set_timesteps(**set_timesteps)
        start = len(theirs.timesteps) - len(timesteps)
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(start)
        noise = iter(nchw(draw) for draw in draws)
        monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(noise))
        return theirs.timesteps[start:].numpy(), run(theirs, theirs.timesteps[start:], nchw(x), None, ours=False)

    if (name, spacing, num_steps) in DIFFUSERS_FAILS:
        if strength == 1:  # later starts skip the failing first steps, but not our different grid
            with pytest.raises(IndexError) if name != "dpmpp_2m" else np.errstate(all="ignore"):
                failed = diffusers_run(spacing, num_inference_steps=num_steps)[1]
                assert np.isnan(failed).any(), "diffusers no longer fails here: compare against it directly"
        if name == "dpmpp_2m":
            their_timesteps, expected = diffusers_run(spacing, timesteps=list(ours.all_timesteps))
        else:
            their_timesteps, expected = diffusers_run("trailing", num_inference_steps=num_steps)
    else:
        their_timesteps, expected = diffusers_run(spacing, num_inference_steps=num_steps)
    np.testing.assert_array_equal(timesteps, their_timesteps)
    diff = relative_difference(got, expected)
    tolerance = ANCESTRAL_TOLERANCE if name == "euler_a" and num_steps > 2 else STEP_TOLERANCE
    assert diff <= tolerance, f"relative diff {diff:.1e} vs diffusers {reference.__name__} ({name})"


@pytest.mark.parametrize("kind", ["sd1", "sd2"])  # epsilon, v-prediction
@pytest.mark.parametrize("name", list(REFERENCES))
def test_pipeline_equals_diffusers(name, kind, reference, ours, monkeypatch):
    pipe, folder = reference(kind)
    reference_class, keys = REFERENCES[name]  # built from the checkpoint's scheduler config, as we are
    monkeypatch.setattr(pipe, "scheduler", reference_class.from_pretrained(folder, subfolder="scheduler", **keys))
    seed, steps = 3, 6
    rng = np.random.default_rng(seed)  # what our pipeline draws for image 0 of seed 3
    draws = [rng.standard_normal((1, 8, 8, 4), dtype=np.float32) for _ in range(steps + 2)]
    step_noise = iter(nchw(draw) for draw in draws[1:])
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(step_noise))
    expected = pipe("a red circle", negative_prompt="green", num_inference_steps=steps, guidance_scale=7.5,
                    height=64, width=64, latents=nchw(draws[0]), output_type="latent").images
    got = ours(kind).text_to_image("a red circle", negative_prompt="green", num_steps=steps, seed=seed,
                                   scheduler=name, return_latents=True, verbose=False)
    diff = np.abs(got - nhwc(expected)).max()
    assert diff <= PIPELINE_TOLERANCE, f"max abs latent diff {diff} vs StableDiffusionPipeline + {reference_class.__name__}"
    with torch.no_grad():
        images = to_numpy(pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample)
    images = np.round(np.clip(images.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1) * 255)
    assert np.abs(ours(kind).decode(got).astype(int) - images).max() <= 1, "uint8 images differ by more than 1"


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m_karras", "pndm"])
def test_add_noise_at_the_strength_timestep_equals_diffusers(name):
    reference, keys = REFERENCES[name]
    theirs = reference.from_config(dict(config("epsilon", "leading"), **keys))
    ours = schedulers.create(name, config("epsilon", "leading"))
    theirs.set_timesteps(10)
    timesteps = ours.set_timesteps(10, strength=0.6)
    start = len(theirs.timesteps) - len(timesteps)
    np.testing.assert_array_equal(timesteps, theirs.timesteps[start:].numpy())
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(start)
    latents, noise = np.random.default_rng(2).standard_normal((2, 1, 4, 4, 3), dtype=np.float32)
    expected = theirs.add_noise(nchw(latents), nchw(noise), theirs.timesteps[start:start + 1])
    np.testing.assert_allclose(ours.add_noise(latents, noise), nhwc(expected), atol=1e-6)


@pytest.mark.parametrize("arguments, message", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=1001), "num_steps"),
    (dict(num_steps=20.0), "num_steps"),
    (dict(num_steps=True), "num_steps"),
    (dict(num_steps=10, strength="0.5"), "strength"),
    (dict(num_steps=10, strength=0), r"strength must be in \(0, 1\]"),
    (dict(num_steps=10, strength=1.5), r"strength must be in \(0, 1\]"),
    (dict(num_steps=10, strength=0.05), "no step"),
])
def test_bad_steps_or_strength(arguments, message):
    with pytest.raises(ValueError, match=message):
        schedulers.create("ddim", {}).set_timesteps(**arguments)


def test_unknown_scheduler():
    with pytest.raises(ValueError, match="'heun'.*"):
        schedulers.create("heun", {})


@pytest.mark.parametrize("key, value", [("thresholding", True), ("trained_betas", [0.001] * 1000),
                                        ("rescale_betas_zero_snr", True)])
def test_configs_of_other_noise_schedules_are_refused(key, value):
    with pytest.raises(ValueError, match=f"with {key} are not supported"):
        schedulers.create("euler", {key: value})


@pytest.mark.parametrize("name", list(REFERENCES))
def test_default_sampler_of_each_diffusers_config(name):
    """The sampler a scheduler config names as diffusers writes it (`_class_name`, every option) is ours of that class
    and options; the config a bundle saves for our sampler builds that diffusers class with those options."""
    import diffusers

    reference, keys = REFERENCES[name]
    written = json.loads(reference.from_config(dict(config("epsilon", "leading"), **keys)).to_json_string())
    assert schedulers.default_name(written) == name
    saved = schedulers.diffusers_config(name, config("epsilon", "leading"))
    theirs = getattr(diffusers, saved["_class_name"]).from_config(saved)
    assert type(theirs) is reference and {key: theirs.config[key] for key in keys} == keys


def test_options_left_out_take_diffusers_defaults():
    import diffusers

    for class_name, options in schedulers.CLASSES.values():
        parameters = inspect.signature(getattr(diffusers, class_name)).parameters
        defaults = {key: parameters[key].default for key in options}
        assert defaults == {key: schedulers.DEFAULT_OPTIONS[key] for key in options}, class_name


def test_keys_a_folder_config_leaves_out_take_ddims_defaults_as_every_sampler_but_pndm_would():
    """diffusers fills the keys a saved config leaves out with the defaults of the class built from it (the sampler):
    `diffusers_folder.DDIM_DEFAULTS` are DDIM's, and every other sampler's where it reads the key, but PNDM's
    `set_alpha_to_one` (the one difference, named in that comment)."""
    import diffusers

    from stable_diffusion.diffusers_folder import DDIM_DEFAULTS

    differing = {}
    for class_name in {class_name for class_name, _ in schedulers.CLASSES.values()}:
        theirs = getattr(diffusers, class_name).from_config({}).config
        differing.update({(class_name, key): theirs[key] for key, value in DDIM_DEFAULTS.items()
                          if key in theirs and theirs[key] != value})
    assert differing == {("PNDMScheduler", "set_alpha_to_one"): False}


@pytest.mark.parametrize("named, message", [
    (dict(_class_name="LMSDiscreteScheduler"), "'LMSDiscreteScheduler', which"),
    (dict(_class_name="PNDMScheduler"), "'PNDMScheduler' with skip_prk_steps=False, which"),  # its Runge-Kutta start
    (dict(_class_name="EulerDiscreteScheduler", use_karras_sigmas=True), "with use_karras_sigmas=True, which"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", solver_order=3),
     "with algorithm_type='sde-dpmsolver++', solver_order=3, which"),
])
def test_sampler_not_implemented_warns_and_is_ddim(named, message):
    with pytest.warns(UserWarning, match=re.escape(message) + " this library does not implement: it samples with DDIM"):
        assert schedulers.default_name(dict(config("epsilon", "leading"), **named)) == "ddim"


def test_config_without_class_is_ddim(recwarn):
    assert schedulers.default_name(config("epsilon", "leading")) == "ddim"
    assert not recwarn.list


@pytest.mark.parametrize("name, reference_class", [
    ("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
    ("dpmpp_2m", "DPMSolverMultistepScheduler"), ("pndm", "PNDMScheduler")])
def test_config_without_timestep_spacing_takes_each_diffusers_default(name, reference_class):
    """The SD 1.5 hub config predates `timestep_spacing`: each diffusers class then uses its own default."""
    import diffusers

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  set_alpha_to_one=False, skip_prk_steps=True)
    ours = schedulers.create(name, config)
    ours.set_timesteps(20)
    theirs = getattr(diffusers, reference_class).from_config(config)
    theirs.set_timesteps(20)
    np.testing.assert_allclose(np.asarray(ours.timesteps, dtype=float), theirs.timesteps.numpy(), atol=1e-4)


@pytest.mark.parametrize("denoising_start", [0.35, 0.799])  # 0.799: the cutoff 201, a timestep ("leading")
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_denoising_start_equals_diffusers(name, spacing, denoising_start, monkeypatch):
    """SDXL's refiner finishing a run (`denoising_start`, strength ignored): the timesteps of diffusers'
    `StableDiffusionXLImg2ImgPipeline.get_timesteps`, and the trajectory from there, the scheduler begun at that
    index as the pipeline begins it (`set_begin_index`; DPM-Solver first order on its first step)."""
    reference, keys = REFERENCES[name]
    theirs = reference.from_config(dict(config("epsilon", spacing), **keys))
    theirs.set_timesteps(10)
    expected, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=theirs), 10, 0.3, "cpu",
                                                                 denoising_start=denoising_start)
    ours = schedulers.create(name, config("epsilon", spacing))
    timesteps = ours.set_timesteps(10, strength=0.3, denoising_start=denoising_start)
    np.testing.assert_array_equal(timesteps, expected.numpy())
    assert 1 < len(timesteps) < 10
    draws = np.random.default_rng(0).standard_normal((len(timesteps), 1, 4, 4, 3), dtype=np.float32)
    theirs_noise = iter(nchw(draw) for draw in draws)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *a, **k: next(theirs_noise))
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 3), dtype=np.float32)
    got = run(ours, timesteps, x, iter(draws).__next__, ours=True)
    diff = relative_difference(got, run(theirs, expected, nchw(x), None, ours=False))
    assert diff <= STEP_TOLERANCE, f"max abs diff {diff:.2e} of the latents' scale vs diffusers ({name})"
