"""Original-layout (latent-diffusion) single files made from diffusers pipelines, for the conversion
tests: the weights written back under the CompVis / Stability key names by inverting the table in
`stable_diffusion.ldm`. `to_diffusers` converts such a state dict back with diffusers' own single-file
converters, so the tests can prove the writer right independently of our reader."""
import torch
from safetensors.torch import save_file
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

from stable_diffusion import ldm

# Training-only tensors of a real file, which loading must skip.
EXTRAS = {"betas": (1000,), "alphas_cumprod": (1000,), "alphas_cumprod_prev": (1000,), "logvar": (1000,),
          "posterior_variance": (1000,), "model_ema.decay": (), "model_ema.num_updates": ()}


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


def open_clip_state_dict(text_encoder, generator):
    """OpenCLIP `cond_stage_model.model.*`: one more (random) block than the diffusers model, which SD 2.x
    drops, fused q/k/v, and the projection and logit scale the text tower carries unused."""
    state = text_state_dict(text_encoder)
    layers = text_encoder.config.num_hidden_layers
    flat = renamed(state, ldm.open_clip_table(layers + 1), "")
    out = {}
    for key, value in flat.items():
        if ".attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            fused = [flat[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            out[key.replace(f"q_proj.{kind}", f"in_proj_{kind}")] = torch.cat(fused)
        elif ".attn.k_proj." not in key and ".attn.v_proj." not in key:
            out[key] = value
    for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        out[key.replace(".0.", f".{layers}.", 1)] = torch.randn(out[key].shape, generator=generator)
    width = text_encoder.config.hidden_size
    out["text_projection"] = torch.randn((width, width), generator=generator)
    out["logit_scale"] = torch.tensor(4.6052)
    return {ldm.OPEN_CLIP + k: v for k, v in out.items()}


def ldm_state_dict(pipe, family, ema=None, vae=True, seed=0):
    """The pipeline's weights as an original single file of `family` ("sd1" / "sd2").

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
    if family == "sd1":
        text = {f"{ldm.CLIP}text_model.{k}": v for k, v in text_state_dict(pipe.text_encoder).items()}
        text[ldm.CLIP + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        text = open_clip_state_dict(pipe.text_encoder, generator)
    extras = {k: torch.rand(shape, generator=generator) for k, shape in EXTRAS.items()}
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
    """{component: state dict} that diffusers' single-file converters make of an original state dict."""
    text = (convert_ldm_clip_checkpoint(state_dict) if family == "sd1"
            else convert_open_clip_checkpoint(pipe.text_encoder, state_dict))
    return dict(unet=convert_ldm_unet_checkpoint(state_dict, dict(pipe.unet.config), extract_ema=extract_ema),
                vae=convert_ldm_vae_checkpoint(state_dict, dict(pipe.vae.config)), text_encoder=text)


def overrides(pipe):
    """The reference's settings that no tensor holds and that differ from SD's (tiny widths, 8 groups)."""
    heads = pipe.unet.config.attention_head_dim
    return {"text_encoder": {"num_heads": pipe.text_encoder.config.num_attention_heads},
            "diffusion_model": {"norm_groups": pipe.unet.config.norm_num_groups,
                                "num_heads": heads if isinstance(heads, int) else tuple(heads)},
            "decoder": {"norm_groups": pipe.vae.config.norm_num_groups},
            "encoder": {"norm_groups": pipe.vae.config.norm_num_groups}}
