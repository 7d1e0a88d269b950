"""diffusers pipeline folders, as `save_pretrained` writes them (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, and SDXL's text_encoder_2/, tokenizer_2/, which its refiner has alone): the configs translated into our
models' arguments, the weights read by their diffusers and transformers names (`weights.py` maps them).

References: diffusers `UNet2DConditionModel`, `AutoencoderKL` and `DDIMScheduler` configs,
transformers `CLIPTextConfig`.
"""
import operator

from .bundle import TOKENIZERS
from .decoder import SCALING_FACTOR
from .settings import PIPELINE_OPTIONS
from .tokenizer import Tokenizer
from .weights import CheckpointError, Tensors, read_json, strict_loader

# diffusers' DDIMScheduler defaults, for keys a checkpoint's scheduler config leaves out. diffusers gives such keys the
# defaults of the class built `from_config` (the sampler), not of the class the file names; these are DDIM's, the
# fallback sampler's, which the others share where they read the key, but for PNDM's `set_alpha_to_one` (False).
DDIM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     steps_offset=0, set_alpha_to_one=True, prediction_type="epsilon", clip_sample=True,
                     clip_sample_range=1.0)


def read(folder):
    """The fields of a `checkpoints.Checkpoint` of the diffusers folder `folder`; an SDXL refiner's (no text_encoder/,
    `requires_aesthetics_score` in model_index.json: 5 time ids) with `config["text_encoder"]` None; SDXL's with the
    VAE config's `force_upcast` among the pipeline's settings (`sdxl.vae_dtypes`)."""
    unet_config_file, vae_config_file = folder / "unet" / "config.json", folder / "vae" / "config.json"
    sources = dict(diffusion_model=unet_config_file, decoder=vae_config_file, encoder=vae_config_file,
                   size=unet_config_file, scheduler=folder / "scheduler" / "scheduler_config.json",
                   pipeline=folder / "model_index.json")
    pipeline = read_json(sources["pipeline"])
    num_time_ids = 5 if pipeline.get("requires_aesthetics_score") else 6
    config = dict(text_encoder=None, diffusion_model=translated(sources["diffusion_model"],
                                                                lambda c: unet_config(c, num_time_ids)),
                  **translated(sources["decoder"], vae_configs),
                  scheduler={**DDIM_DEFAULTS, **{k: v for k, v in read_json(sources["scheduler"]).items()
                                                 if k == "_class_name" or not k.startswith("_")}},  # the sampler
                  pipeline={k: pipeline[k] for k in PIPELINE_OPTIONS if k in pipeline})  # model_index.json's (SDXL)
    if (folder / "text_encoder_2").exists():  # SDXL's pipelines read the VAE's
        config["pipeline"]["force_upcast"] = translated(sources["decoder"], force_upcast)
    sample_size = translated(sources["size"], lambda unet: operator.index(unet["sample_size"]))
    unet, vae = find_weights(folder / "unet"), find_weights(folder / "vae")
    parts = {("diffusion_model",): strict_loader(unet), ("encoder", "decoder"): strict_loader(vae)}
    tensors, tokenizers = dict(diffusion_model=unet, encoder=vae, decoder=vae), dict(tokenizer=None)
    for name, tokenizer in TOKENIZERS.items():  # the text encoders it has: SD's first, SDXL's both, the refiner's second
        if (folder / name).exists():
            sources[name] = folder / name / "config.json"
            config[name] = translated(sources[name], text_encoder_config)
            tensors[name] = text_weights(folder / name)
            parts[(name,)] = strict_loader(tensors[name], ("embeddings.position_ids",))
            tokenizers[tokenizer] = (Tokenizer.from_folder(folder / tokenizer) if (folder / tokenizer).exists()
                                     else Tokenizer.from_vendored())
    size = sample_size * 2 ** (len(config["decoder"]["channels"]) - 1)
    return dict(config=config, **tokenizers, img_height=size, img_width=size, parts=parts, sources=sources,
                tensors=tensors)


def translated(path, translate):
    """`translate(config)` of the JSON config at `path`: CheckpointError naming the file for a missing
    key, a value of another type or an unsupported configuration."""
    config = read_json(path)
    try:
        return translate(config)
    except KeyError as error:
        raise CheckpointError(f"{path} lacks the key {error}.") from error
    except (AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error


def find_weights(folder, rename=lambda key: key):
    """The tensors of a diffusers/transformers component folder (safetensors, maybe sharded)."""
    for name in ("diffusion_pytorch_model", "model"):
        for variant in ("", ".fp16"):
            single, index = folder / f"{name}{variant}.safetensors", folder / f"{name}{variant}.safetensors.index.json"
            if single.exists():
                return Tensors.from_safetensors([single], rename)
            if index.exists():
                shards = sorted(set(translated(index, lambda c: [str(shard) for shard in c["weight_map"].values()])))
                return Tensors.from_safetensors([folder / shard for shard in shards], rename)
    raise FileNotFoundError(f"No .safetensors weights in {folder}.")


def text_weights(folder):
    """The tensors of a transformers CLIP text model folder, keyed without the `text_model.` prefix (transformers 5
    writes CLIPTextModel's keys without it; `text_projection.weight` never has it)."""
    return find_weights(folder, lambda key: key.removeprefix("text_model."))


def text_encoder_config(c):
    """TextEncoder arguments from the transformers CLIPTextConfig of a CLIPTextModel or (SDXL's text_encoder_2)
    a CLIPTextModelWithProjection, which adds `projection_dim`."""
    architectures = c.get("architectures") or ["CLIPTextModel"]
    if architectures not in (["CLIPTextModel"], ["CLIPTextModelWithProjection"]):
        raise ValueError(f"Unsupported text encoder architectures {architectures!r:.80} (not CLIPTextModel or "
                         f"CLIPTextModelWithProjection)")
    projection = dict(projection_dim=c["projection_dim"]) if architectures == ["CLIPTextModelWithProjection"] else {}
    return dict(vocab_size=c["vocab_size"], max_length=c["max_position_embeddings"], width=c["hidden_size"],
                num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                intermediate_size=c["intermediate_size"], activation=c["hidden_act"], **projection)


def unet_config(c, num_time_ids=6):
    """DiffusionModel arguments from a diffusers UNet2DConditionModel config. `num_time_ids`: the time ids
    of a "text_time" (SDXL) UNet: 6 (sizes and crop), 5 where the pipeline has requires_aesthetics_score."""
    attention_levels = tuple(kind == "CrossAttnDownBlock2D" for kind in c["down_block_types"])
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)]
    unsupported = [key for key in ("class_embed_type", "time_cond_proj_dim", "encoder_hid_dim", "dual_cross_attention",
                                   "only_cross_attention", "reverse_transformer_layers_per_block") if c.get(key)]
    if c.get("addition_embed_type") not in (None, "text_time"):  # SDXL's is "text_time"
        unsupported.append(f"addition_embed_type={c['addition_embed_type']!r}")
    depth = c.get("transformer_layers_per_block", 1)  # one per level, or one for all
    if (not set(c["down_block_types"]) <= {"CrossAttnDownBlock2D", "DownBlock2D"}
            or list(c["up_block_types"]) != mirrored or unsupported
            or c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn"
            or not (isinstance(depth, int) or all(isinstance(n, int) for n in depth))):
        raise ValueError(f"Unsupported UNet configuration (not the SD 1.x/2.x/XL family): "
                         f"{c['down_block_types']} / {c['up_block_types']} {unsupported or ''}")
    heads = c.get("num_attention_heads") or c["attention_head_dim"]  # diffusers' legacy naming
    config = dict(in_channels=c["in_channels"], out_channels=c["out_channels"],
                  channels=tuple(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
                  attention_levels=attention_levels,
                  num_heads=heads if isinstance(heads, int) else tuple(heads),
                  context_dim=c["cross_attention_dim"],
                  transformer_depth=depth if isinstance(depth, int) else tuple(depth),
                  norm_groups=c.get("norm_num_groups", 32), norm_eps=c.get("norm_eps", 1e-5),
                  flip_sin_to_cos=c.get("flip_sin_to_cos", True), freq_shift=c.get("freq_shift", 0))
    if c.get("addition_embed_type") == "text_time":  # the input of add_embedding: text_embeds, then the time ids
        inputs, time_dim = c["projection_class_embeddings_input_dim"], c["addition_time_embed_dim"]
        if not inputs > num_time_ids * time_dim:
            raise ValueError(f"projection_class_embeddings_input_dim={inputs!r} leaves no text_embeds beside "
                             f"{num_time_ids} time ids of addition_time_embed_dim={time_dim!r}")
        config.update(pooled_dim=inputs - num_time_ids * time_dim, num_time_ids=num_time_ids, time_id_dim=time_dim)
    return config


def force_upcast(c):
    """The `force_upcast` of a diffusers AutoencoderKL config: true (its default) or false."""
    if not isinstance(c.get("force_upcast", True), bool):
        raise ValueError(f"force_upcast={c['force_upcast']!r:.40} is not true or false")
    return c.get("force_upcast", True)


def vae_configs(c):
    """Decoder and Encoder arguments from a diffusers AutoencoderKL config."""
    shared = dict(latent_channels=c["latent_channels"], channels=tuple(c["block_out_channels"]),
                  layers_per_block=c["layers_per_block"], norm_groups=c.get("norm_num_groups", 32))
    decoder = dict(shared, out_channels=c["out_channels"], scaling_factor=c.get("scaling_factor", SCALING_FACTOR))
    return dict(decoder=decoder, encoder=dict(shared, in_channels=c["in_channels"]))
