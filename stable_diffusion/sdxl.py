"""SDXL's micro-conditioning (Podell et al., 2023, sec. 2.2): the UNet's time ids, the size the training image had
before it was resized, the top-left corner of its crop and the size asked for, each (height, width), as diffusers'
`StableDiffusionXLPipeline` takes them (`original_size`, `crops_coords_top_left`, `target_size`) and lays them out
(`_get_add_time_ids`); the negative prompt's (`negative_...`) are the prompt's unless its sizes are both given.
"""
import numpy as np

SIZES = ("original_size", "crops_coords_top_left", "target_size")
KEYWORDS = (*SIZES, *(f"negative_{name}" for name in SIZES))


def time_ids(size, batch_size, *, original_size=None, crops_coords_top_left=None, target_size=None,
             negative_original_size=None, negative_crops_coords_top_left=None, negative_target_size=None):
    """The prompt's and the negative prompt's time ids, float32 (batch_size, 6): original size, crop corner, target
    size; the sizes default to the image's `size`, the corner to (0, 0)."""
    ids = [*(original_size or size), *(crops_coords_top_left or (0, 0)), *(target_size or size)]
    negative = ids if negative_original_size is None or negative_target_size is None else [
        *negative_original_size, *(negative_crops_coords_top_left or (0, 0)), *negative_target_size]
    return [np.tile(np.float32(values), (batch_size, 1)) for values in (ids, negative)]


def listed(encoded):
    """`encode_text` output as a list of the UNet's text inputs: [states], or SDXL's tuple as [states, text_embeds]."""
    return list(encoded) if isinstance(encoded, tuple) else [encoded]
