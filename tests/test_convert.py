"""Original single-file checkpoints (SD 1.x / 2.x, `.safetensors` / `.ckpt`): the test writer proven
against diffusers' own single-file converters, our models loaded from such files vs the reference
pipelines, training-only and EMA tensors, standalone VAEs, bundles, bad input, and presets."""
import collections
import functools
import json
import re
import shutil

import keras
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

import ldm_reference
from reference import (CONFIGS, make_pipeline, nchw, nhwc, reference_images, relative_difference, rounded,
                       to_numpy)
from stable_diffusion import (StableDiffusion, bundle, checkpoints, diffusers_folder, keras_internals, ldm, presets,
                              weights)
from stable_diffusion.convert import main as convert

MODELS = ("text_encoder", "diffusion_model", "decoder", "encoder")


class Bench:
    """Tiny reference pipelines, their original-layout files and our models loaded from them, each made once."""

    def __init__(self, root):
        self.root = root

    @functools.cache
    def pipe(self, kind):
        (self.root / kind).mkdir()
        return make_pipeline(kind, self.root / kind)

    @functools.cache
    def file(self, kind, suffix, dtype=torch.float32, ema=None, vae=True):
        state = ldm_reference.ldm_state_dict(self.pipe(kind), kind, ema, vae)
        name = f"{kind}-{str(dtype).split('.')[1]}-{ema}-{vae}{suffix}"
        return ldm_reference.write(state, self.root / name, dtype)

    @functools.cache
    def load(self, kind, path, **options):
        return StableDiffusion.from_checkpoint(path, img_height=64, img_width=64, jit_compile=False,
                                               config=ldm_reference.overrides(self.pipe(kind)), **options)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return Bench(tmp_path_factory.mktemp("ldm"))


def variable_values(sd, models=MODELS):
    return {f"{name}/{v.path}": v.numpy() for name in models for v in getattr(sd, name).weights}


def assert_same_weights(a, b, models=MODELS):
    wa, wb = variable_values(a, models), variable_values(b, models)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("ema", [None, "ema"])
def test_writer_round_trips_through_diffusers_converters(kind, ema, bench):
    pipe = bench.pipe(kind)
    state = ldm_reference.ldm_state_dict(pipe, kind, ema)
    converted = ldm_reference.to_diffusers(state, pipe, kind, extract_ema=ema == "ema")
    layers = pipe.text_encoder.config.num_hidden_layers
    converted["text_encoder"] = {  # diffusers drops only block 23 (ViT-H's last) and keeps the projection
        k.removeprefix("text_model."): v for k, v in converted["text_encoder"].items()
        if not k.endswith("position_ids") and f"layers.{layers}." not in k and k != "text_projection.weight"}
    expected = dict(unet=pipe.unet.state_dict(), vae=pipe.vae.state_dict(),
                    text_encoder=ldm_reference.text_state_dict(pipe.text_encoder))
    for component, reference in expected.items():
        got = converted[component]
        assert got.keys() == reference.keys(), f"{component}: {sorted(got.keys() ^ reference.keys())[:5]}"
        unequal = [k for k in reference if not torch.equal(got[k], reference[k])]
        assert not unequal, f"{component}: diffusers reads other values for {unequal[:5]}"


CASES = [("sd1", ".safetensors", torch.float32, None, None),
         ("sd2", ".ckpt", torch.float32, None, None),
         ("sd1", ".ckpt", torch.float16, "ema", None),  # full file: EMA by default
         ("sd2", ".safetensors", torch.float16, "training", False),  # full file, use_ema=False
         ("sd2", ".safetensors", torch.bfloat16, None, None)]


@pytest.mark.parametrize("kind, suffix, dtype, ema, use_ema", CASES)
def test_components_equal_reference(kind, suffix, dtype, ema, use_ema, bench):
    pipe = rounded(bench.pipe(kind), dtype)
    sd = bench.load(kind, bench.file(kind, suffix, dtype, ema), use_ema=use_ema)
    rng = np.random.default_rng(1)
    ids = sd.tokenize(["a red circle", "a blue square"])
    latents = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    timesteps, context = np.array([10.0, 700.0], "float32"), rng.standard_normal((2, 77, 32), dtype=np.float32)
    images = rng.uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    with torch.no_grad():
        expected = dict(
            text_encoder=to_numpy(pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state),
            diffusion_model=nhwc(pipe.unet(nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample),
            decoder=nhwc(pipe.vae.decode(nchw(latents) / pipe.vae.config.scaling_factor).sample),
            encoder=nhwc(pipe.vae.encode(nchw(images)).latent_dist.parameters))
    got = dict(text_encoder=sd.text_encoder.predict_on_batch(ids),
               diffusion_model=sd.diffusion_model.predict_on_batch([latents, timesteps, context]),
               decoder=sd.decoder.predict_on_batch(latents), encoder=sd.encoder.predict_on_batch(images))
    diffs = {name: relative_difference(got[name], expected[name]) for name in MODELS}
    print(f"\n{kind} {suffix} {dtype} ema={ema}: max abs diff / output scale {diffs}")
    assert all(diff <= 1e-4 for diff in diffs.values()), f"vs diffusers/transformers (tolerance 1e-4): {diffs}"


@pytest.mark.parametrize("kind, suffix", [("sd1", ".safetensors"), ("sd2", ".ckpt")])  # epsilon, v
def test_text_to_image_equals_diffusers(kind, suffix, bench):
    sd = bench.load(kind, bench.file(kind, suffix))
    pipe = bench.pipe(kind)  # as diffusers' from_single_file: SD 1.5 / 2.1's scheduler config
    pipe.scheduler = DDIMScheduler(**ldm.SCHEDULER, prediction_type=sd.config["scheduler"]["prediction_type"])
    assert sd.config["scheduler"]["prediction_type"] == CONFIGS[kind]["prediction_type"]
    prompts, negative = ["a red circle", "a blue square"], ["green", ""]
    noise = np.random.default_rng(4).standard_normal((2, 8, 8, 4), dtype=np.float32)
    expected = reference_images(pipe, prompts, negative_prompt=negative, noise=noise, steps=6)
    got = sd.text_to_image(prompts, negative_prompt=negative, num_steps=6, diffusion_noise=noise, verbose=False)
    assert expected.std() > 10, "the reference images are flat: the comparison would prove little"
    diff = np.abs(got.astype(int) - expected).max()
    assert diff <= 1, f"max pixel difference {diff} vs StableDiffusionPipeline (tolerance 1/255)"


def test_defaults_follow_diffusers(bench):
    sd1_settings, sd2_settings = (ldm_reference.overrides(bench.pipe(kind)) for kind in ("sd1", "sd2"))  # tiny widths
    sd1 = checkpoints.read(bench.file("sd1", ".safetensors"), config=sd1_settings)
    sd2 = checkpoints.read(bench.file("sd2", ".ckpt"), config=sd2_settings)
    assert (sd1.config["scheduler"]["prediction_type"], sd1.img_height, sd1.tokenizer.pad_token_id) == ("epsilon", 512, 49407)
    assert (sd2.config["scheduler"]["prediction_type"], sd2.img_height, sd2.tokenizer.pad_token_id) == ("v_prediction", 768, 0)
    epsilon = checkpoints.read(bench.file("sd2", ".ckpt"), prediction_type="epsilon", config=sd2_settings)
    assert epsilon.img_height == 512
    state = ldm_reference.ldm_state_dict(bench.pipe("sd2"), "sd2")  # SD 2.0-base's global step
    base = ldm_reference.write(state, bench.root / "base.ckpt", global_step=ldm.SD2_BASE_GLOBAL_STEP)
    assert checkpoints.read(base, config=sd2_settings).config["scheduler"]["prediction_type"] == "epsilon"
    assert sd2.config["scheduler"] == dict(ldm.SCHEDULER, prediction_type="v_prediction")


def test_use_ema_chooses_between_two_unet_sets(bench):
    full = ldm.open_single_file(bench.file("sd1", ".ckpt", torch.float16, "ema"))[0].shapes
    only = ldm.open_single_file(bench.file("sd1", ".safetensors"))[0].shapes
    sources = lambda shapes, use_ema: {key.split(".")[0] for key, _ in
                                       ldm.plan(shapes, "file", use_ema).names[("diffusion_model",)].values()}
    assert sources(full, None) == sources(full, True) == {"model_ema"}
    assert sources(full, False) == sources(only, None) == sources(only, True) == sources(only, False) == {"model"}


SD15 = dict(unet=dict(cross_attention_dim=768, attention_head_dim=8),
            text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      hidden_act="quick_gelu"))
SD21 = dict(unet=dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
            text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                      hidden_act="gelu"))


@pytest.mark.parametrize("family, spec", [("sd1", SD15), ("sd2", SD21)])
def test_full_size_architecture_inferred(family, spec):
    """The family rules (8 heads, 64-wide heads, penultimate OpenCLIP layer) give SD 1.5 / 2.1's
    diffusers configs from the full-size key shapes (models on the meta device: no memory)."""
    with torch.device("meta"):
        pipe = type("Pipe", (), dict(
            unet=UNet2DConditionModel(**spec["unet"]),
            vae=AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4),
            text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **spec["text"]))))
    state = ldm_reference.ldm_state_dict(pipe, family)
    plan = ldm.plan({k: tuple(v.shape) for k, v in state.items()}, family)
    expected = dict(diffusion_model=diffusers_folder.unet_config(dict(pipe.unet.config)),
                    text_encoder=diffusers_folder.text_encoder_config(pipe.text_encoder.config.to_dict()),
                    **diffusers_folder.vae_configs(dict(pipe.vae.config)))
    for name, config in plan.config.items():
        assert config == {k: expected[name][k] for k in config}, name
    assert plan.family == family


def test_standalone_vae_replaces_the_checkpoint_vae(bench, tmp_path):
    pipe = bench.pipe("sd1")
    vae_file = ldm_reference.write(
        {**ldm_reference.vae_state_dict(pipe.vae, prefix=""), "loss.logvar": torch.zeros(()),
         "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4), "model_ema.decay": torch.ones(())},
        tmp_path / "vae-ft-mse.ckpt")
    without_vae = bench.file("sd1", ".safetensors", vae=False)
    sd = bench.load("sd1", without_vae, vae=vae_file)
    assert_same_weights(sd, bench.load("sd1", bench.file("sd1", ".safetensors")))


def test_bundle_reloads_bit_exact(bench, tmp_path):
    source = bench.file("sd2", ".ckpt")
    original = bench.load("sd2", source)
    original.save(tmp_path / "bundle")
    assert not list(tmp_path.glob(".*partial*"))
    again = StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)
    assert (again.img_height, again.tokenizer.pad_token_id) == (64, 0)
    assert again.config["scheduler"]["prediction_type"] == "v_prediction"
    assert_same_weights(again, original)
    for checkpoint in (checkpoints.read(source, config=ldm_reference.overrides(bench.pipe("sd2"))),
                       checkpoints.read(tmp_path / "bundle")):  # into variables that have values
        checkpoint.load_into(again)
        assert_same_weights(again, original)
    np.testing.assert_array_equal(again.text_to_image("a cat", num_steps=2, seed=1, verbose=False),
                                  original.text_to_image("a cat", num_steps=2, seed=1, verbose=False))


def safetensors_header(path):
    """(header, where the data starts) of a safetensors file, read as the format's specification says."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        return json.loads(file.read(length)), 8 + length


def stored_tensors(path):
    """{key: torch tensor} of a bundle weights file read with safetensors' own reader, padding left out."""
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys() if not key.startswith(bundle.PADDING)}


def test_bundle_files_are_aligned_safetensors_in_the_keras_layout(bench, tmp_path):
    """Each bundle weights file is a safetensors file safetensors' own reader opens, holding every
    variable under its checkpoint key, as it is in memory (with every variable random: each comes back
    in its place), each tensor starting on a 64-byte boundary of the file."""
    sd = bench.load("sd1", bench.file("sd1", ".safetensors"))
    rng = np.random.default_rng(0)
    for name in MODELS:
        for variable in getattr(sd, name).weights:
            variable.assign(rng.standard_normal(variable.shape).astype("float32"))
    sd.save(tmp_path / "bundle")
    paddings = 0
    for name in MODELS:
        path = tmp_path / "bundle" / f"{name}.safetensors"
        header, data_start = safetensors_header(path)
        assert header.pop("__metadata__") == {"format": "keras-stable-diffusion/2", "layout": "keras"}
        paddings += sum(key.startswith("__padding__.") for key in header)
        assert all((data_start + entry["data_offsets"][0]) % 64 == 0 for key, entry in header.items()
                   if not key.startswith("__padding__.")), name
        model = getattr(sd, name)
        expected = {weights.variable_key(layer, v): v.numpy() for layer in model.layers for v in layer.weights}
        stored = stored_tensors(path)
        assert stored.keys() == expected.keys(), name
        for key, value in expected.items():
            np.testing.assert_array_equal(stored[key].numpy(), value, err_msg=key)
    assert paddings, "no tensor needed padding: the test would not see padding skipped"
    conv_in = safetensors_header(tmp_path / "bundle" / "diffusion_model.safetensors")[0]["conv_in.weight"]
    assert conv_in["shape"] == [3, 3, 4, 32]  # Keras' (kh, kw, in, out); PyTorch's is (out, in, kh, kw)
    assert_same_weights(StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False), sd)


@pytest.mark.parametrize("policy, stored", [("float16", "F16"),
                                            pytest.param("bfloat16", "BF16", marks=pytest.mark.slow)])
def test_bundle_keeps_the_dtype_of_the_variables(policy, stored, bench, tmp_path):
    bench.load("sd1", bench.file("sd1", ".safetensors")).save(tmp_path / "float32")
    sd = StableDiffusion.from_checkpoint(tmp_path / "float32", jit_compile=False, dtype=policy)
    sd.save(tmp_path / policy)
    path = tmp_path / policy / "decoder.safetensors"
    header, _ = safetensors_header(path)
    assert {entry["dtype"] for key, entry in header.items() if key.startswith("decoder.")} == {stored}
    expected = {weights.variable_key(layer, v): v.numpy() for layer in sd.decoder.layers for v in layer.weights}
    for key, tensor in stored_tensors(path).items():
        np.testing.assert_array_equal(tensor.float().numpy(), expected[key].astype("float32"), err_msg=key)
    again = StableDiffusion.from_checkpoint(tmp_path / policy, jit_compile=False, dtype=policy)
    assert {v.dtype for v in again.decoder.weights} == {policy}
    assert_same_weights(again, sd)


def test_bundle_weights_are_mapped_copy_on_write(bench, tmp_path):
    """On TensorFlow loading makes each variable a view of its privately mapped bundle file (nothing is
    copied up front); writing a variable never reaches the file, and saving over the bundle a pipeline
    was loaded from is safe."""
    sd = bench.load("sd1", bench.file("sd1", ".safetensors"))
    sd.save(tmp_path / "bundle")
    again = StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)
    if keras.backend.backend() == "tensorflow":
        mapped = []
        for line in open("/proc/self/maps"):
            addresses, *_, path = line.split()
            if path.startswith(str(tmp_path / "bundle")):
                mapped.append([int(address, 16) for address in addresses.split("-")])
        for variable in (v for name in MODELS for v in getattr(again, name).weights):
            address = np.from_dlpack(variable.value.value()).ctypes.data  # the tf.Variable's buffer
            assert any(start <= address < end for start, end in mapped), variable.path
    for variable in again.decoder.weights:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    assert_same_weights(StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False), sd)
    again.save(tmp_path / "bundle", overwrite=True)  # replaces the files `again` maps
    assert_same_weights(StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False), again)
    assert_same_weights(again, sd, models=("text_encoder", "diffusion_model", "encoder"))


def test_loading_reads_each_tensor_once_into_memory_of_its_own(bench):
    """A strict load reads every tensor once (checking that a key exists must not read it), and the
    variables it creates keep their own copy: changing the checkpoint's arrays afterwards changes nothing."""
    sd = bench.load("sd1", bench.file("sd1", ".safetensors"))
    arrays = {weights.variable_key(layer, variable): variable.numpy()
              for name in MODELS for layer in getattr(sd, name).layers for variable in layer.weights}
    reads = collections.Counter()

    def read(key):
        reads[key] += 1
        return arrays[key]

    tensors = weights.Tensors({key: functools.partial(read, key) for key in arrays},
                              {key: array.shape for key, array in arrays.items()}, "arrays")
    load = lambda models: weights.load_weights(models, tensors, layout=weights.keras_layout)
    checkpoint = checkpoints.Checkpoint(sd.config, sd.tokenizer, 64, 64, {MODELS: load})
    again = StableDiffusion(64, 64, jit_compile=False, config=sd.config, tokenizer=sd.tokenizer, weights=checkpoint)
    assert set(reads.values()) == {1} and reads.keys() == arrays.keys()
    for array in arrays.values():
        array[...] = 0
    assert_same_weights(again, sd)


@pytest.mark.parametrize("private", [pytest.param("registry", marks=pytest.mark.slow), "variable methods"])
def test_without_private_keras_models_are_built_then_assigned(private, bench, tmp_path, monkeypatch):
    """Where Keras lacks the private registry of variables waiting for a value, or the private Variable
    methods that create them from arrays, the models are built with random values and every variable
    is assigned from the checkpoint instead."""
    sd = bench.load("sd1", bench.file("sd1", ".safetensors"))
    sd.save(tmp_path / "bundle")
    if private == "registry":
        monkeypatch.setattr(keras_internals, "global_state", None)
    else:
        monkeypatch.setattr(keras, "Variable", type("Variable", (), {}))
    monkeypatch.setattr(keras, "StatelessScope", lambda **kwargs: pytest.fail("deferred initialization used"))
    assert not keras_internals.defers_initialization()
    assert_same_weights(StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False), sd)


@pytest.mark.parametrize("change, message", [
    (lambda arrays: arrays.pop("conv_in.weight"), "missing tensor conv_in.weight"),
    (lambda arrays: arrays.update(extra=np.zeros(3, "float32")), "unexpected tensor extra"),
    (lambda arrays: arrays.update({"conv_in.bias": np.zeros(5, "float32")}), r"conv_in.bias has shape \(5,\)"),
])
def test_bundle_file_that_does_not_fit_is_named(change, message, bench, tmp_path):
    bench.load("sd1", bench.file("sd1", ".safetensors")).save(tmp_path / "bundle")
    path = tmp_path / "bundle" / "diffusion_model.safetensors"
    arrays = {key: tensor.numpy().copy() for key, tensor in stored_tensors(path).items()}  # not views of the file
    change(arrays)
    bundle.write_safetensors(path, arrays)
    fits = f"(?s){re.escape(str(path))} does not fit the diffusion_model model:.*{message}"
    with pytest.raises(ValueError, match=fits):
        StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)


def test_bundle_with_a_foreign_weights_file_is_refused(bench, tmp_path):
    bench.load("sd1", bench.file("sd1", ".safetensors")).save(tmp_path / "bundle")
    decoder = tmp_path / "bundle" / "decoder.safetensors"
    shutil.copy(tmp_path / "bundle" / "encoder.safetensors", decoder)
    with pytest.raises(ValueError, match=f"{re.escape(str(decoder))} does not fit the decoder model"):
        StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)
    shutil.copy(bench.root / "sd1" / "vae" / "diffusion_pytorch_model.safetensors", decoder)  # PyTorch layout
    with pytest.raises(ValueError, match=f"{re.escape(str(decoder))} is not a keras-stable-diffusion/2 weights file"):
        StableDiffusion.from_checkpoint(tmp_path / "bundle", jit_compile=False)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:len(data) // 2], r"its tensors end at byte \d+, the file has \d+ \(truncated\?\)"),
    (lambda data: data[:5], r"its header size says \d+ bytes, the file has 5"),
    (lambda data: data[:8] + b"[" + data[9:], r"its header is not JSON \(.+\)"),
])
def test_damaged_bundle_file_gives_one_clear_error_naming_it(damage, message, bench, tmp_path, capsys):
    bench.load("sd1", bench.file("sd1", ".safetensors")).save(tmp_path / "bundle")
    path = tmp_path / "bundle" / "diffusion_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SystemExit) as exit_info:
        convert([str(tmp_path / "bundle"), str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.count("\n") == 1, error
    assert re.fullmatch(f"error: {re.escape(str(path))} is not a readable safetensors file: {message}.\n", error), error
    assert not (tmp_path / "out").exists()


def test_old_bundle_format_says_how_to_convert_again(bench, tmp_path):
    sd = bench.load("sd1", bench.file("sd1", ".safetensors"))
    old = tmp_path / "bundle"
    sd.save(old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(dict(config, format="keras-stable-diffusion/1")))
    for name in MODELS:
        (old / f"{name}.safetensors").unlink()
        getattr(sd, name).save_weights(old / f"{name}.weights.h5")
    with pytest.raises(ValueError, match=f"{re.escape(str(old))} is a keras-stable-diffusion/1 bundle .*Convert its "
                                         "original checkpoint again: python -m stable_diffusion.convert "
                                         "ORIGINAL_CHECKPOINT NEW_BUNDLE"):
        StableDiffusion.from_checkpoint(old, jit_compile=False)


def test_convert_cli_writes_a_bundle(bench, tmp_path):
    settings = json.dumps(ldm_reference.overrides(bench.pipe("sd1")))
    convert([str(bench.file("sd1", ".safetensors")), str(tmp_path / "out"), "--config", settings])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [bundle.CONFIG, "tokenizer", *(f"{m}.safetensors" for m in bundle.MODELS)])
    with pytest.raises(SystemExit):
        convert([str(bench.file("sd1", ".safetensors")), str(tmp_path / "out")])  # exists, no --overwrite


class Marker:
    """Unpickling this would create a file: proof that a pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def truncated(bench, path):
    data = bench.file("sd1", ".safetensors").read_bytes()
    path.write_bytes(data[:len(data) // 2])


def sdxl(bench, path):
    ldm_reference.write({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                         "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(768)},
                        path)


BAD = {
    "truncated.safetensors": (truncated, "not a readable safetensors"),
    "random.safetensors": (lambda bench, path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
                           "not a readable safetensors"),
    "random.ckpt": (lambda bench, path: path.write_bytes(np.random.default_rng(0).bytes(4096)), "not a readable .ckpt"),
    "pickle.ckpt": (lambda bench, path: torch.save({"state_dict": {"x": Marker(path.with_suffix(".ran"))}}, path),
                    "refused unexecuted"),
    "no-vae.safetensors": (lambda bench, path: path.write_bytes(bench.file("sd1", ".safetensors", vae=False).read_bytes()),
                           "no VAE"),
    "sdxl.safetensors": (sdxl, "no text encoders of a known layout"),  # an SDXL base without its ViT-bigG
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gives_one_clear_error_and_no_output(name, bench, tmp_path, capsys):
    make, message = BAD[name]
    source = tmp_path / name
    make(bench, source)
    with pytest.raises(SystemExit) as exit_info:
        convert([str(source), str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.startswith("error: ") and message in error, error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))
    assert not source.with_suffix(".ran").exists(), "the pickle ran"


def test_unexpected_tensor_is_named(bench, tmp_path):
    state = ldm_reference.ldm_state_dict(bench.pipe("sd1"), "sd1")
    state["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(3)
    path = ldm_reference.write(state, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor input_blocks.1.0.extra.weight"):
        bench.load("sd1", path)


def test_preset_reuses_the_cached_bundle(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: pytest.fail("tried to download"))
    bench.load("sd1", bench.file("sd1", ".safetensors")).save(presets.preset_bundle("sd-1.5"))
    sd = StableDiffusion.from_preset("sd-1.5", img_height=64, img_width=64, jit_compile=False)
    assert_same_weights(sd, bench.load("sd1", bench.file("sd1", ".safetensors")))


def test_preset_offline_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(ConnectionError, match=r"sd-2\.1.*Name or service not known.*from_checkpoint\(path, "
                                              r"prediction_type='v_prediction'\)"):
        StableDiffusion.from_preset("sd-2.1")
    assert not presets.preset_bundle("sd-2.1").exists()
    with pytest.raises(ValueError, match="Unknown preset"):
        StableDiffusion.from_preset("sd-3")


def test_every_preset_download_is_checked_against_a_pinned_sha256(tmp_path, monkeypatch):
    requested = []
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", lambda **kwargs: requested.append(kwargs) or str(tmp_path / "x"))
    for name, preset in presets.PRESETS.items():
        presets.download_preset(name)
        assert requested[-1]["hash_algorithm"] == "sha256" and requested[-1]["origin"] == preset["url"]
        assert requested[-1]["file_hash"] == preset["sha256"] and re.fullmatch("[0-9a-f]{64}", preset["sha256"]), name
