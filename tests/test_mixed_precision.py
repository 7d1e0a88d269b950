"""Mixed precision: images under mixed_bfloat16 / mixed_float16 (and bfloat16 variables) stay close to float32
(PSNR), with the global Keras policy and with the pipeline's `dtype` argument, which every layer of every model
takes and which leaves the global policy as it was."""
import keras
import numpy as np
import pytest

from reference import psnr
from stable_diffusion import StableDiffusion
from stable_diffusion.bundle import MODELS


@pytest.fixture(scope="module")
def float32_images(reference):
    sd = StableDiffusion.from_checkpoint(reference("sd1")[1], jit_compile=False)
    return sd.text_to_image("a red circle", num_steps=4, seed=3, verbose=False)


@pytest.mark.parametrize("policy", [pytest.param("mixed_bfloat16", marks=pytest.mark.slow), "mixed_float16"])
def test_global_policy(policy, reference, float32_images):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        sd = StableDiffusion.from_checkpoint(reference("sd1")[1], jit_compile=False)
        images = sd.text_to_image("a red circle", num_steps=4, seed=3, verbose=False)
    finally:
        keras.config.set_dtype_policy(previous)
    assert sd.diffusion_model.outputs[0].dtype == policy.removeprefix("mixed_")
    assert images.dtype == np.uint8
    assert psnr(images, float32_images) > 35, f"PSNR {psnr(images, float32_images):.1f} dB vs float32"


@pytest.mark.parametrize("policy, variables", [("mixed_bfloat16", "float32"),
                                               pytest.param("bfloat16", "bfloat16", marks=pytest.mark.slow)])
def test_dtype_argument_reaches_every_layer_and_leaves_the_global_policy(policy, variables, reference, float32_images):
    """A mixed policy keeps the variables in float32; "bfloat16" loads them in bfloat16 (half the memory)."""
    sd = StableDiffusion.from_checkpoint(reference("sd1")[1], jit_compile=False, dtype=policy)
    assert keras.config.dtype_policy().name == "float32"
    for name in MODELS:
        layers = [layer for layer in getattr(sd, name).layers if not isinstance(layer, keras.layers.InputLayer)]
        assert {layer.dtype_policy.name for layer in layers} == {policy}, name
        assert {variable.dtype for variable in getattr(sd, name).weights} == {variables}, name
    assert sd.diffusion_model.outputs[0].dtype == "bfloat16"
    images = sd.text_to_image("a red circle", num_steps=4, seed=3, verbose=False)
    assert psnr(images, float32_images) > 35, f"PSNR {psnr(images, float32_images):.1f} dB vs float32"
