"""Fuzzed loaders: seeded mutations of small valid files of every format the package reads, each loaded
in a worker process (`fuzz_worker.py`) under a 10 s watchdog and an address-space cap. A mutated file
must either load, its tensors those of the original or those the reference reader (safetensors,
torch.load) reads from it, or raise one `CheckpointError` whose message names the file: no other
exception, no crash, no hang, no allocation of a size the file does not hold. 50 cases per format by
default, 1000 under the `slow` marker, read by the cheapest entry point that parses a whole file (a
weights file's header and every tensor, `checkpoints.read`, `Tokenizer.from_folder`); the first case
of each format that this loads, and the first two it refuses, go through `from_checkpoint` too.

Mutations: byte flips, overwritten bytes and integers, truncation, inserted and deleted bytes anywhere
in a file's structure (a safetensors header and its size, a zip's central directory, local headers and
sizes, the pickle); edits of the parsed JSON (wrong types, negative, zero and huge numbers, missing,
renamed and unknown keys, unknown dtypes, huge shapes, overlapping offsets); opcode-level edits of a
`.ckpt`'s pickle; line edits of `merges.txt`. Each case is seeded by its format and number.
"""
import collections
import functools
import gzip
import io
import json
import pickle
import pickletools
import random
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import CLIPTokenizer

import ldm_reference
from fuzz_worker import Worker
from stable_diffusion import CheckpointError, StableDiffusion, checkpoints, ldm
from stable_diffusion.presets import asset
from stable_diffusion.tokenizer import END_TOKEN, START_TOKEN, Tokenizer, byte_characters

INTS = (0, 1, -1, 3, 255, 2**31 - 1, 2**32, 2**40, 2**63 - 1, 2**64, -2**63, 10**30)
VALUES = (None, True, False, "", "x", "F33", 0.5, -1.0, 1e308, [], {}, [0], [-1], [2**40], [2**32, 2**32], {"x": 1})
STRINGS = ("", "x", "0", "1", "999", "os", "system", "builtins", "eval", "cpu", "storage", "storag", "torch",
           "torch._utils", "_rebuild_tensor", "_rebuild_parameter", "HalfStorage", "BFloat16Storage", "BoolStorage",
           "LongStorage", "NoStorage", "collections", "OrderedDict", "dict", "state_dict", "global_step",
           "model.diffusion_model.conv_in.weight", "\udcff")
OPCODES = list(pickletools.opcodes)


def position(rng, regions):
    """A byte position in one of `regions` [(start, end), ...], the region picked uniformly."""
    start, end = rng.choice([(a, b) for a, b in regions if b > a])
    return rng.randrange(start, end)


def mutate_bytes(data, rng, regions=None):
    """(bytes, description): one byte-level mutation at a position inside `regions` (default: anywhere)."""
    regions = regions or [(0, len(data))]
    p = position(rng, regions)
    kind = rng.choice(["flip", "byte", "truncate", "insert", "delete", "integer"])
    if kind == "flip":
        bit = rng.randrange(8)
        return data[:p] + bytes([data[p] ^ (1 << bit)]) + data[p + 1:], f"bit {bit} of byte {p} flipped"
    if kind == "byte":
        value = rng.randrange(256)
        return data[:p] + bytes([value]) + data[p + 1:], f"byte {p} set to {value}"
    if kind == "truncate":
        return data[:p], f"truncated to {p} bytes"
    if kind == "insert":
        extra = rng.randbytes(rng.randint(1, 8))
        return data[:p] + extra + data[p:], f"{extra!r} inserted at {p}"
    if kind == "delete":
        n = rng.randint(1, 8)
        return data[:p] + data[p + n:], f"{n} bytes deleted at {p}"
    width, value = rng.choice([1, 2, 4, 8]), rng.choice(INTS)
    encoded = (value % 2 ** (8 * width)).to_bytes(width, "little")
    return data[:p] + encoded + data[p + width:], f"{width}-byte integer {value} written at {p}"


def nodes(value, path=()):
    """Every (path, value) of a parsed JSON document, the root included."""
    yield path, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from nodes(child, (*path, key))


def at(document, path):
    for key in path:
        document = document[key]
    return document


def mutate_json(document, rng, paths=None):
    """(document, description): one edit of a node of `document` (a copy), picked among `paths`."""
    document = json.loads(json.dumps(document))
    path = rng.choice(paths or [p for p, _ in nodes(document)])
    value = at(document, path)
    edits = ["value", "value", "type"] + (["delete", "rename"] if path else [])
    if isinstance(value, bool):
        edits += ["negate"]
    elif isinstance(value, (int, float)):
        edits += ["number", "number", "number"]
    elif isinstance(value, str):
        edits += ["string"]
    elif isinstance(value, list):
        edits += ["append", "drop", "reverse"] if value else ["append"]
    elif isinstance(value, dict):
        edits += ["add key"]
    edit = rng.choice(edits)
    if edit == "delete":
        del at(document, path[:-1])[path[-1]]
        return document, f"{list(path)} deleted"
    if edit == "rename":
        parent = at(document, path[:-1])
        if isinstance(parent, dict):
            parent[path[-1] + "_"] = parent.pop(path[-1])
            return document, f"{list(path)} renamed"
        parent.insert(path[-1], value)
        return document, f"{list(path)} duplicated"
    if edit == "value":
        new = rng.choice(INTS)
    elif edit == "type":
        new = rng.choice(VALUES)
    elif edit == "negate":
        new = not value
    elif edit == "number":
        new = rng.choice([value + 1, value - 1, -value, value * 2**20, value * 2, 0, value / 3])
        new = int(new) if isinstance(value, int) and rng.random() < 0.8 else new
    elif edit == "string":
        new = rng.choice([value + "x", value[:-1], value.upper(), "", "F16", "BF16", "I64", "BOOL", "F8_E4M3"])
    elif edit == "append":
        new = value + [rng.choice(value) if value else 1]
    elif edit == "drop":
        new = value[:-1]
    elif edit == "reverse":
        new = value[::-1]
    else:
        new = dict(value, **{rng.choice(["x", "extra", "__metadata__", "dtype"]): rng.choice(VALUES)})
    if path:
        at(document, path[:-1])[path[-1]] = new
    else:
        document = new
    return document, f"{list(path)} {edit}: {value!r:.60} -> {new!r:.60}"


def mutate_text_json(data, rng):
    """A JSON file: an edit of the document (3 in 4 cases) or of its bytes."""
    if rng.random() < 0.25:
        return mutate_bytes(data, rng)
    document, description = mutate_json(json.loads(data), rng)
    return json.dumps(document, indent=2).encode(), description


def tensor_entry(shape, begin, size):
    return dict(dtype="F32", shape=shape, data_offsets=[begin, begin + size])


def mutate_entry(header, rng):
    """(header, description): an edit of the tensor entries that keeps the offsets consistent, or breaks
    them the way a header check must catch: shapes of the same size or of no size but huge dimensions,
    sizes that overflow int64, overlapping offsets, a 1 TB tensor, metadata that is not strings."""
    keys = [key for key in header if key != "__metadata__"]
    key, other = rng.choice(keys), rng.choice(keys)
    entry, end = header[key], max(header[k]["data_offsets"][1] for k in keys)
    begin = entry["data_offsets"][0]
    edits = {
        "same-size shape": lambda: entry.update(shape=[*entry["shape"][::-1], 1]),
        "same-size dtype": lambda: entry.update(dtype={"F32": "I32", "F16": "BF16"}.get(entry["dtype"], "U8")),
        "int64-overflow shape": lambda: header.update(overflow=tensor_entry([2**32, 2**32], end, 0)),
        "no size, huge dimensions": lambda: header.update(empty=tensor_entry([0, 2**40, 2**40], end, 0)),
        "overlapping offsets": lambda: entry.update(data_offsets=list(header[other]["data_offsets"])),
        "shifted offsets": lambda: entry.update(data_offsets=[begin + 1, entry["data_offsets"][1] + 1]),
        "1 TB tensor": lambda: header.update({key: tensor_entry([2**38], begin, 2**40)}),
        "1 TB tensor at the end": lambda: header.update(huge=tensor_entry([2**38], end, 2**40)),
        "duplicate entry": lambda: header.update({key + ".copy": dict(entry)}),
        "metadata not strings": lambda: header.update(__metadata__={"format": 2, "layout": None}),
    }
    name = rng.choice(sorted(edits))
    edits[name]()
    return header, f"{key}: {name}"


def mutate_safetensors(data, rng):
    """A safetensors file: bytes of its header size, header or data, the header size, or an edit of the
    header's JSON (the entries and metadata) written back with its new size."""
    length = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    kind = rng.choice(["bytes", "bytes", "size", "entry", "json", "json"])
    if kind == "bytes":
        return mutate_bytes(data, rng, [(0, 8), (8, 8 + length), (8, 8 + length), (8 + length, len(data))])
    if kind == "size":
        value = rng.choice([0, 1, 7, length - 1, length + 1, len(data), 2**40, 2**63 - 1, 2**64 - 1])
        return value.to_bytes(8, "little") + data[8:], f"header size {value}"
    if kind == "entry":
        header, description = mutate_entry(header, rng)
    else:
        header, description = mutate_json(header, rng, [path for path, _ in nodes(header) if len(path) >= 2])
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + body, description


@functools.cache  # the same original each time
def zip_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_zip(members):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def encode_string(text):
    data = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(data)) + data


def mutate_pickle(data, rng):
    """(pickle, description): one opcode-level edit: an opcode replaced, deleted or repeated, an integer
    or string argument replaced, or a length prefix changed."""
    ops = list(pickletools.genops(data))
    index = rng.randrange(len(ops) - 1)
    op, arg, pos = ops[index]
    following = ops[index + 1][2]
    kind = rng.choice(["opcode", "delete", "repeat", "argument", "argument", "argument", "length"])
    if kind == "opcode":
        new = rng.choice(OPCODES)
        return data[:pos] + new.code.encode("latin-1") + data[pos + 1:], f"{op.name} at {pos} -> {new.name}"
    if kind == "delete":
        return data[:pos] + data[following:], f"{op.name} at {pos} deleted"
    if kind == "repeat":
        return data[:following] + data[pos:following] + data[following:], f"{op.name} at {pos} repeated"
    if kind == "length" and op.arg is not None and op.arg.n in (pickletools.TAKEN_FROM_ARGUMENT4U,
                                                                pickletools.TAKEN_FROM_ARGUMENT1,
                                                                pickletools.TAKEN_FROM_ARGUMENT4):
        width = 1 if op.arg.n == pickletools.TAKEN_FROM_ARGUMENT1 else 4
        value = rng.randrange(2 ** (8 * width))
        prefix = value.to_bytes(width, "little")
        return data[:pos + 1] + prefix + data[pos + 1 + width:], f"{op.name} at {pos}: length {value}"
    ints = [i for i, (o, a, _) in enumerate(ops) if isinstance(a, int) and not isinstance(a, bool)
            and o.name not in ("PROTO", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET")]
    strings = [i for i, (o, a, _) in enumerate(ops) if isinstance(a, str)]
    index = rng.choice(ints if rng.random() < 0.5 else strings)
    op, arg, pos = ops[index]
    following = ops[index + 1][2]
    if isinstance(arg, int):
        value = rng.choice(INTS + (arg + 1, arg - 1, -arg, 2 * arg))
        encoded = pickle.encode_long(value)
        new = b"\x8a" + bytes([len(encoded)]) + encoded  # LONG1
    elif op.name == "GLOBAL":
        module, name = arg.split(" ")
        module, name = rng.choice([(rng.choice(STRINGS), name), (module, rng.choice(STRINGS))])
        value = f"{module} {name}"
        new = b"c" + f"{module}\n{name}\n".encode("utf-8", "surrogatepass")
    else:
        value = rng.choice(STRINGS + (arg + "x", arg[:-1]))
        new = encode_string(value)
    return data[:pos] + new + data[following:], f"{op.name} {arg!r:.40} at {pos} -> {value!r:.40}"


def zip_regions(data):
    """[(start, end)] of a zip's structures: the end record, the central directory, each local header."""
    end = data.rindex(b"PK\x05\x06")
    directory = int.from_bytes(data[end + 16:end + 20], "little")
    headers, start = [], data.find(b"PK\x03\x04")
    while 0 <= start < directory:
        name_length, extra_length = struct.unpack("<HH", data[start + 26:start + 30])
        headers.append((start, start + 30 + name_length + extra_length))
        start = data.find(b"PK\x03\x04", start + 1)
    return [(end, len(data)), (directory, end), *headers]


def mutate_ckpt(data, rng):
    """A `.ckpt`: its pickle edited and the zip written again (half the cases), or its zip structures
    mutated in place: bytes of the end record, the central directory and local headers, or the sizes and
    offsets these give."""
    kind = rng.choice(["pickle", "pickle", "zip", "sizes"])
    if kind == "pickle":
        members = dict(zip_members(data))
        name = next(name for name in members if name.endswith("/data.pkl"))
        members[name], description = mutate_pickle(members[name], rng)
        return write_zip(members), f"pickle: {description}"
    regions = zip_regions(data)
    if kind == "zip":
        mutated, description = mutate_bytes(data, rng, regions[:2] + rng.sample(regions[2:], 3))
        return mutated, f"zip: {description}"
    entries = [i for i in range(*regions[1]) if data.startswith(b"PK\x01\x02", i)]
    start = rng.choice(entries + [begin for begin, _ in regions[2:]])
    # compressed size, size and local header offset of a central directory entry; sizes of a local header
    field = start + rng.choice([20, 24, 42] if start in entries else [18, 22])
    value = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, rng.randrange(2**16)])
    return data[:field] + value.to_bytes(4, "little") + data[field + 4:], f"zip field at {field} set to {value}"


def mutate_merges(data, rng):
    """merges.txt: a line deleted, repeated, swapped or replaced, or a byte-level mutation."""
    if rng.random() < 0.3:
        return mutate_bytes(data, rng)
    lines = data.decode("utf-8").split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    kind = rng.choice(["delete", "repeat", "swap", "replace"])
    if kind == "delete":
        del lines[i]
    elif kind == "repeat":
        lines.insert(i, lines[j])
    elif kind == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    else:
        lines[i] = rng.choice(["a b c", "a", "", " ", "zz qq", "#version: 0.2", "a  b", "\u00e9 \u00e8", "a\tb",
                               f"{START_TOKEN} {END_TOKEN}"])
    return "\n".join(lines).encode("utf-8"), f"merges line {i} {kind}"


def small_tokenizer(folder):
    """A valid tokenizer folder: CLIP's byte tokens and its first 200 merges (714 tokens), fast to read."""
    with gzip.open(asset("bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as file:
        rules = file.read().split("\n")[1:201]
    characters = byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in rules]
    vocabulary = {token: i for i, token in enumerate(tokens + [START_TOKEN, END_TOKEN])}
    Tokenizer(vocabulary, rules, pad_token_id=vocabulary[END_TOKEN]).save(folder)


@dataclass
class Variant:
    """A file of a format: `file` to mutate (paths relative to the folder of the valid checkpoints, the
    worker's working directory) and how the worker reads it: `read` (reader, path, options), the cheapest
    full parse, and `public` (path, options) through `StableDiffusion.from_checkpoint`."""

    file: str
    mutate: Callable
    read: tuple
    public: tuple


# The reference pipeline's settings that no tensor of its original-layout files holds.
SD1_SETTINGS = {"text_encoder": {"num_heads": 4}, "diffusion_model": {"norm_groups": 8, "num_heads": 8},
                "decoder": {"norm_groups": 8}, "encoder": {"norm_groups": 8}}
UNET, BUNDLE_UNET = "diffusers/unet/diffusion_pytorch_model.safetensors", "bundle/diffusion_model.safetensors"
FORMATS = {  # each case mutates one file of its format, in turn
    "safetensors": [
        Variant("sd1.safetensors", mutate_safetensors, ("single", "sd1.safetensors", {}),
                ("sd1.safetensors", {"config": SD1_SETTINGS})),
        Variant(UNET, mutate_safetensors, ("weights", UNET, {}), ("diffusers", {})),
        Variant(BUNDLE_UNET, mutate_safetensors, ("weights", BUNDLE_UNET, {"bundle": True}), ("bundle", {}))],
    ".ckpt": [
        Variant("vae.ckpt", mutate_ckpt, ("single", "vae.ckpt", {"vae": True}),
                ("sd1.safetensors", {"vae": "vae.ckpt", "config": SD1_SETTINGS}))],
    "bundle config.json": [
        Variant("bundle/config.json", mutate_text_json, ("checkpoint", "bundle", {}), ("bundle", {}))],
    "diffusers config.json": [
        Variant(f"diffusers/{file}", mutate_text_json, ("checkpoint", "diffusers", {}), ("diffusers", {}))
        for file in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                     "scheduler/scheduler_config.json")],
    "tokenizer files": [
        *(Variant(f"bundle/tokenizer/{file}", mutate, ("tokenizer", "bundle/tokenizer", {}), ("bundle", {}))
          for file, mutate in (("vocab.json", mutate_text_json), ("merges.txt", mutate_merges),
                               ("tokenizer_config.json", mutate_text_json))),
        Variant("diffusers/tokenizer/tokenizer.json", mutate_text_json, ("tokenizer", "diffusers/tokenizer", {}),
                ("diffusers", {}))],
}
TENSOR_READERS = ("single", "weights")
PUBLIC = {"ok": 1, "error": 2}  # per format: the first cases the cheap reader loads or refuses, again in public


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A `Worker` working in a folder of its own (`worker.cwd`)."""
    worker = Worker(timeout=10.0, cwd=tmp_path_factory.mktemp("fuzz"))
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def fuzz(reference, worker):
    """(folder of valid checkpoints, the worker working in it). The checkpoints: the tiny SD 1.x reference
    pipeline as an original `.safetensors` (float16, a 1024-token vocabulary), its VAE as a `.ckpt` (a
    standalone VAE file, 130 tensors: 4 times faster to fuzz than the whole model), its diffusers folder
    and a bundle, both with a small tokenizer (fast to read): the bundle's in `vocab.json` and
    `merges.txt`, the diffusers folder's in a `tokenizer.json` as transformers 5 writes it."""
    pipe, folder = reference("sd1")
    assert ldm_reference.overrides(pipe) == SD1_SETTINGS
    root = worker.cwd
    state = ldm_reference.ldm_state_dict(pipe, "sd1")
    embedding = f"{ldm.CLIP}text_model.embeddings.token_embedding.weight"
    state[embedding] = state[embedding][:1024]
    ldm_reference.write(state, root / "sd1.safetensors", torch.float16)
    ldm_reference.write(ldm_reference.vae_state_dict(pipe.vae, prefix=""), root / "vae.ckpt", torch.float16)
    shutil.copytree(folder, root / "diffusers", ignore=shutil.ignore_patterns("vocab", "tokenizer"))
    small_tokenizer(root / "vocab")
    CLIPTokenizer.from_pretrained(root / "vocab").save_pretrained(root / "diffusers" / "tokenizer")
    StableDiffusion.from_checkpoint(root / "diffusers", jit_compile=False).save(root / "bundle")
    return root, worker


def judge(result, file):
    """None if `result` is a load or one CheckpointError naming `file`, else what is wrong."""
    if result[0] == "ok":
        return None
    if result[0] == "error":
        _, kind, ours, message = result
        if not ours:
            return f"{kind}: {message[:300]}"
        return None if file in message else f"a CheckpointError not naming {file}: {message[:300]}"
    return f"{result[0]}: {result[1:]}"


def tensors_problem(worker, variant, ours, original):
    """None if the tensors read from the mutated file are those of the `original` file, or those the
    reference reader reads from it; else what differs."""
    if ours == original:
        return None
    _, path, options = variant.read
    reference = worker.run("reference", path, **options)[1]
    if ours == reference:
        return None
    expected = original if reference is None else reference
    differing = sorted(key for key in set(ours) | set(expected) if ours.get(key) != expected.get(key))
    return ("loads tensors other than the reference reader's" if reference is not None else
            "loads tensors other than the original's from a file the reference reader refuses") + f": {differing[:5]}"


@pytest.mark.parametrize("count", [50, pytest.param(1000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", FORMATS)
def test_mutated_file_loads_or_gives_one_clear_error(name, count, fuzz):
    """`count` seeded mutations of the format's files, each read by the cheapest full parse; the first that
    this loads or refuses (`PUBLIC`) are loaded with `StableDiffusion.from_checkpoint` too."""
    root, worker = fuzz
    variants = FORMATS[name]
    originals = {variant.file: (root / variant.file).read_bytes() for variant in variants}
    valid = {variant.file: worker.run(*variant.read[:2], **variant.read[2]) for variant in variants}
    for variant in variants:
        assert valid[variant.file][0] == "ok", valid[variant.file]
        if variant.read[0] in TENSOR_READERS:
            assert tensors_problem(worker, variant, valid[variant.file][1], None) is None
    outcomes, public, failures = collections.Counter(), collections.Counter(), []
    for i in range(count):
        variant = variants[i % len(variants)]
        mutated, description = variant.mutate(originals[variant.file], random.Random(f"{name} {i}"))
        (root / variant.file).write_bytes(mutated)
        try:
            result = worker.run(*variant.read[:2], **variant.read[2])
            outcomes[result[0]] += 1
            problem = judge(result, variant.file)
            if not problem and result[0] == "ok" and variant.read[0] in TENSOR_READERS:
                problem = tensors_problem(worker, variant, result[1], valid[variant.file][1])
            if not problem and public[result[0]] < PUBLIC.get(result[0], 0):
                public[result[0]] += 1
                problem = judge(worker.run("pipeline", variant.public[0], **variant.public[1]), variant.file)
                description += " (from_checkpoint)" if problem else ""
        finally:
            (root / variant.file).write_bytes(originals[variant.file])
        if problem:
            failures.append(f"case {i}, {variant.file}, {description}: {problem}")
    assert not failures, f"{len(failures)} of {count} cases:\n" + "\n".join(failures[:20])
    assert outcomes["ok"] and outcomes["error"] and public == PUBLIC, (outcomes, public)


class Reduce:
    """An object that pickles as `callable(*arguments)`."""

    def __init__(self, callable, *arguments):
        self.callable, self.arguments = callable, arguments

    def __reduce__(self):
        return self.callable, self.arguments


class StoragePickler(pickle.Pickler):
    """Pickles `STORAGE` as torch.save names a float32 storage of `numel` elements."""

    def __init__(self, file, numel):
        super().__init__(file, protocol=2)
        self.numel = numel

    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", self.numel) if obj is STORAGE else None


STORAGE = object()


def ckpt(path, pickled, storage=bytes(16)):
    """A `.ckpt` laid out as torch.save writes it: `pickled` as its data.pkl, one storage of `storage`."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", storage)
    return path


def tensor_ckpt(path, numel, shape, stride=(1,)):
    """A `.ckpt` of {"w": a float32 tensor of `shape` and `stride`}, its storage claiming `numel` elements."""
    file = io.BytesIO()
    rebuild = Reduce(torch._utils._rebuild_tensor_v2, STORAGE, 0, shape, stride, False, collections.OrderedDict())
    StoragePickler(file, numel).dump({"w": rebuild})
    return ckpt(path, file.getvalue())


def safetensors(path, header, data=bytes(16), length=None):
    encoded = json.dumps(header).encode()
    path.write_bytes((len(encoded) if length is None else length).to_bytes(8, "little") + encoded + data)
    return path


TERABYTE = 2**40
HUGE_CLAIMS = {  # a small file claiming a terabyte, in every place a size is read from
    "safetensors tensor": lambda path: safetensors(path, {
        "w": dict(dtype="F32", shape=[TERABYTE // 4], data_offsets=[0, TERABYTE])}),
    "safetensors header size": lambda path: safetensors(path, {
        "w": dict(dtype="F32", shape=[4], data_offsets=[0, 16])}, length=TERABYTE),
    "safetensors empty tensor of huge dimensions": lambda path: safetensors(path, {
        "w": dict(dtype="F32", shape=[4], data_offsets=[0, 16]),
        "empty": dict(dtype="F32", shape=[0, 2**40, 2**40], data_offsets=[16, 16])}),
    "ckpt storage": lambda path: tensor_ckpt(path, TERABYTE // 4, (4,)),
    "ckpt tensor beyond its storage": lambda path: tensor_ckpt(path, 4, (TERABYTE // 4,)),
    "ckpt tensor broadcast over its storage": lambda path: tensor_ckpt(path, 4, (TERABYTE // 4,), (0,)),
    "ckpt pickle string": lambda path: ckpt(path, b"\x80\x02X" + (2**32 - 1).to_bytes(4, "little") + b"abc"),
    "ckpt pickle bytes": lambda path: ckpt(path, b"\x80\x04\x8e" + TERABYTE.to_bytes(8, "little") + b"abc"),
    "ckpt pickle frame": lambda path: ckpt(path, b"\x80\x04\x95" + TERABYTE.to_bytes(8, "little") + b"abc"),
}


@pytest.mark.parametrize("name", HUGE_CLAIMS)
def test_huge_claim_is_refused_before_allocating(name, worker):
    """Read where an allocation of a terabyte fails (`fuzz_worker.HEADROOM`): refused with one
    CheckpointError naming the file, before anything of the claimed size is allocated."""
    kind, claim = name.split(" ", 1)
    path = HUGE_CLAIMS[name](worker.cwd / f"{claim.replace(' ', '-')}.{kind}")
    result = worker.run("weights" if kind == "safetensors" else "single", path)
    assert result[0] == "error" and result[2] and str(path) in result[3], result


CONFIG_EDITS = {  # a bundle's config.json edited: the error, raised before any model is built
    "huge block count": ({"text_encoder": {"num_layers": 2**40}}, r"num_layers=1099511627776 is larger than any"),
    "other block count": ({"diffusion_model": {"layers_per_block": 1}}, r"layers_per_block=1, its weights \("),
    "unknown setting": ({"decoder": {"channel": [16]}}, r"decoder has no setting 'channel'"),
    "wrong type": ({"encoder": {"norm_groups": "8"}}, r"norm_groups='8' does not have the form of its default 32"),
    "heads": ({"text_encoder": {"num_heads": 3}}, r"channels \[32\] are not multiples of num_heads \[3\]"),
    "scheduler": ({"scheduler": {"prediction_type": "sample"}}, r"the scheduler cannot be built: prediction_type"),
    "image size": ({"img_height": 36}, r"the image size 36 is not a positive multiple of 8 and of 16"),
}


@pytest.mark.parametrize("name", CONFIG_EDITS)
def test_bundle_config_that_cannot_build_is_refused_by_read(name, fuzz):
    root, _ = fuzz
    path = root / "bundle" / "config.json"
    original = path.read_text()
    edit, message = CONFIG_EDITS[name]
    config = json.loads(original)
    for key, value in edit.items():
        config[key] = dict(config[key], **value) if isinstance(value, dict) else value
    path.write_text(json.dumps(config))
    try:
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: .*{message}"):
            checkpoints.read(path.parent)
    finally:
        path.write_text(original)
