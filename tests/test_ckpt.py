"""The `.ckpt` reader against `torch.load(weights_only=True)` (the oracle): equal arrays for files
`torch.save` writes; malicious pickles refused with one error and nothing run; reading without torch."""
import collections
import io
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from stable_diffusion import ckpt

OPS = {op.name: op.code.encode("latin-1") for op in pickletools.opcodes}


def assert_equal_to_torch(path):
    ours, oracle = ckpt.read(path), torch.load(path, map_location="cpu", weights_only=True)
    assert ours.keys() == oracle.keys()
    for key, tensor in oracle.items():
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        got = ours[key].read()
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        np.testing.assert_array_equal(got, expected, err_msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_arrays_equal_torch_load(dtype, tmp_path):
    values = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 10
    state = collections.OrderedDict(matrix=values.to(dtype), vector=torch.arange(7).to(dtype),
                                    scalar=torch.tensor(3).to(dtype), empty=torch.zeros(0, 4, dtype=dtype))
    torch.save(state, tmp_path / "plain.ckpt")
    assert_equal_to_torch(tmp_path / "plain.ckpt")


def test_views_of_shared_storages_keep_offset_and_stride(tmp_path):
    """torch.save writes a tensor and its views as one storage: slices, transposes, steps."""
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = dict(base=base, rows=base[2:5], block=base[1:4, 3:9], transposed=base.t(), stepped=base[::2, 1::3],
                 element=base[3, 7], half=torch.arange(8, dtype=torch.float16)[3:])
    torch.save(state, tmp_path / "views.ckpt")
    assert_equal_to_torch(tmp_path / "views.ckpt")
    ours = ckpt.read(tmp_path / "views.ckpt")
    assert np.shares_memory(ours["base"].read(), ours["block"].read()), "views should share the memory map"


class Reduce:
    """An object that pickles as `callable(*arguments)`."""

    def __init__(self, callable, *arguments):
        self.callable, self.arguments = callable, arguments

    def __reduce__(self):
        return self.callable, self.arguments


def hand_written_stack_global(marker):
    """A protocol-4 pickle calling `posix.system` through STACK_GLOBAL, its module and name fetched from
    the memo in the other order than they were written, so no GLOBAL opcode spells them."""
    def string(text):
        data = text.encode()
        return OPS["SHORT_BINUNICODE"] + bytes([len(data)]) + data

    return (OPS["PROTO"] + b"\x04" + string("system") + OPS["MEMOIZE"] + OPS["POP"]
            + string("posix") + OPS["MEMOIZE"] + OPS["POP"]
            + OPS["BINGET"] + b"\x01" + OPS["BINGET"] + b"\x00" + OPS["STACK_GLOBAL"]  # posix, system
            + string(f"touch {marker}") + OPS["TUPLE1"] + OPS["REDUCE"] + OPS["STOP"])


def zip_with_pickle(path, data):
    """A `.ckpt` laid out as torch.save writes it, its data.pkl replaced by `data`."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


MALICIOUS = {  # name: (object whose pickle runs a command creating the marker file, global refused)
    "os.system": (lambda m: Reduce(os.system, f"touch {m}"), "posix.system"),
    "eval": (lambda m: Reduce(eval, f"open({str(m)!r}, 'w')"), "builtins.eval"),
    "exec": (lambda m: Reduce(exec, f"open({str(m)!r}, 'w')"), "builtins.exec"),
    "nested-in-dict": (lambda m: {"state_dict": {"w": [1.0, 2.0], "x": [Reduce(os.system, f"touch {m}")]}},
                       "posix.system"),
    "subprocess.Popen": (lambda m: Reduce(subprocess.Popen, ["touch", str(m)]), "subprocess.Popen"),
    "torch.load": (lambda m: Reduce(torch.load, str(m)), "torch.serialization.load"),
}


@pytest.mark.parametrize("written_by", ["torch.save", "raw zip member"])
@pytest.mark.parametrize("name", MALICIOUS)
def test_malicious_pickle_is_refused_and_runs_nothing(name, written_by, tmp_path):
    marker = tmp_path / "ran"
    make, refused = MALICIOUS[name]
    payload = make(marker)
    if name == "torch.load":  # torch.load of a file whose own pickle would create the marker
        torch.save(Reduce(os.system, f"touch {marker}"), tmp_path / "inner.pt")
        payload = Reduce(torch.load, str(tmp_path / "inner.pt"))
    path = tmp_path / "evil.ckpt"
    if written_by == "torch.save":
        torch.save(payload, path)
    else:
        zip_with_pickle(path, pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError) as error:
        ckpt.read(path)
    assert str(error.value).startswith(f"{path} refuses to load {refused}:"), error.value
    assert "\n" not in str(error.value)
    assert not marker.exists(), "the payload ran"


def test_stack_global_with_names_from_the_memo_is_refused(tmp_path):
    marker = tmp_path / "ran"
    data = hand_written_stack_global(marker)
    pickletools.dis(data, out=io.StringIO())  # well-formed
    pickle.loads(hand_written_stack_global(tmp_path / "live"))
    assert (tmp_path / "live").exists(), "the payload is live: plain pickle runs it"
    with pytest.raises(ValueError, match="refuses to load posix.system"):
        ckpt.read(zip_with_pickle(tmp_path / "evil.ckpt", data))
    assert not marker.exists(), "the payload ran"


def test_reads_without_torch(tmp_path):
    """A subprocess that cannot import torch reads every tensor of a torch.save file, equal to torch.load."""
    state = dict(weight=torch.randn(4, 3), half=torch.randn(5).half(), view=torch.arange(10.0)[2:8:2])
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "model.ckpt")
    script = ("import sys; sys.modules['torch'] = None\n"
              "import numpy as np\n"
              "from pathlib import Path\n"
              "from stable_diffusion import ldm\n"
              "tensors, step = ldm.open_single_file(Path(sys.argv[1]))\n"
              "assert step == 7 and 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
              "np.savez(sys.argv[2], **{key: tensors[key] for key in tensors})\n")
    run = subprocess.run([sys.executable, "-c", script, tmp_path / "model.ckpt", tmp_path / "got.npz"],
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), KERAS_BACKEND="tensorflow"),
                         capture_output=True, text=True)  # Keras' torch backend itself needs torch
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "got.npz")
    assert sorted(got) == sorted(state)
    for key, tensor in state.items():
        np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=key)


def truncated_storage(path):
    torch.save({"w": torch.arange(100.0)}, path)
    with zipfile.ZipFile(path) as source:
        members = {info.filename: source.read(info) for info in source.infolist()}
    storage = next(name for name in members if "/data/" in name)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data[:40] if name == storage else data)


def missing_storage(path):
    torch.save({"w": torch.arange(100.0)}, path)
    with zipfile.ZipFile(path) as source:
        members = {info.filename: source.read(info) for info in source.infolist() if "/data/" not in info.filename}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def cut_in_half(path):
    torch.save({"w": torch.arange(100.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGED = {
    "truncated storage": (truncated_storage, "storage '0' holds 40 bytes, its 100 elements need 400"),
    "cut in half": (cut_in_half, "not a readable .ckpt"),
    "random bytes": (lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)), "not a readable .ckpt"),
    "no pickle": (lambda path: zipfile.ZipFile(path, "w").close(), "expected one <name>/data.pkl"),
    "missing storage": (missing_storage, "storage '0' is missing"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_file_gives_one_clear_error_naming_it(name, tmp_path):
    make, message = DAMAGED[name]
    path = tmp_path / "damaged.ckpt"
    make(path)
    with pytest.raises(ValueError) as error:
        ckpt.read(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value), error.value
    assert "\n" not in str(error.value)
