"""Speed of one UNet call in int8 (`stable_diffusion/quantization.py`) against float32, in one process.

    python -m benchmarks.int8                                 # the demo model's UNet and a larger one
    KERAS_BACKEND=jax python -m benchmarks.int8 --configs larger sd-1.5

For each config, builds a random-weight UNet, a second one with the same weights quantized as the pipeline
quantizes it, compiles both as the pipeline does (XLA on TensorFlow and JAX), calls each once, then times
them interleaved (float32, int8, float32, ...) and keeps the minimum of `--repeats` calls of each. Batch 2
(one guided step). Also reports the relative error of the int8 output, |y - y32| / |y32|. Appends a table
to benchmarks/RESULTS.md with the CPU model and its flags.
"""
import argparse
import datetime
import json
import os
import time

import keras
import numpy as np

from benchmarks.results import append_entry, cpu
from stable_diffusion import presets
from stable_diffusion.diffusion_model import DiffusionModel
from stable_diffusion.quantization import quantize_models

SECTION = "## int8 against float32: one UNet call (`benchmarks/int8.py`)"
CONFIGS = {  # UNet arguments; the demo model's are read from its config.json
    "demo": None,
    "larger": dict(channels=(160, 320, 640, 640), latent_height=32, latent_width=32),  # SD 1.5 at half width
    "sd-1.5": dict(latent_height=32, latent_width=32),  # full size, 256x256 images
}


def unet_config(name):
    """The UNet arguments of a `CONFIGS` entry, latent size included."""
    if CONFIGS[name] is not None:
        return CONFIGS[name]
    config = json.loads(presets.asset("demo/config.json").read_text())
    factor = 2 ** (len(config["decoder"]["channels"]) - 1)
    return dict(config["diffusion_model"], latent_height=config["img_height"] // factor,
                latent_width=config["img_width"] // factor)


def measure(name, repeats):
    """(float32 seconds, int8 seconds, relative error of the int8 output) of one UNet call of config `name`."""
    config = unet_config(name)
    keras.utils.set_random_seed(0)
    float32, int8 = DiffusionModel(**config), DiffusionModel(**config)
    int8.set_weights(float32.get_weights())
    quantize_models([int8])
    for model in (float32, int8):
        model.compile(jit_compile=keras.backend.backend() in ("tensorflow", "jax"))
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((2, config["latent_height"], config["latent_width"], 4), dtype="float32"),
              np.full((2,), 500.0, "float32"),
              rng.standard_normal((2, 77, config.get("context_dim", 768)), dtype="float32")]
    outputs = [np.asarray(model.predict_on_batch(inputs)) for model in (float32, int8)]  # compiles
    seconds = {0: [], 1: []}
    for _ in range(repeats):
        for index, model in enumerate((float32, int8)):
            start = time.perf_counter()
            model.predict_on_batch(inputs)
            seconds[index].append(time.perf_counter() - start)
    error = np.linalg.norm(outputs[1] - outputs[0]) / np.linalg.norm(outputs[0])
    return min(seconds[0]), min(seconds[1]), error, config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["demo", "larger"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    backend = keras.backend.backend()
    rows = ["| config | channels | latents (batch 2) | float32 s | int8 s | int8 / float32 | output rel. error |",
            "|---|---|---|---|---|---|---|"]
    for name in args.configs:
        float32, int8, error, config = measure(name, args.repeats)
        channels = "-".join(map(str, config.get("channels", (320, 640, 1280, 1280))))
        rows.append(f"| {name} | {channels} | {config['latent_height']}x{config['latent_width']} | {float32:.4f} | "
                    f"{int8:.4f} | {int8 / float32:.2f} | {error:.1e} |")
        print(rows[-1], flush=True)
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    entry = "\n".join([
        f"### {datetime.date.today()}: backend {backend}, one UNet call, min of {args.repeats} interleaved",
        "", f"- Machine: {cpu()}, {os.cpu_count()} cores{load}; Keras {keras.__version__}", "", *rows])
    print(entry)
    if not args.no_record:
        append_entry(SECTION, entry)


if __name__ == "__main__":
    main()
