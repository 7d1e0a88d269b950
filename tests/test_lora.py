"""LoRA files merged into the weights (`lora.py`): kohya / A1111 and diffusers / PEFT files, alone and
stacked, against diffusers' StableDiffusionPipeline with `load_lora_weights` + `set_adapters` on the tiny
SD 1.x and SD 2.x reference pipelines (tolerance: one uint8 level); unloading bit-exact; bad files
refused, each with one error, the weights unchanged."""
import copy
import re

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ldm_reference import invert, unet_table
from reference import nchw, reference_images, relative_difference
from stable_diffusion import StableDiffusion, ldm, lora
from stable_diffusion.train import TEXT_TARGETS, TORCH_ADAMW, DiffusionTrainer, fit
from stable_diffusion.weights import named_variables

STEPS, PROMPTS, NEGATIVE = 2, ["a red circle"], ["green"]
NOISE = np.random.default_rng(8).standard_normal((1, 8, 8, 4), dtype=np.float32)


def adaptable(model):
    """{module name: weight shape} of every Linear and Conv2d of a torch model."""
    return {name: tuple(module.weight.shape) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def random_pair(shape, rank, generator):
    """(down, up) of a LoRA of a weight of `shape` (out, in[, kh, kw]): an update about half the weight's size."""
    out, fan_in, *kernel = shape
    down = torch.randn((rank, fan_in, *kernel), generator=generator) / np.sqrt(fan_in * np.prod(kernel or [1]))
    up = torch.randn((out, rank, *[1] * len(kernel)), generator=generator) * 0.4 / np.sqrt(rank)
    return down, up


def kohya_lora(path, pipe, *, seed, alpha=3.0, original_layout=False, skip=()):
    """A kohya LoRA file of every Linear and Conv2d of `pipe`'s UNet and text encoder: random, ranks 2 and 4,
    one `alpha` for all (diffusers gives attention modules the most common alpha, whatever their own: see
    `test_kohya_alpha_per_module_and_rank_without_one`).
    `original_layout`: UNet modules by their latent-diffusion names. Modules containing a string of `skip`
    are left out."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    unet = adaptable(pipe.unet)
    if original_layout:
        unet = {old: unet[new] for old, (new, _) in ldm.map_keys(unet, invert(unet_table(pipe.unet))).items()}
    modules = {**{f"lora_unet_{k}": s for k, s in unet.items()},
               **{f"lora_te_text_model_{k}": s for k, s in adaptable(pipe.text_encoder).items()}}
    for i, (module, shape) in enumerate(modules.items()):
        if any(text in module for text in skip):
            continue
        name = module.replace(".", "_")
        down, up = random_pair(shape, 2 + 2 * (i % 2), generator)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(alpha)})
    save_file(tensors, path)
    return path


def diffusers_lora(path, pipe, *, seed):
    """A diffusers LoRA file, written by `save_lora_weights` from PEFT adapters with random weights
    (`init_lora_weights=False`) added to a copy of `pipe`, with their configs as metadata: UNet
    attention, MLP, 3x3 / 1x1 convs and time projections at rank 4, alpha 12 (one module alpha 2, by
    `alpha_pattern`); text encoder projections at rank 2, alpha 4, rank-stabilized (alpha / sqrt(rank))."""
    pipe = copy.deepcopy(pipe)
    torch.manual_seed(seed)
    unet = LoraConfig(r=4, lora_alpha=12, init_lora_weights=False, alpha_pattern={"down_blocks.0.resnets.0.conv1": 2},
                      target_modules=["to_q", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1", "conv_shortcut",
                                      "time_emb_proj"])
    text = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, use_rslora=True,
                      target_modules=["q_proj", "v_proj", "fc1"])
    pipe.unet.add_adapter(unet)
    inject_adapter_in_model(text, pipe.text_encoder)  # transformers' add_adapter wants a newer peft
    StableDiffusionPipeline.save_lora_weights(
        path.parent, weight_name=path.name, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet.to_dict(), text_encoder_lora_adapter_metadata=text.to_dict())
    return path


def with_loras(pipe, loras):
    """A copy of the diffusers pipeline with the LoRA files `loras` [(path, scale, load_lora_weights kwargs)]
    loaded as adapters and weighted by `set_adapters`."""
    pipe = copy.deepcopy(pipe)
    for i, (path, _, options) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora{i}", **options)
    pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=[scale for _, scale, _ in loras])
    return pipe


def variables(sd):
    return [variable for model in (sd.text_encoder, sd.diffusion_model) for variable in model.weights]


def weights(sd):
    return [np.array(variable.numpy()) for variable in variables(sd)]


def assert_unchanged(sd, before):
    for variable, value in zip(variables(sd), before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)


@pytest.fixture
def loaded(ours):
    """ours(kind), its LoRAs unloaded after the test (the session shares the pipeline)."""
    used = []

    def get(kind):
        used.append(ours(kind))
        return used[-1]
    yield get
    for sd in used:
        sd.unload_lora()


def assert_equals_diffusers(sd, pipe, loras):
    """`sd` with `loras` [(path, scale, diffusers options)] loaded makes diffusers' images (after its own,
    different images without them, so its compiled step has run before the weights change) and text states."""
    generate = lambda: sd.text_to_image(PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, diffusion_noise=NOISE,
                                        verbose=False)
    base, states = generate(), sd.encode_text(PROMPTS)
    for path, scale, _ in loras:
        sd.load_lora(path, scale=scale)
    reference = with_loras(pipe, loras)
    expected = reference_images(reference, PROMPTS, negative_prompt=NEGATIVE, noise=NOISE, steps=STEPS)
    assert expected.std() > 10, "the reference images are flat: the comparison would prove little"
    assert np.abs(expected.astype(int) - base).mean() > 2, "the LoRAs hardly change the images"
    got = generate()
    diff = np.abs(got.astype(int) - expected).max()
    assert diff <= 1, f"max pixel difference {diff} vs StableDiffusionPipeline with the LoRAs (tolerance 1/255)"
    with torch.no_grad():
        text = reference.text_encoder(torch.from_numpy(sd.tokenize(PROMPTS).astype(np.int64)))[0].numpy()
    assert relative_difference(states, text) > 0.05, "the LoRAs hardly change the text encoder"
    assert relative_difference(sd.encode_text(PROMPTS), text) < 1e-4
    return base


@pytest.mark.parametrize("kind, kohya", [("sd1", True), ("sd2", False)])  # and both stacked on sd2, below
def test_lora_equals_diffusers(kind, kohya, reference, loaded, tmp_path):
    """A kohya file of every Linear / Conv2d, or a diffusers file from `save_lora_weights`, on UNet and text encoder."""
    pipe, _ = reference(kind)
    make = kohya_lora if kohya else diffusers_lora
    assert_equals_diffusers(loaded(kind), pipe, [(make(tmp_path / "lora.safetensors", pipe, seed=1), 0.8, {})])


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # peft, on a second adapter
def test_stacked_loras_equal_diffusers_and_unload_bit_exactly(reference, loaded, tmp_path):
    """On SD 2.x, a kohya file in the original (latent-diffusion) layout at 0.6 and a diffusers file at -0.7;
    diffusers reads the former given the UNet's config. Its converter maps the upsampler of a level without
    attention (`output_blocks.2.1.conv`) to a module that does not exist, so that one is left out."""
    pipe, _ = reference("sd2")
    sd = loaded("sd2")
    before = weights(sd)
    kohya = kohya_lora(tmp_path / "kohya.safetensors", pipe, seed=2, original_layout=True,
                       skip=("output_blocks.2.1.conv",))
    diffusers = diffusers_lora(tmp_path / "diffusers.safetensors", pipe, seed=3)
    base = assert_equals_diffusers(sd, pipe, [(kohya, 0.6, dict(unet_config=pipe.unet.config)), (diffusers, -0.7, {})])
    sd.unload_lora()
    assert_unchanged(sd, before)
    after = sd.text_to_image(PROMPTS, negative_prompt=NEGATIVE, num_steps=STEPS, diffusion_noise=NOISE, verbose=False)
    np.testing.assert_array_equal(after, base)


def kernel(sd, module):
    return named_variables(sd.diffusion_model)[f"{module}.weight"].numpy()


def test_kohya_alpha_per_module_and_rank_without_one(reference, loaded, tmp_path):
    """kohya-ss's and A1111's rule, which diffusers applies only where all modules share one alpha: each module's
    update is scale * alpha / rank * up @ down, alpha its `.alpha` or, absent, the rank (an update of up @ down)."""
    pipe, sd = reference("sd1")[0], loaded("sd1")
    generator, modules = torch.Generator().manual_seed(4), {
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (2, 1.0),  # Linear
        "mid_block.attentions.0.proj_in": (4, 8.0),  # a 1x1 conv in SD 1.x, a Dense here
        "mid_block.resnets.0.conv1": (4, None)}  # 3x3 conv, no alpha
    tensors, expected = {}, {}
    for module, (rank, alpha) in modules.items():
        name = "lora_unet_" + module.replace(".", "_")
        base = pipe.unet.get_submodule(module).weight.detach()
        down, up = random_pair(base.shape, rank, generator)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        update = (up.flatten(1) @ down.flatten(1)).reshape(base.shape) * 0.5 * (alpha or rank) / rank
        merged = (base + update).numpy()
        expected[module] = (merged.transpose(2, 3, 1, 0) if merged.shape[2:] == (3, 3)
                            else merged.reshape(merged.shape[:2]).T)  # Keras: (kh, kw, in, out), (in, out)
    save_file(tensors, tmp_path / "lora.safetensors")
    sd.load_lora(tmp_path / "lora.safetensors", scale=0.5)
    for module, value in expected.items():
        np.testing.assert_allclose(kernel(sd, module), value, atol=1e-6, err_msg=module)


def test_lora_of_another_architecture_is_refused(reference, loaded, tmp_path):
    """A LoRA of the deeper model (other widths, a third level) on the SD 1.x one: one error listing the
    shape mismatches and the modules this model lacks; no weight changed."""
    sd = loaded("sd1")
    before = weights(sd)
    path = kohya_lora(tmp_path / "deep.safetensors", reference("deep")[0], seed=5)
    with pytest.raises(ValueError, match="does not fit this model") as error:
        sd.load_lora(path)
    message = str(error.value)
    assert str(path) in message
    assert "lora_unet_conv_in updates a PyTorch (16, 4, 3, 3) weight, conv_in/kernel is (3, 3, 4, 32)" in message
    assert_unchanged(sd, before)


Q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def small_lora(path, changes=None, metadata=None):
    """A valid kohya file of two modules (UNet, text encoder) at `path`, with `changes` {key: tensor, or None
    to drop it} made first; changes=None: a file without tensors."""
    tensors = {f"{Q}.lora_down.weight": torch.ones(2, 64), f"{Q}.lora_up.weight": torch.ones(64, 2),
               f"{Q}.alpha": torch.tensor(1.0), f"{FC1}.lora_down.weight": torch.ones(2, 32),
               f"{FC1}.lora_up.weight": torch.ones(37, 2)}
    tensors = {} if changes is None else {**tensors, **changes}
    save_file({key: value for key, value in tensors.items() if value is not None}, path, metadata=metadata)
    return path


@pytest.mark.parametrize("changes, metadata, message", [
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 32),
      "lora_unet_foo.weight": torch.ones(1)}, None,
     r"unexpected tensor lora_unet_foo.weight \(1,\)\n  lora_te2_text_model_encoder_layers_0_mlp_fc1: no such layer"),
    ({f"{FC1}.lora_up.weight": None}, None, f"{FC1} has no up tensor"),
    ({f"{FC1}.lora_up.weight": torch.ones(37, 3)}, None, "not a LoRA of a linear or conv layer"),
    ({f"{Q}.alpha": torch.tensor(float("inf"))}, None, r"no finite alpha / rank \(inf\)"),
    ({f"{Q}.lora_down.weight": torch.ones(0, 64), f"{Q}.lora_up.weight": torch.ones(64, 0)}, None, "not a LoRA"),
    (None, None, "no LoRA tensors"),
    ({}, {"lora_adapter_metadata": "{"}, "lora_adapter_metadata is not JSON"),
])
def test_bad_lora_files_are_refused_whole(changes, metadata, message, loaded, tmp_path):
    """One ValueError naming the file and what is wrong; the valid module in the same file is not applied either."""
    sd = loaded("sd1")
    before = weights(sd)
    path = small_lora(tmp_path / "bad.safetensors", changes, metadata)
    with pytest.raises(ValueError, match=message) as error:
        sd.load_lora(path)
    assert str(path) in str(error.value)
    assert_unchanged(sd, before)


def test_unreadable_files_and_bad_scales(loaded, tmp_path):
    sd = loaded("sd1")
    before = weights(sd)
    good = small_lora(tmp_path / "good.safetensors", {})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    (tmp_path / "lora.ckpt").write_bytes(good.read_bytes())
    for path, message in [(truncated, "is not a readable safetensors file"),
                          (tmp_path / "lora.ckpt", "not a .safetensors file")]:
        with pytest.raises(ValueError, match=message):
            sd.load_lora(path)
    with pytest.raises(FileNotFoundError, match="No LoRA file at"):
        sd.load_lora(tmp_path / "missing.safetensors")
    for scale in (float("nan"), float("inf"), "1", True, None):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            sd.load_lora(good, scale=scale)
    with pytest.raises(TypeError, match="positional"):
        sd.load_lora(good, 0.5)
    assert_unchanged(sd, before)


# LoRA training (`train.train_lora`): one step of ours against PEFT + torch's AdamW, and what it saves loaded
# by diffusers. Linear layers, 3x3 and 1x1 convs in the UNet; the text encoder's attention projections.
STEP_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv_shortcut")
LEARNING_RATE = 1e-3


class FixedDraws(DiffusionTrainer):
    """A trainer fed its noise and timesteps: inputs (latents, noise, timesteps, token ids)."""

    def call(self, inputs):
        return self.prediction_and_target(*inputs)


def lora_parameters(pipe):
    """{key in a diffusers LoRA file (`unet.<module>.lora_A.weight`): parameter} of the PEFT adapters in `pipe`."""
    return {re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", prefix + name): parameter
            for prefix, model in (("unet.", pipe.unet), ("text_encoder.text_model.", pipe.text_encoder))
            for name, parameter in model.named_parameters() if ".lora_" in name}


def torch_step(pipe, latents, tokens, noise, timesteps):
    """One step of diffusers' `train_text_to_image_lora.py` on `pipe` (its LoRA loaded): loss, backward,
    gradients clipped to norm 1, torch AdamW with the script's settings but epsilon: Keras adds epsilon to
    sqrt(v) before the bias correction, torch after it, so at the first step Keras' epsilon 1e-8
    (`TORCH_ADAMW`) is torch's 1e-8 / sqrt(1 - beta_2), which then differ only where a gradient is
    within a few 1e-7 of zero."""
    parameters = lora_parameters(pipe)
    for model in (pipe.unet, pipe.text_encoder):
        model.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters.values(), lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=TORCH_ADAMW["epsilon"] / np.sqrt(1 - 0.999))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents, noise, timesteps = nchw(latents), nchw(noise), torch.from_numpy(timesteps.astype(np.int64))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    text = pipe.text_encoder(torch.from_numpy(tokens.astype(np.int64)))[0]
    loss = F.mse_loss(pipe.unet(noisy, timesteps, text).sample.float(), target.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(parameters.values()), 1.0)
    optimizer.step()
    return {key: parameter.detach().numpy() for key, parameter in parameters.items()}


@pytest.fixture(scope="module")
def trained_step(reference, tmp_path_factory):
    """On the SD 2.x pipeline (v-prediction): LoRAs of rank 2, alpha 3 with A as `lora.enable` draws it and B
    random (nonzero, so that both get gradients), written by `lora.write` ("start.safetensors"); one `fit` step of
    ours from there, written again ("step.safetensors"); the LoRA weights after one step of diffusers' recipe
    on the start file."""
    pipe, folder = reference("sd2")
    out = tmp_path_factory.mktemp("lora_step")
    sd = StableDiffusion.from_checkpoint(folder, img_height=64, img_width=64, jit_compile=False)
    keras.utils.set_random_seed(5)
    lora.enable(sd.diffusion_model, STEP_TARGETS, rank=2, alpha=3)
    lora.enable(sd.text_encoder, TEXT_TARGETS, rank=2, alpha=3)
    rng = np.random.default_rng(6)
    for layer in (*sd.diffusion_model.layers, *sd.text_encoder.layers):
        if getattr(layer, "lora_enabled", False):
            layer.lora_kernel_b.assign(rng.standard_normal(layer.lora_kernel_b.shape).astype("float32") * 0.3)
    models = {"unet": sd.diffusion_model, "text_encoder": sd.text_encoder}
    lora.write(out / "start.safetensors", models)
    latents, noise = rng.standard_normal((2, 2, 8, 8, 4), dtype=np.float32)
    tokens, timesteps = sd.tokenize(["a red circle", "a blue square on a gray background"]), np.array([37, 811])
    trainer = FixedDraws(sd.text_encoder, sd.diffusion_model, sd.scheduler.alphas_cumprod, sd.tokenize("")[0],
                         prediction_type=sd.scheduler.config["prediction_type"])
    fit(trainer, (latents, noise, timesteps.astype("int32"), tokens), epochs=1, batch_size=2,
        learning_rate=LEARNING_RATE, adamw=TORCH_ADAMW, verbose=0)
    lora.write(out / "step.safetensors", models)
    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights(out / "start.safetensors")
    return out, torch_step(theirs, latents, tokens, noise, timesteps)


@pytest.mark.slow  # with the next: a 25 s fixture (one fit step and one PEFT step)
def test_one_training_step_equals_peft_and_torch_adamw(trained_step):
    """The LoRA weights after one step equal PEFT's after torch AdamW's (lr 1e-3, weight decay 1e-2, epsilon: see
    `torch_step`, gradients clipped to norm 1), from the same start: 99% of them to within 0.1% of the learning
    rate, all to within 2% (gradients within a few epsilon of zero, where Adam's first step, about
    lr * g / (|g| + epsilon), magnifies float rounding); the step moves most weights by about the learning rate."""
    out, expected = trained_step
    start, got = (load_file(out / f"{name}.safetensors") for name in ("start", "step"))
    assert got.keys() == expected.keys()
    assert {key.split(".")[-3] for key in got} == {*STEP_TARGETS[:3], "0", *STEP_TARGETS[4:], *TEXT_TARGETS}
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].numpy(), value, rtol=0, atol=0.02 * LEARNING_RATE, err_msg=key)
    differences = np.concatenate([np.abs(got[key].numpy() - value).ravel() for key, value in expected.items()])
    assert np.quantile(differences, 0.99) < 1e-3 * LEARNING_RATE  # weight decay alone moves them by ~3e-3 lr
    moved = np.concatenate([np.abs(value - start[key].numpy()).ravel() for key, value in expected.items()])
    assert np.median(moved) > 0.5 * LEARNING_RATE, "the step hardly moves the weights: the comparison would prove little"


@pytest.mark.slow
def test_trained_lora_loads_in_diffusers_as_in_ours(trained_step, reference, loaded):
    """What `lora.write` saved after the step: diffusers' `load_lora_weights` and our `load_lora` make the same
    images (one uint8 level) and text states."""
    out, _ = trained_step
    assert_equals_diffusers(loaded("sd2"), reference("sd2")[0], [(out / "step.safetensors", 1.0, {})])
