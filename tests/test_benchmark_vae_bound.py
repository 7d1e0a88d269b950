"""benchmarks/vae_bound.py: a VAE that gave back its input would score 100%; a checkpoint's run lands in RESULTS."""
from types import SimpleNamespace

from benchmarks import vae_bound
from benchmarks.adherence import scores_by_size
from reference import TINY_CONFIG
from stable_diffusion import StableDiffusion
from stable_diffusion.data import make_dataset


def test_a_lossless_vae_keeps_every_attribute(monkeypatch):
    images, captions = make_dataset(60, seed=vae_bound.SEED)
    monkeypatch.setattr(vae_bound, "encode_latents", lambda encoder, images, scaling_factor: images)
    lossless = SimpleNamespace(encoder=None, decoder=SimpleNamespace(scaling_factor=1.0), decode=lambda x: x)
    scores = scores_by_size(vae_bound.reconstruct(lossless, images), captions)["all"]
    assert scores["count"] == 60 and scores["blank"] == 0
    assert [scores[column] for column in ("color", "shape", "background", "size", "all")] == [1.0] * 5


def test_a_run_appends_its_table(tmp_path, capsys):
    StableDiffusion(32, 32, config=TINY_CONFIG).save(tmp_path / "tiny")
    results = tmp_path / "RESULTS.md"
    vae_bound.main(["--checkpoint", str(tmp_path / "tiny"), "--num-images", "4", "--results", str(results)])
    text = results.read_text()
    assert "## What the VAE keeps (`benchmarks/vae_bound.py`)" in text
    assert f"make_dataset(4, seed={vae_bound.SEED})" in text and "| all prompts | 4 |" in text
