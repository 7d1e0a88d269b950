"""Runs the tutorial notebooks top to bottom in a fresh kernel and stores them with their outputs, so
that their images show wherever the notebooks are read (GitHub, Colab, the docs):

    python notebooks/execute.py                          # every notebook in this folder
    python notebooks/execute.py notebooks/01_quickstart.ipynb

Each notebook runs in a new temporary folder; it is written under a temporary name and renamed into
place once it has run without error. Stored streams show what a terminal would (progress bars at their
last state), without the runtime's log lines on stderr (TensorFlow's and XLA's C++ logging, tqdm's
widget notice), which Colab does not show either.
"""
import argparse
import re
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

FOLDER = Path(__file__).resolve().parent
CELL_TIMEOUT = 1200  # seconds
RUNTIME_LOG = re.compile(r"[IWEF]\d{4} |WARNING: All log messages before absl|To enable the following instructions|"
                         r".*TqdmWarning: IProgress|\s*from \.autonotebook import")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def as_shown(text):
    """Stream text as a terminal leaves it: each line's last carriage-return overwrite, no colour codes."""
    lines = ANSI_ESCAPE.sub("", text.replace("\b", "")).split("\n")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in lines)


def tidied(notebook):
    """`notebook` with each cell's consecutive stream outputs joined as a terminal shows them (progress
    bars at their last state) and runtime log lines left out of stderr; empty streams dropped."""
    for cell in (cell for cell in notebook.cells if cell.cell_type == "code"):
        outputs = []
        for output in cell.outputs:
            if output.output_type == "stream" and outputs and outputs[-1].get("name") == output.name:
                outputs[-1].text += output.text
            else:
                outputs.append(output)
        for output in (o for o in outputs if o.output_type == "stream"):
            lines = as_shown(output.text).splitlines(keepends=True)
            output.text = "".join(line for line in lines if output.name == "stdout" or not RUNTIME_LOG.match(line))
        cell.outputs = [o for o in outputs if o.output_type != "stream" or o.text.strip()]
    return notebook


def execute(path, store=True):
    """Runs the notebook at `path` in a fresh python3 kernel whose working folder is a new temporary
    one; returns the notebook with its outputs and, when `store`, writes it back to `path`.
    Raises nbclient's CellExecutionError naming the failing cell."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                resources={"metadata": {"path": folder}}).execute()
    tidied(notebook)
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
