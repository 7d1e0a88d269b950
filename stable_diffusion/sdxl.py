"""SDXL's micro-conditioning (Podell et al., 2023, sec. 2.2): the UNet's time ids, the size the training image had
before it was resized, the top-left corner of its crop and the size asked for, each (height, width), as diffusers'
`StableDiffusionXLPipeline` takes them (`original_size`, `crops_coords_top_left`, `target_size`) and lays them out
(`_get_add_time_ids`); the negative prompt's (`negative_...`) are the prompt's unless its sizes are both given.
diffusers' SDXL image-to-image and inpainting pipelines (`editing`) take each negative size the prompt's unless
given, and the prompt's crop corner (`negative_crops_coords_top_left` is not theirs).

The refiner (a pipeline config with `requires_aesthetics_score`, as diffusers' `StableDiffusionXLImg2ImgPipeline`)
has five ids instead: the sizes and crop, then an aesthetic score (`aesthetic_score`, default 6.0) in place of the
target size; the negative prompt's take `negative_original_size` (default: the prompt's), its own crop corner
(`negative_crops_coords_top_left`, default (0, 0)) and `negative_aesthetic_score` (default 2.5).

The VAE's precision (`vae_dtypes`): SDXL's VAE overflows float16, so diffusers' SDXL pipelines run one whose config
says `force_upcast` in float32 (madebyollin's fp16-fix VAE says false).
"""
import numpy as np

SIZES = ("original_size", "crops_coords_top_left", "target_size")
SCORES = ("aesthetic_score", "negative_aesthetic_score")
BASE = (*SIZES, *(f"negative_{name}" for name in SIZES))
REFINER = ("original_size", "crops_coords_top_left", "negative_original_size", "negative_crops_coords_top_left",
           *SCORES)
KEYWORDS = (*BASE, *SCORES)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults


def keywords(sdxl, *, requires_aesthetics_score=False, editing=False):
    """The micro-conditioning keywords a pipeline takes: none (not `sdxl`), the refiner's, or the base's (`editing`,
    image-to-image and inpainting: no negative crop corner)."""
    base = tuple(name for name in BASE if not editing or name != "negative_crops_coords_top_left")
    return (REFINER if requires_aesthetics_score else base) if sdxl else ()


def time_ids(size, batch_size, pipeline, *, editing=False, original_size=None, crops_coords_top_left=None,
             target_size=None, negative_original_size=None, negative_crops_coords_top_left=None,
             negative_target_size=None, aesthetic_score=None, negative_aesthetic_score=None):
    """The prompt's and the negative prompt's time ids, float32 (batch_size, 6): original size, crop corner, target
    size; the sizes default to the image's `size`, the corner to (0, 0); the negative ones as the module docstring
    says, for text-to-image or (`editing`) image-to-image and inpainting. With `pipeline` (the pipeline's config)
    `requires_aesthetics_score`, the refiner's (batch_size, 5): original size, crop corner, aesthetic score."""
    original, crop, target = original_size or size, crops_coords_top_left or (0, 0), target_size or size
    if pipeline.get("requires_aesthetics_score"):
        ids = [*original, *crop, AESTHETIC_SCORE if aesthetic_score is None else aesthetic_score]
        negative = [*(negative_original_size or original), *(negative_crops_coords_top_left or (0, 0)),
                    NEGATIVE_AESTHETIC_SCORE if negative_aesthetic_score is None else negative_aesthetic_score]
    else:  # the negative prompt's: the prompt's unless both sizes are given; editing: each size, the prompt's crop
        ids = [*original, *crop, *target]
        both = negative_original_size is not None and negative_target_size is not None
        negative = ids if not (editing or both) else [
            *(negative_original_size or original), *(crop if editing else negative_crops_coords_top_left or (0, 0)),
            *(negative_target_size or target)]
    return [np.tile(np.float32(values), (batch_size, 1)) for values in (ids, negative)]


def vae_dtypes(dtype, pipeline):
    """The (encoder, decoder) dtype policies of a pipeline of dtype policy `dtype` (None: the global one) whose config
    `pipeline` may say `force_upcast`, as diffusers' SDXL pipelines read it from the VAE's config: the encoder then in
    float32 whatever the policy (their image-to-image and inpainting), the decoder when the policy computes in
    float16 (their decoding; bfloat16 has float32's range); without it, both in `dtype`."""
    if not pipeline.get("force_upcast"):
        return dtype, dtype
    import keras  # here: the CLI reads this module's keywords before it loads Keras (and its backend)

    float16 = keras.dtype_policies.get(dtype or keras.config.dtype_policy()).compute_dtype == "float16"
    return "float32", "float32" if float16 else dtype


def listed(encoded):
    """`encode_text` output as a list of the UNet's text inputs: [states], or SDXL's tuple as [states, text_embeds]."""
    return list(encoded) if isinstance(encoded, tuple) else [encoded]
