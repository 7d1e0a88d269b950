"""The tutorial notebooks: each opens with an install cell for Colab and is stored with the outputs
of a complete run (`python notebooks/execute.py`), images included; under the `notebooks` marker they
run again top to bottom in a fresh kernel against the shipped demo model."""
import os
from pathlib import Path

import pytest

import stable_diffusion

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))


def code_cells(path):
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def test_notebooks_open_with_an_install_cell_and_keep_their_outputs():
    assert [path.name for path in NOTEBOOKS] == ["01_quickstart.ipynb", "02_fine_tune.ipynb",
                                                "03_img2img_inpainting.ipynb", "04_latent_walk.ipynb",
                                                "05_lora.ipynb", "06_textual_inversion.ipynb", "07_dreambooth.ipynb"]
    for path in NOTEBOOKS:
        cells = code_cells(path)
        assert "pip install" in cells[0].source, f"{path.name}: the first code cell does not install the package"
        counts = [cell.execution_count for cell in cells]
        assert counts == list(range(1, len(cells) + 1)), f"{path.name} was not stored from one complete run: {counts}"
        outputs = [output for cell in cells for output in cell.outputs]
        assert not [o for o in outputs if o.output_type == "error"], f"{path.name} stored an error"
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no image"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path, monkeypatch):
    # The kernel is a new process: it finds the package as this one does.
    root = str(Path(stable_diffusion.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(FOLDER))
    from execute import execute

    execute(path, store=False)
