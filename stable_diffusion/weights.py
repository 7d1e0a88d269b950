"""The one name mapping from checkpoint tensors to Keras variables, and strict loading.

The Keras layers are named after the diffusers key prefixes, so mapping is by name, with the one
table below: `KEY_SUFFIX` names the PyTorch tensor of each Keras variable (`variable_key`) and
`to_keras_layout` transposes it. Loading is strict: every variable gets exactly one tensor of the
right shape, every tensor is used (or known-unused), and nothing is assigned before everything checks
out. Every format (`diffusers_folder.py`, `ldm.py`, `bundle.py`) hands its tensors to `load_weights`
as a `Tensors` mapping, read lazily one at a time, so loading needs about the model's size in memory.

References: the safetensors format (github.com/huggingface/safetensors, "Format"): an 8-byte
little-endian header size, a JSON header `{key: {dtype, shape, data_offsets}, "__metadata__": {...}}`
and the tensors' bytes, contiguous, offsets relative to the end of the header.
"""
import json
import math
from collections.abc import Mapping
from functools import partial

import ml_dtypes
import numpy as np

from .keras_internals import set_variable

KEY_SUFFIX = {"kernel": "weight", "gamma": "weight", "embeddings": "weight", "bias": "bias", "beta": "bias"}
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
                      "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


class CheckpointError(ValueError):
    """A checkpoint file this package cannot read: the message names the file and says what is wrong."""


def to_keras_layout(variable_name, tensor, shape):
    """A PyTorch tensor in the layout of the Keras variable `variable_name` of `shape`."""
    if variable_name != "kernel":
        return tensor
    if tensor.ndim == 4 and len(shape) == 2:  # a 1x1 conv in PyTorch, a Dense here
        tensor = tensor[:, :, 0, 0]
    return tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T  # (out, in, kh, kw) -> (kh, kw, in, out)


def keras_layout(variable_name, tensor, shape):
    """A tensor stored in the Keras layout already (a bundle's), as it is."""
    return tensor


def variable_key(layer, variable):
    """The checkpoint key of a Keras variable, e.g. `down_blocks.0.resnets.0.conv1.weight`."""
    return f"{layer.name.replace('-', '.')}.{KEY_SUFFIX[variable.name]}"


def named_variables(model):
    """{checkpoint key: variable} of every variable of `model` (`variable_key`)."""
    return {variable_key(layer, variable): variable for layer in model.layers for variable in layer.weights}


def read_json(path):
    """A checkpoint's JSON object; FileNotFoundError saying the checkpoint is incomplete if the file is
    missing, CheckpointError naming it if it does not hold a JSON object in UTF-8."""
    if not path.exists():
        raise FileNotFoundError(f"Missing {path}: the checkpoint is incomplete.")
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise CheckpointError(f"{path} holds a JSON {type(document).__name__}, not an object.")
    return document


def numpy_holds(shape, itemsize):
    """Whether numpy makes arrays of `shape`: their size in bytes, zero dimensions aside, fits an int64."""
    return math.prod(n or 1 for n in shape) * itemsize < 2**63


def safetensors_header(path):
    """(entries, metadata) of the safetensors file `path`: `entries[key]` gives a tensor's numpy `dtype`,
    `shape` and `offset` in the file. The header is checked against the file: known dtypes, sizes that
    fit the shapes, tensors contiguous and ending where the file ends; a CheckpointError naming the file
    says what is wrong otherwise."""
    def unreadable(reason):
        return CheckpointError(f"{path} is not a readable safetensors file: {reason}.")

    size = path.stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if size < 8 or length > size - 8:
            raise unreadable(f"its header size says {length} bytes, the file has {size}")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise unreadable(f"its header is not JSON ({error})") from error
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise unreadable("its header is not a JSON object with an object as __metadata__")
    metadata, entries, spans = header.pop("__metadata__", {}), {}, []
    for key, entry in header.items():
        try:
            dtype, shape = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]), entry["shape"]
            begin, end = entry["data_offsets"]
            valid = (all(type(n) is int and n >= 0 for n in (*shape, begin, end))
                     and end - begin == dtype.itemsize * math.prod(shape) and numpy_holds(shape, dtype.itemsize))
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise unreadable(f"tensor {key!r} has the header entry {entry!r}; expected a dtype of "
                             f"{sorted(SAFETENSORS_DTYPES)}, a shape and the data_offsets of its size")
        entries[key] = dict(dtype=dtype, shape=tuple(shape), offset=8 + length + begin)
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise unreadable(f"tensor {key!r} starts at byte {begin} of the data, not {position} "
                             f"(tensors must be contiguous)")
        position = end
    if 8 + length + position != size:
        reason = "truncated?" if size < 8 + length + position else "bytes after the last tensor"
        raise unreadable(f"its tensors end at byte {8 + length + position}, the file has {size} ({reason})")
    return entries, metadata


def read_tensor(path, entry):
    """A tensor of a safetensors file (`safetensors_header` entry), with a plain read: unlike a memory
    map, nothing of the file stays resident afterwards. bfloat16 comes back as float32."""
    with open(path, "rb") as file:
        file.seek(entry["offset"])
        data = np.fromfile(file, dtype=entry["dtype"], count=int(np.prod(entry["shape"]))).reshape(entry["shape"])
    return data.astype(np.float32) if entry["dtype"] == ml_dtypes.bfloat16 else data


def part_shape(key, shape, part, source):
    """The shape of `take_part(tensor, part)` of the tensor `key` of `shape`; CheckpointError naming `source`
    where the tensor has no such part."""
    if part is None:
        return shape
    if part == "T" and len(shape) == 2:
        return shape[::-1]
    if part in (0, 1, 2) and shape and shape[0] % 3 == 0:
        return (shape[0] // 3, *shape[1:])
    raise CheckpointError(f"{source}: {key} has the shape {shape}, not "
                          f"{'a matrix' if part == 'T' else 'one of fused q/k/v thirds'}.")


def take_part(tensor, part):
    """Part i (0-2) of a tensor: its i-th third along the first axis (OpenCLIP's fused q/k/v projection); part
    "T": its transpose (OpenCLIP's text projection, a matrix applied as x @ W); None: the whole tensor."""
    if part == "T":
        return tensor.T
    if part is None:
        return tensor
    n = tensor.shape[0] // 3
    return tensor[part * n:(part + 1) * n]


class Tensors(Mapping):
    """Checkpoint tensors by key, read lazily one at a time, with their shapes known up front."""

    def __init__(self, readers, shapes, source, owned=False):
        """`owned`: the readers return arrays no one else holds (new, or views of a private file
        mapping), which loading may make variables of where they have the variable's dtype."""
        self._readers, self.shapes, self.source, self.owned = readers, shapes, source, owned

    @classmethod
    def from_arrays(cls, arrays, source="arrays"):
        return cls({k: (lambda v=v: np.asarray(v)) for k, v in arrays.items()},
                   {k: tuple(np.shape(v)) for k, v in arrays.items()}, source)

    @classmethod
    def from_safetensors(cls, paths, rename=lambda key: key):
        readers, shapes = {}, {}
        for path in paths:
            entries, _ = safetensors_header(path)
            for key, entry in entries.items():
                readers[rename(key)] = partial(read_tensor, path, entry)
                shapes[rename(key)] = entry["shape"]
        return cls(readers, shapes, ", ".join(map(str, paths)))

    def subset(self, names):
        """These tensors under new names: `names[new] = (key, part)`, the part as `take_part` takes it."""
        readers, shapes = {}, {}
        for new, (key, part) in names.items():
            shapes[new] = part_shape(key, self.shapes[key], part, self.source)
            readers[new] = self._readers[key] if part is None else lambda key=key, part=part: take_part(self[key], part)
        return Tensors(readers, shapes, self.source)

    def __getitem__(self, key):
        return self._readers[key]()

    def __contains__(self, key):  # Mapping's would read the tensor
        return key in self._readers

    def __iter__(self):
        return iter(self._readers)

    def __len__(self):
        return len(self._readers)


def load_weights(models, tensors, unused_prefixes=(), layout=to_keras_layout):
    """Sets every variable of `models` from `tensors`, strictly; raises CheckpointError listing problems.
    `layout(variable name, tensor, variable shape)` brings a tensor into the variable's layout."""
    plan, problems, used = [], [], set()
    for layer in (layer for model in models for layer in model.layers):
        for variable in layer.weights:
            key = variable_key(layer, variable)
            if key not in tensors:
                problems.append(f"missing tensor {key} for {variable.path} {tuple(variable.shape)}")
                continue
            zeros = np.broadcast_to(np.float32(0), tensors.shapes[key])  # shape check without reading
            shape = layout(variable.name, zeros, variable.shape).shape
            if shape != tuple(variable.shape):
                problems.append(f"{key} has shape {tensors.shapes[key]}, {variable.path} needs {tuple(variable.shape)}")
            plan.append((variable, key))
            used.add(key)
    unused = [k for k in tensors if k not in used and not k.startswith(tuple(unused_prefixes))]
    problems += [f"unexpected tensor {key}" for key in unused]
    if problems:
        names = " + ".join(model.name for model in models)
        raise CheckpointError(f"{tensors.source} does not fit the {names} model:{listing(problems)}")
    for variable, key in plan:
        value = layout(variable.name, tensors[key], variable.shape)
        handed_over = tensors.owned and value.dtype == variable.dtype
        set_variable(variable, value if handed_over else aligned_copy(value, variable.dtype))


def listing(problems, limit=10):
    """The first `limit` of `problems`, one per indented line, each after a newline."""
    more = [f"... and {len(problems) - limit} more"] if len(problems) > limit else []
    return "".join(f"\n  {problem}" for problem in problems[:limit] + more)


def strict_loader(tensors, unused_prefixes=()):
    """load(models) setting `models` from `tensors` with `load_weights`."""
    return lambda models: load_weights(models, tensors, unused_prefixes)


def aligned_empty(shape, dtype):
    """An uninitialized array starting on a 64-byte boundary, the alignment TensorFlow gives tensors."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)


def aligned_copy(array, dtype):
    """`array` as `dtype` in a new `aligned_empty` array."""
    copy = aligned_empty(array.shape, dtype)
    np.copyto(copy, array)
    return copy
