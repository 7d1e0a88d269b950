"""SDXL LoRAs (`lora.py`) and embeddings (`embeddings.py`) on the tiny SDXL base of `reference.make_sdxl_pipeline`,
against diffusers' StableDiffusionXLPipeline with `load_lora_weights` + `set_adapters` and with two
`load_textual_inversion` calls: the final latents within 1e-4 of their scale, the images within one uint8 level.
LoRA files: diffusers' (`save_lora_weights` of PEFT adapters on the UNet and both text encoders) and kohya's (the
same tensors under sgm's UNet names and `lora_te1_` / `lora_te2_`, which diffusers reads as it reads the first);
files of SD 1.x refused, and SDXL's on SD 1.x."""
import copy
import json
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionXLPipeline

from ldm_reference import invert, unet_table
from reference import TINY_CONFIG, nchw, nhwc, relative_difference
from stable_diffusion import StableDiffusion, embeddings, ldm
from test_lora import kohya_lora, with_loras

STEPS, GUIDANCE, PROMPTS, NEGATIVE = 2, 7.5, ["a red circle"], ["green"]
NOISE = np.random.default_rng(9).standard_normal((1, 8, 8, 4), dtype=np.float32)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "linear_1", "linear_2"]  # linear_*: time and text_time
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
NAMES = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "config")  # what loading an embedding changes


@pytest.fixture
def ours(sdxl):
    """Our pipeline of the session's tiny SDXL (`conftest.sdxl`), its LoRAs unloaded and its text encoders, tokenizers,
    config and compiled encoders (`runtime.skipping_model`) put back after the test."""
    sd = sdxl[2](False)
    kept = {name: getattr(sd, name) for name in NAMES}
    skipped = dict(sd.skipped)
    yield sd
    sd.unload_lora()
    for name, value in kept.items():
        setattr(sd, name, value)
    sd.skipped.update(skipped)


def diffusers_sdxl_lora(path, pipe, *, seed, unet_rank=4, text_rank=2):
    """A diffusers LoRA file written by `StableDiffusionXLPipeline.save_lora_weights` from PEFT adapters with random
    weights (`init_lora_weights=False`: lora_B nonzero) on a copy of `pipe`'s UNet (`UNET_TARGETS`: attention, MLP,
    convs, time and text_time embeddings; alpha 2 rank) and both text encoders (`TEXT_TARGETS`, and the projection
    of `text_encoder_2`; alpha 1.5 rank), with their configs as metadata."""
    torch.manual_seed(seed)
    unet, text_encoder, text_encoder_2 = (copy.deepcopy(model) for model in (pipe.unet, pipe.text_encoder,
                                                                             pipe.text_encoder_2))
    configs = dict(unet=LoraConfig(r=unet_rank, lora_alpha=2 * unet_rank, init_lora_weights=False,
                                   target_modules=UNET_TARGETS),
                   text_encoder=LoraConfig(r=text_rank, lora_alpha=1.5 * text_rank, init_lora_weights=False,
                                           target_modules=TEXT_TARGETS),
                   text_encoder_2=LoraConfig(r=text_rank, lora_alpha=1.5 * text_rank, init_lora_weights=False,
                                             target_modules=[*TEXT_TARGETS, "text_projection"]))
    unet.add_adapter(configs["unet"])
    inject_adapter_in_model(configs["text_encoder"], text_encoder)
    inject_adapter_in_model(configs["text_encoder_2"], text_encoder_2)
    models = dict(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    StableDiffusionXLPipeline.save_lora_weights(
        path.parent, weight_name=path.name, **{f"{name}_lora_layers": get_peft_model_state_dict(model)
                                               for name, model in models.items()},
        **{f"{name}_lora_adapter_metadata": config.to_dict() for name, config in configs.items()})
    return path


def kohya_from_diffusers(path, source, pipe):
    """The diffusers LoRA file `source` in kohya-ss's SDXL layout (sd-scripts' `lora_unet_` over its sgm UNet,
    `lora_te1_` / `lora_te2_` over transformers 4's text encoders): UNet modules under their sgm names (diffusers'
    single-file table inverted), "_" for ".", lora_A / lora_B as lora_down / lora_up, each module's `.alpha` from the
    file's PEFT configs."""
    tensors = load_file(source)
    with safe_open(source, "pt") as file:
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    modules = {key.rsplit(".lora_", 1)[0] for key in tensors}  # unet.down_blocks.1...to_q, text_encoder.encoder...
    sgm = invert(unet_table(pipe.unet))
    kohya = {}
    for module in modules:
        component, name = module.split(".", 1)
        if component == "unet":
            name, = ldm.map_keys([name], sgm)
        elif name != "text_projection":
            name = "text_model." + name.removeprefix("text_model.")
        new = f"{prefixes[component]}_{name.replace('.', '_')}"
        kohya.update({f"{new}.lora_down.weight": tensors[f"{module}.lora_A.weight"],
                      f"{new}.lora_up.weight": tensors[f"{module}.lora_B.weight"],
                      f"{new}.alpha": torch.tensor(float(metadata[f"{component}.lora_alpha"]))})
    save_file(kohya, path)
    return path


def generate(pipe_or_sd, prompts=PROMPTS):
    """(final latents (1, 8, 8, 4), uint8 images) of diffusers' pipeline or ours on `prompts`, NEGATIVE, NOISE;
    diffusers' latents decoded as its pipeline decodes them (float32, no latents_mean)."""
    if isinstance(pipe_or_sd, StableDiffusion):
        latents = pipe_or_sd.text_to_image(prompts, negative_prompt=NEGATIVE, num_steps=STEPS, diffusion_noise=NOISE,
                                           unconditional_guidance_scale=GUIDANCE, return_latents=True, verbose=False)
        return latents, pipe_or_sd.decode(latents)
    pipe = pipe_or_sd
    latents = pipe(prompts, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64,
                   width=64, latents=nchw(NOISE), output_type="latent").images
    with torch.no_grad():
        images = pipe.image_processor.postprocess(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample,
                                                  output_type="np")
    return nhwc(latents), np.round(images * 255).astype("uint8")


def encoded(pipe_or_sd, prompts=PROMPTS):
    """(states (1, 77, 32), text_embeds (1, 24)) of `prompts`: both text encoders' states, the second's pooled
    output."""
    if isinstance(pipe_or_sd, StableDiffusion):
        return pipe_or_sd.encode_text(prompts)
    with torch.no_grad():
        states, _, pooled, _ = pipe_or_sd.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return states.numpy(), pooled.numpy()


def assert_encoded(sd, reference, what, prompts=PROMPTS):
    """Our (states, text_embeds) of `prompts` equal diffusers' `encode_prompt` within 1e-4 of their scale; returns
    ours."""
    got, expected = encoded(sd, prompts), encoded(reference, prompts)
    for name, ours, theirs in zip(("states", "text_embeds"), got, expected):
        assert relative_difference(ours, theirs) < 1e-4, f"{name} vs StableDiffusionXLPipeline with {what}"
    return got


def assert_equal(sd, reference, what, prompts=PROMPTS):
    """Our text encodings and final latents of `prompts` equal diffusers' `reference` within 1e-4 of their scale, the
    images within one uint8 level; returns our ((states, text_embeds), latents)."""
    got = assert_encoded(sd, reference, what, prompts)
    (latents, images), (expected_latents, expected_images) = generate(sd, prompts), generate(reference, prompts)
    diff = relative_difference(latents, expected_latents)
    assert diff <= 1e-4, f"final latents: {diff:.2e} of their scale vs StableDiffusionXLPipeline with {what}"
    assert expected_images.std() > 10, "the reference images are flat: the comparison would prove little"
    diff = np.abs(images.astype(int) - expected_images).max()
    assert diff <= 1, f"images: max pixel difference {diff} vs StableDiffusionXLPipeline with {what}"
    return got, latents


def assert_changed(now, before, what):
    """((states, text_embeds), latents) `now` differ from `before` in each text encoder's part (and, where `before`
    has latents, in the final latents), so that a parity test would fail if one of them were left out."""
    ((states, text_embeds), latents), ((old_states, old_text_embeds), old_latents) = now, before
    for name, value, old in (("text_encoder", states[..., :16], old_states[..., :16]),
                             ("text_encoder_2", states[..., 16:], old_states[..., 16:]),
                             ("text_encoder_2's projection", text_embeds, old_text_embeds),
                             ("final latents", latents, old_latents)):
        assert old is None or relative_difference(value, old) > 0.02, f"{what} hardly change the {name}"


def snapshot(sd):
    """[(variable, a copy of its value)] of the weights of `sd`'s text encoders and UNet."""
    models = [model for model in (sd.text_encoder, sd.text_encoder_2, sd.diffusion_model) if model is not None]
    return [(variable, np.array(variable.numpy())) for model in models for variable in model.weights]


def assert_unchanged(weights):
    for variable, value in weights:
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


@pytest.fixture(scope="module")
def before(sdxl):
    """Our (states, text_embeds) and final latents without LoRAs or embeddings."""
    return encoded(sdxl[2](False)), generate(sdxl[2](False))[0]


@pytest.fixture(scope="module")
def sd1():
    """A tiny SD 1.x pipeline of ours (random weights): the other family."""
    return StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=False)


@pytest.fixture(scope="module")
def lora_files(sdxl, tmp_path_factory):
    """{name: path}: diffusers files of seeds 1 and 2, and the kohya version of the first."""
    pipe, folder = sdxl[0], tmp_path_factory.mktemp("sdxl_loras")
    files = {name: diffusers_sdxl_lora(folder / f"{name}.safetensors", pipe, seed=seed)
             for name, seed in (("diffusers", 1), ("other", 2))}
    files["kohya"] = kohya_from_diffusers(folder / "kohya.safetensors", files["diffusers"], pipe)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers", "kohya"])
def test_lora_equals_diffusers(name, sdxl, ours, before, lora_files):
    """A `save_lora_weights` file (`unet.`, `text_encoder.`, `text_encoder_2.` modules) at 0.8, or the same tensors in
    kohya's layout, which diffusers reads as the first."""
    reference = with_loras(sdxl[0], [(lora_files[name], 0.8, {})])
    if name == "kohya":
        diffusers = with_loras(sdxl[0], [(lora_files["diffusers"], 0.8, {})])
        assert relative_difference(generate(reference)[0], generate(diffusers)[0]) < 1e-5, "diffusers reads them apart"
    ours.load_lora(lora_files[name], scale=0.8)
    assert_changed(assert_equal(ours, reference, f"the {name} LoRA"), before, f"the {name} LoRA")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # peft, on a second adapter
def test_stacked_loras_equal_diffusers_and_unload_bit_exactly(sdxl, ours, before, lora_files):
    """The kohya file (sgm's UNet names, `lora_te1_`, `lora_te2_`) at 0.6 and a diffusers file at -0.7 equal
    diffusers; `unload_lora` restores every weight bit-exactly."""
    assert any(key.startswith("lora_unet_output_blocks_") for key in load_file(lora_files["kohya"]))
    weights = snapshot(ours)
    loras = [(lora_files["kohya"], 0.6, {}), (lora_files["other"], -0.7, {})]
    for path, scale, _ in loras:
        ours.load_lora(path, scale=scale)
    assert_changed(assert_equal(ours, with_loras(sdxl[0], loras), "two LoRAs"), before, "two LoRAs")
    ours.unload_lora()
    assert_unchanged(weights)
    np.testing.assert_array_equal(generate(ours)[0], before[1])


def test_loras_of_the_other_family_are_refused(ours, sd1, reference, lora_files, tmp_path):
    """An SD 1.x LoRA on SDXL, and SDXL's LoRAs on SD 1.x: one ValueError listing what fits no layer (other shapes,
    modules the model lacks); no weight changed."""
    sd1_lora = kohya_lora(tmp_path / "sd1.safetensors", reference("sd1")[0], seed=5)
    for sd, path, listed in [
            (ours, sd1_lora, "lora_te_text_model_encoder_layers_0_mlp_fc1 updates a PyTorch (37, 32) weight, "
                             "encoder-layers-0-mlp-fc1/kernel is (16, 37)"),
            (sd1, lora_files["diffusers"], "text_encoder.encoder.layers.0.mlp.fc1 updates a PyTorch (37, 16) weight"),
            (sd1, lora_files["kohya"], "lora_unet_input_blocks_1_0_in_layers_2 updates a PyTorch (16, 16, 3, 3) "
                                       "weight, down_blocks-0-resnets-0-conv1/kernel is (3, 3, 8, 8)")]:
        weights = snapshot(sd)
        with pytest.raises(ValueError, match="does not fit this model") as error:
            sd.load_lora(path)
        assert str(path) in str(error.value) and f"\n  {listed}" in str(error.value), str(error.value)
        assert re.search(r"\.\.\. and \d+ more$", str(error.value))
        assert_unchanged(weights)


def sdxl_embedding(path, vectors):
    """An embedding file of `vectors`, e.g. SDXL's as civitai publishes them: `{"clip_l": (n, 768), "clip_g": (n,
    1280)}` (here 16 and 16)."""
    save_file(vectors, path)
    return path


def test_sdxl_embedding_files_read_as_written(tmp_path):
    """`.safetensors` and pickled `.pt` (A1111 reads both): the file name as token, each encoder's vectors."""
    vectors = dict(clip_l=torch.randn(2, 8), clip_g=torch.randn(2, 12))
    torch.save(vectors, tmp_path / "pickled.pt")
    for path in (sdxl_embedding(tmp_path / "unaesthetic.safetensors", vectors), tmp_path / "pickled.pt"):
        token, got = embeddings.read(path)
        assert token == path.stem and list(got) == ["text_encoder", "text_encoder_2"]
        for name, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            np.testing.assert_array_equal(got[name], vectors[key].numpy())
    assert embeddings.read(path, token="<other>")[0] == "<other>"


@pytest.mark.parametrize("images", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_embedding_equals_diffusers_two_calls(images, sdxl, ours, tmp_path):
    """An SDXL embedding of 2 vectors (file name: the token, as A1111 prompts use it) equals diffusers' two
    `load_textual_inversion` calls, clip_g into text_encoder_2 and clip_l into text_encoder, under the same token:
    the token ids of both tokenizers, both encoders' states and the pooled projection within 1e-4 of their scale
    (the UNet's inputs), and (`images`) the final latents and images."""
    generator = torch.Generator().manual_seed(3)
    vectors = {key: torch.randn(2, 16, generator=generator) for key in ("clip_l", "clip_g")}
    path = sdxl_embedding(tmp_path / "shiny.safetensors", vectors)
    changed = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")  # the rest is shared
    pipe = StableDiffusionXLPipeline(**{**sdxl[0].components, **{name: copy.deepcopy(sdxl[0].components[name])
                                                                for name in changed}}, add_watermarker=False)
    pipe.load_textual_inversion(vectors["clip_g"], token="shiny", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(vectors["clip_l"], token="shiny", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    prompts = ["a shiny red circle"]
    without = encoded(ours, prompts)  # "shiny" as the word it is without the embedding
    ours.load_textual_inversion(path)
    for tokenizer, theirs in ((ours.tokenizer, pipe.tokenizer), (ours.tokenizer_2, pipe.tokenizer_2)):
        assert tokenizer("a shiny circle")[0, 1:5].tolist() == theirs(
            pipe.maybe_convert_prompt("a shiny circle", theirs)).input_ids[1:5]
    if images:
        assert_changed(assert_equal(ours, pipe, "the embedding", prompts), (without, None), "the embedding")
    else:
        assert_changed((assert_encoded(ours, pipe, "the embedding", prompts), None), (without, None), "the embedding")


@pytest.mark.parametrize("vectors, sdxl_model, message", [
    (dict(clip_l=torch.zeros(1, 16), clip_g=torch.zeros(1, 12)), True,
     "holds an embedding (clip_g) of width 12; this model's text encoder 2 is 16 wide"),
    (dict(emb_params=torch.zeros(1, 16)), True,
     "holds vectors for text_encoder; this model's text encoders are text_encoder and text_encoder_2"),
    (dict(clip_l=torch.zeros(1, 8), clip_g=torch.zeros(1, 8)), False,
     "holds vectors for text_encoder and text_encoder_2; this model's text encoders are text_encoder:"),
], ids=["clip_g of another width", "SD 1.x embedding on SDXL", "SDXL embedding on SD 1.x"])
def test_embeddings_of_other_widths_or_models_are_refused(vectors, sdxl_model, message, ours, sd1, tmp_path):
    """One ValueError naming the file; the text encoders, tokenizers and config stay as they were."""
    sd = ours if sdxl_model else sd1
    kept = [getattr(sd, name) for name in NAMES]
    path = sdxl_embedding(tmp_path / "embedding.safetensors", vectors)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        sd.load_textual_inversion(path)
    assert str(path) in str(error.value)
    assert all(getattr(sd, name) is value for name, value in zip(NAMES, kept))
    assert all(t is None or not t.added_tokens for t in (sd.tokenizer, sd.tokenizer_2))
