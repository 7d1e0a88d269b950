"""The generations `test_runtime.py` compares across backends, and the script that makes them in a subprocess
on another backend: `KERAS_BACKEND=openvino python other_backend.py CHECKPOINT OUT.npz` loads two pipelines from
CHECKPOINT in turn, the second (text-to-image only) after the first left its compiled models in the cache on disk,
and saves their images with each one's (compilations, compilations read from the cache), and the second's
image again after a weight of its decoder changed, and whether TensorFlow was imported."""
import sys

import numpy as np
from PIL import Image

PROMPT, NEGATIVE = "a red circle", "green"


def generate(sd, tasks=("text_to_image", "image_to_image", "inpaint")):
    """uint8 images of text-to-image (ancestral sampler), image-to-image (a sample of the VAE posterior) and
    inpainting (or those of `tasks`) by the 64x64 pipeline `sd`, from fixed seeds."""
    picture = np.asarray(Image.radial_gradient("L").resize((64, 64)).convert("RGB"))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    options = dict(negative_prompt=NEGATIVE, num_steps=4, seed=3, verbose=False)
    calls = dict(
        text_to_image=lambda: sd.text_to_image(PROMPT, scheduler="euler_a", **options),
        image_to_image=lambda: sd.image_to_image(PROMPT, picture, strength=0.7, scheduler="dpmpp_2m_karras",
                                                 sample_latents=True, **options),
        inpaint=lambda: sd.inpaint(PROMPT, picture, mask, strength=0.8, scheduler="pndm", **options))
    return {task: calls[task]() for task in tasks}


def main(checkpoint, out):
    import keras

    from stable_diffusion import StableDiffusion

    backend, events = keras.backend.backend(), []
    if backend == "jax":
        import jax

        jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
    saved = {}
    for run, tasks in (("first", ("text_to_image", "image_to_image", "inpaint")), ("second", ("text_to_image",))):
        del events[:]
        sd = StableDiffusion.from_checkpoint(checkpoint, img_height=64, img_width=64)
        saved.update({f"{run}_{task}": images for task, images in generate(sd, tasks).items()})
        if backend == "jax":
            reads = [events.count(f"/jax/compilation_cache/{name}") for name in ("compile_requests_use_cache",
                                                                                 "cache_hits")]
        else:  # openvino
            compiled = [model for predictor in (sd.text_encoder, sd.denoise_step, sd.decoder, sd.encoder)
                        for model in predictor.predict_on_batch.compiled.values()]
            reads = [len(compiled), sum(model.get_property("LOADED_FROM_CACHE") for model in compiled)]
        saved[f"{run}_reads"] = np.array(reads)
    bias = sd.decoder.get_layer("decoder-conv_out").bias  # assigned after compiling: must be compiled again
    bias.assign(keras.ops.convert_to_numpy(bias.value) + 0.5)
    saved["brighter_text_to_image"] = generate(sd, ("text_to_image",))["text_to_image"]
    saved["tensorflow_imported"] = np.array("tensorflow" in sys.modules)
    np.savez(out, **saved)


if __name__ == "__main__":
    main(*sys.argv[1:])
