"""Training: a few `fit` steps of each stage on tiny models, fine-tuning a saved bundle, data folders, the loss
against diffusers' training objective, LoRA training end to end (its step against PEFT: test_lora.py), textual
inversion (its file in diffusers: test_embeddings.py).
.ci/run also runs the two stage tests on the JAX and torch backends."""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from reference import TINY_CONFIG, nchw
from stable_diffusion import StableDiffusion, embeddings
from stable_diffusion.data import make_dataset, write_folder
from stable_diffusion.decoder import Decoder
from stable_diffusion.encoder import Encoder
from stable_diffusion.train import (DiffusionTrainer, Epochs, VAETrainer, edges, fine_tune, fit, initial_vectors,
                                    load_folder, main, to_unit_range, train_demo, train_diffusion, train_embedding,
                                    train_lora, train_textual_inversion)
from stable_diffusion.bundle import write_safetensors
from stable_diffusion.weights import named_variables

SIZE = 16
TOKEN_TABLE = "embeddings.token_embedding.weight"  # the text encoder's, by its transformers key


def snapshot(model):
    return [np.array(w) for w in model.get_weights()]


def changed(before, model):
    return any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.training
def test_vae_stage_fits():
    images, _ = make_dataset(8, seed=0, image_size=SIZE)
    encoder = Encoder(SIZE, SIZE, **TINY_CONFIG["encoder"])
    decoder = Decoder(SIZE // 2, SIZE // 2, **TINY_CONFIG["decoder"])
    before = snapshot(encoder), snapshot(decoder)
    loss = fit(VAETrainer(encoder, decoder, seed=0), images, epochs=2, batch_size=4, learning_rate=1e-3)
    assert np.isfinite(loss)
    assert changed(before[0], encoder) and changed(before[1], decoder)


def test_vae_loss_weighs_edges():
    """Plain L1 without edge weight; with it, the same error costs more on a shape's outline than on flat colour,
    and the weights average to 1 over an image, so the loss keeps L1's scale."""
    images = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    images[0, 4:12, 4:12] = 255  # a white square on black
    found = np.asarray(edges(to_unit_range(images)))[0, ..., 0]
    assert found[4, 4] == found[11, 8] == 1 and found[0, 0] == found[8, 8] == 0
    target = np.asarray(to_unit_range(images))
    moments = np.zeros((1, SIZE // 2, SIZE // 2, 4), np.float32)
    trainer = lambda weight: VAETrainer(None, None, edge_weight=weight)
    loss = lambda weight, error: float(trainer(weight).compute_loss(images, y_pred=(target + error, moments, moments)))
    on_edge, on_flat = np.zeros_like(target), np.zeros_like(target)
    on_edge[0, 4, 4], on_flat[0, 8, 8] = 0.5, 0.5
    assert loss(0.0, on_edge) == pytest.approx(loss(0.0, on_flat)) == pytest.approx(np.abs(on_edge).mean())
    assert loss(10.0, on_edge) > 5 * loss(10.0, on_flat)
    assert loss(10.0, np.full_like(target, 0.5)) == pytest.approx(0.5)


def test_fit_draws_a_new_order_each_epoch_and_a_resumed_run_the_same_orders(tmp_path, interrupted, monkeypatch):
    """Keras' own shuffle repeats its first order every epoch (under `set_random_seed`); ours draws one per epoch
    from the seed and the epoch, each batch read once in the epoch's order, so resuming after epoch 1 goes on as an
    uninterrupted run."""
    class Trainer(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.seed_generator = keras.layers.Dense(1), keras.random.SeedGenerator(0)

        def call(self, x):
            return self.dense(x)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return keras.ops.mean(keras.ops.square(y_pred))

    reads, read = set(), Epochs.__getitem__  # Keras may read a batch twice, or ahead (TensorFlow)
    monkeypatch.setattr(Epochs, "__getitem__", lambda self, index: (reads.add((
        self.start + index // len(self), index % len(self), tuple(read(self, index)[0][:, 0]))), read(self, index))[1])
    rows = np.arange(8, dtype="float32")[:, None]
    fit(Trainer(), rows, 3, 4, 1e-3, tmp_path / "whole", verbose=0, seed=5)
    whole = {(epoch, batch): read_rows for epoch, batch, read_rows in reads if epoch < 3}
    orders = [whole[epoch, 0] + whole[epoch, 1] for epoch in range(3)]
    assert len(set(orders)) == 3 and all(sorted(order) == list(range(8)) for order in orders)
    reads.clear()
    trainer = Trainer()
    interrupted(fit, trainer, rows, 3, 4, 1e-3, tmp_path / "resumed", verbose=0, seed=5)
    fit(trainer, rows, 3, 4, 1e-3, tmp_path / "resumed", verbose=0, seed=5)
    assert {(epoch, batch): read_rows for epoch, batch, read_rows in reads if epoch < 3} == whole


@pytest.mark.training
def test_diffusion_stage_fits_and_resumes(tmp_path):
    sd = StableDiffusion(SIZE, SIZE, config=TINY_CONFIG)
    _, captions = make_dataset(8, seed=0, image_size=SIZE)
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
    options = dict(num_images=8, vae_epochs=1, epochs=1, tune_images=8, tune_epochs=2, small_images=12,
                   small_epochs=1, batch_size=4, vae_batch_size=4, work_dir=tmp_path / "work", config=config,
                   verbose=0)
    result = train_demo(tmp_path / "demo", **options)  # stage 4 keeps the 4 small shapes of make_dataset(12, 3)
    stages = ("vae_loss", "diffusion_loss", "tune_loss_1", "tune_loss_2", "small_loss")  # two rounds of stage 3
    assert sorted(result) == sorted([*stages, "scaling_factor", "num_images"])
    assert all(np.isfinite(result[stage]) for stage in stages)
    saved = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert saved["decoder"]["scaling_factor"] == pytest.approx(result["scaling_factor"])
    sd = StableDiffusion.from_checkpoint(tmp_path / "demo")
    after_stage_2 = StableDiffusion.from_checkpoint(tmp_path / "demo")
    after_stage_2.text_encoder.load_weights(tmp_path / "work" / "diffusion_text_encoder.weights.h5")
    after_stage_2.diffusion_model.load_weights(tmp_path / "work" / "diffusion_diffusion_model.weights.h5")
    final = snapshot(sd.diffusion_model)
    sd.diffusion_model.load_weights(tmp_path / "work" / "tune_2_diffusion_model.weights.h5")  # after stage 3
    assert changed(final, sd.diffusion_model), "stage 4 left the UNet"
    after_stage_3 = snapshot(sd.diffusion_model)
    sd.diffusion_model.load_weights(tmp_path / "work" / "tune_1_diffusion_model.weights.h5")  # after round 1
    assert changed(after_stage_3, sd.diffusion_model), "round 2 left the UNet"
    assert not changed(snapshot(after_stage_2.text_encoder), sd.text_encoder), "stages 3-4 trained the text encoder"
    assert changed(snapshot(after_stage_2.diffusion_model), sd.diffusion_model), "stage 3 left the UNet"
    resumed = train_demo(tmp_path / "demo", **options)  # every stage is read back, not retrained
    assert all(resumed[stage] == result[stage] for stage in stages)
    with pytest.raises(ValueError, match="hold no small shape"):  # make_dataset(1, seed 0 + 0 rounds + 1): a square
        train_demo(tmp_path / "other", **dict(options, tune_rounds=0, small_images=1))
    assert not (tmp_path / "other").exists()
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



@pytest.mark.parametrize("kind", ["sd1", "sd2"])  # epsilon and v-prediction
def test_loss_equals_diffusers_training_objective(kind, reference, ours):
    """For the same latents, noise, timesteps and captions, `DiffusionTrainer`'s loss equals diffusers'
    `train_text_to_image.py`: F.mse_loss(unet(add_noise(latents, noise, t), t, text).sample, target), the target the
    noise or `get_velocity` (relative tolerance 1e-5)."""
    pipe, sd = reference(kind)[0], ours(kind)
    prediction_type = sd.scheduler.config["prediction_type"]
    assert prediction_type == ("epsilon" if kind == "sd1" else "v_prediction")
    latents, noise = np.random.default_rng(3).standard_normal((2, 3, 8, 8, 4), dtype=np.float32)
    timesteps, tokens = np.array([5, 500, 990]), sd.tokenize(["a red circle", "", "a blue square on a gray background"])
    trainer = DiffusionTrainer(sd.text_encoder, sd.diffusion_model, sd.scheduler.alphas_cumprod, sd.tokenize("")[0],
                               prediction_type=prediction_type)
    inputs = [keras.ops.convert_to_tensor(x) for x in (latents, noise, timesteps.astype("int32"), tokens)]
    loss = keras.ops.convert_to_numpy(trainer.compute_loss(y_pred=trainer.prediction_and_target(*inputs)))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents, noise, t = nchw(latents), nchw(noise), torch.from_numpy(timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    with torch.no_grad():
        text = pipe.text_encoder(torch.from_numpy(tokens.astype(np.int64)))[0]
        expected = F.mse_loss(pipe.unet(scheduler.add_noise(latents, noise, t), t, text).sample, target).item()
    wrong = F.mse_loss(noise if prediction_type != "epsilon" else scheduler.get_velocity(latents, noise, t), target)
    assert abs(float(loss) - expected) <= 1e-5 * expected
    assert abs(wrong.item() - expected) > 0.01 * expected, "the two targets give about the same loss"


@pytest.mark.training
def test_train_lora_resumes_and_its_cli_writes_a_loadable_file(tmp_path, interrupted, capsys):
    """A run stopped after its first epoch and rerun with the same work folder ends where an uninterrupted run
    ends (one image, so shuffling plays no part); the backup goes once done. The CLI writes a file that
    `load_lora` merges."""
    StableDiffusion(32, 32, config=TINY_CONFIG).save(tmp_path / "base")
    write_folder(tmp_path / "data", *make_dataset(1, seed=2, image_size=32))
    options = dict(targets=("to_q", "to_v", "conv1"), train_text_encoder=True, epochs=3, batch_size=1,
                   learning_rate=1e-2, verbose=0)
    train_lora(tmp_path / "base", tmp_path / "data", tmp_path / "whole.safetensors", work_dir=tmp_path / "w1", **options)
    interrupted(train_lora, tmp_path / "base", tmp_path / "data", tmp_path / "resumed.safetensors",
                work_dir=tmp_path / "w2", **options)
    assert (tmp_path / "w2" / "backup.safetensors").exists()
    train_lora(tmp_path / "base", tmp_path / "data", tmp_path / "resumed.safetensors", work_dir=tmp_path / "w2",
               **options)
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
    whole, resumed = (load_file(tmp_path / f"{name}.safetensors") for name in ("whole", "resumed"))
    assert whole.keys() == resumed.keys() and len(whole) == 2 * (16 + 8 + 4)  # q, v of 8 attentions; 8 conv1; text
    for key, value in whole.items():
        np.testing.assert_allclose(resumed[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-7, err_msg=key)

    main(["lora", "--checkpoint", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--output",
          str(tmp_path / "cli.safetensors"), "--epochs", "1", "--rank", "2", "--verbose", "0"])
    assert json.loads(capsys.readouterr().out)["modules"] == 32  # q, k, v, out of 8 attentions
    sd = StableDiffusion.from_checkpoint(tmp_path / "base")
    before = snapshot(sd.diffusion_model)
    sd.load_lora(tmp_path / "cli.safetensors")
    assert changed(before, sd.diffusion_model)


LORA = ["lora", "--data", "D", "--output", "o.safetensors"]
TI = ["textual-inversion", "--data", "D", "--output", "o.safetensors", "--token", "<pink>"]


@pytest.mark.parametrize("argv, message", [
    ([*LORA[:4], "lora.ckpt"], "--output must be a .safetensors file, got 'lora.ckpt'."),
    ([*LORA, "--rank", "0"], "--rank must be an integer >= 1, got 0."),
    ([*LORA, "--alpha", "nan"], "--alpha must be a finite number > 0, got nan."),
    ([*LORA, "--epochs", "0"], "--epochs must be an integer >= 1, got 0."),
    ([*LORA, "--learning-rate", "-1"], "--learning-rate must be a finite number > 0, got -1.0."),
    ([*LORA[:2], "MISSING", *LORA[3:]], "error: Training data folder MISSING does not exist"),
    (["--output", "o", "--checkpoint", "C"], "--checkpoint and --data go together"),  # the fine-tuning CLI
    (TI[:-2], "the following arguments are required: --token"),
    ([*TI[:4], "o.bin", *TI[5:]], "--output must be a .safetensors file, got 'o.bin'."),
    ([*TI, "--num-vectors", "0"], "--num-vectors must be an integer >= 1, got 0."),
    ([*TI, "--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan."),
    ([*TI[:-1], " "], "--token must be a non-empty string, got ' '."),
    ([*TI, "--initializer-token", ""], "--initializer-token must be a non-empty string, got ''."),
    (["textual-inversion", "--data", "MISSING", *TI[3:]], "error: Training data folder MISSING does not exist"),
])
def test_train_cli_refuses_bad_arguments_before_loading(argv, message, tmp_path, monkeypatch, capsys, no_loading):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "D").mkdir()
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "D"], "something was written"


def test_deterministic_is_refused_on_other_backends_in_flags(monkeypatch, capsys):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(SystemExit) as exit:
        main([*LORA, "--deterministic"])
    assert exit.value.code == 2
    assert "--deterministic: Deterministic training is for the TensorFlow backend, not jax." in capsys.readouterr().err


@pytest.mark.training
def test_deterministic_runs_tensorflow_ops_one_at_a_time():
    """In a new process, as the flag must act before TensorFlow's first op: one inter-op thread (default 0: one
    per core)."""
    code = ("import argparse, tensorflow as tf; from stable_diffusion.train import parse; "
            "parse(argparse.ArgumentParser(), ['--deterministic']); "
            "print(tf.config.threading.get_inter_op_parallelism_threads())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1"]


@pytest.mark.parametrize("train, keywords, message", [
    (train_lora, dict(rank=2.0), "^rank must be an integer >= 1, got 2.0"),
    (train_lora, dict(alpha=float("inf")), "^alpha must be a finite number > 0, got inf"),
    (train_lora, dict(epochs=0), "^epochs must be an integer >= 1, got 0"),
    (train_lora, dict(learning_rate=0), "^learning_rate must be a finite number > 0, got 0"),
    (train_textual_inversion, dict(token=None), "^token must be a non-empty string, got None"),
    (train_textual_inversion, dict(token="<pink>", learning_rate=True),
     "^learning_rate must be a finite number > 0, got True"),
    (train_textual_inversion, dict(token="<pink>", epochs=1.5), "^epochs must be an integer >= 1, got 1.5"),
])
def test_training_refuses_bad_arguments_in_its_keywords(train, keywords, message, tmp_path, no_loading):
    with pytest.raises(ValueError, match=message):
        train(None, tmp_path, tmp_path / "out" / "o.safetensors", **keywords)
    assert not list(tmp_path.iterdir()), "something was written"


def all_variables(sd):
    """{model/key: value} of every variable of sd's four models."""
    return {f"{model.name}/{key}": np.array(variable.numpy()) for model in (sd.text_encoder, sd.diffusion_model,
            sd.encoder, sd.decoder) for key, variable in named_variables(model).items()}


TAUGHT = dict(epochs=3, batch_size=1, learning_rate=1e-2, seed=0, verbose=0)  # one caption: no shuffling


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny model, a caption naming "<new>" (2 vectors from "red") as tokens with latents, the model's variables
    and an image of a prompt without the token, all before `train_embedding` (`TAUGHT`, a backup folder), and
    what it returned."""
    sd = StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=False)
    tokens = embeddings.with_tokens(sd.tokenizer, "<new>", 2, first_id=49408)(["a <new> circle on a white background"])
    latents = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype("float32")
    before = all_variables(sd), sd.text_to_image("a red circle", num_steps=10, seed=0, verbose=False)
    backup = tmp_path_factory.mktemp("taught") / "backup"
    return sd, tokens, latents, before, train_embedding(sd, initial_vectors(sd, "red", 2), latents, tokens,
                                                        backup_dir=backup, **TAUGHT), backup


def test_textual_inversion_trains_the_new_rows_alone(taught, tmp_path):
    """`train_embedding` moves the new token's rows, each its own way, and nothing else: every variable of the four
    models bit-identical, the pipeline's text encoder, tokenizer and trainable flags as they were. Loaded, the rows
    change the states of prompts with the token; prompts without it make bit-identical images."""
    sd, _, _, (variables, image), (trained, loss), backup = taught
    vectors = initial_vectors(sd, "red", 2)
    np.testing.assert_array_equal(vectors[1], named_variables(sd.text_encoder)[TOKEN_TABLE].numpy()[736])  # red</w>
    assert np.isfinite(loss) and trained.shape == (2, 8) and not backup.exists()
    assert np.abs(trained - vectors).min() > 1e-3 and np.abs(trained[0] - trained[1]).max() > 1e-3
    assert sd.text_encoder.trainable and sd.diffusion_model.trainable
    after = all_variables(sd)
    assert after.keys() == variables.keys()
    for key, value in variables.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)

    text_encoder, tokenizer, config = sd.text_encoder, sd.tokenizer, sd.config
    write_safetensors(tmp_path / "new.safetensors", {"<new>": trained}, alignment=1)
    sd.load_textual_inversion(tmp_path / "new.safetensors")
    np.testing.assert_array_equal(sd.text_to_image("a red circle", num_steps=10, seed=0, verbose=False), image)
    assert np.abs(sd.encode_text("a <new> circle") - sd.encode_text("a red circle")).max() > 1e-3
    sd.text_encoder, sd.tokenizer, sd.config = text_encoder, tokenizer, config  # for the next test


@pytest.mark.training
def test_textual_inversion_resumes(taught, tmp_path, interrupted):
    """A run of `train_embedding` stopped after its first epoch and rerun with the same backup folder ends where
    the uninterrupted run of `taught` ended."""
    sd, tokens, latents, _, (whole, _), _ = taught
    vectors = initial_vectors(sd, "red", 2)
    interrupted(train_embedding, sd, vectors, latents, tokens, backup_dir=tmp_path / "backup", **TAUGHT)
    assert (tmp_path / "backup" / "backup.safetensors").exists()
    resumed, _ = train_embedding(sd, vectors, latents, tokens, backup_dir=tmp_path / "backup", **TAUGHT)
    assert not (tmp_path / "backup").exists()
    np.testing.assert_allclose(resumed, whole, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def pink_folder(tmp_path_factory):
    """A tiny saved model and a folder of two 32x32 images whose captions name "<pink>"."""
    folder = tmp_path_factory.mktemp("textual_inversion")
    StableDiffusion(32, 32, config=TINY_CONFIG).save(folder / "base")
    images, captions = make_dataset(2, seed=2, image_size=32)
    write_folder(folder / "data", images, [caption.replace(" on ", " <pink> on ") for caption in captions])
    return folder




@pytest.mark.parametrize("options, message", [
    (["--token", "red"], "--token 'red' cannot be learned: Token 'red' is already in the tokenizer's vocabulary."),
    (["--token", "<Pink>", "--num-vectors", "2", "--initializer-token", "red circle"],
     "--initializer-token must be one token of the tokenizer, got 'red circle' (2 tokens)."),
    (["--token", "<blue>"], "No caption in"),
])
def test_textual_inversion_cli_refuses_tokens_the_model_cannot_learn(options, message, pink_folder, capsys):
    """Errors found once the model's tokenizer is read, before any training: in flag names, nothing written."""
    output = pink_folder / "out" / "learned_embeds.safetensors"
    with pytest.raises(SystemExit) as exit:
        main(["textual-inversion", "--checkpoint", str(pink_folder / "base"), "--data", str(pink_folder / "data"),
              "--output", str(output), *options])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not output.parent.exists() or not any(output.parent.iterdir())
