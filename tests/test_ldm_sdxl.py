"""Original SDXL base and refiner single files (sgm's `conditioner.embedders.*` layout): the test writer proven
against diffusers' own single-file converters, our models built from `ldm.plan`'s configs and loaded by its
names vs the diffusers / transformers models, the family told from the tensors (full-size shapes too), the SDXL
base file in the pipeline vs StableDiffusionXLPipeline, its bundle, a VAE file replacing its VAE and the Turbo
preset's settings (the refiner file in the pipeline: `test_sdxl_refiner.py`)."""
import functools
import json

import keras
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.loaders import single_file_utils

import ldm_reference
from reference import (HUB_SDXL, SDXL_UNETS, assert_same_generation, full_size_sdxl, make_sdxl_pipeline, nchw, nhwc,
                       predicted, relative_difference, rounded, to_numpy)
from test_convert import assert_same_weights
from test_diffusion_model import TIME_IDS, unet_difference
from stable_diffusion import StableDiffusion, checkpoints, diffusers_folder, ldm, presets, schedulers, settings
from stable_diffusion.decoder import Decoder
from stable_diffusion.diffusion_model import DiffusionModel
from stable_diffusion.encoder import Encoder
from stable_diffusion.text_encoder import TextEncoder
from stable_diffusion.tokenizer import Tokenizer
from stable_diffusion.weights import CheckpointError, strict_loader

KINDS = {"sdxl": "sdxl", "sdxl_refiner": "refiner"}  # ldm family: its `reference.SDXL_UNETS` kind
PROMPTS = ["a red circle on a white background", "", "An astronaut riding a horse, 4k, trending!"]
PAD_TOKENS = {"text_encoder": "<|endoftext|>", "text_encoder_2": "!"}  # SDXL's tokenizer and tokenizer_2


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """sdxl(family, dtype=torch.float32) -> the tiny models (`ldm_reference.make_sdxl`), made once."""
    @functools.cache
    def make(family, dtype=torch.float32):
        return ldm_reference.make_sdxl(KINDS[family], tmp_path_factory.mktemp(family), dtype)

    return make


@pytest.mark.parametrize("family", KINDS)
def test_writer_round_trips_through_diffusers_converters(family, sdxl):
    models = sdxl(family)
    state = ldm_reference.ldm_state_dict(models, family)
    base = family == "sdxl"  # diffusers' detection of the text encoders (`create_diffusers_clip_model_from_ldm`)
    assert (single_file_utils.is_clip_sdxl_model(state), single_file_utils.is_open_clip_sdxl_model(state),
            single_file_utils.is_open_clip_sdxl_refiner_model(state)) == (base, base, not base)
    converted = ldm_reference.to_diffusers(state, models, family)
    expected = dict(unet=models.unet.state_dict(), vae=models.vae.state_dict())
    for name in ldm.TEXT_ENCODERS[family]:
        expected[name] = ldm_reference.text_state_dict(getattr(models, name))
        converted[name] = {k.removeprefix("text_model."): v for k, v in converted[name].items()
                           if not k.endswith("position_ids")}
    assert converted.keys() == expected.keys()
    for component, reference in expected.items():
        got = converted[component]
        assert got.keys() == reference.keys(), f"{component}: {sorted(got.keys() ^ reference.keys())[:5]}"
        unequal = [k for k in reference if not torch.equal(got[k], reference[k])]
        assert not unequal, f"{component}: diffusers reads other values for {unequal[:5]}"


MODELS = {"text_encoder": TextEncoder, "text_encoder_2": TextEncoder, "diffusion_model": DiffusionModel,
          "decoder": Decoder, "encoder": Encoder}


def load(path, settings_of, height, width):
    """(plan, {model name: our model}) of a single file: each model built from `ldm.plan`'s config (with
    `settings_of` the tensors do not hold), checked as `checkpoints.read` checks it, loaded strictly by the plan's
    names."""
    tensors, _ = ldm.open_single_file(path)
    found = ldm.plan(tensors.shapes, path)
    sizes = dict(diffusion_model=dict(latent_height=height // 8, latent_width=width // 8),
                 decoder=dict(latent_height=height // 8, latent_width=width // 8),
                 encoder=dict(img_height=height, img_width=width))
    ours = {}
    for names, tensor_names in found.names.items():
        subset = tensors.subset(tensor_names)
        for name in names:
            config = dict(found.config[name], **settings_of.get(name, {}))
            settings.check_model(name.removesuffix("_2"), config, subset, path)
            ours[name] = MODELS[name](**sizes.get(name, {}), **config)
        strict_loader(subset)([ours[name] for name in names])
    return found, ours


# The base's models are compared end to end by the generation test below; the refiner's here (VAE encoder too).
# The refiner's single file also loads as its folder does in test_sdxl_refiner.py's default run.
CASES = [pytest.param("sdxl_refiner", ".safetensors", torch.float32, marks=pytest.mark.slow)]


@pytest.mark.parametrize("family, suffix, dtype", CASES)
def test_components_equal_reference(family, suffix, dtype, sdxl, tmp_path):
    """UNet (with text_embeds and 6 or 5 time ids), text encoders (text_encoder_2's text_embeds too) and VAE
    (SDXL's scaling factor) of a written file vs the diffusers / transformers models whose weights it holds."""
    models = sdxl(family, dtype)
    path = ldm_reference.write(ldm_reference.ldm_state_dict(models, family), tmp_path / f"{family}{suffix}", dtype)
    height, width = (96, 64) if family == "sdxl" else (64, 128)
    found, ours = load(path, ldm_reference.overrides(models), height, width)
    assert found.family == family and ours.keys() == {*ldm.TEXT_ENCODERS[family], "diffusion_model", "decoder",
                                                      "encoder"}
    assert found.config["decoder"]["scaling_factor"] == models.vae.config.scaling_factor == 0.13025
    rng = np.random.default_rng(2)
    num_time_ids = SDXL_UNETS[KINDS[family]][1]
    text_embeds = rng.standard_normal((2, 24), dtype=np.float32)
    time_ids = np.array(TIME_IDS[num_time_ids], dtype=np.float32)
    diff = unet_difference(models.unet, ours["diffusion_model"], height, width, text_embeds=text_embeds,
                           time_ids=time_ids)
    assert diff <= 1e-3, f"UNet: max abs diff {diff:.2e} of the output scale vs UNet2DConditionModel (tolerance 1e-3)"
    for name in ldm.TEXT_ENCODERS[family]:
        ids = Tokenizer.from_vendored(PAD_TOKENS[name])(PROMPTS)
        with torch.no_grad():
            expected = getattr(models, name)(torch.from_numpy(ids).long())
        got = predicted(ours[name], ids)
        pairs = [(got, expected.last_hidden_state)] if name == "text_encoder" else list(
            zip(got, [expected.last_hidden_state, expected.text_embeds]))
        for value, reference in pairs:
            diff = np.abs(value - to_numpy(reference)).max()
            assert diff <= 1e-4, f"{name}: max abs diff {diff} vs transformers (tolerance 1e-4)"
    latents = rng.standard_normal((2, height // 8, width // 8, 4), dtype=np.float32)
    images = rng.uniform(-1, 1, (2, height, width, 3)).astype("float32")
    with torch.no_grad():
        expected = dict(decoder=nhwc(models.vae.decode(nchw(latents) / models.vae.config.scaling_factor).sample),
                        encoder=nhwc(models.vae.encode(nchw(images)).latent_dist.parameters))
    got = dict(decoder=predicted(ours["decoder"], latents), encoder=predicted(ours["encoder"], images))
    diffs = {name: relative_difference(got[name], expected[name]) for name in expected}
    assert all(diff <= 1e-4 for diff in diffs.values()), f"VAE vs AutoencoderKL (tolerance 1e-4): {diffs}"


def depth_used(config):
    """The transformer depth of each level with attention, and the middle block's (the last entry): what a
    DiffusionModel builds of its transformer_depth."""
    depths = config["transformer_depth"]
    depths = [depths] * len(config["channels"]) if isinstance(depths, int) else list(depths)
    return [d for d, attention in zip(depths, config["attention_levels"]) if attention] + depths[-1:]


@pytest.mark.parametrize("family", HUB_SDXL)
def test_full_size_architecture_inferred(family):
    """The family rules (64-wide heads, 6 or 5 time ids, every OpenCLIP layer and the projection, 0.13025) give
    SDXL 1.0's diffusers configs from the full-size key shapes (models on the meta device: no memory)."""
    with torch.device("meta"):
        models = full_size_sdxl(family)
    state = ldm_reference.ldm_state_dict(models, family)
    found = ldm.plan({k: tuple(v.shape) for k, v in state.items()}, family)
    assert found.family == family and found.config.keys() == {
        *ldm.TEXT_ENCODERS[family], "diffusion_model", "decoder", "encoder"}
    unet = diffusers_folder.unet_config(dict(models.unet.config), num_time_ids=ldm.SDXL_TIME_IDS[family])
    expected = dict(diffusion_model=unet, **diffusers_folder.vae_configs(dict(models.vae.config)), **{
        name: diffusers_folder.text_encoder_config(dict(getattr(models, name).config.to_dict(),
                                                        architectures=[type(getattr(models, name)).__name__]))
        for name in ldm.TEXT_ENCODERS[family]})
    for name, config in found.config.items():
        assert {k: v for k, v in config.items() if k != "transformer_depth"} == {
            k: expected[name][k] for k in config if k != "transformer_depth"}, name
    assert depth_used(found.config["diffusion_model"]) == depth_used(unet)
    assert found.config["text_encoder_2"]["projection_dim"] == found.config["diffusion_model"]["pooled_dim"] == 1280
    assert found.config["diffusion_model"]["time_id_dim"] == 256


UNET = ldm.UNET + "input_blocks.0.0.weight"
FOREIGN = {  # a file's keys: what the error names
    "SD3": [UNET, ldm.UNET + "joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.clip_g.transformer.x"],
    "SD3 (bare)": ["joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.t5xxl.transformer.shared.weight"],
    "Flux": ["double_blocks.0.img_attn.qkv.weight", "final_layer.linear.weight"],
    "ControlNet": [UNET, ldm.CLIP + "text_model.x", "control_model.time_embed.0.weight"],
    "class-conditioned SD 2.x": [UNET, ldm.UNET + "label_emb.weight", ldm.OPEN_CLIP + "token_embedding.weight"],
    "no text encoders (an SDXL base without bigG)": [UNET, ldm.SDXL_CLIP + "text_model.final_layer_norm.weight"],
    "no text encoders (SVD's image embedder)": [UNET, "conditioner.embedders.0.open_clip.model.visual.proj"],
    "no model.diffusion_model": [ldm.CLIP + "text_model.x", ldm.VAE + "decoder.conv_in.weight"],
}


@pytest.mark.parametrize("what", FOREIGN)
def test_other_layouts_give_one_error_naming_them(what):
    with pytest.raises(CheckpointError) as error:
        ldm.plan(dict.fromkeys(FOREIGN[what], (4, 4)), "model.safetensors")
    message = str(error.value)
    assert message.startswith("model.safetensors") and what.split(" (")[0] in message, message
    assert "\n" not in message


@pytest.mark.parametrize("family", KINDS)
def test_text_time_input_that_does_not_fit_is_one_error(family, sdxl):
    """label_emb.0.0 takes the pooled text and 6 (base) or 5 (refiner) ids of one width: one fewer id is refused."""
    state = ldm_reference.ldm_state_dict(sdxl(family), family)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    key = ldm.UNET + "label_emb.0.0.weight"
    shapes[key] = (shapes[key][0], shapes[key][1] - 8)
    with pytest.raises(CheckpointError, match=rf"{family}: the tensors do not have the {ldm.FAMILY_NAMES[family]} "
                                              rf"layout .*label_emb.0.0.weight .* {ldm.SDXL_TIME_IDS[family]} embedded"):
        ldm.plan(shapes, family)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(the tiny StableDiffusionXLPipeline of `reference.make_sdxl_pipeline`, files(suffix, dtype, vae=True) -> its
    SDXL base single file, our pipeline loaded from the float32 `.ckpt`), each made once."""
    root = tmp_path_factory.mktemp("sdxl_base")
    pipe = make_sdxl_pipeline(root / "diffusers")

    @functools.cache
    def files(suffix, dtype=torch.float32, vae=True):
        state = ldm_reference.ldm_state_dict(pipe, "sdxl", vae=vae)
        return ldm_reference.write(state, root / f"base-{str(dtype).split('.')[1]}-{vae}{suffix}", dtype)

    sd = StableDiffusion.from_checkpoint(files(".ckpt"), img_height=64, img_width=64, jit_compile=False,
                                         config=ldm_reference.overrides(pipe))
    return pipe, files, sd


# (file, its dtype, negative prompts, guidance): None negative prompts are force_zeros_for_empty_prompt's zeros.
GENERATION = [(".ckpt", torch.float32, None, 7.5),
              pytest.param(".safetensors", torch.float16, ["green", "a triangle"], 5.0, marks=pytest.mark.slow)]


@pytest.mark.parametrize("suffix, dtype, negative, guidance", GENERATION)
def test_base_file_generates_as_diffusers(suffix, dtype, negative, guidance, base):
    """The file's settings as diffusers' `from_single_file` takes them for SDXL base (its scheduler config, 1024
    pixels, both tokenizers, zero states for no negative prompt, the VAE's force_upcast), and the final latents within
    1e-4 of their scale (float32 rounding: ~1e-6) of StableDiffusionXLPipeline's on the same weights, float32 and
    rounded through float16 (loaded into the same models), the images within one uint8 level."""
    pipe, files, sd = base
    checkpoint = checkpoints.read(files(".ckpt"), config=ldm_reference.overrides(pipe))
    scheduler = {key: checkpoint.config["scheduler"][key] for key in single_file_utils.SCHEDULER_DEFAULT_CONFIG}
    assert scheduler == single_file_utils.SCHEDULER_DEFAULT_CONFIG
    assert (checkpoint.img_height, checkpoint.img_width) == (single_file_utils.DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP
                                                             ["xl_base"],) * 2 == (1024, 1024)
    assert checkpoint.config["pipeline"] == {"force_zeros_for_empty_prompt": True, "force_upcast": True}
    assert checkpoint.config["decoder"]["scaling_factor"] == 0.13025
    assert (sd.tokenizer.pad_token_id, sd.tokenizer_2.pad_token_id) == (
        pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id) == (49407, 0)
    prompts, noise = ["a red circle", "a blue square"], np.random.default_rng(4).standard_normal((2, 8, 8, 4),
                                                                                                  dtype=np.float32)
    reference = rounded(pipe, dtype)
    reference.scheduler = DDIMScheduler.from_config(checkpoint.config["scheduler"])  # as run by our default
    if dtype != torch.float32:
        checkpoints.read(files(suffix, dtype), config=ldm_reference.overrides(pipe)).load_into(sd)
    try:
        expected = reference(prompts, negative_prompt=negative, num_inference_steps=4, guidance_scale=guidance,
                             height=64, width=64, latents=nchw(noise), output_type="latent").images
        got = sd.text_to_image(prompts, negative_prompt=negative, num_steps=4, diffusion_noise=noise,
                               unconditional_guidance_scale=guidance, return_latents=True, verbose=False)
        assert_same_generation(reference, sd, got, expected, f"StableDiffusionXLPipeline, {suffix} {dtype}")
    finally:
        checkpoint.load_into(sd)  # the float32 weights again, for the other tests


def test_base_bundle_reloads_bit_exact(base, tmp_path):
    """Every setting, the sampler it ran (named in the scheduler config), both tokenizers and every weight
    (text_encoder_2's too) of the loaded file."""
    _, _, sd = base
    sd.save(tmp_path / "bundle")
    again = StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)
    saved = dict(sd.config, scheduler=schedulers.diffusers_config(sd.scheduler_name, sd.config["scheduler"]))
    assert again.config == json.loads(json.dumps(saved)) and (again.img_height, again.img_width) == (64, 64)
    assert (again.tokenizer.pad_token_id, again.tokenizer_2.pad_token_id) == (49407, 0)
    assert_same_weights(again, sd, (*MODELS, "text_encoder_2"))


def test_standalone_vae_keeps_sdxl_scaling_factor(base, tmp_path):
    """A VAE file (which holds no scaling factor) replacing an SDXL base file's VAE: SDXL's latents, 0.13025."""
    pipe, files, _ = base
    vae_file = ldm_reference.write(ldm_reference.vae_state_dict(pipe.vae, prefix=""), tmp_path / "vae.safetensors")
    options = dict(config=ldm_reference.overrides(pipe))
    replaced = checkpoints.read(files(".safetensors", vae=False), vae=vae_file, **options)
    assert replaced.config == checkpoints.read(files(".safetensors"), **options).config
    assert replaced.config["decoder"]["scaling_factor"] == 0.13025


def test_turbo_preset_has_trailing_timesteps_and_euler_ancestral_at_512(base, tmp_path, monkeypatch):
    """"sdxl-turbo" converts its file with "trailing" timesteps and loads with Euler ancestral at 512 pixels unless
    told otherwise; the second call reads the converted bundle (the tiny base file stands in for the download)."""
    pipe, files, _ = base
    turbo = presets.PRESETS["sdxl-turbo"]
    config = dict(turbo["options"]["config"], **ldm_reference.overrides(pipe))  # the settings a tiny file needs
    monkeypatch.setitem(turbo, "options", dict(turbo["options"], config=config))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", lambda **kwargs: str(files(".safetensors", torch.float16)))
    sd = StableDiffusion.from_preset("sdxl-turbo", jit_compile=False)
    assert (sd.scheduler_name, sd.img_height, sd.img_width) == ("euler_a", 512, 512)
    assert sd.config["scheduler"]["timestep_spacing"] == "trailing"
    monkeypatch.setattr(keras.utils, "get_file", lambda **kwargs: pytest.fail("tried to download"))
    again = StableDiffusion.from_preset("sdxl-turbo", scheduler="ddim", img_height=64, img_width=64, jit_compile=False)
    assert (again.scheduler_name, again.img_height, again.img_width) == ("ddim", 64, 64)
    assert_same_weights(again, sd, (*MODELS, "text_encoder_2"))
