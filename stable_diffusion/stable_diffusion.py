"""Stable Diffusion text-to-image (Rombach et al., 2022): tokenize the prompt, encode it with CLIP,
denoise random latents with a sampler (`schedulers.py`) and classifier-free guidance (Ho & Salimans,
2022), decode with the VAE. Image-to-image and inpainting (`editing.py`) share the denoising loop.
The API follows KerasCV's `StableDiffusion`.

Seeds: image i of a call gets its own numpy generator seeded with `seed + i`, which draws its initial
noise, then (ancestral samplers) each step's noise, so an image repeats across runs and batch sizes.
"""
import contextlib

import keras
import numpy as np
from keras import ops

from . import bundle, checkpoints, keras_internals, presets, schedulers, tiling
from .decoder import Decoder
from .diffusion_model import DiffusionModel
from .encoder import Encoder
from .text_encoder import TextEncoder
from .editing import ImageEditing
from .tokenizer import Tokenizer

MODELS = ("text_encoder", "diffusion_model", "decoder", "encoder")


class StableDiffusion(ImageEditing):
    """Stable Diffusion 1.x / 2.x, or a smaller model of the same family, with random weights.

    Use `StableDiffusion.from_checkpoint(path)` for trained weights.

    Args:
        img_height, img_width: image size in pixels, multiples of 8.
        jit_compile: compile the text encoder, the denoising step and the decoder with XLA
            (TensorFlow and JAX; the torch backend runs eagerly).
        config: keyword arguments per component, `{"text_encoder": {...}, "diffusion_model": {...},
            "decoder": {...}, "encoder": {...}, "scheduler": {...}}`; missing ones take SD 1.5's values.
        tokenizer: a `Tokenizer`; default: the bundled CLIP vocabulary, padding with the end token.
        scheduler: the default sampler, one of `schedulers.SCHEDULERS` ("ddim", "euler", "euler_a",
            "dpmpp_2m", "dpmpp_2m_karras", "pndm"), built from `config["scheduler"]`.
        dtype_policy: the models' Keras dtype policy, e.g. "mixed_bfloat16"; default: the global one.
        weights: a `checkpoints.Checkpoint` (from `checkpoints.read`) to create the weights from, as
            `from_checkpoint` does; default: random initialization.
    """

    def __init__(self, img_height=512, img_width=512, jit_compile=True, config=None, tokenizer=None,
                 scheduler="ddim", dtype_policy=None, weights=None):
        config = {name: dict((config or {}).get(name, {})) for name in (*MODELS, "scheduler")}
        vae_factor = 2 ** (len(config["decoder"].get("channels", (0,) * 4)) - 1)
        unet_factor = 2 ** (len(config["diffusion_model"].get("channels", (0,) * 4)) - 1)
        for name, size in (("img_height", img_height), ("img_width", img_width)):
            if not isinstance(size, int) or size <= 0 or size % 8 or size % (vae_factor * unet_factor):
                raise ValueError(f"{name} must be a positive multiple of 8 (of {vae_factor * unet_factor} "
                                 f"for this model's VAE and UNet depth), got {size!r}.")
        self.config, self.img_height, self.img_width = config, img_height, img_width
        latent_size = dict(latent_height=img_height // vae_factor, latent_width=img_width // vae_factor)
        global_policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy(dtype_policy or global_policy)  # layers take it when created
        try:
            with keras_internals.created_from(weights, self) if weights else contextlib.nullcontext():
                self.text_encoder = TextEncoder(**config["text_encoder"])
                self.diffusion_model = DiffusionModel(**latent_size, **config["diffusion_model"])
                self.decoder = Decoder(None, None, **config["decoder"])
                self.encoder = Encoder(img_height, img_width, **config["encoder"])
        finally:
            keras.config.set_dtype_policy(global_policy)
        self.vae_factor, self.vae_tile_size = vae_factor, None
        self.latent_shape = (img_height // vae_factor, img_width // vae_factor, self.decoder.inputs[0].shape[-1])
        self.scheduler_name, self.scheduler = scheduler, schedulers.create(scheduler, config["scheduler"])
        self.tokenizer = tokenizer or Tokenizer.from_vendored()
        self.denoise_step = self._build_denoise_step()
        jit_compile = jit_compile and keras.backend.backend() != "torch"
        for model in (self.text_encoder, self.denoise_step, self.decoder):
            model.compile(jit_compile=jit_compile)

    @classmethod
    def from_checkpoint(cls, path=None, img_height=None, img_width=None, jit_compile=True, vae=None,
                        prediction_type=None, use_ema=None, config=None, scheduler="ddim", dtype_policy=None):
        """Loads a checkpoint: a diffusers folder (`save_pretrained` layout), a bundle from `save` (memory-mapped:
        replace its files, never edit them in place), or an original SD 1.x / 2.x `.safetensors` or `.ckpt`.

        Args:
            path: the checkpoint; default: the small demo model shipped with the package.
            img_height, img_width: image size; default: the size the model was trained at.
            jit_compile, scheduler, dtype_policy: see `StableDiffusion`.
            vae, prediction_type, use_ema, config: see `checkpoints.read`.
        """
        checkpoint = checkpoints.read(path, vae, prediction_type, use_ema, config)
        return cls(checkpoint.img_height if img_height is None else img_height,
                   checkpoint.img_width if img_width is None else img_width, jit_compile,
                   checkpoint.config, checkpoint.tokenizer, scheduler, dtype_policy, weights=checkpoint)

    @classmethod
    def from_preset(cls, name, img_height=None, img_width=None, jit_compile=True):
        """Loads "sd-1.5", "sd-2.1-base" or "sd-2.1": the original checkpoint is downloaded once into
        the Keras cache and converted once into a bundle there, which later calls load."""
        converted = presets.preset_bundle(name)
        if not converted.exists():
            path, options = presets.download_preset(name)
            cls.from_checkpoint(path, jit_compile=False, **options).save(converted)
        return cls.from_checkpoint(converted, img_height, img_width, jit_compile)

    def save(self, path, overwrite=False):
        """Saves a bundle folder (`bundle.py`): `config.json`, one `.safetensors` per model and the tokenizer.

        The folder appears only once complete. Load it with `StableDiffusion.from_checkpoint(path)`.
        """
        bundle.save(self, path, overwrite)

    def _build_denoise_step(self):
        """The compiled model call of a step: the UNet runs once on [unconditional, conditional] inputs
        and guidance mixes its outputs. The sampler's update (cheap, with the history multistep
        samplers keep) runs after it in numpy."""
        latents = keras.Input(self.diffusion_model.inputs[0].shape[1:])
        context, negative_context = (keras.Input(self.diffusion_model.inputs[2].shape[1:]) for _ in "cn")
        timestep, guidance = keras.Input(()), keras.Input(())
        both = self.diffusion_model([ops.concatenate([latents, latents]),
                                     ops.concatenate([timestep, timestep]),
                                     ops.concatenate([negative_context, context])])
        unconditional, conditional = ops.split(both, 2)
        output = unconditional + guidance[:, None, None, None] * (conditional - unconditional)
        return keras.Model([latents, context, negative_context, timestep, guidance], output, name="denoise_step")

    def tokenize(self, prompt, long_prompts=False, min_chunks=1):
        """Token ids, int32 numpy (B, 77), of a prompt or a list of prompts. With `long_prompts`,
        (B, 77 k): each prompt in k chunks of 75 tokens (at least `min_chunks`, as many as the longest
        prompt needs), each chunk with start and end tokens, padded to 77."""
        if not long_prompts:
            return self.tokenizer(prompt)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            return self.tokenizer(prompt)  # raises, naming the bad prompt
        rows = self.tokenizer.bpe_ids(prompts)
        width = self.tokenizer.sequence_length - 2
        chunks = max(min_chunks, *(-(-len(row) // width) for row in rows))
        pieces = [row[i * width:(i + 1) * width] for row in rows for i in range(chunks)]
        return keras.ops.convert_to_numpy(self.tokenizer.packer(pieces)).astype("int32").reshape(len(rows), -1)

    def encode_text(self, prompt, long_prompts=False, min_chunks=1):
        """CLIP hidden states (B, 77, dim) of a prompt or a list of prompts; with `long_prompts`
        (B, 77 k, dim): the chunks of `tokenize` encoded one by one and concatenated."""
        tokens = self.tokenize(prompt, long_prompts, min_chunks)
        states = self.text_encoder.predict_on_batch(tokens.reshape(-1, self.tokenizer.sequence_length))
        return np.asarray(states).reshape(tokens.shape[0], -1, states.shape[-1])

    def text_to_image(self, prompt, negative_prompt=None, batch_size=1, num_steps=50,
                      unconditional_guidance_scale=7.5, seed=None, diffusion_noise=None, verbose=True,
                      scheduler=None, callback=None, return_latents=False, long_prompts=False):
        """Generates images for a prompt; returns uint8 numpy (B, H, W, 3).

        Args:
            prompt: a string, or a list of strings (one image each).
            negative_prompt: what to steer away from: a string, or one per image; default "".
            batch_size: images per prompt string.
            num_steps: sampler steps.
            unconditional_guidance_scale: classifier-free guidance weight.
            seed: image i draws its noise from numpy's `default_rng(seed + i)` (see the module
                docstring); default: a random seed.
            diffusion_noise: the initial latents (B, h, w, C) instead of seeded noise (scaled by the
                sampler's initial sigma, as diffusers' `latents`).
            verbose: show a progress bar.
            scheduler: the sampler for this call (see `StableDiffusion`); default: the pipeline's.
            callback: called as `callback(step, timestep, latents)` after every step.
            return_latents: return the final latents (B, h, w, C) instead of decoding them.
            long_prompts: encode prompts longer than 77 tokens in chunks (see `tokenize`) instead of
                truncating them; the shorter of prompt and negative prompt gets empty chunks.
        """
        return self.generate_image(self.encode_text(prompt, long_prompts), negative_prompt, batch_size,
                                   num_steps, unconditional_guidance_scale, diffusion_noise, seed, verbose,
                                   scheduler, callback, return_latents, long_prompts)

    def generate_image(self, encoded_text, negative_prompt=None, batch_size=1, num_steps=50,
                       unconditional_guidance_scale=7.5, diffusion_noise=None, seed=None, verbose=True,
                       scheduler=None, callback=None, return_latents=False, long_prompts=False):
        """Generates images from `encode_text` output (B or 1, 77 k, dim); see `text_to_image`."""
        context, negative = self._contexts(encoded_text, negative_prompt, batch_size, long_prompts)
        draw_noise = self._noise_source(len(context), seed)
        sampler = self._sampler(scheduler, num_steps)
        latents = self._initial_noise(draw_noise, diffusion_noise) * sampler.init_noise_sigma
        latents = self.denoise(latents, context, negative, sampler, unconditional_guidance_scale,
                               draw_noise, callback, verbose=verbose)
        return latents if return_latents else self.decode(latents)

    def denoise(self, latents, context, negative, sampler, guidance=7.5, draw_noise=None, callback=None,
                conditioning=None, after_step=None, verbose=True):
        """The denoising loop of every task: latents (B, h, w, C) at the first timestep of `sampler` (a
        `schedulers.Scheduler` after `set_timesteps`) -> clean latents, guided by hidden states `context`
        and `negative` (B, L, dim). `draw_noise()` gives ancestral samplers fresh noise; `conditioning`
        holds extra UNet input channels (an inpainting UNet's mask and masked-image latents);
        `after_step(latents)` follows each update (inpainting's blending); see `text_to_image` for the rest."""
        per_image = lambda value: np.full((len(latents),), value, dtype="float32")
        progress = keras.utils.Progbar(len(sampler.timesteps), verbose=int(verbose))
        for step, t in enumerate(sampler.timesteps):
            model_input = sampler.scale_model_input(latents)
            if conditioning is not None:
                model_input = np.concatenate([model_input, conditioning], axis=-1)
            output = self.denoise_step.predict_on_batch(
                [model_input, context, negative, per_image(t), per_image(guidance)])
            latents = sampler.step(output, latents, draw_noise)
            latents = after_step(latents) if after_step else latents
            if callback:
                callback(step, t, latents)
            progress.update(step + 1)
        return latents

    def enable_vae_tiling(self, tile_size=512):
        """Decodes images larger than `tile_size` pixels (height or width) in overlapping tiles of that
        size, as diffusers' `enable_vae_tiling`: the decoder then needs the memory of one tile. Tiles
        are blended where they overlap; not exact (see `tiling.py`). `tile_size=None` turns it off."""
        if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 4 * self.vae_factor
                                      or tile_size % self.vae_factor):
            raise ValueError(f"tile_size must be a multiple of {self.vae_factor} pixels, at least "
                             f"{4 * self.vae_factor}, or None; got {tile_size!r}.")
        self.vae_tile_size = tile_size

    def decode(self, latents):
        """VAE-decodes latents (B, h, w, C) to uint8 images (B, H, W, 3), in tiles after `enable_vae_tiling`."""
        tile = (self.vae_tile_size or 0) // self.vae_factor
        if tile and max(np.shape(latents)[1:3]) > tile:
            images = tiling.decode_in_tiles(self.decoder.predict_on_batch, np.asarray(latents), tile, self.vae_factor)
        else:
            images = np.asarray(self.decoder.predict_on_batch(latents))
        return np.round(np.clip(images / 2 + 0.5, 0, 1) * 255).astype("uint8")

    def _contexts(self, encoded_text, negative_prompt, batch_size, long_prompts=False):
        """Prompt and negative prompt hidden states, one row per image, of one length (B, L, dim)."""
        context = np.asarray(encoded_text, dtype="float32")
        context = context[None] if context.ndim == 2 else context
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if context.shape[0] not in (1, batch_size) and batch_size != 1:
            raise ValueError(f"batch_size={batch_size} does not match {context.shape[0]} encoded prompts.")
        batch_size = max(batch_size, context.shape[0])
        context = np.broadcast_to(context, (batch_size, *context.shape[1:]))
        chunks = context.shape[1] // self.tokenizer.sequence_length
        negative = self.encode_text("" if negative_prompt is None else negative_prompt,
                                    long_prompts or chunks > 1, chunks)
        if negative.shape[0] not in (1, batch_size):
            raise ValueError(f"Got {negative.shape[0]} negative prompts for {batch_size} images.")
        if negative.shape[1] > context.shape[1]:  # pad the prompt with empty chunks
            missing = (negative.shape[1] - context.shape[1]) // self.tokenizer.sequence_length
            empty = self.encode_text("", True, missing)
            context = np.concatenate([context, np.broadcast_to(empty, (batch_size, *empty.shape[1:]))], axis=1)
        return context, np.broadcast_to(negative, context.shape)

    def _sampler(self, name, num_steps, strength=1.0):
        """A fresh sampler `name` (default: the pipeline's) set for `num_steps` steps."""
        sampler = schedulers.create(name or self.scheduler_name, self.config["scheduler"])
        sampler.set_timesteps(num_steps, strength)
        return sampler

    def _noise_source(self, batch_size, seed):
        """draw() -> standard normal latents (B, h, w, C), image i from `default_rng(seed + i)`."""
        seed = np.random.SeedSequence().entropy % 2**32 if seed is None else seed
        generators = [np.random.default_rng(seed + i) for i in range(batch_size)]
        return lambda: np.stack([g.standard_normal(self.latent_shape, dtype=np.float32) for g in generators])

    def _initial_noise(self, draw_noise, diffusion_noise):
        noise = draw_noise()  # drawn either way, so that later draws do not depend on diffusion_noise
        if diffusion_noise is None:
            return noise
        given = np.asarray(diffusion_noise, dtype="float32")
        given = np.broadcast_to(given, noise.shape) if given.shape in (noise.shape[1:], (1, *noise.shape[1:])) else given
        if given.shape != noise.shape:
            raise ValueError(f"diffusion_noise must have shape {noise.shape}, got {given.shape}.")
        return given
