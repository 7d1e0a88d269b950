"""Image-to-image and inpainting against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on the same random weights, and bad input.

diffusers samples the VAE posterior with its generator; we encode to the posterior's mean. To compare,
diffusers' `retrieve_latents` is patched to return the mean (`latent_dist.mode()`), and its
`randn_tensor` to return our noise (tolerance: uint8 +-1).
"""
import copy

import keras
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, UNet2DConditionModel)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img, pipeline_stable_diffusion_inpaint
from PIL import Image

from reference import nchw, psnr, randomize
from stable_diffusion import StableDiffusion

PROMPT, NEGATIVE = "a red circle", "green"
SCHEDULERS = {"ddim": (DDIMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
              "dpmpp_2m_karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True))}


def own_components(pipe):
    """pipe's components with a copy of its scheduler: a diffusers pipeline's __init__ rewrites the
    scheduler config in place (clip_sample=False), which would change the shared reference pipeline."""
    return dict(pipe.components, scheduler=copy.deepcopy(pipe.scheduler))


def picture(height=64, width=64):
    """A uint8 test picture (H, W, 3): colour gradients and a bright disc."""
    y, x = np.mgrid[:height, :width] / np.array([height, width])[:, None, None]
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.06)[..., None]
    image = np.stack([x, y, 1 - x * y], axis=-1) * 200 + disc * 55
    return image.astype("uint8")


def mask(height=64, width=64):
    """A uint8 mask (H, W): white (repaint) in a rectangle off the centre."""
    m = np.zeros((height, width), "uint8")
    m[8:40, 20:60] = 255
    return m


def patch_diffusers(module, monkeypatch, noise):
    monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mode())
    monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: nchw(noise))


def assert_close(got, expected, reference):
    expected = np.round(expected * 255).astype(int)
    assert expected.std() > 10, "the reference images are flat: the comparison would prove little"
    diff = np.abs(got.astype(int) - expected).max()
    assert diff <= 1, f"max pixel difference {diff} vs {reference} (tolerance 1/255)"


@pytest.mark.parametrize("kind, scheduler, strength", [("sd1", "ddim", 0.6), ("sd2", "ddim", 0.8),
                                                       ("sd1", "dpmpp_2m_karras", 0.7),
                                                       pytest.param("sd1", "euler", 0.5, marks=pytest.mark.slow)])
def test_image_to_image_equals_diffusers(kind, scheduler, strength, reference, ours, monkeypatch):
    pipe, folder = reference(kind)
    img2img = StableDiffusionImg2ImgPipeline(**own_components(pipe), requires_safety_checker=False)
    reference_scheduler, keys = SCHEDULERS[scheduler]  # set after __init__, which would force clip_sample=False
    img2img.scheduler = reference_scheduler.from_pretrained(folder, subfolder="scheduler", **keys)
    noise = np.random.default_rng(8).standard_normal((1, 8, 8, 4), dtype=np.float32)
    patch_diffusers(pipeline_stable_diffusion_img2img, monkeypatch, noise)
    expected = img2img(PROMPT, image=Image.fromarray(picture()), strength=strength, negative_prompt=NEGATIVE,
                       num_inference_steps=8, guidance_scale=7.5, output_type="np").images
    got = ours(kind).image_to_image(PROMPT, picture(), strength=strength, negative_prompt=NEGATIVE,
                                    num_steps=8, diffusion_noise=noise, scheduler=scheduler, verbose=False)
    assert_close(got, expected, f"StableDiffusionImg2ImgPipeline ({scheduler}, strength {strength})")


def inpainting_checkpoint(reference, tmp_path):
    """The sd1 reference with a random 9-channel (inpainting) UNet, saved to a folder of its own."""
    pipe, folder = reference("sd1")
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config(dict(pipe.unet.config, in_channels=9))
    randomize(unet)
    target = tmp_path / "inpainting"
    target.mkdir()
    for part in folder.iterdir():
        if part.name != "unet":
            (target / part.name).symlink_to(part)
    unet.save_pretrained(target / "unet")
    return dict(own_components(pipe), unet=unet.to(torch.float32)), target


@pytest.mark.parametrize("unet_channels, strength", [pytest.param(4, 1.0, marks=pytest.mark.slow), (4, 0.7),
                                                     (9, 1.0), pytest.param(9, 0.75, marks=pytest.mark.slow)])
def test_inpaint_equals_diffusers(unet_channels, strength, reference, ours, monkeypatch, tmp_path):
    if unet_channels == 4:
        sd, components = ours("sd1"), own_components(reference("sd1")[0])
    else:
        components, folder = inpainting_checkpoint(reference, tmp_path)
        sd = StableDiffusion.from_checkpoint(folder, scheduler="ddim")  # as the reference's components
    inpaint = StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
    noise = np.random.default_rng(9).standard_normal((1, 8, 8, 4), dtype=np.float32)
    patch_diffusers(pipeline_stable_diffusion_inpaint, monkeypatch, noise)
    expected = inpaint(PROMPT, image=Image.fromarray(picture()), mask_image=Image.fromarray(mask()),
                       strength=strength, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5,
                       height=64, width=64, output_type="np").images
    got = sd.inpaint(PROMPT, picture(), mask(), strength=strength, negative_prompt=NEGATIVE, num_steps=8,
                     diffusion_noise=noise, verbose=False)
    assert_close(got, expected, f"StableDiffusionInpaintPipeline ({unet_channels}-channel UNet, strength {strength})")


def test_inputs_as_pil_images_paths_and_batches(ours, tmp_path):
    sd = ours("sd1")
    Image.fromarray(picture()).save(tmp_path / "image.png")
    Image.fromarray(mask()).save(tmp_path / "mask.png")
    arguments = dict(num_steps=2, seed=4, verbose=False)
    from_path = sd.inpaint(PROMPT, tmp_path / "image.png", str(tmp_path / "mask.png"), **arguments)
    from_array = sd.inpaint(PROMPT, picture(), mask() > 0, **arguments)
    np.testing.assert_array_equal(from_path, from_array)
    batch = sd.image_to_image([PROMPT, NEGATIVE], np.stack([picture(), picture()[::-1]]), **arguments)
    assert batch.shape == (2, 64, 64, 3)
    latents = sd.image_to_image(PROMPT, Image.fromarray(picture()), return_latents=True, **arguments)
    assert latents.shape == (1, 8, 8, 4)


def test_inpaint_and_image_to_image_under_mixed_precision(reference, ours):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        sd = StableDiffusion.from_checkpoint(reference("sd1")[1], jit_compile=False)
    finally:
        keras.config.set_dtype_policy(previous)
    assert sd.diffusion_model.outputs[0].dtype == "float16"
    arguments = dict(num_steps=4, seed=2, scheduler="dpmpp_2m", verbose=False)
    for task, inputs in (("inpaint", (picture(), mask())), ("image_to_image", (picture(),))):
        got, expected = (getattr(model, task)(PROMPT, *inputs, **arguments) for model in (sd, ours("sd1")))
        assert psnr(got, expected) > 35, f"{task}: PSNR {psnr(got, expected):.1f} dB of mixed_float16 vs float32"


@pytest.mark.parametrize("call, message", [
    (lambda sd, tmp: sd.image_to_image(PROMPT, tmp / "missing.png"), "Cannot read image .*missing.png"),
    (lambda sd, tmp: sd.image_to_image(PROMPT, tmp / "not-an-image.png"), "Cannot read image .*not-an-image"),
    (lambda sd, tmp: sd.image_to_image(PROMPT, picture(32, 64)), r"image is 32x64 pixels \(height x width\) but this pipeline makes 64x64"),
    (lambda sd, tmp: sd.image_to_image(PROMPT, picture().astype("float32")), "uint8"),
    (lambda sd, tmp: sd.image_to_image(PROMPT, np.ones((64, 64, 4), "float32")),
     r"image as latents must be .* got \(64, 64, 4\) \(float arrays are read as latents; pictures are uint8"),
    (lambda sd, tmp: sd.image_to_image(PROMPT, picture(), strength=0), r"strength must be in \(0, 1\]"),
    (lambda sd, tmp: sd.image_to_image(PROMPT, picture(), strength=1.2), r"strength must be in \(0, 1\]"),
    (lambda sd, tmp: sd.image_to_image(PROMPT, picture(), strength=0.01), "leaves no step"),
    (lambda sd, tmp: sd.inpaint(PROMPT, picture(), mask(32, 64)), r"mask is 32x64 pixels \(height x width\) but image is 64x64"),
    (lambda sd, tmp: sd.inpaint(PROMPT, picture(), tmp / "missing.png"), "Cannot read mask"),
    (lambda sd, tmp: sd.inpaint(PROMPT, picture(), np.zeros((64, 64), "float32")), "mask must be uint8 or bool"),
    (lambda sd, tmp: sd.image_to_image([PROMPT] * 2, np.stack([picture()] * 3)), "Got 3 images for a batch of 2"),
])
def test_bad_input(call, message, ours, tmp_path):
    (tmp_path / "not-an-image.png").write_text("text")
    with pytest.raises(ValueError, match=message):
        call(ours("sd1"), tmp_path)
