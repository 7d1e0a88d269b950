"""The denoising loop as one compiled program: with XLA (on JAX, and on TensorFlow with `jit_compile=True`), all
steps of a task, each the guided UNet call (`StableDiffusion.denoise_step`; with guidance at most 1 the UNet on the
prompt alone), the sampler's update and inpainting's blend, run in one `ops.fori_loop` inside one
`predict_on_batch`, so an accelerator never waits on the host between steps.

The host prepares in numpy, before the loop, what the steps need: per step the timestep, the UNet input's scale
and the sampler's `coefficients` (float32 tables, `schedulers.py`), and an ancestral sampler's noise, drawn in the
order the numpy loop draws it; each step applies the sampler's own `update` rule, with keras.ops. So the final
latents are the numpy loop's (`StableDiffusion.denoise`) up to float32 rounding (`tests/test_compiled_loop.py`).

One program has no place for per-step work on the host: with a `callback` the pipeline runs the numpy loop;
progress is reported once, when the loop ends. Each new step count, batch size, image size or prompt length
compiles the loop again, as it does the step.
"""
import functools
import time

import keras
import numpy as np
from keras import ops

from . import progress, schedulers


def instead(denoise):
    """Decorates `StableDiffusion.denoise`: runs the pipeline's `denoise_loop` instead (`runtime.compile_models`
    gives it one with XLA on JAX or TensorFlow, None otherwise) unless a callback is given."""
    @functools.wraps(denoise)
    def run(sd, latents, setup, *, callback=None, **options):
        if sd.denoise_loop is None or callback is not None:
            return denoise(sd, latents, setup, callback=callback, **options)
        return sd.denoise_loop(latents, setup, **options)
    return run


class CompiledLoop:
    """`StableDiffusion.denoise` as one program per sampler update rule and guidance (on or off), each a `Loop`
    compiled with XLA on first use, calling `denoise_step` or (no guidance) `diffusion_model`."""

    def __init__(self, denoise_step, diffusion_model):
        self.denoise_step, self.diffusion_model, self.loops = denoise_step, diffusion_model, {}

    def __call__(self, latents, setup, *, guidance, conditioning=None, after_step=None, verbose=True):
        """The clean latents (B, h, w, C), as `StableDiffusion.denoise` (`after_step`: None or a
        `schedulers.Repaint`); progress on stderr once, at the end, if `verbose`."""
        sampler, steps, start = setup.sampler, len(setup.sampler.timesteps), time.perf_counter()
        inputs = dict(latents=latents, context=setup.context, tables=step_tables(sampler, after_step))
        if guidance > 1:  # diffusers: at most 1 is no guidance
            inputs.update(negative=setup.negative, guidance=np.full((len(latents),), guidance, dtype="float32"))
        if sampler.ancestral:
            inputs["noise"] = np.stack([setup.draw_noise() for _ in range(steps)])  # (steps, B, h, w, C)
        if conditioning is not None:
            inputs["conditioning"] = conditioning
        if after_step is not None:
            inputs["repaint"] = dict(mask=after_step.mask, known=after_step.known, noise=after_step.noise)
        key = (type(sampler), sampler.ancestral, tuple(sorted(sampler.config.items())), guidance > 1)  # what it reads
        if key not in self.loops:
            self.loops[key] = Loop(self.denoise_step if guidance > 1 else self.diffusion_model, sampler)
            self.loops[key].compile(jit_compile=True)
        latents = self.loops[key].predict_on_batch(inputs)
        if verbose:
            progress.write("denoising", steps, steps, start)
        return latents


def step_tables(sampler, repaint=None):
    """The rest of `sampler`'s run as float32 tables {name: (steps,)}: per step its timestep, the UNet input's scale
    (`input_scale`), its `coefficients` and, given a `schedulers.Repaint`, the blend's levels after the step."""
    rows = []
    for index in range(sampler.index, sampler.end):
        levels = dict(zip(("signal", "level"), repaint.levels(index + 1))) if repaint else {}
        rows.append(dict(timestep=sampler.all_timesteps[index], input_scale=sampler.input_scale(index),
                         **sampler.coefficients(index), **levels))
    return {name: np.float32([row[name] for row in rows]) for name in rows[0]}


class Loop(keras.Model):
    """All the steps of a sampler's run in one call, each calling `model`: the guided step, or the UNet alone. Inputs,
    a dict: latents (B, h, w, C) at the first step; context: the UNet's text inputs (`StableDiffusion._prepare`);
    for the guided step, negative (the same of the negative prompt) and guidance (B,); tables {name: (steps,)} of
    the timestep, input_scale, the sampler's coefficients and (with repaint) `schedulers.Repaint`'s signal and
    level; noise (steps, B, h, w, C) for an ancestral sampler; optionally conditioning (B, h, w, extra channels)
    and repaint {mask, known, noise}. Output: the latents after the last step, float32."""

    def __init__(self, model, sampler):
        super().__init__(dtype="float32", name="denoising_loop")
        self.model, self.update, self.memory_size = model, sampler.update, sampler.memory_size
        self.built = True  # its only weights are the step's

    def call(self, inputs):
        tables = inputs["tables"]

        def step(i, state):
            latents, memory = state
            c = {name: table[i] for name, table in tables.items()}
            model_input = latents * c["input_scale"]
            if "conditioning" in inputs:
                model_input = ops.concatenate([model_input, inputs["conditioning"]], axis=-1)
            timestep = ops.broadcast_to(c["timestep"], ops.shape(latents)[:1])
            guided = "guidance" in inputs  # the step's inputs after the timestep, else the UNet's
            rest = [inputs["guidance"], *inputs["context"], *inputs["negative"]] if guided else inputs["context"]
            output = self.model([model_input, timestep, *rest])
            noise = inputs["noise"][i] if "noise" in inputs else None
            latents, memory = self.update(c, ops.cast(output, "float32"), latents, memory, noise, ops)
            if "repaint" in inputs:
                latents = schedulers.Repaint.blend(latents, **inputs["repaint"], signal=c["signal"], level=c["level"])
            return latents, memory

        memory = (ops.zeros_like(inputs["latents"]),) * self.memory_size
        return ops.fori_loop(0, ops.shape(tables["timestep"])[0], step, (inputs["latents"], memory))[0]
