"""Reference pipelines for the parity tests: tiny random-weight diffusers / transformers models
saved with `save_pretrained`, in the SD 1.x, SD 2.x and other layouts of the family."""
import copy
from types import SimpleNamespace

import keras
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from stable_diffusion import runtime
from stable_diffusion.tokenizer import Tokenizer

# Small members of the family: SD 1.x layout (conv projections, 8 heads everywhere, quick_gelu CLIP,
# end-token padding, epsilon), SD 2.x layout (linear projections, heads per level, gelu CLIP,
# "!" padding, v-prediction), and a deeper one (3 levels, 1 ResBlock per level, 2 transformer blocks).
CONFIGS = {
    "sd1": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=False),
        text=dict(hidden_act="quick_gelu", num_hidden_layers=2, num_attention_heads=4),
        pad_token="<|endoftext|>", prediction_type="epsilon"),
    "sd2": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=(2, 4),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=True),
        text=dict(hidden_act="gelu", num_hidden_layers=3, num_attention_heads=2),
        pad_token="!", prediction_type="v_prediction"),
    "deep": dict(
        unet=dict(block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=(2, 2, 4),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  transformer_layers_per_block=2, use_linear_projection=True),
        text=dict(hidden_act="quick_gelu", num_hidden_layers=1, num_attention_heads=4),
        pad_token="<|endoftext|>", prediction_type="epsilon"),
}
CONTEXT_DIM = 32
# Small SDXL-like UNets ("text_time" addition embedding, transformer depth per level, linear projections,
# heads per level), with their number of time ids: the base layout (3 levels, the first without attention;
# 6 ids: sizes and crop) and the refiner's (4 levels, the first and last without attention, 1 ResBlock per
# level; 5 ids, with the aesthetic score). Pooled text embeddings of 24, time ids embedded in 8 each.
SDXL_UNETS = {
    "sdxl": (dict(block_out_channels=(16, 32, 32), attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 1, 2),
                  layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  projection_class_embeddings_input_dim=24 + 6 * 8), 6),
    "refiner": (dict(block_out_channels=(16, 16, 32, 32), attention_head_dim=(1, 2, 4, 4),
                     transformer_layers_per_block=2, layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     projection_class_embeddings_input_dim=24 + 5 * 8), 5),
}
# The smallest model of the family for tests of our own code (no reference): 16x16 latents at 32x32
# pixels, a 1-layer CLIP of width 8. Random weights: `StableDiffusion(32, 32, config=TINY_CONFIG)`.
TINY_CONFIG = {
    "text_encoder": dict(width=8, num_layers=1, num_heads=2, intermediate_size=16),
    "diffusion_model": dict(channels=(8, 16), layers_per_block=1, attention_levels=(False, True), num_heads=2,
                            context_dim=8, norm_groups=4),
    "decoder": dict(channels=(8, 16), layers_per_block=1, norm_groups=4, scaling_factor=0.5),
    "encoder": dict(channels=(8, 16), layers_per_block=1, norm_groups=4),
}

FULL_SIZE_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)
FULL_SIZE_UNET = dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32)
# Full-size SD 1.5 and SD 2.1: the values of the hub's config.json files.
HUB_CONFIGS = {
    "sd-1.5": dict(
        unet=dict(FULL_SIZE_UNET, sample_size=64, attention_head_dim=8, cross_attention_dim=768),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408)),
    "sd-2.1": dict(
        unet=dict(FULL_SIZE_UNET, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                  use_linear_projection=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", max_position_embeddings=77, vocab_size=49408)),
}

# Full-size SDXL 1.0 base ("sdxl") and refiner ("sdxl_refiner"): the values of the hub's config.json files.
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, scaling_factor=0.13025,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
             projection_dim=1280)
HUB_SDXL = {
    "sdxl": dict(unet=dict(block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
                           transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                           projection_class_embeddings_input_dim=2816,
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
                 text_encoder=CLIP_L),
    "sdxl_refiner": dict(unet=dict(block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
                                   transformer_layers_per_block=4, cross_attention_dim=1280,
                                   projection_class_embeddings_input_dim=2560,
                                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                     "DownBlock2D"],
                                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                   "UpBlock2D"])),
}


def make_pipeline(kind, folder, seed=0):
    """Builds a random-weight StableDiffusionPipeline of `kind`, saves it to `folder`, returns it."""
    spec = CONFIGS[kind]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8,
                                cross_attention_dim=CONTEXT_DIM, **spec["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=CONTEXT_DIM, intermediate_size=37, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **spec["text"]))
    randomize(unet, vae, text_encoder)
    pipe = save_pipeline(folder, unet, vae, text_encoder, spec["pad_token"], spec["prediction_type"],
                         clip_sample=False if kind == "sd1" else None)
    if kind == "sd1":  # the hub's layout; transformers 5 writes tokenizer.json and unprefixed keys
        for name in ("vocab.json", "merges.txt"):
            (folder / "tokenizer" / name).write_bytes((folder / "vocab" / name).read_bytes())
        path = folder / "text_encoder" / "model.safetensors"
        save_file({f"text_model.{k}": v for k, v in load_file(path).items()}, path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.to(torch.float32)


def make_sdxl_unet(kind, folder, seed=0):
    """A random-weight SDXL-like UNet2DConditionModel of `kind` (`SDXL_UNETS`) saved to `folder`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8,
                                cross_attention_dim=CONTEXT_DIM, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8, **SDXL_UNETS[kind][0])
    randomize(unet)
    unet.save_pretrained(folder)
    return unet.eval()


def make_projected_text_encoder(folder, seed=0, width=CONTEXT_DIM):
    """A random-weight CLIPTextModelWithProjection laid out as SDXL's text_encoder_2 (gelu, the legacy
    eos_token_id 2 of SDXL's configs, bos 0, pad 1), width 32 (or `width`), 3 layers, projection 24, saved to
    `folder`."""
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=37, max_position_embeddings=77,
        num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu", projection_dim=24, bos_token_id=0,
        eos_token_id=2, pad_token_id=1))
    randomize(model)
    model.save_pretrained(folder)
    return model.eval()


def make_sdxl_pipeline(folder, seed=0):
    """A random-weight StableDiffusionXLPipeline saved to `folder`: the "sdxl" UNet of `SDXL_UNETS`, a quick_gelu
    CLIPTextModel and the projected text encoder, 16 wide each (their states concatenated: the context's 32), the
    first tokenizer padding with the end token, the second with "!", SDXL's VAE scaling factor, DDIM."""
    unet = make_sdxl_unet("sdxl", folder / "unet", seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=37, max_position_embeddings=77, num_hidden_layers=2,
        num_attention_heads=2, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        block_out_channels=(16, 16, 32, 32), layers_per_block=1, scaling_factor=0.13025,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    randomize(text_encoder, vae)
    return save_sdxl_pipeline(folder, SimpleNamespace(
        unet=unet, vae=vae, text_encoder=text_encoder,
        text_encoder_2=make_projected_text_encoder(folder / "text_encoder_2", seed, 16))).to(torch.float32)


def save_sdxl_pipeline(folder, models):
    """A StableDiffusionXLPipeline of `models` (attributes unet, vae, text_encoder, text_encoder_2), the first
    tokenizer padding with the end token, the second with "!", DDIM on SD's noise schedule, saved to `folder`."""
    tokenizers = []
    for pad_token in ("<|endoftext|>", "!"):
        Tokenizer.from_vendored(pad_token).save(folder / "vocab")
        tokenizers.append(CLIPTokenizer.from_pretrained(folder / "vocab", model_max_length=77, pad_token=pad_token))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionXLPipeline(**vars(models), tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    return pipe


def make_sdxl_refiner_pipeline(folder, seed=0):
    """A random-weight SDXL refiner, a StableDiffusionXLImg2ImgPipeline saved to `folder` as the hub's: no first text
    encoder or tokenizer, `requires_aesthetics_score` (the "refiner" UNet of `SDXL_UNETS`: 5 time ids), states not
    zeroed for no negative prompt; the projected text encoder alone, 32 wide (the UNet's context), its tokenizer
    padding with "!"; `make_sdxl_pipeline`'s VAE layout, DDIM."""
    unet = make_sdxl_unet("refiner", folder / "unet", seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        block_out_channels=(16, 16, 32, 32), layers_per_block=1, scaling_factor=0.13025,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    randomize(vae)
    Tokenizer.from_vendored("!").save(folder / "vocab")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "vocab", model_max_length=77, pad_token="!")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, tokenizer_2=tokenizer,
        text_encoder_2=make_projected_text_encoder(folder / "text_encoder_2", seed), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.save_pretrained(folder)
    return pipe.to(torch.float32)


def make_full_size_pipeline(version, folder):
    """A full-size random-weight SD 1.5 / 2.1 pipeline (`HUB_CONFIGS`), saved to `folder`."""
    config = HUB_CONFIGS[version]
    unet = UNet2DConditionModel(**config["unet"])
    vae = AutoencoderKL(**FULL_SIZE_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config["text"]))
    randomize(unet.conv_out)  # zero-initialised in diffusers
    sd2 = version.startswith("sd-2")
    pipe = save_pipeline(folder, unet, vae, text_encoder, "!" if sd2 else "<|endoftext|>",
                         "v_prediction" if sd2 and config["unet"]["sample_size"] == 96 else "epsilon",
                         clip_sample=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def full_size_sdxl(family):
    """SDXL 1.0's base ("sdxl") or refiner ("sdxl_refiner") (`HUB_SDXL`) as diffusers / transformers models with
    diffusers' initial weights, attributes unet, vae, text_encoder_2 and (the base) text_encoder, on torch's
    default device and dtype: inside `with torch.device("meta"):` they take no memory."""
    spec, text = HUB_SDXL[family], dict(vocab_size=49408, max_position_embeddings=77)
    models = SimpleNamespace(
        unet=UNet2DConditionModel(**spec["unet"], sample_size=128, layers_per_block=2, use_linear_projection=True,
                                  addition_embed_type="text_time", addition_time_embed_dim=256),
        vae=AutoencoderKL(**SDXL_VAE),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, **BIG_G)))
    if "text_encoder" in spec:
        models.text_encoder = CLIPTextModel(CLIPTextConfig(**text, **spec["text_encoder"]))
    return models


def make_full_size_sdxl_pipeline(folder, dtype=torch.float16):
    """A full-size random-weight SDXL 1.0 base pipeline (`full_size_sdxl`) saved to `folder`, each model created
    in `dtype` (torch's default dtype meanwhile), so no float32 copy is ever made: 6.9 GB in float16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        models = full_size_sdxl("sdxl")
    finally:
        torch.set_default_dtype(previous)
    randomize(models.unet.conv_out)  # zero-initialised in diffusers
    return save_sdxl_pipeline(folder, models)


def save_pipeline(folder, unet, vae, text_encoder, pad_token, prediction_type, clip_sample):
    """Assembles a StableDiffusionPipeline with SD's noise schedule and saves it to `folder`."""
    vocab_folder = folder / "vocab"
    Tokenizer.from_vendored(pad_token).save(vocab_folder)
    tokenizer = CLIPTokenizer.from_pretrained(vocab_folder, model_max_length=77, pad_token=pad_token)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True,
                              prediction_type=prediction_type)
    if clip_sample is not None:  # the hub's SD configs say False; otherwise DDIM's default (True)
        scheduler.register_to_config(clip_sample=clip_sample)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def rounded(pipe, dtype):
    """A copy of the diffusers pipeline `pipe` whose models' weights went through `dtype`, as a file of that dtype
    holds them."""
    if dtype == torch.float32:
        return pipe
    pipe = copy.deepcopy(pipe)
    with torch.no_grad():
        for model in pipe.components.values():
            if isinstance(model, torch.nn.Module):
                for parameter in model.parameters():
                    parameter.copy_(parameter.to(dtype).float())
    return pipe


def randomize(*models):
    """Gives every parameter a random value: fresh diffusers models zero some layers (e.g. conv_out),
    which would hide mapping errors."""
    with torch.no_grad():
        for model in models:
            for name, parameter in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
                else:
                    parameter.copy_(torch.randn_like(parameter) * (0.5 / max(1, parameter[0].numel()) ** 0.5))


def to_numpy(tensor):
    return tensor.detach().cpu().numpy()


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(tensor):
    return np.transpose(to_numpy(tensor), (0, 2, 3, 1))


def reference_images(pipe, prompts, *, negative_prompt, noise, steps, guidance=7.5, **options):
    """uint8 images (B, H, W, 3) of a diffusers pipeline started from the NHWC latents `noise`; `options`: more of
    the pipeline's keywords (SDXL's sizes)."""
    images = pipe(prompts, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                  height=noise.shape[1] * 8, width=noise.shape[2] * 8, latents=nchw(noise), output_type="np",
                  **options).images
    return np.round(images * 255).astype("uint8")


def predicted(model, x):
    """`model.predict_on_batch(x)` as the pipeline runs it: on OpenVINO in float32 (`runtime.OpenVINOPredictor`),
    where Keras' own OpenVINO predict computes in bfloat16 on CPUs that have it (errors ~1e-2)."""
    if keras.backend.backend() == "openvino":
        return runtime.OpenVINOPredictor(model)(x)
    return model.predict_on_batch(x)


def relative_difference(got, expected):
    """The largest absolute difference, relative to the largest absolute value of `expected`."""
    return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


def assert_same_generation(pipe, sd, got, expected, what):
    """Our final latents `got` within 1e-4 of their scale (float32 rounding: ~1e-6) of diffusers' `expected` (NCHW),
    and the images `sd` decodes of them within one uint8 level of those `pipe`'s VAE decodes, as the pipeline does."""
    diff = relative_difference(got, nhwc(expected))
    assert diff <= 1e-4, f"final latents: max abs diff {diff:.2e} of their scale vs {what}"
    with torch.no_grad():
        decoded = pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample
    expected = np.round(nhwc(decoded / 2 + 0.5).clip(0, 1) * 255).astype("uint8")  # the pipeline's postprocessing
    assert expected.std() > 10, "flat reference images: the comparison would prove little"
    diff = np.abs(sd.decode(got).astype(int) - expected).max()
    assert diff <= 1, f"max pixel difference {diff} vs {what} (tolerance 1/255)"


def psnr(got, expected):
    """Peak signal-to-noise ratio, in dB, of uint8 images `got` against `expected`."""
    mse = np.mean((np.asarray(got, "float64") - expected) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-10))
