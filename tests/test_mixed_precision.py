"""Mixed precision: images under mixed_bfloat16 / mixed_float16 (and bfloat16 variables) stay close to float32
(PSNR), with the global Keras policy and with the pipeline's `dtype` argument, which every layer of every model
takes and which leaves the global policy as it was; SDXL's VAE with `force_upcast` in float32 under float16
policies, as diffusers' SDXL pipelines run it."""
import functools
import json
import shutil

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from reference import TINY_CONFIG, psnr, relative_difference
from test_editing import picture
from stable_diffusion import StableDiffusion, sdxl
from stable_diffusion.bundle import MODELS
from stable_diffusion.decoder import Decoder
from stable_diffusion.encoder import Encoder


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


def policies(model):
    """The names of the dtype policies of `model`'s layers."""
    return {layer.dtype_policy.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)}


@pytest.mark.parametrize("policy, variables", [("mixed_bfloat16", "float32"),
                                               pytest.param("bfloat16", "bfloat16", marks=pytest.mark.slow)])
def test_dtype_argument_reaches_every_layer_and_leaves_the_global_policy(policy, variables, reference, float32_images):
    """A mixed policy keeps the variables in float32; "bfloat16" loads them in bfloat16 (half the memory)."""
    sd = StableDiffusion.from_checkpoint(reference("sd1")[1], jit_compile=False, dtype=policy)
    assert keras.config.dtype_policy().name == "float32"
    for name in MODELS:
        assert policies(getattr(sd, name)) == {policy}, name
        assert {variable.dtype for variable in getattr(sd, name).weights} == {variables}, name
    assert sd.diffusion_model.outputs[0].dtype == "bfloat16"
    images = sd.text_to_image("a red circle", num_steps=4, seed=3, verbose=False)
    assert psnr(images, float32_images) > 35, f"PSNR {psnr(images, float32_images):.1f} dB vs float32"


@pytest.fixture(scope="module")
def overflowing(sdxl, tmp_path_factory):
    """A copy of the tiny SDXL folder (`conftest.sdxl`; its vae/config.json says force_upcast, AutoencoderKL's
    default) whose VAE's first convolutions (the encoder's and the decoder's `conv_in`) are scaled by 1e6, so that
    their activations overflow float16 (at most 65504) but not float32, as the SDXL VAE's do at full size."""
    folder = tmp_path_factory.mktemp("overflowing")
    shutil.copytree(sdxl[1], folder, dirs_exist_ok=True)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    for key in [key for key in tensors if key.split(".")[1] == "conv_in"]:
        tensors[key] = tensors[key] * 1e6
    save_file(tensors, weights)
    return folder


@pytest.mark.parametrize("policy", ["mixed_float16", pytest.param("float16", marks=pytest.mark.slow)])
def test_force_upcast_vae_runs_in_float32_under_float16(policy, overflowing):
    """As diffusers' SDXL pipelines run a VAE whose config says force_upcast, ours decodes and encodes in float32
    under a float16 policy (the UNet in float16): finite, within float32 rounding (1e-6 of their scale) of the same
    weights in float32 models; the same weights in the policy's models overflow (inf or NaN), so the comparison
    shows the upcast at work."""
    sd = StableDiffusion.from_checkpoint(overflowing, jit_compile=False, dtype=policy)
    assert sd.config["pipeline"]["force_upcast"] is True and sd.diffusion_model.outputs[0].dtype == "float16"
    assert policies(sd.decoder) == policies(sd.encoder) == {"float32"}
    latents = np.random.default_rng(2).standard_normal((1, 8, 8, 4), dtype=np.float32)
    images = picture()[None].astype("float32") / 127.5 - 1
    for name, build, x in (("decoder", lambda dtype: Decoder(None, None, **sd.config["decoder"], dtype=dtype), latents),
                           ("encoder", lambda dtype: Encoder(64, 64, **sd.config["encoder"], dtype=dtype), images)):
        upcast, float32, policy_model = getattr(sd, name), build("float32"), build(policy)
        for model in (float32, policy_model):
            model.set_weights(upcast.get_weights())
        run = lambda model: keras.ops.convert_to_numpy(model(x)).astype("float32")  # eager: faster for one call
        assert not np.isfinite(run(policy_model)).all(), f"{name}: no overflow in {policy}"
        got, expected = run(upcast), run(float32)
        diff = relative_difference(got, expected)
        assert np.isfinite(got).all() and diff <= 1e-6, f"{name}: max abs diff {diff:.2e} of the scale vs float32"


@pytest.mark.parametrize("policy, encoder, decoder", [
    ("float32", "float32", "float32"), ("mixed_float16", "float32", "float32"), ("float16", "float32", "float32"),
    ("mixed_bfloat16", "float32", "mixed_bfloat16"), ("bfloat16", "float32", "bfloat16")])
def test_vae_dtypes(policy, encoder, decoder):
    """force_upcast as diffusers' SDXL pipelines read it: the encoder in float32 under any policy (image-to-image and
    inpainting upcast it whatever the dtype), the decoder under float16 ones only (bfloat16 has float32's range);
    without it, both in the policy; the policy given, or the global one (None)."""
    assert sdxl.vae_dtypes(policy, dict(force_upcast=True)) == (encoder, decoder)
    assert sdxl.vae_dtypes(policy, dict(force_upcast=False)) == sdxl.vae_dtypes(policy, {}) == (policy, policy)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        assert sdxl.vae_dtypes(None, dict(force_upcast=True)) == (encoder, None if decoder == policy else decoder)
    finally:
        keras.config.set_dtype_policy(previous)
