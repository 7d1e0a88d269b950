"""Pictures and masks as `StableDiffusion.image_to_image` and `inpaint` take them.

Images are uint8 arrays (H, W, 3) / (B, H, W, 3), PIL images or paths (image-to-image also takes latents: float
(B, h, w, C)); masks are white where to repaint: uint8 or bool arrays (H, W) / (B, H, W), PIL images or paths,
binarized at 128.
"""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def load_images(image, size, name="image"):
    """Pictures in [-1, 1], float32 (B, H, W, 3), from uint8 arrays, PIL images or paths, of `size`
    (height, width) pixels: the pipeline's."""
    if isinstance(image, (str, Path)):
        image = open_image(image, name)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    image = image[None] if image.ndim == 3 else image
    if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 (H, W, 3) or (B, H, W, 3), a PIL image or a path; "
                         f"got {image.dtype} {image.shape}.")
    if image.shape[1:3] != tuple(size):
        raise ValueError(f"{name} is {pixels(image.shape[1:3])} but this pipeline makes {pixels(size)} images; "
                         f"resize it, or load the pipeline with img_height={image.shape[1]}, "
                         f"img_width={image.shape[2]}.")
    return image.astype("float32") / 255.0 * 2.0 - 1.0  # as diffusers' VaeImageProcessor


def load_latents(image, latent_shape):
    """`image` as latents, float32 (B, h, w, C), if it is a float array of C = `latent_shape[-1]` channels (B, h, w, C)
    or (h, w, C), else None (a picture: `load_images`); ValueError if it is such an array of other height or width."""
    if isinstance(image, (str, Path, Image.Image)) or np.asarray(image).dtype.kind != "f":
        return None
    latents = np.asarray(image, "float32")
    if latents.ndim not in (3, 4) or latents.shape[-1] != latent_shape[-1]:
        return None
    if latents.shape[-3:] != tuple(latent_shape):
        raise ValueError(f"image as latents must be (B, h, w, C) = (B, {', '.join(map(str, latent_shape))}) for this "
                         f"pipeline, got {latents.shape} (float arrays are read as latents; pictures are uint8 "
                         f"(H, W, 3)).")
    return latents.reshape(-1, *latent_shape)


def load_masks(mask, size):
    """Masks, 1 where to repaint, float32 (B, H, W, 1), from uint8 / bool arrays, PIL images or paths,
    of the image's `size` (height, width) pixels."""
    if isinstance(mask, (str, Path)):
        mask = open_image(mask, "mask")
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    mask = np.asarray(mask)
    if mask.ndim in (3, 4) and mask.shape[-1] in (1, 3, 4):  # not a width (a multiple of 8): channels
        raise ValueError(f"mask must have one channel, (H, W) or (B, H, W); got {mask.dtype} {mask.shape}, "
                         f"channels last: pass one channel, or a PIL image or a path (read as grayscale).")
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.dtype not in (np.uint8, bool) or mask.ndim != 3:
        raise ValueError(f"mask must be uint8 or bool (H, W) or (B, H, W), a PIL image or a path; "
                         f"got {mask.dtype} {mask.shape}.")
    if mask.shape[1:3] != tuple(size):
        raise ValueError(f"mask is {pixels(mask.shape[1:3])} but image is {pixels(size)}; they must match.")
    return (mask.astype("float32") / (1 if mask.dtype == bool else 255) >= 0.5)[..., None].astype("float32")


def pixels(size):
    """(height, width) in words: "64x48 pixels (height x width)"."""
    return f"{size[0]}x{size[1]} pixels (height x width)"


def open_image(path, name):
    """A PIL image from a file, or a ValueError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"Cannot read {name} {str(path)!r}: {error}") from error


def broadcast(array, batch_size, name):
    """`array` (1 or B, ...) repeated to (B, ...)."""
    if len(array) not in (1, batch_size):
        raise ValueError(f"Got {len(array)} {name} for a batch of {batch_size}.")
    return np.broadcast_to(array, (batch_size, *array.shape[1:]))
