"""How the pipeline's models are compiled on each backend, and the caches on disk that spare a second process
the compilation:

- TensorFlow and JAX: `Model.compile(jit_compile=...)` (XLA); JAX keeps what it compiles in XLA's persistent
  compilation cache (`jax_compilation_cache_dir`, every compilation however short), unless the process set one.
  With XLA, the denoising loop runs as one compiled program (`compiled_loop.py`) unless `compiled_loop=False`.
- torch: eager.
- OpenVINO (inference only: CPU): each model's `predict_on_batch` runs an OpenVINO model compiled once per
  input shapes, in float32 (the CPU plugin otherwise computes in bfloat16 on CPUs that have it), kept in memory
  and in OpenVINO's model cache (`CACHE_DIR`), which a later process reads instead of compiling.

The caches live in $KERAS_SD_CACHE (an empty value: none), by default `~/.keras/cache/stable_diffusion`
(under $KERAS_HOME if set), in one folder per backend.
"""
import functools
import os

import keras
import numpy as np

from . import compiled_loop as loop, keras_internals, presets
from .text_encoder import skipping

CACHE_VARIABLE = "KERAS_SD_CACHE"


def cache_dir(backend):
    """The folder of `backend`'s compiled models (see the module docstring), or None if caching is off."""
    root = os.environ.get(CACHE_VARIABLE, presets.cache_dir().parent / "cache" / "stable_diffusion")
    return os.path.join(root, backend) if root else None


def compile_models(sd, *, jit_compile, compiled_loop=True):
    """Prepares the models of the pipeline `sd` for its backend (see the module docstring) and sets its
    `denoise_loop`: a `compiled_loop.CompiledLoop`, or None for the numpy loop. `jit_compile` None: XLA on JAX
    only (TensorFlow graphs start faster; README, "XLA or not")."""
    backend = keras.backend.backend()
    jit_compile = backend == "jax" if jit_compile is None else jit_compile
    for model in (sd.text_encoder, sd.text_encoder_2, sd.diffusion_model, sd.denoise_step, sd.decoder):
        if model is not None:
            model.compile(jit_compile=jit_compile and backend != "torch")
    xla = jit_compile and backend in ("jax", "tensorflow")
    sd.denoise_loop = loop.CompiledLoop(sd.denoise_step, sd.diffusion_model) if xla and compiled_loop else None
    if backend == "jax" and jit_compile and cache_dir("jax"):
        import jax

        if jax.config.jax_compilation_cache_dir is None:
            jax.config.update("jax_compilation_cache_dir", cache_dir("jax"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if backend == "openvino":
        for model in (sd.text_encoder, sd.text_encoder_2, sd.diffusion_model, sd.denoise_step, sd.decoder, sd.encoder):
            if model is not None:
                model.predict_on_batch = OpenVINOPredictor(model)


def skipping_model(sd, name, clip_skip, *, sdxl):
    """Text encoder `name` of `sd`, or the model of its hidden states `clip_skip` layers before the last, final-layer-
    normed (`text_encoder.skipping`), SDXL's (`sdxl`) one layer more and not normed; compiled as the encoder, the last
    one per encoder kept in `sd.skipped`. A `clip_skip` not None or an integer >= 0: `skipping`'s ValueError."""
    encoder, valid = getattr(sd, name), clip_skip is None or type(clip_skip) is int and clip_skip >= 0
    k = (clip_skip or 0) + sdxl if valid else clip_skip
    if k and sd.skipped.get(name, [None])[:3] != [encoder, k, not sdxl]:
        model = skipping(encoder, k, normed=not sdxl)
        model.compile(jit_compile=encoder.jit_compile)
        if isinstance(encoder.predict_on_batch, OpenVINOPredictor):
            model.predict_on_batch = OpenVINOPredictor(model)
        sd.skipped[name] = [encoder, k, not sdxl, model]
    return sd.skipped[name][3] if k else encoder


class OpenVINOPredictor:
    """`model.predict_on_batch` on OpenVINO: numpy inputs -> numpy outputs, compiled per input shapes and
    dtypes in float32, in OpenVINO's model cache; compiled again once the model's weights are assigned."""

    def __init__(self, model):
        self.model, self.compiled, self.weights = model, {}, []

    def __call__(self, x):
        inputs = [np.asarray(value) for value in keras.tree.flatten(x)]
        weights = [variable.value for variable in self.model.variables]  # held: their ids stay theirs
        if list(map(id, weights)) != list(map(id, self.weights)):
            self.compiled, self.weights = {}, weights
        key = tuple((value.shape, value.dtype.str) for value in inputs)
        if key not in self.compiled:
            graph = keras_internals.openvino_graph(self.model, inputs)
            if graph is None:  # this Keras lacks what it takes: its own predict_on_batch
                return type(self.model).predict_on_batch(self.model, x)
            self.compiled[key] = compile_openvino(graph)
        outputs = self.compiled[key](inputs).to_tuple()
        return outputs[0] if len(outputs) == 1 else list(outputs)



def compile_openvino(graph):
    """The OpenVINO CPU plugin's compiled model of the `openvino.Model` `graph`, in float32, read from the cache
    on disk if there, else compiled and written there."""
    for index, operation in enumerate(graph.get_ordered_ops()):  # the cache's key: names, not a global count
        operation.set_friendly_name(str(index))
        for port, output in enumerate(operation.outputs()):
            output.get_tensor().set_names({f"{index}.{port}"})
    folder = cache_dir("openvino")
    return openvino_core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                         **({"CACHE_DIR": folder} if folder else {})})


@functools.cache
def openvino_core():
    """The process's `openvino.Core`."""
    import openvino

    return openvino.Core()
