"""Bad arguments to every generating method are refused in the caller's words before any model work
(`stable_diffusion/arguments.py`), on a tiny random-weight pipeline; the memory bound of image sizes;
the warning for samplers used below their reliable step count; the XLA default; the trainers' number and
string checks, and the command lines' translation of keywords into flags."""
import argparse
import inspect
import warnings

import keras
import numpy as np
import pytest

from reference import TINY_CONFIG
from stable_diffusion import StableDiffusion, arguments

MODELS = ("text_encoder", "denoise_step", "encoder", "decoder")


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=False)


@pytest.fixture
def idle(sd, monkeypatch):
    """`sd` whose models fail the test if called: an error must come before any model work."""
    for name in MODELS:
        monkeypatch.setattr(getattr(sd, name), "predict_on_batch", lambda *a, name=name: pytest.fail(f"{name} ran"))
    return sd


PICTURE, MASK = np.zeros((32, 32, 3), "uint8"), np.zeros((32, 32), "uint8")
TASKS = {
    "text_to_image": lambda sd, **kw: sd.text_to_image("a cat", **kw),
    "generate_image": lambda sd, **kw: sd.generate_image(np.zeros((1, 77, 8), "float32"), **kw),
    "image_to_image": lambda sd, **kw: sd.image_to_image("a cat", PICTURE, **kw),
    "inpaint": lambda sd, **kw: sd.inpaint("a cat", PICTURE, MASK, **kw),
}
BAD = [  # Why 5, 7 and the other arguments every task takes
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(seed=1.5), "seed must be an integer >= 0, got 1.5"),
    (dict(seed="abc"), "seed must be an integer >= 0, got 'abc'"),
    (dict(seed=True), "seed must be an integer >= 0, got True"),
    (dict(seed=np.float64(2)), "seed must be an integer >= 0"),
    (dict(unconditional_guidance_scale=float("nan")), "unconditional_guidance_scale must be a finite number, got nan"),
    (dict(unconditional_guidance_scale=float("inf")), "unconditional_guidance_scale must be a finite number, got inf"),
    (dict(unconditional_guidance_scale=-np.inf), "unconditional_guidance_scale must be a finite number"),
    (dict(unconditional_guidance_scale="7.5"), "unconditional_guidance_scale must be a finite number, got '7.5'"),
    (dict(num_steps=1001), "num_steps must be an integer between 1 and 1000, got 1001"),
    (dict(num_steps=2.0), "num_steps must be an integer"),
    (dict(scheduler="plms"), "scheduler must be one of"),
    (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (dict(batch_size=2, negative_prompt=["a", "b", "c"]), "Got 3 negative prompts for a batch of 2"),
    (dict(diffusion_noise=np.zeros((1, 4, 4, 4))), r"diffusion_noise must have shape \(1, 16, 16, 4\)"),
    (dict(callback="print"), "callback must be callable or None"),
]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("keywords, message", BAD)
def test_bad_arguments_refused_before_model_work(task, keywords, message, idle):
    keywords = dict(dict(num_steps=2, verbose=False), **keywords)
    with pytest.raises(ValueError, match=message):
        TASKS[task](idle, **keywords)


@pytest.mark.parametrize("task, keywords, message", [
    ("image_to_image", dict(strength=0.2, num_steps=4), "strength 0.2 leaves no step of 4"),
    ("inpaint", dict(strength=1.5), r"strength must be in \(0, 1\]"),
    ("image_to_image", dict(batch_size=2, image=np.zeros((3, 32, 32, 3), "uint8")), "Got 3 images for a batch of 2"),
])
def test_bad_editing_arguments_refused_before_model_work(task, keywords, message, idle):
    image = keywords.pop("image", PICTURE)
    call = idle.image_to_image if task == "image_to_image" else lambda *a, **kw: idle.inpaint(*a, MASK, **kw)
    with pytest.raises(ValueError, match=message):
        call("a cat", image, verbose=False, **keywords)


@pytest.mark.parametrize("call, message", [
    (lambda sd: sd.text_to_image(3), "prompt must be a string or a non-empty list of strings, got 3"),
    (lambda sd: sd.text_to_image([]), "prompt must be a string or a non-empty list of strings, got"),
    (lambda sd: sd.image_to_image(["a", None], PICTURE), "prompt must hold strings only, got None"),
    (lambda sd: sd.text_to_image("a", negative_prompt=[7]), "negative_prompt must hold strings only, got 7"),
])
def test_bad_prompts_refused_before_model_work(call, message, idle):
    with pytest.raises(ValueError, match=message):
        call(idle)


def test_numpy_integer_seeds_are_seeds(sd):
    images = [sd.text_to_image("a cat", num_steps=2, seed=seed, verbose=False, return_latents=True)
              for seed in (3, np.int64(3), np.uint32(3))]
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0], images[2])


def test_mask_with_channels_is_named_by_its_axes(idle):
    """Why 9: a (H, W, 3) mask was read as (B, H, W) and reported as "3x64 pixels"."""
    with pytest.raises(ValueError, match=r"mask must have one channel, \(H, W\) or \(B, H, W\); got uint8 \(32, 32, 3\)") as error:
        idle.inpaint("a cat", PICTURE, np.zeros((32, 32, 3), "uint8"), verbose=False)
    assert "3x32" not in str(error.value)
    with pytest.raises(ValueError, match=r"image is 32x16 pixels \(height x width\) but this pipeline makes 32x32"):
        idle.image_to_image("a cat", np.zeros((32, 16, 3), "uint8"), verbose=False)


def test_huge_sizes_refused_by_memory_before_building(monkeypatch):
    """Why 3: 100000 x 100000 pixels (here 100032, a multiple of 64) were accepted; now refused with the estimate and the memory
    available before a model is built."""
    monkeypatch.delenv(arguments.MEMORY_VARIABLE, raising=False)
    monkeypatch.setattr("stable_diffusion.stable_diffusion.DiffusionModel", lambda **kw: pytest.fail("built"))
    with pytest.raises(ValueError, match=r"an image of img_height=100032, img_width=100032 needs at least [\d.]+ TiB "
                                         r"of memory, more than the [\d.]+ GiB available"):
        StableDiffusion(100032, 100032)


def test_memory_bound_follows_batch_tiling_and_the_override(sd, idle, monkeypatch):
    one, four = (arguments.memory_needed(sd.config, 32, 32, batch, decoded=32 * 32) for batch in (1, 4))
    assert four == 4 * one
    monkeypatch.setenv(arguments.MEMORY_VARIABLE, str((one + four) / 2 / arguments.GIB))
    with pytest.raises(ValueError, match=r"batch_size=4 images of img_height=32, img_width=32 needs at least [\d.]+ MiB "
                                         r"of memory, more than the [\d.]+ MiB available; .*enable_vae_tiling, or set "
                                         r"STABLE_DIFFUSION_MEMORY_GIB"):
        idle.text_to_image("a cat", batch_size=4, verbose=False)
    monkeypatch.setenv(arguments.MEMORY_VARIABLE, "inf")
    assert arguments.available_memory() == float("inf")
    monkeypatch.setenv(arguments.MEMORY_VARIABLE, "lots")
    with pytest.raises(ValueError, match="STABLE_DIFFUSION_MEMORY_GIB must be a number of GiB or 'inf', got 'lots'"):
        StableDiffusion(32, 32, config=TINY_CONFIG)
    # the decoder's share: the whole image, or one tile of it
    assert arguments.memory_needed({}, 4096, 4096, decoded=512 * 512) < arguments.memory_needed({}, 4096, 4096, decoded=4096**2)


def test_few_steps_warn_once(sd):
    """Item 6: PNDM below its reliable step count gives poor images (benchmarks/few_steps.py): one warning."""
    arguments.warn_few_steps.cache_clear()
    reliable = arguments.schedulers.PNDMScheduler.reliable_steps
    assert reliable > 1
    with pytest.warns(UserWarning, match=f"scheduler='pndm' with num_steps=2 gives poor images; it needs about "
                                         f"{reliable} steps or more") as caught:
        for _ in range(2):
            sd.text_to_image("a cat", num_steps=2, scheduler="pndm", verbose=False, return_latents=True)
    assert len(caught) == 1 and caught[0].filename == __file__  # pointing at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arguments.check_steps("pndm", {}, reliable)
        arguments.check_steps("ddim", {}, 10)


def test_xla_is_off_by_default_on_tensorflow_and_a_third_batch_size_is_not_retraced(sd):
    """Why 10: on TensorFlow, XLA's first image and each new shape cost a compilation (benchmarks/
    RESULTS.md), so the API, like the command line, defaults to TensorFlow graphs, whose steps trace for
    the first shape, once more with relaxed shapes for the second, and never again. (JAX compiles by
    default: without it, it runs op by op.)"""
    assert inspect.signature(StableDiffusion).parameters["jit_compile"].default is None  # as from_checkpoint's
    default = StableDiffusion(32, 32, config=TINY_CONFIG)
    compiled = [model.jit_compile for model in (default.text_encoder, default.denoise_step, default.decoder)]
    assert compiled == [keras.backend.backend() == "jax"] * 3
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tracing counts are TensorFlow's")
    for batch_size in (1, 2):
        sd.text_to_image("a cat", num_steps=1, batch_size=batch_size, verbose=False, return_latents=True)
    traces = sd.denoise_step.predict_function.experimental_get_tracing_count()
    sd.text_to_image("a cat", num_steps=1, batch_size=3, verbose=False, return_latents=True)
    assert sd.denoise_step.predict_function.experimental_get_tracing_count() == traces


@pytest.mark.parametrize("value, zero, message", [
    (0, False, "> 0, got 0."), (-1e-9, True, ">= 0, got -1e-09."), (float("nan"), True, ">= 0, got nan."),
    (np.inf, False, "> 0, got inf."), (True, False, "> 0, got True."), ("1", False, "> 0, got '1'."),
])
def test_positive_number_refuses(value, zero, message):
    with pytest.raises(ValueError, match=f"^rate must be a finite number {message}$"):
        arguments.positive_number(value, "rate", zero=zero)
    assert arguments.positive_number(0, "rate", zero=True) == 0.0
    assert arguments.positive_number(np.float32(2), "rate") == 2.0


def test_non_empty_string_and_flags():
    with pytest.raises(ValueError, match="^token must be a non-empty string, got ' '."):
        arguments.non_empty_string(" ", "token")
    parser = argparse.ArgumentParser()
    for flag in ("--token", "--batch-size", "--output"):
        parser.add_argument(flag)
    parser.add_argument("--data", dest="instance_data")
    message = "token 'batch_size' of instance_data/x, batch_size.y: one token for batch_size (output_dir)."
    assert arguments.in_flags(message, parser) == ("--token 'batch_size' of instance_data/x, batch_size.y: one token "
                                                   "for --batch-size (output_dir).")
