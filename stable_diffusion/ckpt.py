"""PyTorch `.ckpt` files read without PyTorch, by a restricted unpickler that runs nothing.

A `.ckpt` written by `torch.save` is a zip: `<name>/data.pkl` (the pickled object), `<name>/data/<key>`
(one raw storage per key), `<name>/byteorder`. The pickle names each storage by a persistent id
`("storage", storage type, key, location, numel)` and rebuilds tensors with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, a parameter (e.g. of a textual-inversion
embedding) wrapping one with `torch._utils._rebuild_parameter(tensor, ...)`. `read` allows only those callables,
the typed storage classes and `collections.OrderedDict`; any other global is refused in `find_class`, before
anything is called. Tensors come back as `Tensor` records whose `read()` gives a
numpy view of a read-only memory map of the file (members are stored uncompressed).

References: PyTorch `torch/serialization.py` (`_save`, `_load`) and `torch/_utils.py`
(`_rebuild_tensor_v2`); Python's `pickle` ("Restricting globals").
"""
import _compat_pickle
import collections
import io
import math
import mmap
import pickle
import pickletools
import struct
import zipfile
from typing import NamedTuple

import ml_dtypes
import numpy as np

from .weights import CheckpointError, numpy_holds

STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
            "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
            "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


class StorageType(NamedTuple):  # tuples: the pickle's BUILD opcode cannot set their fields
    """A `torch.<Name>Storage` class as the pickle names it: only its element dtype matters here."""

    dtype: type


class Tensor(NamedTuple):
    """A tensor of a `.ckpt`: `read()` gives it as a numpy array (bfloat16 as float32)."""

    storage: np.ndarray  # the whole storage, 1-D, a view of the file's memory map
    offset: int
    shape: tuple
    stride: tuple

    def read(self):
        itemsize = self.storage.itemsize
        array = np.lib.stride_tricks.as_strided(self.storage[self.offset:], self.shape,
                                                tuple(s * itemsize for s in self.stride), writeable=False)
        return array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array


def read(path):
    """The object pickled in the `.ckpt` at `path`, its tensors as `Tensor` records.

    Raises CheckpointError naming `path` for anything but a zip of a pickle of tensors and plain containers:
    a refused global (nothing of the pickle has run), a damaged zip, a storage shorter than its tensors.
    """
    def unreadable(reason):
        return CheckpointError(f"{path} is not a readable .ckpt: {reason}.")

    def member(archive, name):  # read no further than the file's size, whatever the zip claims
        with archive.open(name) as file:
            data = file.read(size + 1)
        if len(data) > size:
            raise unreadable(f"its zip member {name} claims more bytes than the file has")
        return data

    try:
        size = path.stat().st_size
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            members = {info.filename: info for info in archive.infolist()}
            pickles = [name for name in members if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise unreadable(f"expected one <name>/data.pkl in the zip, found {len(pickles)}")
            root = pickles[0].removesuffix("data.pkl")
            byteorder = member(archive, root + "byteorder").decode() if root + "byteorder" in members else "little"
            if byteorder != "little":
                raise unreadable(f"its byte order is {byteorder!r}, only 'little' is supported")
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            storages = {}

            def storage(storage_type, key, numel):
                if key not in storages:
                    info = members.get(f"{root}data/{key}")
                    if info is None:
                        raise unreadable(f"storage {key!r} is missing")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise unreadable(f"storage {key!r} is compressed (PyTorch stores storages uncompressed)")
                    signature, name_length, extra_length = LOCAL_HEADER.unpack_from(data, info.header_offset)
                    if signature != b"PK\x03\x04":
                        raise unreadable(f"the zip entry of storage {key!r} is damaged")
                    start = info.header_offset + LOCAL_HEADER.size + name_length + extra_length
                    size = numel * np.dtype(storage_type.dtype).itemsize
                    if info.file_size < size or start + size > len(data):
                        raise unreadable(f"storage {key!r} holds {min(info.file_size, len(data) - start)} bytes, "
                                         f"its {numel} elements need {size} (truncated?)")
                    storages[key] = np.frombuffer(data, storage_type.dtype, numel, start)
                return storages[key]

            pickled = member(archive, pickles[0])
            parse(pickled)
            return Unpickler(io.BytesIO(pickled), path, storage).load()
    except CheckpointError:
        raise
    except Exception as error:  # anything a damaged zip or pickle raises
        raise unreadable(str(error).strip().splitlines()[0][:300] if str(error).strip()
                         else type(error).__name__) from error


def parse(pickled):
    """Parses `pickled` without running anything, raising where a length it gives reaches past its end:
    the unpickler would allocate what the length claims before reading."""
    collections.deque(pickletools.genops(pickled), maxlen=0)


def rebuild_parameter(tensor, *unused):
    """`torch._utils._rebuild_parameter(tensor, requires_grad, backward_hooks)`: the tensor itself."""
    if not isinstance(tensor, Tensor):
        raise pickle.UnpicklingError(f"a parameter of {type(tensor).__name__}, not of a tensor")
    return tensor


class Unpickler(pickle.Unpickler):
    """Unpickles `torch.save`'s `data.pkl`, allowing only the globals that rebuild tensors."""

    def __init__(self, file, path, storage):
        super().__init__(file)
        self.path, self.storage = path, storage

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as pickle's own find_class maps them
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "torch" and name in STORAGES:
            return StorageType(STORAGES[name])
        allowed = {("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor,
                   ("torch._utils", "_rebuild_tensor"): self.rebuild_tensor,
                   ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
                   ("collections", "OrderedDict"): collections.OrderedDict}
        if (module, name) not in allowed:
            raise CheckpointError(f"{self.path} refuses to load {module}.{name}: a .ckpt may hold only tensors "
                                  f"and plain containers, and the pickle was refused unexecuted. Use the "
                                  f".safetensors release of the checkpoint.")
        return allowed[module, name]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and type(pid[4]) is int
                and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self.storage(pid[1], pid[2], pid[4])

    def rebuild_tensor(self, storage, offset, shape, stride, *unused):
        """`torch._utils._rebuild_tensor(_v2)`: a view of `storage`, checked to lie inside it."""
        if not (isinstance(storage, np.ndarray) and all(type(n) is int and n >= 0 for n in (offset, *shape, *stride))
                and len(shape) == len(stride) and numpy_holds(shape, storage.itemsize)
                and all(s * storage.itemsize < 2**63 for s in stride)):
            raise pickle.UnpicklingError(f"unsupported tensor arguments {offset!r}, {shape!r}, {stride!r}")
        extent = offset + (sum((n - 1) * s for n, s in zip(shape, stride)) + 1 if all(shape) else 0)
        if extent > storage.size or math.prod(shape) > storage.size:  # the latter: no broadcast (stride 0) views
            raise pickle.UnpicklingError(f"a tensor of shape {shape} at offset {offset} reaches element {extent} "
                                         f"of a storage of {storage.size}, or has more elements than it")
        return Tensor(storage, offset, tuple(shape), tuple(stride))
