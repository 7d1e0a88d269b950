"""Stable Diffusion (Rombach et al., 2022) with KerasCV's API. Each task encodes the prompt with CLIP, denoises
latents with a sampler (`schedulers.py`) and classifier-free guidance (Ho & Salimans, 2022), and decodes them with
the VAE; image-to-image and inpainting (`editing.py`) start from a picture. Seeds: image i of a call draws its
initial and (ancestral samplers) step noise from numpy's `default_rng(seed + i)`, so it repeats in any batch.
"""
import collections
import contextlib

import keras
import numpy as np
from keras import ops

from . import (arguments, bundle, checkpoints, compiled_loop, data, editing, embeddings, emphasis, export,
               keras_internals, lora, presets, progress, quantization, runtime, schedulers, sdxl, tiling)
from .decoder import Decoder
from .diffusion_model import DiffusionModel
from .encoder import Encoder
from .images import broadcast
from .text_encoder import TextEncoder
from .tokenizer import Tokenizer

Setup = collections.namedtuple("Setup", "context negative sampler draw_noise noise")  # see `_prepare`
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))  # SDXL's second: `text_encoder_2`


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x / XL or a smaller model of the family, with random weights (see `from_checkpoint`).

    Args:
        img_height, img_width: image size in pixels, multiples of 8.
        jit_compile: compile the text encoder, denoising step and decoder with XLA (TensorFlow, JAX; torch: eager);
            default: on JAX only, as TensorFlow graphs start faster (see README, "XLA or not"); see `runtime.py`.
        compiled_loop: with XLA, run all denoising steps as one program (`compiled_loop.py`); False: step by step.
        config: keyword arguments per component, `{"text_encoder": {...}, "diffusion_model": {...},
            "decoder": {...}, "encoder": {...}, "scheduler": {...}}`; missing ones take SD 1.5's values. SDXL also
            has "text_encoder_2" and "pipeline" (diffusers' options: `force_zeros_for_empty_prompt`, no negative prompt
            gives zero states; `requires_aesthetics_score`, the refiner's time ids; `force_upcast`, the VAE in float32
            under float16 policies, `sdxl.vae_dtypes`), and its refiner `"text_encoder": None` (none); "grammar": the
            caption words of a model trained on `data.py`'s shapes (`data.GRAMMAR`).
        tokenizer, tokenizer_2: `Tokenizer`s; default: the bundled CLIP vocabulary, padding with the end token, "!".
            `sd.tokenizer` is the model's first tokenizer, which `tokenize` uses: the refiner's is `tokenizer_2`.
        scheduler: the default sampler (`schedulers.SCHEDULERS`); default: the one `config["scheduler"]` names, or DDIM.
        dtype: the models' Keras dtype policy, e.g. "mixed_bfloat16"; default: the global one (the VAE: see "pipeline").
        quantize: "int8": int8 UNet and text encoder, once the weights are loaded (`quantization.py`); default None.
        weights: a `checkpoints.Checkpoint` (`checkpoints.read`) to create the weights from; default: random.
    """

    def __init__(self, img_height=512, img_width=512, *, jit_compile=None, compiled_loop=True, config=None,
                 tokenizer=None, tokenizer_2=None, scheduler=None, dtype=None, quantize=None, weights=None):
        given = config or {}
        names = dict.fromkeys((*bundle.MODELS, "scheduler", "grammar", "pipeline", *given))
        config = {name: None if name in given and given[name] is None else dict(given.get(name, {})) for name in names}
        vae_factor = 2 ** (len(config["decoder"].get("channels", (0,) * 4)) - 1)
        unet_factor = 2 ** (len(config["diffusion_model"].get("channels", (0,) * 4)) - 1)
        for name, size in (("img_height", img_height), ("img_width", img_width)):
            arguments.check_image_size(name, size, vae_factor * unet_factor)
        arguments.check_memory(config, img_height, img_width)  # denoising one image
        quantization.check(quantize)
        arguments.check_compiling(jit_compile, compiled_loop)
        self.config, self.img_height, self.img_width = config, img_height, img_width
        latent_size = dict(latent_height=img_height // vae_factor, latent_width=img_width // vae_factor)
        with keras_internals.created_from(weights, self) if weights else contextlib.nullcontext():
            for name, _ in ENCODERS:  # None: a model without it (SD 1.x / 2.x: the second; SDXL's refiner: the first)
                setattr(self, name, None if config.get(name) is None else TextEncoder(**config[name], dtype=dtype))
            self.diffusion_model = DiffusionModel(**latent_size, **config["diffusion_model"], dtype=dtype)
            encoder_dtype, decoder_dtype = sdxl.vae_dtypes(dtype, config["pipeline"])  # SDXL's float32 VAE
            self.decoder = Decoder(latent_height=None, latent_width=None, **config["decoder"], dtype=decoder_dtype)
            self.encoder = Encoder(img_height=img_height, img_width=img_width, **config["encoder"], dtype=encoder_dtype)
        quantization.apply(self, quantize)
        self.vae_factor, self.vae_tile_size, self.skipped, self.lora_originals = vae_factor, None, {}, {}
        self.latent_shape = (img_height // vae_factor, img_width // vae_factor, self.decoder.inputs[0].shape[-1])
        self.scheduler_name = scheduler or schedulers.default_name(config["scheduler"])
        self.scheduler = schedulers.create(self.scheduler_name, config["scheduler"])
        self.tokenizer_2 = tokenizer_2 or Tokenizer.from_vendored("!") if self.text_encoder_2 else None
        self.tokenizer = tokenizer or Tokenizer.from_vendored() if self.text_encoder else self.tokenizer_2
        self.denoise_step = self._build_denoise_step()
        runtime.compile_models(self, jit_compile=jit_compile, compiled_loop=compiled_loop)

    @classmethod
    def from_checkpoint(cls, path=None, *, img_height=None, img_width=None, vae=None, prediction_type=None,
                        use_ema=None, config=None, **options):
        """Loads a checkpoint: a diffusers folder (`save_pretrained` layout), a bundle from `save` (memory-mapped:
        replace its files, never edit them in place), or an original SD 1.x / 2.x / XL `.safetensors` or `.ckpt`.

        Args:
            path: the checkpoint; default: the small demo model shipped with the package.
            img_height, img_width: image size; default: the size the model was trained at.
            vae, prediction_type, use_ema, config: see `checkpoints.read`.
            options: `jit_compile`, `compiled_loop`, `scheduler`, `dtype`, `quantize`: see `StableDiffusion`.
        """
        checkpoint = checkpoints.read(path, vae=vae, prediction_type=prediction_type, use_ema=use_ema, config=config)
        return cls(img_height=checkpoint.img_height if img_height is None else img_height,
                   img_width=checkpoint.img_width if img_width is None else img_width, config=checkpoint.config,
                   tokenizer=checkpoint.tokenizer, tokenizer_2=checkpoint.tokenizer_2, weights=checkpoint, **options)

    @classmethod
    def from_preset(cls, name, **options):
        """Loads a preset of `presets.PRESETS` ("sd-1.5", "sd-2.1-base", "sd-2.1", "sdxl-base-1.0", "sdxl-refiner-1.0",
        "sdxl-turbo"): the original file is downloaded once into the Keras cache and converted once into a bundle there,
        which later calls load. Keyword options: see `from_checkpoint`; Turbo defaults to scheduler="euler_a" at 512x512
        (run it with `num_steps` 1-4 and `unconditional_guidance_scale=0`)."""
        converted = presets.preset_bundle(name)
        if not converted.exists():
            path, download_options = presets.download_preset(name)
            cls.from_checkpoint(path, jit_compile=False, **download_options).save(converted)
        return cls.from_checkpoint(converted, **{**presets.defaults(name), **options})

    # Methods whose code lives with the file format it reads or writes: `sd.save(path, *, overwrite=False)`,
    # `sd.load_lora(path, *, scale=1.0)`, `sd.unload_lora()`, `sd.load_textual_inversion(path, *, token=None)`.
    save, load_lora, unload_lora, load_textual_inversion = bundle.save, lora.load, lora.unload, embeddings.load
    export = export.export  # `sd.export(folder, *, format="tf_saved_model")`: static-shape models for `exported.py`

    def tokenize(self, prompt, *, long_prompts=False, min_chunks=1):
        """Token ids, int32 numpy (B, 77) or with `long_prompts` (B, 77 k), of prompts by `sd.tokenizer` (the model's
        first tokenizer; SDXL's refiner: tokenizer_2): see `Tokenizer.__call__`."""
        return self.tokenizer(prompt, long_prompts=long_prompts, min_chunks=min_chunks)

    def encode_text(self, prompt, *, long_prompts=False, clip_skip=None, prompt_weighting=False, min_chunks=1):
        """CLIP hidden states (B, 77, dim) of prompts; with `long_prompts` (B, 77 k, dim); see `text_to_image`. SDXL:
        (the un-normed states before the last layer of each encoder it has, concatenated (the refiner: text_encoder_2's
        alone); text_embeds (B, P) of text_encoder_2's first chunk)."""
        sdxl, states = self.text_encoder_2 is not None, []
        for name, tokenizer in [(name, tokenizer) for name, tokenizer in ENCODERS if getattr(self, name) is not None]:
            tokenizer = getattr(self, tokenizer)
            tokens, weights = tokenizer(prompt, long_prompts=long_prompts, prompt_weighting=prompt_weighting,
                                        min_chunks=min_chunks, return_weights=True)
            encoder = runtime.skipping_model(self, name, clip_skip, sdxl=sdxl)  # SDXL's: the penultimate, un-normed
            x, *pooled = keras.tree.flatten(encoder.predict_on_batch(tokens.reshape(-1, tokenizer.sequence_length)))
            x = emphasis.weigh(np.asarray(x), weights.reshape(x.shape[:2])) if prompt_weighting else np.asarray(x)
            states.append(x.reshape(tokens.shape[0], -1, x.shape[-1]))
        states = np.concatenate(states, axis=-1)
        return (states, np.reshape(pooled[0], (len(states), -1, pooled[0].shape[-1]))[:, 0]) if sdxl else states

    @arguments.checked
    def text_to_image(self, prompt, *, negative_prompt=None, batch_size=1, num_steps=50,
                      unconditional_guidance_scale=7.5, seed=None, diffusion_noise=None, scheduler=None,
                      long_prompts=False, clip_skip=None, prompt_weighting=False, callback=None, return_latents=False,
                      verbose=True, denoising_end=None, **micro_conditioning):
        """Generates images for a prompt; returns uint8 numpy (B, H, W, 3).

        Args:
            prompt: a string, or a list of strings (one image each), or their `encode_text` output (B or 1, 77 k,
                dim) (`generate_image`, KerasCV's name for that use); warns of words outside the model's grammar.
            negative_prompt: what to steer away from: a string, or one per image; default "".
            batch_size: images per prompt string.
            num_steps: sampler steps.
            unconditional_guidance_scale: classifier-free guidance weight; at most 1: none (the prompt's prediction).
            seed: image i draws its noise from numpy's `default_rng(seed + i)`; default: a random seed.
            diffusion_noise: the initial latents (B, h, w, C) instead of seeded noise, as diffusers' `latents`.
            scheduler: the sampler for this call (see `StableDiffusion`); default: the pipeline's.
            long_prompts: encode prompts longer than 77 tokens in chunks (see `tokenize`) instead of
                truncating them; the shorter of prompt and negative prompt gets empty chunks.
            clip_skip: condition on CLIP's hidden state this many layers before the last (1: the penultimate;
                None, 0: the last), for prompt and negative prompt alike (`text_encoder.skipping`).
            prompt_weighting: read A1111's emphasis, `(word:1.3)`, in prompt and negative prompt (`emphasis.py`).
                An encoded prompt must have been encoded with the same `clip_skip` and `prompt_weighting`.
            callback: called as `callback(step, timestep, latents)` after every step (so no compiled loop).
            return_latents: return the final latents (B, h, w, C) instead of decoding them.
            verbose: report progress on stderr (once, at the end, from a compiled loop).
            denoising_end: a float in (0, 1): stop where that fraction of the training schedule is denoised, as
                diffusers (steps at timesteps >= round(T (1 - denoising_end))), e.g. 0.8 with `return_latents` for
                SDXL's refiner to finish (`image_to_image(..., denoising_start=0.8)`: the ensemble of experts).
            micro_conditioning: SDXL's sizes and crop, as diffusers' keywords `original_size`, `crops_coords_top_left`,
                `target_size` and their `negative_` counterparts; the refiner's `aesthetic_score` (6.0) and
                `negative_aesthetic_score` (2.5) instead of the target sizes (`sdxl.py`).
        Bad arguments raise ValueError, naming them, before any model work (`arguments.py`).
        """
        data.warn_outside_grammar(prompt, self.config["grammar"])
        setup = self._prepare(prompt, negative_prompt=negative_prompt, batch_size=batch_size, num_steps=num_steps,
                              seed=seed, diffusion_noise=diffusion_noise, scheduler=scheduler, long_prompts=long_prompts,
                              clip_skip=clip_skip, prompt_weighting=prompt_weighting, denoising_end=denoising_end,
                              **micro_conditioning)
        latents = self.denoise(setup.noise * setup.sampler.init_noise_sigma, setup,
                               guidance=unconditional_guidance_scale, callback=callback, verbose=verbose)
        return latents if return_latents else self.decode(latents)

    generate_image = text_to_image  # KerasCV's name, for `encode_text` output
    # `sd.image_to_image(prompt, image, *, ...)`, `sd.inpaint(prompt, image, mask, *, ...)`, `sd.encode_images(...)`
    image_to_image, inpaint, encode_images = editing.image_to_image, editing.inpaint, editing.encode_images

    def _prepare(self, prompt, *, negative_prompt, batch_size, num_steps, seed, diffusion_noise, scheduler,
                 long_prompts, clip_skip, prompt_weighting, strength=1.0, denoising_start=None, denoising_end=None,
                 editing=False, **micro_conditioning):
        """What every task starts from (arguments: see `text_to_image`; `editing`: image-to-image or inpainting, whose
        SDXL time ids differ): the UNet's text inputs of prompt and negative prompt, [states (B, L, dim)] or (SDXL)
        [states, text_embeds (B, P), time_ids (B, n)], a fresh sampler, draw_noise() -> the next seeded noise
        (B, h, w, C), the first noise (or `diffusion_noise`)."""
        encode = lambda text, **options: sdxl.listed(self.encode_text(text, clip_skip=clip_skip,
                                                                      prompt_weighting=prompt_weighting, **options))
        encoded = sdxl.listed(prompt) if arguments.is_encoded(prompt) else encode(prompt, long_prompts=long_prompts)
        # a prompt's or a batch's states (.., L, dim) [and text_embeds (.., P)]
        context = [np.asarray(x, "float32").reshape(-1, *np.shape(x)[-2 + i:]) for i, x in enumerate(encoded)]
        batch_size, length = max(batch_size, len(context[0])), context[0].shape[1]
        chunk = self.tokenizer.sequence_length
        context = [np.broadcast_to(x, (batch_size, *x.shape[1:])) for x in context]
        if negative_prompt is None and self.config["pipeline"].get("force_zeros_for_empty_prompt"):
            negative = [np.zeros_like(x) for x in context]  # SDXL's: zeros, not the empty prompt's states
        else:
            negative = [broadcast(x, batch_size, "negative prompts") for x in encode(
                "" if negative_prompt is None else negative_prompt, long_prompts=long_prompts or length > chunk,
                min_chunks=length // chunk)]
        if negative[0].shape[1] > length:  # pad the prompt with empty chunks
            empty = encode("", long_prompts=True, min_chunks=(negative[0].shape[1] - length) // chunk)[0]
            context[0] = np.concatenate([context[0], np.broadcast_to(empty, (batch_size, *empty.shape[1:]))], axis=1)
        if self.text_encoder_2:  # SDXL's size and crop conditioning (the refiner's: and aesthetic scores)
            ids, negative_ids = sdxl.time_ids((self.img_height, self.img_width), batch_size, self.config["pipeline"],
                                              editing=editing, **micro_conditioning)
            context, negative = [*context, ids], [*negative, negative_ids]
        sampler = schedulers.create(scheduler or self.scheduler_name, self.config["scheduler"])
        sampler.set_timesteps(num_steps, strength=strength, denoising_start=denoising_start,
                              denoising_end=denoising_end)
        seed = np.random.SeedSequence().entropy % 2**32 if seed is None else seed
        generators = [np.random.default_rng(seed + i) for i in range(batch_size)]
        draw_noise = lambda: np.stack([g.standard_normal(self.latent_shape, dtype=np.float32) for g in generators])
        noise = draw_noise()  # drawn either way, so that later draws do not depend on diffusion_noise
        given = noise if diffusion_noise is None else np.asarray(diffusion_noise, dtype="float32")
        return Setup(context, negative, sampler, draw_noise, np.broadcast_to(given, noise.shape))

    @compiled_loop.instead  # all steps in one XLA program (`compiled_loop.py`) without a callback, if set up
    def denoise(self, latents, setup, *, guidance, callback=None, conditioning=None, after_step=None, verbose=True):
        """The denoising loop of every task: latents (B, h, w, C) at the first timestep of `setup.sampler` -> clean
        latents. `conditioning`: extra UNet input channels (an inpainting UNet's mask and masked-image latents);
        `after_step(latents)` follows each update (a `schedulers.Repaint`); see `text_to_image` for the rest."""
        sampler, per_image = setup.sampler, lambda value: np.full((len(latents),), value, dtype="float32")
        for step, t in enumerate(progress.report(sampler.timesteps, "denoising", verbose)):
            model_input = sampler.scale_model_input(latents)
            model_input = model_input if conditioning is None else np.concatenate([model_input, conditioning], axis=-1)
            output = self.denoise_step.predict_on_batch([model_input, per_image(t), per_image(guidance), *setup.context,
                *setup.negative]) if guidance > 1 else self.diffusion_model.predict_on_batch(
                [model_input, per_image(t), *setup.context])  # diffusers: no guidance at most 1
            latents = sampler.step(output, latents, setup.draw_noise)
            latents = after_step(latents) if after_step else latents
            if callback:
                callback(step, t, latents)
        return latents

    def _build_denoise_step(self):
        """The compiled model call of a guided step: [latents, timestep, guidance, the UNet's text inputs (`_prepare`)
        of the prompt, then of the negative prompt] -> the UNet once on both, mixed by guidance."""
        shapes = (self.diffusion_model.inputs[0].shape[1:], (), ())
        latents, timestep, guidance = (keras.Input(shape) for shape in shapes)
        context, negative = ([keras.Input(x.shape[1:]) for x in self.diffusion_model.inputs[2:]] for _ in range(2))
        both = self.diffusion_model([ops.concatenate([latents, latents]), ops.concatenate([timestep, timestep]),
                                     *(ops.concatenate(pair) for pair in zip(negative, context))])
        unconditional, conditional = ops.split(both, 2)
        output = unconditional + guidance[:, None, None, None] * (conditional - unconditional)
        return keras.Model([latents, timestep, guidance, *context, *negative], output, name="denoise_step")

    def enable_vae_tiling(self, tile_size=512):
        """Decodes images over `tile_size` pixels high or wide in overlapping tiles of that size, as diffusers'
        `enable_vae_tiling`, in one tile's memory; blended, not exact (see `tiling.py`). None turns it off."""
        self.vae_tile_size = tiling.checked_tile_size(tile_size, self.vae_factor)

    def decode(self, latents):
        """VAE-decodes latents (B, h, w, C) to uint8 images (B, H, W, 3), in tiles after `enable_vae_tiling`."""
        images = tiling.decode(self.decoder.predict_on_batch, np.asarray(latents), self.vae_tile_size, self.vae_factor)
        return np.round(np.clip(images / 2 + 0.5, 0, 1) * 255).astype("uint8")
