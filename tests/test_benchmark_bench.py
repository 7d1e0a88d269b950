"""benchmarks/bench.py on the tiny pipelines: the UNet part times every runtime (ours in float32 and int8,
diffusers, OpenVINO running diffusers' UNet), SDXL's UNet part gets the same inputs to both sides and runs in
bfloat16 on both with each load timed, and `--backend` is refused once Keras runs another backend."""
import keras
import numpy as np
import pytest
import torch

from benchmarks import bench
from reference import make_sdxl_unet, nhwc, relative_difference
from stable_diffusion import diffusers_folder
from stable_diffusion.diffusion_model import DiffusionModel
from stable_diffusion.weights import Tensors, load_weights

UNET_RUNTIMES = ["ours", "ours int8", "diffusers", "OpenVINO (diffusers' UNet)"]


@pytest.mark.slow  # about a minute: four runtimes, OpenVINO's conversion of diffusers' UNet among them
def test_unet_part_times_every_runtime(reference, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())  # bench.main sets it
    bench.main(["--backend", keras.backend.backend(), "--config", "tiny", "--size", "64", "--parts", "unet",
                "--int8", "--repeats", "1", "--no-xla", "--no-record", "--folder", str(reference("sd1")[1])])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("UNet call")]
    assert [" ".join(row[4:row.index("min")]) for row in rows] == UNET_RUNTIMES
    assert all(float(row[row.index("min") + 1]) > 0 for row in rows)


def test_backend_other_than_keras_is_refused(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    other = next(backend for backend in bench.BACKENDS if backend != keras.backend.backend())
    with pytest.raises(SystemExit, match=f"--backend {other}"):
        bench.main(["--backend", other, "--no-record"])


def test_sdxl_unet_inputs_give_both_sides_the_same_call(tmp_path):
    """The UNet part's SDXL inputs (pooled text embeddings, time ids of the image size) in diffusers' arguments: its
    UNet's output equals ours on the same random weights, so both time the same call (tolerance 1e-3)."""
    unet = make_sdxl_unet("sdxl", tmp_path)
    ours = DiffusionModel(latent_height=8, latent_width=8, **diffusers_folder.unet_config(dict(unet.config)))
    load_weights([ours], Tensors.from_arrays({k: v.numpy() for k, v in unet.state_dict().items()}))
    inputs = bench.unet_inputs(ours, 64, np.random.default_rng(0))
    assert [x.shape for x in inputs] == [(2, 8, 8, 4), (2,), (2, 77, 32), (2, 24), (2, 6)]
    assert inputs[4].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    args, kwargs = bench.reference_unet_arguments(inputs, torch.as_tensor)
    with torch.no_grad():
        expected = nhwc(unet(*args, **kwargs).sample)
    diff = relative_difference(keras.ops.convert_to_numpy(ours(inputs)), expected)  # eager: no trace to pay for
    assert diff <= 1e-3, f"max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 1e-3)"


@pytest.mark.slow  # about a minute: two loads of the tiny SDXL pipeline, a UNet call of each in bfloat16
def test_sdxl_unet_part_in_bfloat16_records_the_loads(sdxl, capsys, monkeypatch):
    """The full-size command's flags on the tiny SDXL pipeline: ours and diffusers in bfloat16, each load timed with
    the memory it added, the entry naming both dtypes."""
    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
    entries = []
    monkeypatch.setattr(bench, "append_entry", lambda heading, entry: entries.append(entry))
    bench.main(["--backend", keras.backend.backend(), "--config", "tiny-sdxl", "--size", "64", "--parts", "unet",
                "--repeats", "1", "--no-xla", "--dtype-policy", "bfloat16", "--reference-dtype", "bfloat16",
                "--folder", str(sdxl[1])])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out if line.startswith("load ")] == ["diffusers", "ours"]
    assert [line.split()[4] for line in out if line.startswith("UNet call")] == ["ours", "diffusers"]
    assert len(entries) == 1 and "bfloat16, XLA off, diffusers bfloat16 on cpu" in entries[0]
    assert "Loading, once each, diffusers first: diffusers" in entries[0] and "; ours " in entries[0]
