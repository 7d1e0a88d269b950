"""Training: a few `fit` steps of each stage on tiny models, fine-tuning a saved bundle, data folders.
.ci/run also runs the two stage tests on the JAX and torch backends."""
import json

import numpy as np
import pytest
from PIL import Image

from reference import TINY_CONFIG
from stable_diffusion import StableDiffusion
from stable_diffusion.data import make_dataset, write_folder
from stable_diffusion.decoder import Decoder
from stable_diffusion.encoder import Encoder
from stable_diffusion.train import VAETrainer, fine_tune, fit, load_folder, train_demo, train_diffusion

SIZE = 16


def snapshot(model):
    return [np.array(w) for w in model.get_weights()]


def changed(before, model):
    return any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))


def test_vae_stage_fits():
    images, _ = make_dataset(8, seed=0, image_size=SIZE)
    encoder = Encoder(SIZE, SIZE, **TINY_CONFIG["encoder"])
    decoder = Decoder(SIZE // 2, SIZE // 2, **TINY_CONFIG["decoder"])
    before = snapshot(encoder), snapshot(decoder)
    loss = fit(VAETrainer(encoder, decoder, seed=0), images, epochs=2, batch_size=4, learning_rate=1e-3)
    assert np.isfinite(loss)
    assert changed(before[0], encoder) and changed(before[1], decoder)


def test_diffusion_stage_fits_and_resumes(tmp_path):
    sd = StableDiffusion(SIZE, SIZE, config=TINY_CONFIG)
    images, captions = make_dataset(8, seed=0, image_size=SIZE)
    latents = np.random.default_rng(0).standard_normal((8, SIZE // 2, SIZE // 2, 4)).astype("float32")
    unet, text = snapshot(sd.diffusion_model), snapshot(sd.text_encoder)
    loss = train_diffusion(sd, latents, sd.tokenize(captions), epochs=2, batch_size=4, learning_rate=1e-3,
                           backup_dir=tmp_path / "backup", seed=0)
    assert np.isfinite(loss)
    assert changed(unet, sd.diffusion_model) and changed(text, sd.text_encoder)
    assert not (tmp_path / "backup").exists()  # removed once training completes


@pytest.mark.training
def test_train_demo_writes_a_loadable_bundle_and_resumes(tmp_path):
    config = dict(TINY_CONFIG, decoder=dict(TINY_CONFIG["decoder"], scaling_factor=1.0))
    options = dict(num_images=8, epochs=1, decoder_images=8, decoder_epochs=2, batch_size=4, vae_batch_size=4,
                   work_dir=tmp_path / "work", config=config, verbose=0)
    result = train_demo(tmp_path / "demo", **options)
    assert all(np.isfinite(result[stage]) for stage in ("vae_loss", "diffusion_loss", "decoder_loss"))
    saved = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert saved["decoder"]["scaling_factor"] == pytest.approx(result["scaling_factor"])
    resumed = train_demo(tmp_path / "demo", **options)  # stage 1 is read back, not retrained
    assert resumed["vae_loss"] == result["vae_loss"]
    sd = StableDiffusion.from_checkpoint(tmp_path / "demo")
    assert sd.img_height == 64  # make_dataset's image size
    assert sd.text_to_image("a red circle on a white background", num_steps=2, seed=0, verbose=False).shape == (
        1, 64, 64, 3)


@pytest.mark.training
def test_fine_tune_changes_only_the_unet(tmp_path):
    StableDiffusion(SIZE, SIZE, config=TINY_CONFIG).save(tmp_path / "base")
    images, captions = make_dataset(6, seed=1, image_size=SIZE)
    write_folder(tmp_path / "data", images, captions)
    result = fine_tune(tmp_path / "base", tmp_path / "data", tmp_path / "tuned", epochs=1, batch_size=3,
                       learning_rate=1e-3, verbose=0)
    assert result["num_images"] == 6 and np.isfinite(result["diffusion_loss"])
    base, tuned = (StableDiffusion.from_checkpoint(tmp_path / name) for name in ("base", "tuned"))
    assert changed(snapshot(base.diffusion_model), tuned.diffusion_model)
    for name in ("text_encoder", "encoder", "decoder"):
        assert not changed(snapshot(getattr(base, name)), getattr(tuned, name)), name


def test_load_folder_reads_sidecar_captions(tmp_path):
    images, captions = make_dataset(2, seed=0, image_size=SIZE)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption + "\n")
    loaded, texts = load_folder(tmp_path, SIZE, SIZE)
    np.testing.assert_array_equal(loaded, images)
    assert texts == captions


def test_bad_data_folders_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(tmp_path / "missing", SIZE, SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no captioned images"):
        load_folder(tmp_path / "empty", SIZE, SIZE)
    images, captions = make_dataset(2, seed=0, image_size=32)
    write_folder(tmp_path / "big", images, captions)
    with pytest.raises(ValueError, match="32x32 pixels"):
        load_folder(tmp_path / "big", SIZE, SIZE)
    Image.fromarray(images[0]).save(tmp_path / "empty" / "uncaptioned.png")
    with pytest.raises(ValueError, match="no .txt caption"):
        load_folder(tmp_path / "empty", 32, 32)

