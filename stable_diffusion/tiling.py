"""Tiled VAE decoding, as diffusers' `AutoencoderKL.tiled_decode` (`enable_tiling`) does it.

The latents are cut into `tile` x `tile` tiles that overlap by a quarter; each is decoded alone, so
the decoder's memory is that of one tile whatever the image size. Each decoded tile fades in from
its upper, then its left neighbour (already blended) over a quarter of a tile and is cropped to
three quarters. Not exact: group norm statistics are taken per tile.
"""
import numpy as np

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def checked_tile_size(tile_size, factor):
    """`tile_size` (pixels) if it is None or a multiple of `factor` (image pixels per latent) of at
    least 4 latents; ValueError otherwise."""
    if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 4 * factor or tile_size % factor):
        raise ValueError(f"tile_size must be a multiple of {factor} pixels, at least {4 * factor}, got {tile_size!r}.")
    return tile_size


def decode(decoder, latents, tile_size, factor):
    """Images (B, H, W, 3) from latents (B, h, w, C): `decoder` (a model call) applied to the whole, or tile by
    tile where the image is over `tile_size` pixels (None: never) high or wide; `factor`: image pixels per latent."""
    tile = (tile_size or 0) // factor
    if not tile or max(latents.shape[1:3]) <= tile:
        return np.asarray(decoder(latents))
    stride, blend = int(tile * (1 - OVERLAP)), int(tile * factor * OVERLAP)
    keep = tile * factor - blend
    height, width = latents.shape[1:3]
    rows = [[np.array(decoder(latents[:, i:i + tile, j:j + tile])) for j in range(0, width, stride)]
            for i in range(0, height, stride)]
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            if i:
                fade_in(rows[i - 1][j], image, blend, axis=1)
            if j:
                fade_in(row[j - 1], image, blend, axis=2)
    return np.concatenate([np.concatenate([image[:, :keep, :keep] for image in row], axis=2) for row in rows], axis=1)


def fade_in(previous, image, extent, axis):
    """Blends, in place, the first `extent` rows (axis 1) or columns (axis 2) of `image` linearly from
    the last ones of `previous`, the tile before it."""
    image, previous = np.moveaxis(image, axis, 0), np.moveaxis(previous, axis, 0)  # views along `axis`
    extent = min(len(previous), len(image), extent)
    weight = (np.arange(extent, dtype=np.float32) / extent)[:, None, None, None]
    image[:extent] = previous[-extent:] * (1 - weight) + image[:extent] * weight
