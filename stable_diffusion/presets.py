"""What ships with the package: the files in `assets/` (package data, found through
`importlib.resources`, so editable installs, wheels and `pip install git+URL` all have them)."""
from importlib import resources
from pathlib import Path

ASSETS = Path(resources.files(__package__) / "assets")


def asset(name):
    """Path of a file or folder shipped in the package's `assets/`, e.g. "demo" (the demo model bundle)
    or "bpe_simple_vocab_16e6.txt.gz"; FileNotFoundError if this installation lacks it."""
    path = ASSETS / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed with the package (no {path}); reinstall "
                                f"keras-stable-diffusion.")
    return path
