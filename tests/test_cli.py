"""The command line (`python -m stable_diffusion`) on a tiny random-weight bundle: PNGs with their
settings as metadata, reproducible seeds, no overwriting, one-line errors that write nothing, checked
before the model loads; one-line warnings; outputs that appear whole or not at all; Ctrl-C; a quick,
quiet start; SDXL's micro-conditioning flags on conftest's tiny SDXL folder."""
import errno
import inspect
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

import stable_diffusion
from reference import TINY_CONFIG
from stable_diffusion import StableDiffusion, presets
from stable_diffusion import __main__ as cli
from stable_diffusion.__main__ import DEMO_NOTICE, main
from stable_diffusion.data import GRAMMAR
from stable_diffusion.weights import named_variables

PROG = "python -m stable_diffusion"
PROGRESS = re.compile(r"denoising: \d+/\d+, \d+\.\d s$")  # our progress lines on stderr
VOCABULARY = "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random-weight bundle saved with `StableDiffusion.save`."""
    path = tmp_path_factory.mktemp("checkpoints") / "tiny"
    StableDiffusion(img_height=32, img_width=32, config=TINY_CONFIG).save(path)
    return path


@pytest.fixture
def demo(bundle, tmp_path, monkeypatch):
    """Makes the tiny bundle the built-in demo model (`assets/demo`), the vocabulary still shipped."""
    assets = tmp_path / "assets"
    shutil.copytree(bundle, assets / "demo")
    (assets / VOCABULARY).symlink_to(presets.asset(VOCABULARY))
    monkeypatch.setattr(presets, "ASSETS", assets)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current folder, so a stray default `out.png` would show up."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def run_failing(argv, capsys):
    """Runs `main(argv)` expecting a bad-argument exit; returns its one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{PROG}: error: ")
    return err


def test_writes_pngs_with_metadata_reproducibly(demo, workdir, capsys):
    main(["a red circle", "-o", "shape.png", "--negative-prompt", "blue", "--steps", "2", "--guidance", "3",
          "--seed", "7", "--batch-size", "2"])
    out, err = capsys.readouterr()
    notice, *progress = [line for line in err.splitlines() if not line.startswith(f"{PROG}: warning: ")]
    assert notice == DEMO_NOTICE and progress and all(PROGRESS.match(line) for line in progress), err
    assert "Seed 7" in out
    assert sorted(p.name for p in workdir.iterdir()) == ["shape-0.png", "shape-1.png"]
    first = []
    for index in range(2):
        with Image.open(workdir / f"shape-{index}.png") as image:
            assert (image.format, image.size, image.mode) == ("PNG", (32, 32), "RGB")
            assert image.text == dict(prompt="a red circle", negative_prompt="blue", seed=str(7 + index),
                                      steps="2", guidance="3.0", scheduler="ddim", height="32", width="32",
                                      model="built-in demo")
            first.append(np.asarray(image))
    assert not np.array_equal(*first)

    # The second image's stored settings make it again on its own, over the first file.
    main(["a red circle", "-o", "shape-0.png", "--negative-prompt", "blue", "--steps", "2", "--guidance", "3",
          "--seed", "8", "--overwrite"])
    with Image.open(workdir / "shape-0.png") as image:
        # batch sizes round differently (~1e-6 in float), as in test_pipeline
        assert np.abs(np.asarray(image).astype(int) - first[1]).max() <= 1


def test_refuses_to_overwrite(bundle, workdir, capsys):
    (workdir / "out-1.png").write_bytes(b"keep me")
    err = run_failing(["a red circle", "--checkpoint", str(bundle), "--batch-size", "2"], capsys)
    assert "out-1.png exists; pass --overwrite to replace it" in err
    assert (workdir / "out-1.png").read_bytes() == b"keep me"
    assert sorted(p.name for p in workdir.iterdir()) == ["out-1.png"]


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: prompt"),
    (["  "], "the prompt is empty"),
    (["a", "--steps", "0"], "--steps must be an integer between 1 and 1000, got 0"),
    (["a", "--steps", "1001"], "--steps must be an integer between 1 and 1000, got 1001"),
    (["a", "--steps", "two"], "--steps: expected an integer, got 'two'"),
    (["a", "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["a", "--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["a", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["a", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["a", "--seed", "1.5"], "--seed: expected an integer, got '1.5'"),
    (["a", "--scheduler", "plms"], "--scheduler: invalid choice: 'plms'"),
    (["a", "--height", "30"], "--height must be a positive multiple of 8, got 30"),
    (["a", "--width", "0"], "--width must be a positive multiple of 8, got 0"),
    (["a", "--vae-tiling", "7"], "--vae-tiling must be a multiple of 8 pixels, at least 32, got 7"),
    (["a", "--init-image", "x.png", "--strength", "0.01"], "--strength 0.01 leaves no step of 50; raise --strength or --steps"),
    (["a", "--strength", "0.5"], "error: --mask and --strength need --init-image (see --help)"),
    (["a", "-o", "missing/out.png"], "does not exist"),
    (["a", "-o", "out.jpg"], "must be a .png file"),
    (["a", "--checkpoint", "missing"], "no checkpoint at 'missing'"),
    (["a", "--unknown"], "unrecognized arguments: --unknown"),
    (["a", "--lora", "missing.safetensors:0.5"], "--lora: no file at 'missing.safetensors'"),
    (["a", "--lora", "style.safetensors:nan"], "--lora: expected PATH[:SCALE] with a finite SCALE, got 'style"),
    (["a", "--original-size", "0", "64"], "--original-size must be an integer >= 1, got 0"),
    (["a", "--negative-crops-coords-top-left", "-1", "0"], "--negative-crops-coords-top-left must be an integer >= 0"),
    (["a", "--target-size", "64"], "--target-size: expected 2 arguments"),
    (["a", "--aesthetic-score", "nan"], "--aesthetic-score must be a finite number, got nan"),
])
def test_bad_arguments_exit_with_one_line_and_no_file(argv, message, workdir, capsys, monkeypatch):
    """Why 1, 9: flag names, not the API's keywords; reported before the model loads."""
    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model loaded before the arguments were checked"))
    err = run_failing(argv, capsys)
    assert message in err
    assert list(workdir.iterdir()) == []


def test_image_to_image_and_inpainting(bundle, workdir, capsys):
    picture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(picture).save("in.png")
    Image.fromarray(mask).save("mask.png")
    common = ["a cat", "--checkpoint", str(bundle), "--steps", "2", "--seed", "3"]
    main([*common, "--init-image", "in.png", "--strength", "0.5", "-o", "a.png"])
    main([*common, "--init-image", "in.png", "--mask", "mask.png", "-o", "b.png"])
    sd = StableDiffusion.from_checkpoint(bundle, jit_compile=False)
    expected = sd.image_to_image("a cat", picture, strength=0.5, num_steps=2, seed=3, negative_prompt="", verbose=False)
    assert np.abs(np.asarray(Image.open("a.png")).astype(int) - expected[0]).max() <= 1
    with Image.open("b.png") as image:
        assert (image.text["init_image"], image.text["mask"], image.size) == ("in.png", "mask.png", (32, 32))


@pytest.mark.parametrize("extra, message", [
    (["--init-image", "missing.png"], "Cannot read image 'missing.png'"),
    (["--init-image", "in.png", "--strength", "0"], r"--strength must be in \(0, 1\]"),
    (["--init-image", "in.png", "--strength", "1.5"], r"--strength must be in \(0, 1\]"),
    (["--mask", "in.png"], "need --init-image"),
    (["--init-image", "in.png", "--mask", "small.png"],
     r"mask is 16x16 pixels \(height x width\) but image is 32x32 pixels \(height x width\)"),
    (["--init-image", "small.png"], r"image is 16x16 pixels \(height x width\) but this pipeline makes 32x32 pixels"
                                    r" \(height x width\) images; resize it, or load the pipeline with --height 16, "
                                    r"--width 16"),
    (["--init-image", "in.png", "--strength", "0.3", "--steps", "3"], "--strength 0.3 leaves no step of 3"),
])
def test_bad_pictures_exit_with_one_line_and_no_file(extra, message, bundle, workdir, capsys):
    Image.new("RGB", (32, 32)).save("in.png")
    Image.new("L", (16, 16)).save("small.png")
    err = run_failing(["a cat", "--checkpoint", str(bundle), "--steps", "10", *extra], capsys)
    assert re.search(message, err), err
    assert not Path("out.png").exists()


def test_micro_conditioning_flags_give_sdxls_keywords():
    args = cli.build_parser().parse_args(["a", "--original-size", "1", "2", "--crops-coords-top-left", "3", "4",
                                          "--target-size", "5", "6", "--negative-original-size", "7", "8",
                                          "--negative-crops-coords-top-left", "9", "10", "--negative-target-size", "11",
                                          "12", "--aesthetic-score", "6.5", "--negative-aesthetic-score", "2"])
    assert cli.micro_conditioning(args) == dict(
        original_size=[1, 2], crops_coords_top_left=[3, 4], target_size=[5, 6], negative_original_size=[7, 8],
        negative_crops_coords_top_left=[9, 10], negative_target_size=[11, 12], aesthetic_score=6.5,
        negative_aesthetic_score=2.0)


@pytest.mark.slow  # two SDXL generations; the flags' keywords are checked above by default
def test_micro_conditioning_flags_reach_the_sdxl_pipeline(sdxl, workdir, monkeypatch):
    """The image of an SDXL folder with the flags is the API call's with those keywords (which change it), and its
    PNG stores them as the flags take them."""
    pipe, folder, ours = sdxl
    sd = ours(False)
    monkeypatch.setattr(cli, "load", lambda args: sd)  # the folder, as conftest's fixture loaded it
    main(["a red circle", "--checkpoint", str(folder), "--steps", "2", "--seed", "3", "--original-size", "40", "56",
          "--crops-coords-top-left", "8", "16", "--target-size", "48", "32", "--negative-original-size", "24", "24",
          "--negative-target-size", "64", "64"])
    options = dict(negative_prompt="", num_steps=2, seed=3, verbose=False)
    expected = sd.text_to_image("a red circle", original_size=(40, 56), crops_coords_top_left=(8, 16),
                                target_size=(48, 32), negative_original_size=(24, 24), negative_target_size=(64, 64),
                                **options)
    assert np.abs(expected.astype(int) - sd.text_to_image("a red circle", **options)).max() > 1, "no change"
    with Image.open(workdir / "out.png") as image:
        assert np.abs(np.asarray(image).astype(int) - expected[0]).max() <= 1
        assert (image.text["original_size"], image.text["negative_target_size"]) == ("40 56", "64 64")


def test_micro_conditioning_refused_on_a_model_without_it(bundle, workdir, capsys):
    err = run_failing(["a cat", "--checkpoint", str(bundle), "--steps", "2", "--original-size", "32", "32"], capsys)
    assert "error: --original-size is SDXL's micro-conditioning; this pipeline's UNet takes no time ids" in err
    assert list(workdir.iterdir()) == []


def test_vae_tiling(bundle, workdir, capsys):
    main(["a cat", "--checkpoint", str(bundle), "--steps", "1", "--height", "64", "--width", "48", "--vae-tiling", "32"])
    with Image.open(workdir / "out.png") as image:
        assert image.size == (48, 64)
    capsys.readouterr()
    err = run_failing(["a cat", "--checkpoint", str(bundle), "--vae-tiling", "0", "--overwrite"], capsys)
    assert "--vae-tiling must be a multiple of 8 pixels, at least 32, got 0" in err


def test_not_a_checkpoint(workdir, capsys):
    err = run_failing(["a", "--checkpoint", "."], capsys)
    assert "is not a checkpoint this library reads" in err
    assert list(workdir.iterdir()) == []


def tiny_lora(path, sd):
    """A kohya LoRA file of every Dense and Conv2D of `sd`'s UNet, random, rank 2."""
    rng, tensors = np.random.default_rng(0), {}
    for key, variable in named_variables(sd.diffusion_model).items():
        if variable.name == "kernel":  # Keras (in, out) or (kh, kw, in, out)
            *kernel, fan_in, out = variable.shape
            name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = rng.standard_normal((2, fan_in, *kernel), dtype=np.float32)
            tensors[f"{name}.lora_up.weight"] = rng.standard_normal((out, 2, *[1] * len(kernel)), dtype=np.float32) / 10
    save_file(tensors, path)
    return path


def test_lora_flags(bundle, workdir, capsys):
    sd = StableDiffusion.from_checkpoint(bundle, jit_compile=False)
    lora = tiny_lora(workdir.parent / "style.safetensors", sd)
    base = sd.text_to_image("a cat", negative_prompt="", num_steps=2, seed=3, verbose=False)
    main(["a cat", "--checkpoint", str(bundle), "--steps", "2", "--seed", "3", "--lora", f"{lora}:0.5",
          "--lora", str(lora)])
    sd.load_lora(lora, scale=0.5)
    sd.load_lora(lora)
    expected = sd.text_to_image("a cat", negative_prompt="", num_steps=2, seed=3, verbose=False)
    assert np.abs(expected.astype(int) - base).max() > 10, "the LoRA hardly changes the image"
    with Image.open(workdir / "out.png") as image:
        assert np.abs(np.asarray(image).astype(int) - expected[0]).max() <= 1
        assert image.text["lora"] == f"{lora}:0.5 {lora}:1.0"
    other = workdir.parent / "other.safetensors"
    save_file({"lora_unet_foo.lora_down.weight": np.ones((2, 4), np.float32)}, other)
    capsys.readouterr()  # the progress lines of the run above
    err = run_failing(["a cat", "--checkpoint", str(bundle), "-o", "other.png", "--lora", str(other)], capsys)
    assert "does not fit this model" in err and "lora_unet_foo: no such layer" in err
    assert not (workdir / "other.png").exists()


def test_embeddings_and_clip_skip(bundle, workdir, capsys):
    """`--embedding` (repeatable) and `--clip-skip` give the API's image and are stored in the PNG."""
    paths = [workdir.parent / "charm.pt", workdir.parent / "shimmerz.pt"]
    for index, path in enumerate(paths):
        torch.save({"string_to_param": {"*": torch.randn(index + 1, 8)}, "name": path.stem}, path)
    main(["a charm, shimmerz", "--checkpoint", str(bundle), "--steps", "2", "--seed", "3", "--clip-skip", "1",
          *(argument for path in paths for argument in ("--embedding", str(path)))])
    with Image.open(workdir / "out.png") as image:
        assert (image.text["clip_skip"], image.text["embedding"]) == ("1", " ".join(map(str, paths)))
        got = np.asarray(image)
    sd = StableDiffusion.from_checkpoint(bundle, jit_compile=False)
    for path in paths:
        sd.load_textual_inversion(path)
    expected = sd.text_to_image("a charm, shimmerz", num_steps=2, seed=3, clip_skip=1, verbose=False)[0]
    assert np.abs(got.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("extra, message", [
    (["--embedding", "wide.safetensors"], "holds an embedding of width 16; this model's text encoder is 8 wide"),
    (["--clip-skip", "2"], "--clip-skip must be None or an integer from 0 to 1"),
    (["--clip-skip", "-1"], "--clip-skip must be an integer >= 0, got -1"),
])
def test_bad_embeddings_and_clip_skip(extra, message, bundle, workdir, capsys):
    save_file({"emb_params": np.zeros((1, 16), np.float32)}, "wide.safetensors")
    err = run_failing(["a cat", "--checkpoint", str(bundle), "--steps", "10", *extra], capsys)
    assert message in err
    assert not Path("out.png").exists()


@pytest.mark.parametrize("content, message", [(None, "--embedding: no file at 'e.pt'"),
                                              (b"text", "e.pt is not a readable .ckpt")])
def test_embedding_files_are_checked_before_the_model_loads(content, message, bundle, workdir, capsys, monkeypatch):
    if content:
        Path("e.pt").write_bytes(content)
    monkeypatch.setattr(StableDiffusion, "from_checkpoint", None)  # loading the model would raise TypeError
    err = run_failing(["a cat", "--checkpoint", str(bundle), "--embedding", "e.pt"], capsys)
    assert message in err


def test_int8(bundle, workdir):
    main(["a cat", "--checkpoint", str(bundle), "--steps", "2", "--seed", "4", "--int8"])
    expected = StableDiffusion.from_checkpoint(bundle, jit_compile=False, quantize="int8").text_to_image(
        "a cat", num_steps=2, seed=4, verbose=False)
    with Image.open(workdir / "out.png") as image:
        assert image.text["model"] == f"{bundle}, int8"
        np.testing.assert_array_equal(np.asarray(image), expected[0])


def test_numpy_loop_flag_turns_the_compiled_loop_off(bundle):
    for flags, compiled in (([], True), (["--numpy-loop"], False)):
        sd = cli.load(cli.build_parser().parse_args(["a cat", "--checkpoint", str(bundle), "--xla", *flags]))
        assert (sd.denoise_loop is not None) == compiled, flags


def test_incomplete_bundle(bundle, workdir, capsys):
    broken = workdir.parent / "broken"
    shutil.copytree(bundle, broken)
    (broken / "diffusion_model.safetensors").unlink()
    err = run_failing(["a", "--checkpoint", str(broken)], capsys)
    assert "diffusion_model.safetensors" in err and "incomplete" in err
    assert list(workdir.iterdir()) == []


def test_missing_demo_model(workdir, monkeypatch, capsys):
    monkeypatch.setattr(presets, "ASSETS", workdir.parent / "no-assets")
    err = run_failing(["a red circle"], capsys)
    assert "the built-in demo model is not installed" in err and "--checkpoint PATH" in err
    assert list(workdir.iterdir()) == []


def module_command(args, cwd):
    """The command and keywords that run `python -m stable_diffusion` in a fresh interpreter, with the
    environment of a new user (no TensorFlow logging settings of ours)."""
    root = str(Path(stable_diffusion.__file__).parents[1])
    env = {key: value for key, value in os.environ.items() if not key.startswith("TF_CPP")}
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    return [sys.executable, "-m", "stable_diffusion", *args], dict(cwd=cwd, env=env, text=True)


def run_module(args, cwd):
    """Runs `python -m stable_diffusion` in a fresh interpreter."""
    command, options = module_command(args, cwd)
    return subprocess.run(command, capture_output=True, timeout=300, **options)


def test_module_entry_point(bundle, workdir):
    """Why 8: stderr holds our warning and progress lines and nothing from TensorFlow or absl; no
    control characters when it is not a terminal (nor in stdout)."""
    done = run_module(["a green square", "--checkpoint", str(bundle), "--steps", "2", "--seed", "3",
                       "--scheduler", "euler"], workdir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Seed 3; 2 euler steps, guidance 7.5, 32x32.", "Wrote out.png"]
    warning, *progress = done.stderr.splitlines()
    assert warning == (f"{PROG}: warning: --scheduler 'euler' with --steps 2 gives poor images; it needs about 10 "
                       f"steps or more (or use another --scheduler).")
    assert progress and all(PROGRESS.match(line) for line in progress), done.stderr
    assert not re.search(r"[\r\b\x1b]", done.stdout + done.stderr)
    with Image.open(workdir / "out.png") as image:
        assert image.size == (32, 32) and image.text["model"] == str(bundle)
        assert (image.text["seed"], image.text["scheduler"]) == ("3", "euler")

    done = run_module(["a green square", "--checkpoint", str(bundle), "--steps", "0"], workdir)
    assert done.returncode == 2
    assert done.stderr == f"{PROG}: error: --steps must be an integer between 1 and 1000, got 0 (see --help)\n"


def test_words_outside_the_models_grammar_warn_in_one_line(bundle, workdir, capsys):
    shutil.copytree(bundle, workdir / "shapes")  # the tiny bundle, as the demo model's config says
    config = json.loads((workdir / "shapes/config.json").read_text())
    (workdir / "shapes/config.json").write_text(json.dumps(dict(config, grammar=GRAMMAR)))
    main(["a large red circle on a yellow background", "--checkpoint", "shapes", "--steps", "10"])
    err = "".join(line + "\n" for line in capsys.readouterr().err.splitlines() if not PROGRESS.match(line))
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{PROG}: warning: This model knows only prompts of the form ")
    assert err.endswith("background: white, black, gray), not 'yellow' as a background.\n")


def test_help_and_argument_errors_are_quick_and_import_no_tensorflow(workdir):
    """Why 8: --help and argument errors come before TensorFlow / Keras are imported: under 1 s. Timed in
    CPU seconds of the child process, which other jobs on this shared machine do not inflate (its wall
    time was 0.3 s idle, 1.1 s at a load average of 9 on 2 cores)."""
    for argv in (["--help"], ["a", "--steps", "0"]):
        command, options = module_command(argv, workdir)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(command, capture_output=True, timeout=60, **options)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert done.returncode == (0 if argv == ["--help"] else 2) and "Traceback" not in done.stderr
        seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        assert seconds < 1, f"{argv}: {seconds:.2f} CPU s"
    probe = ("import sys; from stable_diffusion.__main__ import main\n"
             "try:\n    main(['a', '--steps', '0'])\nexcept SystemExit:\n    pass\n"
             "print(sorted({'keras', 'tensorflow', 'keras_hub', 'jax', 'torch'} & set(sys.modules)))")
    command, options = module_command([], workdir)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60, **options)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_help_states_the_pipeline_defaults():
    from stable_diffusion.stable_diffusion import StableDiffusion as Pipeline
    parameters = inspect.signature(Pipeline.text_to_image).parameters
    assert (cli.STEPS, cli.GUIDANCE) == (parameters["num_steps"].default, parameters["unconditional_guidance_scale"].default)
    assert cli.build_parser().get_default("steps") == cli.STEPS


@pytest.mark.parametrize("output, overwrite, message", [
    ("/proc/x.png", False, "cannot write in the folder of /proc/x.png: No such file or directory"),
    ("/sys/x.png", False, "cannot write in the folder of /sys/x.png: Permission denied"),  # read-only, even for root
    ("taken.png", True, "taken.png is a folder"),
])
def test_unwritable_output_refused_before_the_model_loads(output, overwrite, message, workdir, capsys, monkeypatch):
    """Why 4: output errors come before any work, not as a traceback after it."""
    (workdir / "taken.png").mkdir()
    monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model loaded before the output was checked"))
    err = run_failing(["a", "-o", output, *(["--overwrite"] if overwrite else [])], capsys)
    assert message in err, err
    assert [p.name for p in workdir.iterdir()] == ["taken.png"] and not list((workdir / "taken.png").iterdir())


def test_huge_size_refused_by_its_memory_before_any_work(bundle, workdir, capsys, monkeypatch):
    """Why 3: an image size whose activations cannot fit is refused with the estimate and the memory
    available, in flag names, before any noise is drawn."""
    monkeypatch.delenv("STABLE_DIFFUSION_MEMORY_GIB", raising=False)
    err = run_failing(["a", "--checkpoint", str(bundle), "--height", "100000", "--width", "100000"], capsys)
    assert re.search(r"an image of --height 100000, --width 100000 needs at least [\d.]+ [GT]iB of memory, more "
                     r"than the [\d.]+ GiB available; .* set STABLE_DIFFUSION_MEMORY_GIB", err), err
    assert list(workdir.iterdir()) == []


def failing_disk(folder, monkeypatch):
    """Makes PNG writes into `folder` fail as on a full disk, after writing part of the file."""
    write = cli.write_png

    def write_png(image, settings, file):
        if isinstance(file, Path) and file.resolve().parent == folder.resolve():
            file.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(image, settings, file)

    monkeypatch.setattr(cli, "write_png", write_png)


def test_write_failure_keeps_the_image_elsewhere_and_the_old_file(bundle, workdir, tmp_path, capsys, monkeypatch):
    """Why 4: on a full disk the finished image is saved in the temporary folder, the message says
    where, the earlier PNG stays whole, and no truncated or temporary file is left."""
    (workdir / "out.png").write_bytes(b"the earlier image")
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    failing_disk(workdir, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["a cat", "--checkpoint", str(bundle), "--steps", "1", "--seed", "5", "--overwrite"])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 1
    [saved] = list(spare.iterdir())
    assert err[-1] == (f"{PROG}: error: cannot write out.png (No space left on device); the image is saved as {saved}")
    with Image.open(saved) as image:
        assert image.text["seed"] == "5" and image.size == (32, 32)
    assert [p.name for p in workdir.iterdir()] == ["out.png"]
    assert (workdir / "out.png").read_bytes() == b"the earlier image"


def test_interrupt_exits_130_with_one_line_and_no_file(bundle, workdir):
    """Why 8: Ctrl-C during generation: exit status 130, one line on stderr (after the progress
    lines), no traceback and no partial file."""
    command, options = module_command(["a cat", "--checkpoint", str(bundle), "--steps", "1000", "--seed", "1"],
                                      workdir)
    # A shell starts background jobs with SIGINT ignored, which Python inherits; a terminal's Ctrl-C has the default.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.readline().startswith("Seed 1;")  # printed when generation starts
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if not PROGRESS.match(line)]
    assert lines == [f"{PROG}: interrupted"], err
    assert "Wrote" not in out and list(workdir.iterdir()) == []
