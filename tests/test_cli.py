"""The command line (`python -m stable_diffusion`) on a tiny random-weight bundle: PNGs with their
settings as metadata, reproducible seeds, no overwriting, one-line errors that write nothing, one-line
warnings."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import stable_diffusion
from reference import TINY_CONFIG
from stable_diffusion import StableDiffusion, presets
from stable_diffusion.__main__ import DEMO_NOTICE, main
from stable_diffusion.data import GRAMMAR

PROG = "python -m stable_diffusion"
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
    assert err.strip() == DEMO_NOTICE
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
    assert "out-1.png exists" in err and "--overwrite" in err
    assert (workdir / "out-1.png").read_bytes() == b"keep me"
    assert sorted(p.name for p in workdir.iterdir()) == ["out-1.png"]


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: prompt"),
    (["  "], "the prompt is empty"),
    (["a", "--steps", "0"], "--steps: expected an integer >= 1"),
    (["a", "--steps", "two"], "--steps: expected an integer"),
    (["a", "--guidance", "nan"], "--guidance: expected a number >= 0"),
    (["a", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["a", "--seed", "-1"], "--seed: expected an integer >= 0"),
    (["a", "--scheduler", "plms"], "--scheduler: invalid choice: 'plms'"),
    (["a", "--height", "30"], "--height: expected an integer >= 8 and a multiple of 8"),
    (["a", "--width", "0"], "--width: expected an integer >= 8"),
    (["a", "-o", "missing/out.png"], "does not exist"),
    (["a", "-o", "out.jpg"], "must be a .png file"),
    (["a", "--checkpoint", "missing"], "no checkpoint at 'missing'"),
    (["a", "--checkpoint", "."], "is not a checkpoint this library reads"),
    (["a", "--unknown"], "unrecognized arguments: --unknown"),
])
def test_bad_arguments_exit_with_one_line_and_no_file(argv, message, workdir, capsys):
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
    (["--init-image", "in.png", "--mask", "small.png"], "mask is 16x16 pixels but image is 32x32"),
    (["--init-image", "small.png"], "image is 16x16 pixels but this pipeline makes 32x32"),
])
def test_bad_pictures_exit_with_one_line_and_no_file(extra, message, bundle, workdir, capsys):
    Image.new("RGB", (32, 32)).save("in.png")
    Image.new("L", (16, 16)).save("small.png")
    err = run_failing(["a cat", "--checkpoint", str(bundle), "--steps", "1", *extra], capsys)
    assert re.search(message, err), err
    assert not Path("out.png").exists()


def test_vae_tiling(bundle, workdir, capsys):
    main(["a cat", "--checkpoint", str(bundle), "--steps", "1", "--height", "64", "--width", "48", "--vae-tiling", "32"])
    with Image.open(workdir / "out.png") as image:
        assert image.size == (48, 64)
    err = run_failing(["a cat", "--checkpoint", str(bundle), "--vae-tiling", "0", "--overwrite"], capsys)
    assert "tile_size must be a multiple of" in err


def test_int8(bundle, workdir):
    main(["a cat", "--checkpoint", str(bundle), "--steps", "2", "--seed", "4", "--int8"])
    expected = StableDiffusion.from_checkpoint(bundle, jit_compile=False, quantize="int8").text_to_image(
        "a cat", num_steps=2, seed=4, verbose=False)
    with Image.open(workdir / "out.png") as image:
        assert image.text["model"] == f"{bundle}, int8"
        np.testing.assert_array_equal(np.asarray(image), expected[0])


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


def run_module(args, cwd):
    """Runs `python -m stable_diffusion` in a fresh interpreter."""
    root = str(Path(stable_diffusion.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "stable_diffusion", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_module_entry_point(bundle, workdir):
    done = run_module(["a green square", "--checkpoint", str(bundle), "--steps", "2", "--seed", "3",
                       "--scheduler", "euler"], workdir)
    assert done.returncode == 0, done.stderr
    assert "Seed 3" in done.stdout and "Wrote out.png" in done.stdout
    assert DEMO_NOTICE not in done.stderr
    with Image.open(workdir / "out.png") as image:
        assert image.size == (32, 32) and image.text["model"] == str(bundle)
        assert (image.text["seed"], image.text["scheduler"]) == ("3", "euler")

    done = run_module(["a green square", "--checkpoint", str(bundle), "--steps", "0"], workdir)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    # TensorFlow may log to stderr when imported; the CLI's own message is the one last line.
    errors = [line for line in done.stderr.splitlines() if line.startswith(PROG)]
    assert errors == [done.stderr.splitlines()[-1]] and "--steps" in errors[0]


def test_words_outside_the_models_grammar_warn_in_one_line(bundle, workdir, capsys):
    shutil.copytree(bundle, workdir / "shapes")  # the tiny bundle, as the demo model's config says
    config = json.loads((workdir / "shapes/config.json").read_text())
    (workdir / "shapes/config.json").write_text(json.dumps(dict(config, grammar=GRAMMAR)))
    main(["a large red circle on a yellow background", "--checkpoint", "shapes", "--steps", "1"])
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{PROG}: warning: This model knows only prompts of the form ")
    assert err.endswith("background: white, black, gray), not 'yellow' as a background.\n")
