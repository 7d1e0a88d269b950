"""Original-layout (latent-diffusion) single files made from diffusers pipelines, for the conversion
tests: the weights written back under the CompVis / Stability key names by inverting the tables in
`stable_diffusion.ldm` (SD 1.x / 2.x, and SDXL's base and refiner in sgm's `conditioner.embedders.*`
layout). `to_diffusers` converts such a state dict back with diffusers' own single-file converters, so
the tests can prove the writer right independently of our reader."""
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel

from reference import CONTEXT_DIM, make_projected_text_encoder, make_sdxl_unet, randomize
from stable_diffusion import ldm

# Training-only tensors of a real file, which loading must skip: LDM's schedule buffers and EMA bookkeeping;
# the sigmas of sgm's denoiser (SDXL files written by sgm since SDXL-Turbo).
EXTRAS = {"betas": (1000,), "alphas_cumprod": (1000,), "alphas_cumprod_prev": (1000,), "logvar": (1000,),
          "posterior_variance": (1000,), "model_ema.decay": (), "model_ema.num_updates": ()}
SGM_EXTRAS = {"denoiser.sigmas": (1000,)}


def invert(table):
    return {new: old for old, new in table.items() if new is not None}


def renamed(state_dict, table, prefix):
    """`state_dict` (diffusers names) under the original names: `table` (original -> diffusers) inverted."""
    return {prefix + new: state_dict[old] for new, (old, _) in ldm.map_keys(state_dict, invert(table)).items()}


def unet_table(unet):
    c = unet.config
    return ldm.unet_table(len(c.block_out_channels), c.layers_per_block,
                          [kind == "CrossAttnDownBlock2D" for kind in c.down_block_types])


def vae_state_dict(vae, prefix=ldm.VAE):
    c = vae.config
    state = renamed(vae.state_dict(), ldm.vae_table(len(c.block_out_channels), c.layers_per_block), prefix)
    for key, value in state.items():  # the VAE attention projections are 1x1 convs in the original
        if ".mid.attn_1." in key and key.endswith("weight") and ".norm." not in key:
            state[key] = value[:, :, None, None]
    return state


def text_state_dict(text_encoder):
    """CLIPTextModel weights without the `text_model.` prefix and the position ids buffer."""
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
            if not k.endswith("position_ids")}


def clip_state_dict(text_encoder, prefix):
    """CLIPTextModel weights under `prefix` and `text_model.`, with the position ids buffer of the original files."""
    state = {f"{prefix}text_model.{k}": v for k, v in text_state_dict(text_encoder).items()}
    state[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def open_clip_state_dict(text_encoder, generator, prefix=ldm.OPEN_CLIP, projected=False):
    """OpenCLIP weights under `prefix`: fused q/k/v, and the logit scale the text tower carries unused. SD 2.x's:
    one more (random) block than the diffusers model, which SD 2.x drops, and a random (unused) projection;
    SDXL's (`projected`, a CLIPTextModelWithProjection): the model's projection as OpenCLIP's (width, projection)
    matrix, applied as x @ W."""
    state = text_state_dict(text_encoder)
    layers = text_encoder.config.num_hidden_layers
    flat = renamed(state, ldm.open_clip_table(layers if projected else layers + 1, projected), "")
    out = {}
    for key, value in flat.items():
        if ".attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            fused = [flat[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            out[key.replace(f"q_proj.{kind}", f"in_proj_{kind}")] = torch.cat(fused)
        elif ".attn.k_proj." not in key and ".attn.v_proj." not in key:
            out[key] = value
    if projected:
        out["text_projection"] = out["text_projection"].T.contiguous()
    else:
        for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            out[key.replace(".0.", f".{layers}.", 1)] = torch.randn(out[key].shape, generator=generator)
        width = text_encoder.config.hidden_size
        out["text_projection"] = torch.randn((width, width), generator=generator)
    out["logit_scale"] = torch.tensor(4.6052)
    return {prefix + k: v for k, v in out.items()}


def text_encoders_state_dict(pipe, family, generator):
    """The text encoders of `pipe` (attributes named as `ldm.TEXT_ENCODERS`) under the original names of `family`."""
    state = {}
    for model, (prefix, layout) in ldm.TEXT_ENCODERS[family].items():
        encoder = getattr(pipe, model)
        state.update(clip_state_dict(encoder, prefix) if layout == "clip" else
                     open_clip_state_dict(encoder, generator, prefix, projected=layout == "open_clip_projected"))
    return state


def ldm_state_dict(pipe, family, ema=None, vae=True, seed=0):
    """The pipeline's weights as an original single file of `family` (a key of `ldm.FAMILY_NAMES`; for SDXL,
    `pipe` holds unet, vae, text_encoder_2 and, in the base, text_encoder: `make_sdxl`).

    ema: None: EMA-only layout (the weights under `model.diffusion_model.`); "ema": a full file whose
    `model_ema.*` copy holds the pipeline's UNet and `model.diffusion_model.*` other (perturbed) weights;
    "training": the other way round.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    unet = renamed(pipe.unet.state_dict(), unet_table(pipe.unet), ldm.UNET)
    if ema is not None:
        other = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in unet.items()}
        training, averaged = (other, unet) if ema == "ema" else (unet, other)
        unet = dict(training, **{ldm.EMA + "".join(k.split(".")[1:]): v for k, v in averaged.items()})
    text = text_encoders_state_dict(pipe, family, generator)
    extras = {k: torch.rand(shape, generator=generator)
              for k, shape in (SGM_EXTRAS if family in ldm.SDXL_TIME_IDS else EXTRAS).items()}
    return {**unet, **text, **(vae_state_dict(pipe.vae) if vae else {}), **extras}


def write(state_dict, path, dtype=torch.float32, nest=True, global_step=None):
    """Writes a `.safetensors` or `.ckpt` (under "state_dict", as LDM's Lightning checkpoints) file."""
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file(state_dict, path)
    else:
        torch.save({"state_dict": state_dict, "global_step": global_step} if nest else state_dict, path)
    return path


def to_diffusers(state_dict, pipe, family, extract_ema=False):
    """{component: state dict} that diffusers' single-file converters make of an original state dict: the UNet,
    the VAE and the text encoders of `family` (CLIP by prefix; OpenCLIP under the prefix diffusers picks for it)."""
    converted = dict(unet=convert_ldm_unet_checkpoint(state_dict, dict(pipe.unet.config), extract_ema=extract_ema),
                     vae=convert_ldm_vae_checkpoint(state_dict, dict(pipe.vae.config)))
    for model, (prefix, layout) in ldm.TEXT_ENCODERS[family].items():
        converted[model] = (convert_ldm_clip_checkpoint(state_dict) if layout == "clip"
                            else convert_open_clip_checkpoint(getattr(pipe, model), state_dict, prefix=prefix))
    return converted


def overrides(pipe):
    """The reference's settings that no tensor holds and that differ from SD's (tiny widths, 8 groups)."""
    heads = pipe.unet.config.attention_head_dim
    text = {name: {"num_heads": getattr(pipe, name).config.num_attention_heads}
            for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    return {**text, "diffusion_model": {"norm_groups": pipe.unet.config.norm_num_groups,
                                        "num_heads": heads if isinstance(heads, int) else tuple(heads)},
            "decoder": {"norm_groups": pipe.vae.config.norm_num_groups},
            "encoder": {"norm_groups": pipe.vae.config.norm_num_groups}}


def make_sdxl(kind, folder, dtype=torch.float32, seed=0):
    """Random-weight tiny SDXL models of `kind` ("sdxl": the base, "refiner"; `reference.SDXL_UNETS`) as
    attributes unet, text_encoder_2 (`make_projected_text_encoder`), vae (SDXL's scaling factor) and, in the
    base, text_encoder (a CLIPTextModel, quick_gelu), their weights rounded through `dtype` as a file of that
    dtype holds them. As in SDXL, the base's UNet attends to both encoders' states side by side (8 + 24 wide),
    the refiner's to text_encoder_2's (32), and the base's text_encoder_2 projects to its own width (24), a
    square matrix, which a transposition would not change in shape. Saved under `folder`: the UNet and
    text_encoder_2."""
    base = kind == "sdxl"
    models = SimpleNamespace(unet=make_sdxl_unet(kind, folder / "unet", seed), text_encoder_2=make_projected_text_encoder(
        folder / "text_encoder_2", seed, width=24 if base else CONTEXT_DIM))
    torch.manual_seed(seed)
    models.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                               block_out_channels=(8, 16), layers_per_block=1,
                               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                               scaling_factor=ldm.SDXL_SCALING_FACTOR).eval()
    randomize(models.vae)
    if base:
        models.text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=8, intermediate_size=24, max_position_embeddings=77, num_hidden_layers=2,
            num_attention_heads=2, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=1)).eval()
        randomize(models.text_encoder)
    with torch.no_grad():
        for model in vars(models).values():
            for parameter in model.parameters():
                parameter.copy_(parameter.to(dtype).float())
    return models
