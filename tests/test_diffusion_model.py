"""UNet parity: ours vs diffusers' UNet2DConditionModel on the same weights and inputs."""
import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch

from reference import SDXL_UNETS, make_sdxl_unet, nchw, nhwc, predicted, relative_difference
from stable_diffusion import StableDiffusion, blocks, checkpoints, diffusers_folder, settings
from stable_diffusion.diffusion_model import DiffusionModel
from stable_diffusion.weights import CheckpointError, strict_loader


def unet_difference(unet, model, height, width, **added):
    """Max abs difference of our UNet's output from diffusers', relative to the output's scale; `added`:
    SDXL's text_embeds and time_ids, diffusers' `added_cond_kwargs`."""
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((2, height // 8, width // 8, 4), dtype=np.float32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    timesteps = np.array([1, 981])
    added_cond_kwargs = {key: torch.from_numpy(value) for key, value in added.items()} or None
    with torch.no_grad():
        expected = nhwc(unet(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context),
                             added_cond_kwargs=added_cond_kwargs).sample)
    got = predicted(model, [latents, timesteps.astype("float32"), context, *added.values()])
    assert got.shape == expected.shape == latents.shape
    return relative_difference(got, expected)


@pytest.mark.parametrize("kind, height, width", [("sd1", 64, 48), ("sd2", 48, 64), ("deep", 64, 96)])
def test_equals_diffusers(kind, height, width, reference, ours):
    diff = unet_difference(reference(kind)[0].unet, ours(kind, height, width).diffusion_model, height, width)
    assert diff <= 1e-3, f"max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 1e-3)"


def test_attention_in_query_chunks_equals_diffusers(reference, monkeypatch):
    """Large self-attention runs in query chunks (as at 512x512); forced here on 8x6 latents: 48
    queries in 12 chunks of 4, in the UNet and in the VAE decoder."""
    monkeypatch.setattr(blocks, "MAX_ATTENTION_SCORES", 5 * 48)
    pipe, folder = reference("sd1")
    sd = StableDiffusion.from_checkpoint(folder, img_height=64, img_width=48)
    diff = unet_difference(pipe.unet, sd.diffusion_model, 64, 48)  # float32 rounding: ~1e-6; misplaced chunks: 5e-4+
    assert diff <= 5e-5, f"max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 5e-5)"
    latents = np.random.default_rng(2).standard_normal((1, 8, 6, 4), dtype=np.float32)
    with torch.no_grad():
        expected = nhwc(pipe.vae.decode(nchw(latents) / pipe.vae.config.scaling_factor).sample)
    diff = relative_difference(sd.decoder.predict_on_batch(latents), expected)
    assert diff <= 1e-4, f"max abs diff {diff:.2e} of the output scale vs AutoencoderKL.decode (tolerance 1e-4)"


def read_unet(folder, num_time_ids, height, width):
    """Our UNet of a diffusers `unet` folder for `height` x `width` images, as the diffusers-folder reader builds
    and loads it: the config translated and checked against the weights, the weights loaded strictly by name."""
    config = diffusers_folder.translated(folder / "config.json",
                                         partial(diffusers_folder.unet_config, num_time_ids=num_time_ids))
    tensors = diffusers_folder.find_weights(folder)
    settings.check_model("diffusion_model", config, tensors, folder / "config.json")
    model = DiffusionModel(latent_height=height // 8, latent_width=width // 8, **config)
    strict_loader(tensors)([model])
    return model


# Time ids as SDXL's pipelines make them: original size, crop corner, then target size (base) or aesthetic score.
TIME_IDS = {6: [[1024, 1024, 0, 0, 1024, 1024], [768, 512, 32, 16, 64, 48]],
            5: [[1024, 1024, 0, 0, 6], [768, 512, 32, 16, 2.5]]}


@pytest.mark.parametrize("kind, height, width", [("sdxl", 96, 64), ("refiner", 64, 128)])
def test_sdxl_equals_diffusers(kind, height, width, tmp_path):
    """SDXL layouts: transformer depth per level, heads per level, the "text_time" embedding of text_embeds (B,
    24) and time_ids (B, 6 or 5)."""
    unet, num_time_ids = make_sdxl_unet(kind, tmp_path), SDXL_UNETS[kind][1]
    ours = read_unet(tmp_path, num_time_ids, height, width)
    assert [tuple(x.shape) for x in ours.inputs[3:]] == [(None, 24), (None, num_time_ids)]
    text_embeds = np.random.default_rng(2).standard_normal((2, 24), dtype=np.float32)
    time_ids = np.array(TIME_IDS[num_time_ids], dtype=np.float32)
    diff = unet_difference(unet, ours, height, width, text_embeds=text_embeds, time_ids=time_ids)
    # float32 rounding: ~7e-7; zeroed time ids or text_embeds, or ids in another order gave 1.2e-2 to 3e-2
    assert diff <= 1e-3, f"max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 1e-3)"


@pytest.mark.parametrize("change, message", [
    (dict(projection_class_embeddings_input_dim=48), "leaves no text_embeds beside 6 time ids"),
    (dict(transformer_layers_per_block=[[1], [1, 1], [2, 2]]), "Unsupported UNet"),
    (dict(reverse_transformer_layers_per_block=[[2, 2, 2], [2, 2, 2], [1, 1, 1]]), "Unsupported UNet"),
    (dict(addition_embed_type="text_image"), "Unsupported UNet"),
    (dict(transformer_layers_per_block=[1, 2]), "one value per level"),
    (dict(transformer_layers_per_block=[1, 2, 1]), "transformer_depth=.1, 2, 1., its weights .* have 2"),
])
def test_sdxl_config_that_cannot_be_built_is_one_checkpoint_error(change, message, tmp_path):
    make_sdxl_unet("sdxl", tmp_path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | change))
    with pytest.raises(CheckpointError, match=message) as error:
        read_unet(tmp_path, 6, 96, 64)
    assert str(config_file) in str(error.value)


def test_sdxl_unet_without_a_second_text_encoder_is_refused_before_any_model_is_built(reference, tmp_path):
    """An SD 1.x folder with an SDXL UNet: nothing gives it text_embeds; one CheckpointError naming the file."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(reference("sd1")[1], folder)
    shutil.rmtree(folder / "unet")
    make_sdxl_unet("sdxl", folder / "unet")
    with pytest.raises(CheckpointError, match=r"unet/config.json: the UNet takes context_dim=32 and pooled_dim=24 "
                                              r"\(beside 6 time ids\), but its text encoders give 32 and 0 \(one CLIP\)"):
        checkpoints.read(folder)
