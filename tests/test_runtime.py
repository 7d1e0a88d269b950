"""The backends' compilation (runtime.py): OpenVINO and JAX generate the images of this process's backend
(TensorFlow in the default run) to within one uint8 level, a pipeline loaded after another reads every
compiled model from the cache on disk instead of compiling it, and weights assigned after compiling count."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stable_diffusion
from other_backend import generate
from stable_diffusion import runtime


@pytest.mark.parametrize("backend", [pytest.param("openvino", marks=pytest.mark.slow),
                                     pytest.param("jax", marks=pytest.mark.compiled)])
def test_backend_equals_this_one_and_reads_its_cache(backend, reference, ours, tmp_path):
    """Two pipelines in a subprocess on `backend` (other_backend.py); images against ours here (tolerance 1/255)."""
    _, folder = reference("sd1")
    paths = [str(Path(stable_diffusion.__file__).parents[1]), str(Path(__file__).parent)]
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=os.pathsep.join(paths),
               **{runtime.CACHE_VARIABLE: str(tmp_path / "cache")})
    out = tmp_path / "images.npz"
    subprocess.run([sys.executable, Path(__file__).parent / "other_backend.py", folder, out], env=env, check=True)
    saved = np.load(out)
    for task, expected in generate(ours("sd1")).items():
        assert expected.std() > 10, f"{task}: flat images would prove little"
        diff = np.abs(saved[f"first_{task}"].astype(int) - expected).max()
        assert diff <= 1, f"{task} on {backend}: max pixel difference {diff} (tolerance 1/255)"
    np.testing.assert_array_equal(saved["second_text_to_image"], saved["first_text_to_image"])
    brightening = (saved["brighter_text_to_image"].astype(int) - saved["second_text_to_image"]).mean()
    assert brightening > 30, f"the decoder's output bias, raised by 0.5 (64 levels), raised the image {brightening:.1f}"
    assert not saved["tensorflow_imported"], f"generating on {backend} imported TensorFlow"
    compiled, from_cache = saved["first_reads"]
    assert compiled > 0 and from_cache == 0, f"a fresh cache: {from_cache} of {compiled} compilations read"
    compiled, from_cache = saved["second_reads"]
    assert compiled > 0 and from_cache == compiled, f"{from_cache} of {compiled} compilations read from the cache"


def test_cache_folder_follows_keras_home_and_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    assert Path(runtime.cache_dir("openvino")) == tmp_path / "keras" / "cache" / "stable_diffusion" / "openvino"
    monkeypatch.setenv(runtime.CACHE_VARIABLE, str(tmp_path / "elsewhere"))
    assert Path(runtime.cache_dir("jax")) == tmp_path / "elsewhere" / "jax"
    monkeypatch.setenv(runtime.CACHE_VARIABLE, "")
    assert runtime.cache_dir("jax") is None
