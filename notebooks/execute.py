"""Runs the tutorial notebooks top to bottom in a fresh kernel and stores them with their outputs, so
that their images show wherever the notebooks are read (GitHub, Colab, the docs):

    python notebooks/execute.py                          # every notebook in this folder
    python notebooks/execute.py notebooks/01_quickstart.ipynb

Each notebook runs in a new temporary folder; it is written under a temporary name and renamed into
place once it has run without error.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

FOLDER = Path(__file__).resolve().parent
CELL_TIMEOUT = 1200  # seconds


def execute(path, store=True):
    """Runs the notebook at `path` in a fresh python3 kernel whose working folder is a new temporary
    one; returns the notebook with its outputs and, when `store`, writes it back to `path`.
    Raises nbclient's CellExecutionError naming the failing cell."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                resources={"metadata": {"path": folder}}).execute()
    if store:
        partial = path.with_name(f".{path.name}.partial")
        nbformat.write(notebook, partial)
        partial.replace(path)
    return notebook


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in this folder")
    paths = parser.parse_args(argv).notebooks or sorted(FOLDER.glob("*.ipynb"))
    for path in paths:
        print(f"running {path}", file=sys.stderr)
        execute(path)


if __name__ == "__main__":
    main()
