"""A pipeline's models exported for runtimes without Keras, through Keras' `Model.export`.
`StableDiffusion.export(folder, format=...)` writes, with static shapes for the pipeline's image size and batches
of one image:

    config.json        the format, image size, latent shape, the VAE's factor and scaling factor, each model's
                       file and inputs, the default sampler, the pipeline's `config` (the sampler's among them)
    text_encoder.EXT   token_ids (1, 77) int32 -> CLIP states (1, 77, dim)
    denoise_step.EXT   the guided step (`StableDiffusion.denoise_step`): latents (1, h, w, C), timestep (1,),
                       guidance (1,), context and negative (1, 77, dim) states -> the guided UNet output
    decoder.EXT        latents (1, h, w, C) -> image (1, H, W, 3), about [-1, 1]
    encoder.EXT        images (1, H, W, 3) in [-1, 1] -> the VAE posterior's mean and log-variance (1, h, w, 2C)
    tokenizer/         the CLIP vocabulary (`Tokenizer.save`)

per format: "tf_saved_model" a SavedModel folder per model (signature `serve`; the step's SavedModel also has
`from_token_ids`, its `serving_default` for TF Serving, which takes token_ids and negative_token_ids (1, 77)
and the noisy latents in place of the states), "onnx" `.onnx`, "openvino" `.xml` + `.bin`, "litert" `.tflite`
with float32 weights, or float16 weights (computed in float32) for a model whose float32 weights pass
LiteRT's 2 GB flatbuffer limit, as the full-size UNet's 3.4 GB do. The folder appears only once complete.
`exported.ExportedStableDiffusion(folder)` generates with it.
"""
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np

FORMATS = {"tf_saved_model": "", "onnx": ".onnx", "openvino": ".xml", "litert": ".tflite"}  # file suffixes
LITERT_FLOAT32_LIMIT = 2**31  # bytes of weights a .tflite flatbuffer holds


def export(sd, folder, *, format="tf_saved_model"):
    """Writes the models of the pipeline `sd` in `format` (one of `FORMATS`) and what `ExportedStableDiffusion`
    needs besides into the new folder `folder` (see the module docstring); on the TensorFlow backend."""
    folder = Path(folder)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}.")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"export runs on the TensorFlow backend (KERAS_BACKEND=tensorflow), not "
                         f"{keras.backend.backend()!r}.")
    if folder.exists():
        raise FileExistsError(f"{folder} exists; export writes a new folder.")
    if sd.text_encoder_2 is not None:
        raise ValueError("export writes SD 1.x / 2.x pipelines; SDXL's (two text encoders, time ids) not yet.")
    tokens, dim = (1, sd.tokenizer.sequence_length), sd.text_encoder.outputs[0].shape[-1]
    latents = (1, *sd.latent_shape[:2], sd.diffusion_model.inputs[0].shape[-1])
    inputs = dict(
        text_encoder=dict(token_ids=(tokens, "int32")),
        denoise_step=dict(latents=(latents, "float32"), timestep=((1,), "float32"), guidance=((1,), "float32"),
                          context=((*tokens, dim), "float32"), negative=((*tokens, dim), "float32")),
        decoder=dict(latents=((1, *sd.latent_shape), "float32")),
        encoder=dict(images=((1, sd.img_height, sd.img_width, 3), "float32")))
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, specs in inputs.items():
            model, path = getattr(sd, name), str(staging / f"{name}{FORMATS[format]}")
            signature = [keras.InputSpec(shape=shape, dtype=dtype, name=key) for key, (shape, dtype) in specs.items()]
            if format == "tf_saved_model" and name == "denoise_step":
                export_step_with_token_ids(sd, path, signature)
            else:
                model.export(path, format=format, input_signature=[signature if len(signature) > 1 else signature[0]],
                             verbose=False, **export_options(model, format))
        sd.tokenizer.save(staging / "tokenizer")
        (staging / "config.json").write_text(json.dumps(dict(
            format=format, img_height=sd.img_height, img_width=sd.img_width, latent_shape=sd.latent_shape,
            vae_factor=sd.vae_factor, scaling_factor=sd.decoder.scaling_factor,
            models={name: dict(file=f"{name}{FORMATS[format]}", inputs=specs) for name, specs in inputs.items()},
            scheduler=sd.scheduler_name, config=sd.config), indent=2))
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_options(model, format):
    """Keras' exporter's options: float16 weights in LiteRT for a model over its limit, tf2onnx taught Erfc."""
    if format == "onnx":
        teach_tf2onnx_erfc()
    if format == "litert" and 4 * sum(math.prod(weight.shape) for weight in model.weights) > LITERT_FLOAT32_LIMIT:
        import tensorflow as tf

        return dict(optimizations=[tf.lite.Optimize.DEFAULT], target_spec=dict(supported_types=[tf.float16]))
    return {}


def export_step_with_token_ids(sd, path, signature):
    """The step's SavedModel: `serve` as the other formats' step, and `from_token_ids` (`serving_default`),
    which runs the text encoder on token ids first, so that TF Serving runs a step from token ids and noise."""
    import tensorflow as tf

    specs = {spec.name: tf.TensorSpec(spec.shape, spec.dtype, spec.name) for spec in signature}
    ids = [tf.TensorSpec((1, sd.tokenizer.sequence_length), "int32", name)
           for name in ("token_ids", "negative_token_ids")]
    archive = keras.export.ExportArchive()
    archive.track(sd.denoise_step)
    archive.track(sd.text_encoder)
    archive.add_endpoint("from_token_ids", lambda ids, negative_ids, latents, timestep, guidance: sd.denoise_step(
        [latents, timestep, guidance, sd.text_encoder(ids), sd.text_encoder(negative_ids)]),
        input_signature=[*ids, specs["latents"], specs["timestep"], specs["guidance"]])
    archive.add_endpoint("serve", sd.denoise_step.__call__, input_signature=[list(specs.values())])
    archive.write_out(path, verbose=False)


@functools.cache
def teach_tf2onnx_erfc():
    """tf2onnx (1.17) converts no `Erfc`, in which TensorFlow writes the exact GELU: registers a converter to
    erfc(x) = 1 + erf(-x) with its handler decorator (float32 models: ONNX export wants them)."""
    from tf2onnx import handler

    @handler.tf_op("Erfc")
    class Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            node.type = "Erf"
            ctx.insert_new_node_on_input(node, "Neg", node.input[0])
            one = ctx.make_const(f"{node.name}/one", np.array(1, dtype=np.float32))
            ctx.insert_new_node_on_output("Add", node.output[0], inputs=[node.output[0], one.output[0]])
