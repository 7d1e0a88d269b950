"""Stable Diffusion text-to-image (Rombach et al., 2022): tokenize the prompt, encode it with CLIP,
denoise random latents with DDIM and classifier-free guidance (Ho & Salimans, 2022), decode with the
VAE. The API follows KerasCV's `StableDiffusion`.
"""
import keras
import numpy as np
from keras import ops

from . import checkpoints
from .decoder import Decoder
from .diffusion_model import DiffusionModel
from .encoder import Encoder
from .schedulers import DDIMScheduler
from .text_encoder import TextEncoder
from .tokenizer import Tokenizer

MODELS = ("text_encoder", "diffusion_model", "decoder", "encoder")


class StableDiffusion:
    """Stable Diffusion 1.x / 2.x, or a smaller model of the same family, with random weights.

    Use `StableDiffusion.from_checkpoint(path)` for trained weights.

    Args:
        img_height, img_width: image size in pixels, multiples of 8.
        jit_compile: compile the text encoder, the denoising step and the decoder with XLA
            (TensorFlow and JAX; the torch backend runs eagerly).
        config: keyword arguments per component, `{"text_encoder": {...}, "diffusion_model": {...},
            "decoder": {...}, "encoder": {...}, "scheduler": {...}}`; missing ones take SD 1.5's values.
        tokenizer: a `Tokenizer`; default: the bundled CLIP vocabulary, padding with the end token.
    """

    def __init__(self, img_height=512, img_width=512, jit_compile=True, config=None, tokenizer=None):
        config = {name: dict((config or {}).get(name, {})) for name in (*MODELS, "scheduler")}
        vae_factor = 2 ** (len(config["decoder"].get("channels", (0,) * 4)) - 1)
        unet_factor = 2 ** (len(config["diffusion_model"].get("channels", (0,) * 4)) - 1)
        for name, size in (("img_height", img_height), ("img_width", img_width)):
            if not isinstance(size, int) or size <= 0 or size % 8 or size % (vae_factor * unet_factor):
                raise ValueError(f"{name} must be a positive multiple of 8 (of {vae_factor * unet_factor} "
                                 f"for this model's VAE and UNet depth), got {size!r}.")
        self.config, self.img_height, self.img_width = config, img_height, img_width
        latent_size = dict(latent_height=img_height // vae_factor, latent_width=img_width // vae_factor)
        self.text_encoder = TextEncoder(**config["text_encoder"])
        self.diffusion_model = DiffusionModel(**latent_size, **config["diffusion_model"])
        self.decoder = Decoder(**latent_size, **config["decoder"])
        self.encoder = Encoder(img_height, img_width, **config["encoder"])
        self.scheduler = DDIMScheduler(**config["scheduler"])
        self.tokenizer = tokenizer or Tokenizer.from_vendored()
        self.denoise_step = self._build_denoise_step()
        jit_compile = jit_compile and keras.backend.backend() != "torch"
        for model in (self.text_encoder, self.denoise_step, self.decoder):
            model.compile(jit_compile=jit_compile)

    @classmethod
    def from_checkpoint(cls, path=None, img_height=None, img_width=None, jit_compile=True, vae=None,
                        prediction_type=None, use_ema=None, config=None):
        """Loads a checkpoint: a diffusers folder (`save_pretrained` layout), a bundle from `save`, or an
        original SD 1.x / 2.x single file (`.safetensors`, `.ckpt`).

        Args:
            path: the checkpoint; default: the small demo model shipped in `weights/demo`.
            img_height, img_width: image size; default: the size the model was trained at.
            jit_compile: see `StableDiffusion`.
            vae, prediction_type, use_ema, config: see `checkpoints.read`.
        """
        checkpoint = checkpoints.read(path, vae, prediction_type, use_ema, config)
        sd = cls(checkpoint.img_height if img_height is None else img_height,
                 checkpoint.img_width if img_width is None else img_width, jit_compile,
                 checkpoint.config, checkpoint.tokenizer)
        checkpoint.load_into(sd)
        return sd

    @classmethod
    def from_preset(cls, name, img_height=None, img_width=None, jit_compile=True):
        """Loads "sd-1.5", "sd-2.1-base" or "sd-2.1": the original checkpoint is downloaded once into
        the Keras cache and converted once into a bundle there, which later calls load."""
        bundle = checkpoints.preset_bundle(name)
        if not bundle.exists():
            path, options = checkpoints.download_preset(name)
            cls.from_checkpoint(path, jit_compile=False, **options).save(bundle)
        return cls.from_checkpoint(bundle, img_height, img_width, jit_compile)

    def save(self, path, overwrite=False):
        """Saves a bundle folder: `config.json`, one `.weights.h5` per model and the tokenizer.

        The folder appears only once complete. Load it with `StableDiffusion.from_checkpoint(path)`.
        """
        checkpoints.save_bundle(self, path, overwrite)

    def _build_denoise_step(self):
        """One sampler step as a model: the UNet runs once on [unconditional, conditional] latents."""
        latents = keras.Input(self.diffusion_model.inputs[0].shape[1:])
        context, negative_context = (keras.Input(self.diffusion_model.inputs[2].shape[1:]) for _ in "cn")
        timestep, alpha, alpha_prev, guidance = (keras.Input(()) for _ in range(4))
        both = self.diffusion_model([ops.concatenate([latents, latents]),
                                     ops.concatenate([timestep, timestep]),
                                     ops.concatenate([negative_context, context])])
        unconditional, conditional = ops.split(both, 2)
        output = unconditional + guidance[:, None, None, None] * (conditional - unconditional)
        new_latents = self.scheduler.step(output, latents, alpha, alpha_prev)
        return keras.Model([latents, context, negative_context, timestep, alpha, alpha_prev, guidance],
                           new_latents, name="denoise_step")

    def tokenize(self, prompt):
        """Token ids, int32 numpy (B, 77), of a prompt or a list of prompts."""
        return self.tokenizer(prompt)

    def encode_text(self, prompt):
        """CLIP hidden states (B, 77, dim) of a prompt or a list of prompts."""
        return self.text_encoder.predict_on_batch(self.tokenize(prompt))

    def text_to_image(self, prompt, negative_prompt=None, batch_size=1, num_steps=50,
                      unconditional_guidance_scale=7.5, seed=None, diffusion_noise=None, verbose=True):
        """Generates images for a prompt; returns uint8 numpy (B, H, W, 3).

        Args:
            prompt: a string, or a list of strings (one image each).
            negative_prompt: what to steer away from: a string, or one per image; default "".
            batch_size: images per prompt string.
            num_steps: DDIM steps.
            unconditional_guidance_scale: classifier-free guidance weight.
            seed: seeds the initial noise (numpy), so images repeat across runs and backends.
            diffusion_noise: the initial latents (B, h, w, C) instead of seeded noise.
            verbose: show a progress bar.
        """
        return self.generate_image(self.encode_text(prompt), negative_prompt, batch_size, num_steps,
                                   unconditional_guidance_scale, diffusion_noise, seed, verbose)

    def generate_image(self, encoded_text, negative_prompt=None, batch_size=1, num_steps=50,
                       unconditional_guidance_scale=7.5, diffusion_noise=None, seed=None, verbose=True):
        """Generates images from `encode_text` output (B or 1, 77, dim); see `text_to_image`."""
        context = np.asarray(encoded_text, dtype="float32")
        context = context[None] if context.ndim == 2 else context
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if context.shape[0] not in (1, batch_size) and batch_size != 1:
            raise ValueError(f"batch_size={batch_size} does not match {context.shape[0]} encoded prompts.")
        batch_size = max(batch_size, context.shape[0])
        context = np.broadcast_to(context, (batch_size, *context.shape[1:]))
        negative = self.encode_text("" if negative_prompt is None else negative_prompt)
        if negative.shape[0] not in (1, batch_size):
            raise ValueError(f"Got {negative.shape[0]} negative prompts for {batch_size} images.")
        negative = np.broadcast_to(negative, context.shape)
        latents = self._initial_noise(batch_size, diffusion_noise, seed)
        timesteps, alphas, alphas_prev = self.scheduler.schedule(num_steps)
        per_image = lambda value: np.full((batch_size,), value, dtype="float32")
        progress = keras.utils.Progbar(num_steps, verbose=int(verbose))
        for step, (t, alpha, alpha_prev) in enumerate(zip(timesteps, alphas, alphas_prev)):
            latents = self.denoise_step.predict_on_batch(
                [latents, context, negative, per_image(t), per_image(alpha), per_image(alpha_prev),
                 per_image(unconditional_guidance_scale)])
            progress.update(step + 1)
        return self.decode(latents)

    def decode(self, latents):
        """VAE-decodes latents (B, h, w, C) to uint8 images (B, H, W, 3)."""
        images = np.asarray(self.decoder.predict_on_batch(latents))
        return np.round(np.clip(images / 2 + 0.5, 0, 1) * 255).astype("uint8")

    def _initial_noise(self, batch_size, diffusion_noise, seed):
        shape = (batch_size, *self.diffusion_model.inputs[0].shape[1:])
        if diffusion_noise is None:
            return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        noise = np.asarray(diffusion_noise, dtype="float32")
        noise = np.broadcast_to(noise, shape) if noise.shape in (shape[1:], (1, *shape[1:])) else noise
        if noise.shape != shape:
            raise ValueError(f"diffusion_noise must have shape {shape}, got {noise.shape}.")
        return noise
