"""The denoising loop compiled as one XLA program (`stable_diffusion/compiled_loop.py`) against the numpy loop
(`StableDiffusion.denoise`, whose samplers equal diffusers': test_schedulers.py): every sampler under a stand-in
for the guided UNet step, then the three tasks of a tiny pipeline; and where each loop runs."""
import functools
import types

import keras
import numpy as np
import pytest
from keras import ops

from reference import TINY_CONFIG, relative_difference
from stable_diffusion import StableDiffusion, compiled_loop, runtime, schedulers
from stable_diffusion.stable_diffusion import Setup

BACKEND = keras.backend.backend()
# Whether the loop compiles, per backend and jit_compile (None: the default), given compiled_loop=True
COMPILES = {"jax": {None: True, True: True, False: False}, "tensorflow": {None: False, True: True, False: False}}
needs_xla = pytest.mark.skipif(BACKEND not in COMPILES, reason="the loop compiles with XLA: JAX and TensorFlow")
TOLERANCE = 1e-5  # final latents: max abs difference relative to their max abs, float32
LATENTS, EXTRA = (2, 4, 4, 3), 2  # stand-in latents (B, h, w, C); an inpainting UNet's extra input channels


@functools.cache
def stand_in_step(extra_channels=0):
    """A compiled Keras model with the inputs of `StableDiffusion.denoise_step` (latents with `extra_channels`,
    timestep, guidance, context, negative) and a smooth function of them in place of the guided UNet."""
    latents = keras.Input((*LATENTS[1:3], LATENTS[3] + extra_channels))
    timestep, guidance, context, negative = keras.Input(()), keras.Input(()), keras.Input((2, 3)), keras.Input((2, 3))
    x = latents[..., :LATENTS[3]]
    if extra_channels:
        x = x + ops.mean(latents[..., LATENTS[3]:], axis=-1, keepdims=True)
    scale = (0.5 + timestep / 1000)[:, None, None, None]
    pull = (guidance * ops.mean(context - negative, axis=(1, 2)))[:, None, None, None]
    output = ops.tanh(x) * scale + 0.1 * ops.cos(3 * x) + pull
    model = keras.Model([latents, timestep, guidance, context, negative], output)
    model.compile(jit_compile=BACKEND in COMPILES)
    return model


def both_loops(name, config, *, strength=1.0, editing=None):
    """The final latents of the numpy loop and of the compiled one for sampler `name` with `config`, 3 steps from
    seeded noise (B, h, w, C), or from a noised picture at `strength` < 1; `editing`: None, "repaint" (a 4-channel
    UNet's inpainting) or "conditioning" (an inpainting UNet's extra channels). Also returns the start."""
    step = stand_in_step(EXTRA if editing == "conditioning" else 0)
    results, rng = [], np.random.default_rng(7)
    context, picture = rng.standard_normal((2, 2, 3), dtype=np.float32), rng.standard_normal(LATENTS, dtype=np.float32)
    mask = (rng.random((*LATENTS[:3], 1)) < 0.5).astype("float32")
    conditioning = rng.standard_normal((*LATENTS[:3], EXTRA), dtype=np.float32) if editing == "conditioning" else None
    for loop in (None, compiled_loop.CompiledLoop(step, None)):  # a loop per sampler config: its rule reads it
        sampler = schedulers.create(name, config)
        sampler.set_timesteps(3 if strength == 1 else 6, strength=strength)
        generators = [np.random.default_rng(seed) for seed in range(LATENTS[0])]
        draw_noise = lambda: np.stack([g.standard_normal(LATENTS[1:], dtype=np.float32) for g in generators])
        setup = Setup([context], [context[::-1] * 0.5], sampler, draw_noise, draw_noise())
        start = setup.noise * sampler.init_noise_sigma if strength == 1 else sampler.add_noise(picture, setup.noise)
        after_step = schedulers.Repaint(sampler, mask, picture, setup.noise) if editing == "repaint" else None
        pipeline = types.SimpleNamespace(denoise_step=step, denoise_loop=loop)  # what `denoise` reads of its pipeline
        results.append(StableDiffusion.denoise(pipeline, start, setup, guidance=7.5, conditioning=conditioning,
                                               after_step=after_step, verbose=False))
    return *results, start


@needs_xla
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(schedulers.SCHEDULERS))
def test_every_sampler_equals_the_numpy_loop(name, prediction_type):
    expected, got, start = both_loops(name, dict(prediction_type=prediction_type, clip_sample=name == "ddim"))
    assert relative_difference(expected, start) > 0.1, "the latents hardly moved: the comparison would prove little"
    assert relative_difference(got, expected) <= TOLERANCE, f"{name}, {prediction_type}"


@needs_xla
@pytest.mark.parametrize("editing", ["repaint", "conditioning"])
@pytest.mark.parametrize("name", list(schedulers.SCHEDULERS))
def test_every_sampler_equals_the_numpy_loop_editing_a_picture(name, editing):
    """Image-to-image's later start (strength 0.5) and both kinds of inpainting."""
    expected, got, start = both_loops(name, {}, strength=0.5, editing=editing)
    assert relative_difference(expected, start) > 0.1, "the latents hardly moved: the comparison would prove little"
    assert relative_difference(got, expected) <= TOLERANCE, f"{name}, {editing}"


@pytest.fixture(scope="module")
def pipeline():
    """A tiny random-weight pipeline with XLA: its loop as one program. On TensorFlow its models then run as graphs
    (the step for the numpy loop too): compiling each with XLA costs seconds on CPU and adds nothing here."""
    sd = StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=True)
    if BACKEND == "tensorflow":
        for model in (sd.text_encoder, sd.denoise_step, sd.decoder):
            model.compile(jit_compile=False)
    return sd


@needs_xla
@pytest.mark.compiled  # the loop's rule is the default run's, on the stand-in step above
@pytest.mark.parametrize("task", ["text_to_image", "image_to_image", "inpaint"])
def test_tasks_equal_the_numpy_loop_which_a_callback_gets(task, pipeline, capsys):
    """Euler ancestral (scaled UNet input, fresh noise each step), 2 steps, a batch of 2; the callback's numpy loop
    is the reference."""
    rng = np.random.default_rng(0)
    picture, mask = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    inputs = dict(text_to_image=(), image_to_image=(picture,), inpaint=(picture, mask))[task]
    run = lambda **options: getattr(pipeline, task)(
        "a red circle", *inputs, negative_prompt="green", batch_size=2, num_steps=2 if task == "text_to_image" else 4,
        seed=3, scheduler="euler_a", return_latents=True, **({} if task == "text_to_image" else dict(strength=0.5)),
        **options)
    steps = []
    expected = run(callback=lambda step, timestep, latents: steps.append(step), verbose=False)
    assert steps == [0, 1], "with a callback, the numpy loop runs, step by step"
    capsys.readouterr()
    got = run(verbose=True)
    assert capsys.readouterr().err.startswith("denoising: 2/2, ") and steps == [0, 1], "one progress line, no callback"
    assert expected.std() > 0.1, "flat latents: the comparison would prove little"
    assert relative_difference(got, expected) <= TOLERANCE
    assert np.abs(pipeline.decode(got).astype(int) - pipeline.decode(expected)).max() <= 1, "uint8 images differ by > 1"


def test_the_loop_compiles_with_xla_on_jax_and_tensorflow_unless_told_not_to():
    """TensorFlow graphs, torch and OpenVINO run the numpy loop; `compiled_loop=False` asks for it."""
    sd = StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=True, compiled_loop=False)
    assert sd.denoise_loop is None
    for jit_compile in (None, True, False):
        for compiled in (True, False):
            runtime.compile_models(sd, jit_compile=jit_compile, compiled_loop=compiled)
            expected = compiled and COMPILES.get(BACKEND, {}).get(jit_compile, False)
            assert isinstance(sd.denoise_loop, compiled_loop.CompiledLoop) if expected else sd.denoise_loop is None


@pytest.mark.parametrize("options, message", [
    (dict(compiled_loop="no"), "compiled_loop must be True or False, got 'no'"),
    (dict(compiled_loop=None), "compiled_loop must be True or False, got None"),
    (dict(jit_compile="xla"), "jit_compile must be None, True or False, got 'xla'"),
])
def test_bad_switches_are_refused_before_building(options, message, monkeypatch):
    monkeypatch.setattr("stable_diffusion.stable_diffusion.TextEncoder", None)  # building would raise TypeError
    with pytest.raises(ValueError, match=message):
        StableDiffusion(32, 32, config=TINY_CONFIG, **options)
