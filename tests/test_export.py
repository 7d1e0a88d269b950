"""Export (export.py) and generating with the exported models (exported.py): per format, the images of
`ExportedStableDiffusion` against the Keras pipeline's, without a Keras model built; the SavedModel's
serving signature from token ids; LiteRT's float16 weights; bad arguments and interrupted exports."""
import keras
import numpy as np
import pytest

from reference import TINY_CONFIG, psnr
from stable_diffusion import StableDiffusion, export
from stable_diffusion.exported import ExportedStableDiffusion

PROMPTS, NEGATIVE = ["a red circle", "a blue square"], "green"


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion(32, 32, config=TINY_CONFIG, jit_compile=False)


def generations(pipeline):
    """uint8 images of the three tasks (an ancestral sampler; a batch of two prompts; no guidance) from fixed seeds."""
    picture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    options = dict(negative_prompt=NEGATIVE, num_steps=3, seed=2, verbose=False)
    return dict(text_to_image=pipeline.text_to_image(PROMPTS, scheduler="euler_a", **options),
                image_to_image=pipeline.image_to_image(PROMPTS[0], picture, strength=0.7, sample_latents=True,
                                                       scheduler="dpmpp_2m", **options),
                inpaint=pipeline.inpaint(PROMPTS[1], picture, mask, strength=0.8, **options),
                unguided=pipeline.text_to_image(PROMPTS, unconditional_guidance_scale=1.0, **options))


def no_keras_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a Keras model was built")
    monkeypatch.setattr(keras.Model, "__init__", refuse)


@pytest.mark.export
@pytest.mark.parametrize("format", sorted(export.FORMATS))
def test_exported_pipeline_equals_keras(format, sd, tmp_path, monkeypatch):
    sd.export(tmp_path / "exported", format=format)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["exported"], "staging folders left behind"
    expected = generations(sd)
    with monkeypatch.context() as patch:
        no_keras_models(patch)
        got = generations(ExportedStableDiffusion(tmp_path / "exported"))
    for task, images in expected.items():
        assert images.std() > 10, f"{task}: flat images would prove little"
        diff = np.abs(got[task].astype(int) - images).max()
        assert diff <= 1, f"{task} from {format}: max pixel difference {diff} vs the Keras pipeline (tolerance 1/255)"


@pytest.mark.export
def test_saved_model_serves_a_step_from_token_ids(sd, tmp_path):
    import tensorflow as tf

    sd.export(tmp_path / "exported")
    serve = tf.saved_model.load(str(tmp_path / "exported" / "denoise_step")).signatures["serving_default"]
    ids, negative_ids = sd.tokenize(PROMPTS[:1]), sd.tokenize([NEGATIVE])
    latents = np.random.default_rng(1).standard_normal((1, *sd.latent_shape), dtype=np.float32)
    timestep, guidance = np.array([500.0], "float32"), np.array([7.5], "float32")
    got = serve(token_ids=ids, negative_token_ids=negative_ids, latents=latents, timestep=timestep, guidance=guidance)
    expected = sd.denoise_step.predict_on_batch([latents, timestep, guidance, sd.encode_text(PROMPTS[:1]),
                                                 sd.encode_text([NEGATIVE])])
    np.testing.assert_allclose(next(iter(got.values())).numpy(), expected, atol=1e-5)


@pytest.mark.export
def test_litert_float16_weights_past_the_limit(sd, tmp_path, monkeypatch):
    """Every model past a 0-byte limit: the UNet's weights stored in float16; images near float32's (>= 30 dB)."""
    from ai_edge_litert.interpreter import Interpreter

    monkeypatch.setattr(export, "LITERT_FLOAT32_LIMIT", 0)
    sd.export(tmp_path / "exported", format="litert")
    tensors = Interpreter(model_path=str(tmp_path / "exported" / "denoise_step.tflite")).get_tensor_details()
    stored = sum(np.prod(tensor["shape"]) for tensor in tensors if tensor["dtype"] == np.float16)
    parameters = sum(np.prod(weight.shape) for weight in sd.diffusion_model.weights)
    assert stored >= 0.9 * parameters, f"{stored} float16 values for {parameters} parameters"
    expected, got = generations(sd), generations(ExportedStableDiffusion(tmp_path / "exported"))
    for task, images in expected.items():
        assert psnr(got[task], images) >= 30, f"{task}: {psnr(got[task], images):.1f} dB"


@pytest.mark.parametrize("arguments, error, message", [
    (dict(format="pickle"), ValueError, "format must be one of"),
    (dict(format="onnx", folder="exists"), FileExistsError, "exists; export writes a new folder"),
])
def test_bad_export_arguments(arguments, error, message, sd, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(error, match=message):
        sd.export(tmp_path / arguments.pop("folder", "new"), **arguments)


def test_an_interrupted_export_leaves_nothing(sd, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sd.tokenizer, "save", fail)  # after every model is written
    monkeypatch.setattr(keras.Model, "export", lambda model, path, **kwargs: open(path, "w").close())
    with pytest.raises(KeyboardInterrupt):
        sd.export(tmp_path / "exported", format="openvino")
    assert list(tmp_path.iterdir()) == []
