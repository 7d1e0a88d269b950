"""Editing a picture: image-to-image (SDEdit, Meng et al., 2022) starts from the picture's latents noised `strength`
of the way back (or, with `denoising_start`, from given latents as they are: SDXL's refiner finishing the base's);
inpainting re-imposes the noised known region after each step (4-channel UNets, as diffusers) or gives an
inpainting UNet (9 input channels) the mask and masked picture's latents. `StableDiffusion`'s methods
`image_to_image`, `inpaint` and `encode_images`, on the pipeline's preparation and denoising loop.
"""
import numpy as np

from . import arguments, schedulers
from .images import broadcast, load_images, load_latents, load_masks


@arguments.checked
def image_to_image(sd, prompt, image, *, negative_prompt=None, batch_size=1, num_steps=50,
                   unconditional_guidance_scale=7.5, seed=None, diffusion_noise=None, scheduler=None,
                   long_prompts=False, clip_skip=None, prompt_weighting=False, callback=None, return_latents=False,
                   verbose=True, strength=0.8, sample_latents=False, denoising_start=None, denoising_end=None,
                   **micro_conditioning):
    """Redraws a picture after a prompt; returns uint8 numpy (B, H, W, 3).

    Args:
        image: the picture(s), at the pipeline's size (see `images.py`), or their latents, float (B or 1, h, w, C)
            of the pipeline's `latent_shape` (e.g. `text_to_image(..., return_latents=True)`), as diffusers takes a
            4-channel image: used as they are, not VAE-encoded.
        diffusion_noise: the noise (B, h, w, C) added to the picture's latents instead of seeded noise.
        strength: in (0, 1]: how far to noise the picture; `int(num_steps * strength)` steps run.
        sample_latents: encode to a sample of the VAE posterior (seeded) instead of its mean.
        denoising_start: a float in (0, 1): as diffusers, start where that fraction of the training schedule is
            denoised (the steps at timesteps < round(T (1 - denoising_start))), from `image` as it is, adding no
            noise; `strength` is then ignored. SDXL's ensemble of experts: the base's `text_to_image(...,
            denoising_end=0.8, return_latents=True)`, then the refiner's `image_to_image(prompt, latents,
            denoising_start=0.8)`.
        denoising_end: stop early, as in `text_to_image`; above denoising_start.
        micro_conditioning: as in `text_to_image`, but as diffusers' SDXL image-to-image and inpainting pipelines take
            them, the base's negative sizes default each to the prompt's and its negative crop corner is the prompt's
            (`sdxl.py`).
        Other arguments: see `text_to_image`.
    Bad arguments (latents of another shape too) raise ValueError, naming them, before any model work.
    """
    latents = load_latents(image, sd.latent_shape)
    images = load_images(image, (sd.img_height, sd.img_width)) if latents is None else None
    setup = sd._prepare(prompt, negative_prompt=negative_prompt, batch_size=batch_size, num_steps=num_steps,
                        seed=seed, diffusion_noise=diffusion_noise, scheduler=scheduler, long_prompts=long_prompts,
                        clip_skip=clip_skip, prompt_weighting=prompt_weighting, strength=strength,
                        denoising_start=denoising_start, denoising_end=denoising_end, editing=True,
                        **micro_conditioning)
    if latents is None:
        latents = sd.encode_images(images, setup, sample=sample_latents)
    latents = broadcast(latents, len(setup.noise), "images")
    latents = latents if denoising_start is not None else setup.sampler.add_noise(latents, setup.noise)
    latents = sd.denoise(latents, setup, guidance=unconditional_guidance_scale, callback=callback, verbose=verbose)
    return latents if return_latents else sd.decode(latents)


@arguments.checked
def inpaint(sd, prompt, image, mask, *, negative_prompt=None, batch_size=1, num_steps=50,
            unconditional_guidance_scale=7.5, seed=None, diffusion_noise=None, scheduler=None, long_prompts=False,
            clip_skip=None, prompt_weighting=False, callback=None, return_latents=False, verbose=True,
            strength=1.0, sample_latents=False, **micro_conditioning):
    """Repaints the white part of `mask` in `image` after a prompt; returns uint8 numpy (B, H, W, 3).

    Args:
        mask: where to repaint, white (see `images.py`); the image's size.
        strength: in (0, 1]; below 1 the masked region starts from the noised picture, as in
            `image_to_image`; at 1 from pure noise.
        Other arguments: see `image_to_image`.
    """
    images = load_images(image, (sd.img_height, sd.img_width))
    masks = load_masks(mask, images.shape[1:3])
    setup = sd._prepare(prompt, negative_prompt=negative_prompt, batch_size=batch_size, num_steps=num_steps,
                        seed=seed, diffusion_noise=diffusion_noise, scheduler=scheduler, long_prompts=long_prompts,
                        clip_skip=clip_skip, prompt_weighting=prompt_weighting, strength=strength, editing=True,
                        **micro_conditioning)
    sampler, noise = setup.sampler, setup.noise
    known = sd.encode_images(images, setup, sample=sample_latents)
    latents = noise * sampler.init_noise_sigma if strength == 1 else sampler.add_noise(known, noise)
    mask = broadcast(masks[:, ::sd.vae_factor, ::sd.vae_factor], len(known), "masks")  # nearest, as diffusers
    conditioning = after_step = None
    if sd.diffusion_model.inputs[0].shape[-1] > known.shape[-1]:  # an inpainting UNet
        masked = sd.encode_images(images * (masks < 0.5), setup, sample=sample_latents)
        conditioning = np.concatenate([mask, masked], axis=-1)
    else:  # the known region, noised to the next step, clean after the last
        after_step = schedulers.Repaint(sampler, mask, known, noise)
    latents = sd.denoise(latents, setup, guidance=unconditional_guidance_scale, callback=callback,
                         conditioning=conditioning, after_step=after_step, verbose=verbose)
    return latents if return_latents else sd.decode(latents)


def encode_images(sd, images, setup, *, sample=False):
    """The UNet's latents (B, h, w, C), one row per image of `setup`, of pictures in [-1, 1]: the VAE
    posterior's mean (or a sample of it, drawn with `setup.draw_noise`) times the decoder's scaling factor."""
    moments = np.asarray(sd.encoder.predict_on_batch(images), dtype="float32")
    mean, log_variance = np.split(broadcast(moments, len(setup.noise), "images"), 2, axis=-1)
    if sample:
        mean = mean + np.exp(0.5 * np.clip(log_variance, -30.0, 20.0)) * setup.draw_noise()
    return mean * sd.decoder.scaling_factor
