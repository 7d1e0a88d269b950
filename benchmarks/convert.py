"""Converting a full-size SD 1.5 checkpoint: time and peak memory, `.safetensors` and `.ckpt`.

    python -m benchmarks.convert [--workdir /tmp/sd-convert-bench] [--repeats 3] [--memory-limit-factor F]

Writes a random-weight SD 1.5 checkpoint in the original (LDM) layout, fp32, tensor by tensor (the
shapes come from diffusers' models on the meta device) and the same as a `.ckpt`, converts each
into a bundle, and loads each original and a bundle (`--repeats` times, interleaved), every step in
a fresh process, timing model construction with its weights and saving, and recording peak memory.
`--memory-limit-factor F` also converts each file in a memory cgroup of F times its size (root), to
show what a conversion needs, as peak RSS counts file pages the kernel can reclaim. Writes its
section of benchmarks/RESULTS.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.results import cpu, replace_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Checkpoint conversion (full-size SD 1.5, original layout)"
MEASURE = """
import json, sys, threading, time
peak = dict(anon=0, file=0)

def sample():  # resident anonymous memory vs pages of mapped files (a memory-mapped checkpoint)
    while True:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        for name in peak:
            peak[name] = max(peak[name], int(status[f"Rss{name.title()}"].split()[0]) / 2**20)
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
from stable_diffusion import StableDiffusion, bundle
import keras
times = [time.perf_counter()]
sd = StableDiffusion.from_checkpoint(sys.argv[2], jit_compile=False)
times.append(time.perf_counter())
for name in bundle.MODELS:  # a mapped bundle reads its pages here, on first use
    for variable in getattr(sd, name).weights:
        keras.ops.sum(variable)
times.append(time.perf_counter())
if sys.argv[1] == "convert":
    sd.save(sys.argv[3])
times.append(time.perf_counter())
status = dict(line.split(":", 1) for line in open("/proc/self/status"))  # ru_maxrss would count the parent's
print(json.dumps(dict(load=times[1] - times[0], first_read=times[2] - times[1], save=times[3] - times[2],
                      peak_rss_gb=int(status["VmHWM"].split()[0]) / 2**20,
                      peak_anon_gb=peak["anon"], peak_file_gb=peak["file"])))
"""


def sd15_shapes():
    """{original key: shape} of SD 1.5 (v1-5-pruned-emaonly layout), from meta-device diffusers models."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from ldm_reference import ldm_state_dict

    with torch.device("meta"):
        pipe = type("Pipe", (), dict(
            unet=UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
            vae=AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
            text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=768,
                                                      intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12, hidden_act="quick_gelu"))))
    return {k: tuple(v.shape) for k, v in ldm_state_dict(pipe, "sd1").items() if v.is_floating_point()}


def write_safetensors(shapes, path):
    """A random fp32 safetensors file written one tensor at a time (never the whole model in memory)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[key] = dict(dtype="F32", shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        for shape in shapes.values():
            file.write((rng.standard_normal(shape, dtype=np.float32) * 0.02).tobytes())


def write_ckpt(safetensors_path, path):
    """The same tensors as a Lightning-style `.ckpt` ({"state_dict": ...}, zip pickle)."""
    import torch
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(safetensors_path), "global_step": 840000}, path)


def warm_page_cache(path):
    """Reads the file (or a folder's files) once, so that every load starts with it in the page cache."""
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as handle:
                while handle.read(2**26):
                    pass


def measure(*args):
    warm_page_cache(args[1])
    output = subprocess.run([sys.executable, "-c", MEASURE, *map(str, args)], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def converts_within(path, factor, workdir):
    """Converts `path` in a memory cgroup of `factor` times the file's size: (completed, seconds)."""
    from benchmarks.memory import cgroup_with_limit

    group, _, enter = cgroup_with_limit(int(factor * path.stat().st_size), name="sd-convert-benchmark")
    bundle, start = workdir / "bundle-limited", time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "stable_diffusion.convert", str(path), str(bundle)], cwd=ROOT,
                         capture_output=True, preexec_fn=enter)
    seconds = time.perf_counter() - start
    shutil.rmtree(bundle, ignore_errors=True)
    group.rmdir()
    return run.returncode == 0, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sd-convert-bench"),
                        help="where the checkpoints (kept for reruns) and bundles go")
    parser.add_argument("--repeats", type=int, default=3, help="loads of each format, interleaved; medians reported")
    parser.add_argument("--memory-limit-factor", type=float, metavar="F",
                        help="also convert each file in a memory cgroup of F times its size (needs root)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    shapes = sd15_shapes()
    size_gb = 4 * sum(int(np.prod(s)) for s in shapes.values()) / 2**30
    free_gb = shutil.disk_usage(args.workdir).free / 2**30
    if free_gb < 4 * size_gb:
        sys.exit(f"{args.workdir} has {free_gb:.1f} GiB free; the benchmark needs {4 * size_gb:.1f} GiB.")
    files = dict(safetensors=args.workdir / "sd15.safetensors", ckpt=args.workdir / "sd15.ckpt")
    for kind, write in (("safetensors", lambda path: write_safetensors(shapes, path)),
                        ("ckpt", lambda path: write_ckpt(files["safetensors"], path))):
        if not files[kind].exists():  # written under a temporary name: an existing file is complete
            partial = files[kind].with_name(f".{files[kind].name}.partial")
            write(partial)
            partial.rename(files[kind])
    print(f"{len(shapes)} tensors, {size_gb:.2f} GiB per file")
    converted = {}
    for kind, path in files.items():
        shutil.rmtree(args.workdir / f"bundle-{kind}", ignore_errors=True)
        converted[kind] = measure("convert", path, args.workdir / f"bundle-{kind}")
        print("convert", kind, converted[kind])
    sources = {**files, "bundle": args.workdir / "bundle-safetensors"}
    loads = {kind: [] for kind in sources}
    for _ in range(args.repeats):  # interleaved: this machine's speed drifts between runs
        for kind, path in sources.items():
            loads[kind].append(measure("load", path))
            print("load", kind, loads[kind][-1])
    loaded = {kind: {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
              for kind, runs in loads.items()}
    lines = [SECTION, "",
             f"Random-weight SD 1.5 in the v1-5-pruned-emaonly layout ({len(shapes)} fp32 tensors, "
             f"{size_gb:.2f} GiB), `{' '.join(['python -m benchmarks.convert', *sys.argv[1:]])}`, "
             f"{time.strftime('%Y-%m-%d')}, {len(os.sched_getaffinity(0))} cores of an {cpu()}, TensorFlow "
             "backend, each step in a fresh process. "
             "load: `StableDiffusion.from_checkpoint` (reading the file, building the Keras models and creating "
             "every variable from its tensor); first read: then summing every variable once (a bundle's variables "
             "are views of its memory-mapped files, whose pages are read on first use); save: writing the bundle. "
             "Peak RSS is VmHWM; anon / file: peak resident anonymous memory and pages of memory-mapped files "
             "(the checkpoint or bundle; reclaimable), sampled every 50 ms. Each file is read once before its "
             f"step: every step starts with it in the page cache. Loads: medians of {args.repeats} runs, "
             "interleaved.", "",
             "| step | load s | first read s | save s | peak RSS GiB (x file) | peak anon GiB | peak file-backed GiB |",
             "|---|---|---|---|---|---|---|"]
    steps = [(f"{step} .{kind}", m) for kind in files for step, m in (("convert", converted[kind]), ("load", loaded[kind]))]
    for step, m in steps + [("load bundle", loaded["bundle"])]:
        lines.append(f"| {step} | {m['load']:.1f} | {m['first_read']:.1f} | {m['save']:.1f} | "
                     f"{m['peak_rss_gb']:.2f} ({m['peak_rss_gb'] / size_gb:.2f}x) | {m['peak_anon_gb']:.2f} | "
                     f"{m['peak_file_gb']:.2f} |")
    both = lambda m: m["load"] + m["first_read"]

    def speedup(kind, seconds):
        """Bundle vs `kind`: ratio of the medians, and the range of the per-run ratios."""
        per_run = [seconds(original) / seconds(bundle) for original, bundle in zip(loads[kind], loads["bundle"])]
        median = seconds(loaded[kind]) / seconds(loaded["bundle"])
        return f"{median:.1f}x ({min(per_run):.1f}-{max(per_run):.1f}x per run)"

    load = lambda m: m["load"]
    lines += ["", f"Loading the bundle: {speedup('safetensors', load)} faster than the .safetensors, "
              f"{speedup('ckpt', load)} than the .ckpt; with the first read of every weight, "
              f"{speedup('safetensors', both)} and {speedup('ckpt', both)}.", "",
              "Load per run, in order: " + "; ".join(
                  f"{kind} " + ", ".join(f"{run['load']:.1f}" for run in runs) + " s" for kind, runs in loads.items()) + ".",
              ""]
    if args.memory_limit_factor:
        within = {kind: converts_within(path, args.memory_limit_factor, args.workdir) for kind, path in files.items()}
        print("within limit", within)
        lines += [f"Converting in a memory cgroup of {args.memory_limit_factor}x the file's size (page cache dropped "
                  "first, then charged to the group): " + ", ".join(
                      f".{kind} {f'completes in {seconds:.0f} s' if ok else 'is killed'}"
                      for kind, (ok, seconds) in within.items()) + ".", ""]
    replace_section(SECTION, "\n".join(lines[1:]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
