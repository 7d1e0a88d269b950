"""benchmarks/bench.py on the tiny pipeline: the UNet part times every runtime (ours in float32 and int8,
diffusers, OpenVINO running diffusers' UNet), and `--backend` is refused once Keras runs another backend."""
import keras
import pytest

from benchmarks import bench

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
