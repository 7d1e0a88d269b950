"""Generating with a folder that `StableDiffusion.export` wrote (`export.py`): the pipeline's own tasks and sampler
code on the exported models, run by the format's runtime (tensorflow, onnxruntime, openvino, ai-edge-litert),
without building a Keras model. Prompts of up to 77 tokens (no `long_prompts`); no VAE tiling.
"""
import collections
import json
from pathlib import Path

import numpy as np

from . import schedulers
from .stable_diffusion import StableDiffusion
from .tokenizer import Tokenizer

Input = collections.namedtuple("Input", "shape")  # what the pipeline's tasks read of a model's input


class ExportedModel:
    """One exported model as the pipeline's tasks use a Keras one: `predict_on_batch(inputs)` (numpy, run one
    image at a time, as exported), `inputs[i].shape`."""

    def __init__(self, run, specs):
        self.run, self.names = run, list(specs)
        self.inputs = [Input((None, *shape[1:])) for shape, _ in specs.values()]

    def predict_on_batch(self, x):
        arrays = [np.asarray(value) for value in (x if isinstance(x, (list, tuple)) else [x])]
        return np.concatenate([self.run({name: np.ascontiguousarray(value[i:i + 1]) for name, value in
                                         zip(self.names, arrays)}) for i in range(len(arrays[0]))])


class Unguided:
    """The UNet as the pipeline calls it without guidance, [latents, timestep, context] -> its prediction: the exported
    step given the prompt's states for both halves and guidance 1. `inputs[0]`: the latents, the UNet's channels."""

    def __init__(self, step):
        self.step, self.inputs = step, step.inputs

    def predict_on_batch(self, x):
        latents, timestep, context = x
        return self.step.predict_on_batch([latents, timestep, np.ones_like(timestep), context, context])


class ExportedStableDiffusion:
    """Generates with a folder written by `StableDiffusion.export`: `text_to_image`, `image_to_image`, `inpaint`
    and the rest of the pipeline's API below, as `StableDiffusion`'s; images equal the Keras pipeline's to
    within one uint8 level.

    Args:
        folder: the exported folder.
        scheduler: the default sampler (see `StableDiffusion`); default: the exported pipeline's.
    """

    def __init__(self, folder, *, scheduler=None):
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        load = RUNTIMES[config["format"]]
        for name, model in config["models"].items():
            setattr(self, name, ExportedModel(load(folder / model["file"]), model["inputs"]))
        self.diffusion_model, self.text_encoder_2 = Unguided(self.denoise_step), None
        self.decoder.scaling_factor = config["scaling_factor"]
        self.img_height, self.img_width = config["img_height"], config["img_width"]
        self.latent_shape, self.vae_factor = tuple(config["latent_shape"]), config["vae_factor"]
        self.vae_tile_size = None
        self.config = config["config"]
        self.scheduler_name = scheduler or config["scheduler"]
        self.scheduler = schedulers.create(self.scheduler_name, self.config["scheduler"])
        self.tokenizer = Tokenizer.from_folder(folder / "tokenizer")

    # The pipeline's tasks as they are: they reach the models through `predict_on_batch` and `inputs` alone.
    tokenize, encode_text, decode = StableDiffusion.tokenize, StableDiffusion.encode_text, StableDiffusion.decode
    text_to_image, generate_image = StableDiffusion.text_to_image, StableDiffusion.generate_image
    image_to_image, inpaint = StableDiffusion.image_to_image, StableDiffusion.inpaint
    _prepare, denoise, encode_images = StableDiffusion._prepare, StableDiffusion.denoise, StableDiffusion.encode_images
    denoise_loop = None  # the exported step runs once per step (`compiled_loop.instead`)


def load_saved_model(path):
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serve"]
    return lambda inputs: next(iter(serve(**inputs).values())).numpy()


def load_onnx(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, inputs)[0]


def load_openvino(path):
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda inputs: compiled(inputs).to_tuple()[0]


def load_litert(path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's copy of the interpreter
        from tensorflow.lite import Interpreter
    run = Interpreter(model_path=str(path)).get_signature_runner()
    return lambda inputs: next(iter(run(**inputs).values()))


RUNTIMES = dict(tf_saved_model=load_saved_model, onnx=load_onnx, openvino=load_openvino, litert=load_litert)
