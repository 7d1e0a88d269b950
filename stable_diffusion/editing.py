"""Image-to-image (SDEdit, Meng et al., 2022) and inpainting for `StableDiffusion`, on its one
denoising loop: the picture's VAE latents are noised to the timestep `strength` of the way back and
the remaining steps run. Inpainting either re-imposes the known region, noised to each next step
(standard UNets; diffusers' `StableDiffusionInpaintPipeline` for 4 input channels), or gives an
inpainting UNet (9 input channels) the mask and the masked picture's latents at every step.

Images are uint8 arrays (H, W, 3) / (B, H, W, 3), PIL images or paths; masks are white where to
repaint: uint8 or bool arrays (H, W) / (B, H, W), PIL images or paths, binarized at 128.
"""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageEditing:
    """`image_to_image` and `inpaint`, mixed into `StableDiffusion`."""

    def image_to_image(self, prompt, image, strength=0.8, negative_prompt=None, num_steps=50,
                       unconditional_guidance_scale=7.5, seed=None, batch_size=1, diffusion_noise=None,
                       scheduler=None, sample_latents=False, callback=None, return_latents=False,
                       long_prompts=False, verbose=True):
        """Redraws a picture after a prompt; returns uint8 numpy (B, H, W, 3).

        Args:
            image: the picture(s), at the pipeline's size (see the module docstring).
            strength: in (0, 1]: how far to noise the picture; `int(num_steps * strength)` steps run.
            diffusion_noise: the noise (B, h, w, C) added to the picture's latents instead of seeded noise.
            sample_latents: encode to a sample of the VAE posterior (seeded) instead of its mean.
            Other arguments: see `text_to_image`.
        """
        images = self.load_images(image, "image")
        context, negative = self._contexts(self.encode_text(prompt, long_prompts), negative_prompt, batch_size,
                                           long_prompts)
        draw_noise = self._noise_source(len(context), seed)
        sampler = self._sampler(scheduler, num_steps, strength)
        noise = self._initial_noise(draw_noise, diffusion_noise)
        latents = sampler.add_noise(self.encode_images(images, len(context), sample_latents, draw_noise), noise)
        latents = self.denoise(latents, context, negative, sampler, unconditional_guidance_scale,
                               draw_noise, callback, verbose=verbose)
        return latents if return_latents else self.decode(latents)

    def inpaint(self, prompt, image, mask, strength=1.0, negative_prompt=None, num_steps=50,
                unconditional_guidance_scale=7.5, seed=None, batch_size=1, diffusion_noise=None,
                scheduler=None, sample_latents=False, callback=None, return_latents=False,
                long_prompts=False, verbose=True):
        """Repaints the white part of `mask` in `image` after a prompt; returns uint8 numpy (B, H, W, 3).

        Args:
            image: the picture(s), at the pipeline's size (see the module docstring).
            mask: where to repaint, white; the image's size.
            strength: in (0, 1]; below 1 the masked region starts from the noised picture, as in
                `image_to_image`; at 1 from pure noise.
            Other arguments: see `image_to_image`.
        """
        images, masks = self.load_images(image, "image"), load_masks(mask)
        if masks.shape[1:3] != images.shape[1:3]:
            raise ValueError(f"mask is {masks.shape[2]}x{masks.shape[1]} pixels but image is "
                             f"{images.shape[2]}x{images.shape[1]}; they must match.")
        context, negative = self._contexts(self.encode_text(prompt, long_prompts), negative_prompt, batch_size,
                                           long_prompts)
        batch = len(context)
        draw_noise = self._noise_source(batch, seed)
        sampler = self._sampler(scheduler, num_steps, strength)
        noise = self._initial_noise(draw_noise, diffusion_noise)
        known = self.encode_images(images, batch, sample_latents, draw_noise)
        latents = noise * sampler.init_noise_sigma if strength == 1 else sampler.add_noise(known, noise)
        factor = self.img_height // known.shape[1]
        latent_mask = broadcast(masks[:, ::factor, ::factor], batch, "masks")  # nearest, as diffusers
        conditioning = after_step = None
        if self.diffusion_model.inputs[0].shape[-1] > known.shape[-1]:  # an inpainting UNet
            masked = self.encode_images(images * (masks < 0.5), batch, sample_latents, draw_noise)
            conditioning = np.concatenate([latent_mask, masked], axis=-1)
        else:
            def after_step(latents):
                last = sampler.index == len(sampler.all_timesteps)
                return latent_mask * latents + (1 - latent_mask) * (known if last else sampler.add_noise(known, noise))
        latents = self.denoise(latents, context, negative, sampler, unconditional_guidance_scale,
                               draw_noise, callback, conditioning, after_step, verbose)
        return latents if return_latents else self.decode(latents)

    def load_images(self, image, name):
        """Pictures in [-1, 1], float32 (B, H, W, 3), from uint8 arrays, PIL images or paths."""
        if isinstance(image, (str, Path)):
            image = open_image(image, name)
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        image = np.asarray(image)
        image = image[None] if image.ndim == 3 else image
        if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"{name} must be uint8 (H, W, 3) or (B, H, W, 3), a PIL image or a path; "
                             f"got {image.dtype} {image.shape}.")
        if image.shape[1:3] != (self.img_height, self.img_width):
            raise ValueError(f"{name} is {image.shape[2]}x{image.shape[1]} pixels but this pipeline makes "
                             f"{self.img_width}x{self.img_height} images; resize it, or load the pipeline "
                             f"with img_height={image.shape[1]}, img_width={image.shape[2]}.")
        return image.astype("float32") / 255.0 * 2.0 - 1.0  # as diffusers' VaeImageProcessor

    def encode_images(self, images, batch_size, sample=False, draw_noise=None):
        """The UNet's latents (B, h, w, C) of pictures in [-1, 1]: the VAE posterior's mean (or a
        sample of it, with noise from `draw_noise`) times the VAE's scaling factor."""
        moments = np.asarray(self.encoder.predict_on_batch(images), dtype="float32")
        mean, log_variance = np.split(broadcast(moments, batch_size, "images"), 2, axis=-1)
        if sample:
            mean = mean + np.exp(0.5 * np.clip(log_variance, -30.0, 20.0)) * draw_noise()
        return mean * self.config["decoder"].get("scaling_factor", 0.18215)


def open_image(path, name):
    """A PIL image from a file, or a ValueError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"Cannot read {name} {str(path)!r}: {error}") from error


def load_masks(mask):
    """Masks, 1 where to repaint, float32 (B, H, W, 1), from uint8 / bool arrays, PIL images or paths."""
    if isinstance(mask, (str, Path)):
        mask = open_image(mask, "mask")
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    mask = np.asarray(mask)
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.dtype not in (np.uint8, bool) or mask.ndim != 3:
        raise ValueError(f"mask must be uint8 or bool (H, W) or (B, H, W), a PIL image or a path; "
                         f"got {mask.dtype} {mask.shape}.")
    return (mask.astype("float32") / (1 if mask.dtype == bool else 255) >= 0.5)[..., None].astype("float32")


def broadcast(array, batch_size, name):
    """`array` (1 or B, ...) repeated to (B, ...)."""
    if len(array) not in (1, batch_size):
        raise ValueError(f"Got {len(array)} {name} for a batch of {batch_size}.")
    return np.broadcast_to(array, (batch_size, *array.shape[1:]))
