"""int8 inference through Keras' own quantization (`keras.Model.quantize`, Keras >= 3.15), applied to a loaded
pipeline: `StableDiffusion(..., quantize="int8")`, `from_checkpoint(path, quantize="int8")`, the CLI's `--int8`.

What is quantized: the Dense layers of the UNet and of the text encoder (attention projections, feed-forward,
time-embedding projections): int8 kernels with one abs-max scale per output channel, and, where the backend
multiplies int8 by int8 (TensorFlow, JAX, torch), int8 inputs with one abs-max scale per token, computed at
each call. On OpenVINO, whose Keras backend computes an int8 product in int32 (slower than float32), the
weights only. What is not: convolutions (Keras 3.15 quantizes no Conv layer: the ResBlocks and the VAE stay
float32), embeddings, and the VAE, whose only Dense layers (one attention block per VAE model) hold about 2%
of its weights: nothing to gain. The text encoder is quantized as its image quality cost on the demo model is
no larger than the UNet's, and it halves the memory of SD 1.5's; it runs once per prompt, so speed does not
change. Random weights cannot show whether a real CLIP's outlier activations suffer. Measured (speed of a
UNet call, PSNR and latents against float32, the demo model's prompt adherence): `python -m benchmarks.int8`,
`python -m benchmarks.precision --policies int8`, `python -m benchmarks.adherence --int8`; benchmarks/RESULTS.md.

A quantized pipeline holds int8 variables that bundles have no place for: `StableDiffusion.save` refuses it
(save the float pipeline and load it with quantize="int8").
"""
import keras

from .keras_internals import garbage_collected_once

MODES = (None, "int8")
QUANTIZED = ("text_encoder", "text_encoder_2", "diffusion_model")  # the models quantized (if there), see above


def check(mode):
    """Raises a ValueError unless `mode` is one of `MODES`."""
    if mode not in MODES:
        raise ValueError(f'quantize must be None or "int8", got {mode!r}.')


def apply(sd, mode):
    """Quantizes the `QUANTIZED` models of the pipeline `sd` to `mode`, in place; None leaves them as they are."""
    if mode:
        quantize_models([getattr(sd, name) for name in QUANTIZED if getattr(sd, name) is not None])


def quantize_models(models):
    """Quantizes the Dense layers of Keras `models` to int8, in place (see the module's docstring)."""
    config = None
    if keras.backend.backend() == "openvino":  # weights only: int8 x int8 products run in int32 there
        config = keras.quantizers.Int8QuantizationConfig(
            weight_quantizer=keras.quantizers.AbsMaxQuantizer(axis=0), activation_quantizer=None)
    with garbage_collected_once():
        for model in models:
            model.quantize("int8", config=config, filters=lambda layer: isinstance(layer, keras.layers.Dense))
