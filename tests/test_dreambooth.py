"""DreamBooth: the prior-preservation loss against diffusers' `train_dreambooth.py`, a short run end to end
(bundle, resumption, LoRA file through the CLI), and arguments refused before any model loads. .ci/run also runs
the loss test on the JAX and torch backends."""
import json

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from reference import TINY_CONFIG, nchw
from stable_diffusion import StableDiffusion
from stable_diffusion.data import make_dataset
from stable_diffusion.dreambooth import DreamBoothTrainer, train_dreambooth
from stable_diffusion.train import DiffusionTrainer, main

PROMPTS = dict(instance_prompt="a photo of sks circle", class_prompt="a photo of a circle")


def write_images(folder, images):
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])  # epsilon and v-prediction
def test_loss_equals_diffusers_prior_preservation_loss(kind, reference, ours):
    """For the same latents, noise, timesteps and captions, `DreamBoothTrainer`'s loss equals diffusers'
    `train_dreambooth.py` with prior preservation: the UNet run once on the instance and class rows concatenated,
    its output and the target chunked in halves, F.mse_loss(instance half) + prior_loss_weight * F.mse_loss(class
    half) (relative tolerance 1e-5). The trainer's `call` concatenates instances first, as diffusers' collate_fn."""
    pipe, sd = reference(kind)[0], ours(kind)
    prediction_type = sd.scheduler.config["prediction_type"]
    latents, noise = np.random.default_rng(4).standard_normal((2, 4, 8, 8, 4), dtype=np.float32)
    noise[2:] *= 2  # the class half's loss far from the instance half's
    timesteps = np.array([5, 500, 990, 250])
    tokens = sd.tokenize([PROMPTS["instance_prompt"]] * 2 + [PROMPTS["class_prompt"]] * 2)
    models = sd.text_encoder, sd.diffusion_model, sd.scheduler.alphas_cumprod, sd.tokenize("")[0]
    trainer = DreamBoothTrainer(*models, prediction_type=prediction_type, prior_loss_weight=0.3)
    inputs = [keras.ops.convert_to_tensor(x) for x in (latents, noise, timesteps.astype("int32"), tokens)]
    loss = float(keras.ops.convert_to_numpy(trainer.compute_loss(y_pred=trainer.prediction_and_target(*inputs))))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents_t, noise_t, t = nchw(latents), nchw(noise), torch.from_numpy(timesteps)
    target = noise_t if prediction_type == "epsilon" else scheduler.get_velocity(latents_t, noise_t, t)
    with torch.no_grad():
        text = pipe.text_encoder(torch.from_numpy(tokens.astype(np.int64)))[0]
        model_pred = pipe.unet(scheduler.add_noise(latents_t, noise_t, t), t, text).sample
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    instance, prior = F.mse_loss(model_pred, target).item(), F.mse_loss(model_pred_prior, target_prior).item()
    expected = instance + 0.3 * prior
    assert abs(loss - expected) <= 1e-5 * expected
    assert abs(prior - instance) > 0.5 * expected, "the halves' losses are about equal: the weight is untested"

    split = [latents[:2], tokens[:2], latents[2:], tokens[2:]]
    concatenated = DiffusionTrainer(*models, caption_dropout=0.0, seed=5)((latents, tokens))
    for ours_, whole in zip(DreamBoothTrainer(*models, caption_dropout=0.0, seed=5)(split), concatenated):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours_), keras.ops.convert_to_numpy(whole))


@pytest.mark.training
def test_dreambooth_writes_a_loadable_bundle_resumes_and_its_cli_writes_a_lora(tmp_path, interrupted, capsys):
    """A run generates its class image with the model from the class prompt and trains the UNet alone; one stopped
    after its first epoch and rerun with the same work folder ends where an uninterrupted run ends (one pair of
    images, so shuffling plays no part). The CLI with --lora-rank writes a file that `load_lora` merges."""
    StableDiffusion(32, 32, config=TINY_CONFIG).save(tmp_path / "base")
    write_images(tmp_path / "subject", make_dataset(1, seed=2, image_size=32)[0])
    options = dict(PROMPTS, class_data=tmp_path / "class", num_class_images=1, epochs=3, batch_size=1,
                   learning_rate=1e-2, verbose=0)
    result = train_dreambooth(tmp_path / "base", tmp_path / "subject", tmp_path / "whole", work_dir=tmp_path / "w1",
                              **options)
    assert result["num_images"] == 1 and result["num_class_images"] == 1 and np.isfinite(result["loss"])
    base = StableDiffusion.from_checkpoint(tmp_path / "base")
    class_image, = (np.asarray(Image.open(path)) for path in (tmp_path / "class").iterdir())
    generated = base.text_to_image(PROMPTS["class_prompt"], seed=0, verbose=False)[0]
    np.testing.assert_array_equal(class_image, generated)

    interrupted(train_dreambooth, tmp_path / "base", tmp_path / "subject", tmp_path / "resumed",
                work_dir=tmp_path / "w2", **options)
    assert (tmp_path / "w2" / "backup.safetensors").exists()
    train_dreambooth(tmp_path / "base", tmp_path / "subject", tmp_path / "resumed", work_dir=tmp_path / "w2",
                     **options)
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
    whole, resumed = (StableDiffusion.from_checkpoint(tmp_path / name) for name in ("whole", "resumed"))
    for name in ("diffusion_model", "text_encoder", "encoder", "decoder"):
        trained, before = getattr(whole, name).get_weights(), getattr(base, name).get_weights()
        assert any(not np.allclose(a, b) for a, b in zip(trained, before)) == (name == "diffusion_model"), name
        for a, b in zip(getattr(resumed, name).get_weights(), trained):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)

    main(["dreambooth", "--checkpoint", str(tmp_path / "base"), "--data", str(tmp_path / "subject"),
          "--instance-prompt", PROMPTS["instance_prompt"], "--class-prompt", PROMPTS["class_prompt"],
          "--class-data", str(tmp_path / "class"), "--num-class-images", "2", "--batch-size", "2", "--epochs", "1",
          "--lora-rank", "2", "--output", str(tmp_path / "lora.safetensors"), "--verbose", "0"])
    assert json.loads(capsys.readouterr().out)["modules"] == 32  # q, k, v, out of 8 attentions
    assert len(list((tmp_path / "class").iterdir())) == 2  # the one it lacked generated
    before = base.diffusion_model.get_weights()
    base.load_lora(tmp_path / "lora.safetensors")
    assert any(not np.allclose(a, b) for a, b in zip(before, base.diffusion_model.get_weights()))


ARGS = ["dreambooth", "--checkpoint", "NO_CHECKPOINT", "--data", "subject", "--instance-prompt", "a sks circle",
        "--class-prompt", "a circle"]


@pytest.mark.parametrize("extra, message", [
    (["--output", "o.safetensors"], "--output must be a bundle folder without --lora-rank"),
    (["--output", "o", "--lora-rank", "4"], "--output must be a .safetensors file with --lora-rank, got 'o'"),
    (["--output", "o.safetensors", "--lora-rank", "0"], "--lora-rank must be an integer >= 1, got 0"),
    (["--output", "o", "--num-class-images", "0"], "--num-class-images must be an integer >= 1"),
    (["--output", "o", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--output", "o", "--prior-loss-weight", "nan"], "--prior-loss-weight must be a finite number >= 0"),
    (["--output", "o", "--learning-rate", "-1"], "--learning-rate must be a finite number > 0, got -1.0"),
    (["--output", "o", "--instance-prompt", " "], "--instance-prompt must be a non-empty string"),
    (["--output", "o", "--data", "missing"], "--data 'missing' is not a folder"),
    (["--output", "o", "--data", "empty"], "--data 'empty' holds no images"),
])
def test_dreambooth_cli_refuses_bad_arguments_before_loading(extra, message, tmp_path, monkeypatch, capsys,
                                                             no_loading):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "subject", np.zeros((1, 32, 32, 3), np.uint8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit:
        main(ARGS + extra)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "NO_CHECKPOINT" not in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "subject"], "something was written"


def test_dreambooth_refuses_bad_arguments_in_its_keywords(tmp_path, no_loading):
    with pytest.raises(ValueError, match="^prior_loss_weight must be a finite number >= 0, got -1"):
        train_dreambooth(None, tmp_path, tmp_path / "out", prior_loss_weight=-1, **PROMPTS)
    with pytest.raises(ValueError, match="^class_prompt must be a non-empty string, got None"):
        train_dreambooth(None, tmp_path, tmp_path / "out", instance_prompt="a sks circle", class_prompt=None)
