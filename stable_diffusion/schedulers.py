"""Noise schedules and the DDIM sampler (Song et al., 2021), computed from the betas.

`DDIMScheduler(**config)` takes the keys of diffusers' `DDIMScheduler` config, with Stable
Diffusion's values as defaults; a checkpoint's scheduler config (often a `PNDMScheduler` one) gives
the same timesteps and updates as `DDIMScheduler.from_config` of it.
"""
import numpy as np
from keras import ops


def alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear"):
    """Cumulative products of 1 - beta: the signal fraction alpha_bar_t of each training timestep."""
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta), as in LDM
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    else:
        raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}.")
    return np.cumprod(1.0 - betas, dtype=np.float32)


class DDIMScheduler:
    """Deterministic DDIM (eta = 0) for epsilon- or v-prediction models.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule: the training noise schedule
            (SD: 1000 steps, betas 0.00085-0.012 linear in sqrt(beta)).
        steps_offset: added to every inference timestep ("leading" spacing; SD: 1).
        set_alpha_to_one: whether the step after the last one is noise-free (SD: False).
        prediction_type: "epsilon" or "v_prediction".
        timestep_spacing: "leading", "trailing" or "linspace".
        clip_sample, clip_sample_range: clip the predicted clean latents.
        **config: other keys of a diffusers scheduler config, which DDIM does not use.
    """

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                 prediction_type="epsilon", timestep_spacing="leading", clip_sample=False,
                 clip_sample_range=1.0, **config):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}.")
        if config.get("thresholding") or config.get("trained_betas") is not None:
            raise ValueError("Scheduler configs with thresholding or trained_betas are not supported.")
        self.config = dict(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                           beta_end=beta_end, beta_schedule=beta_schedule, steps_offset=steps_offset,
                           set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type,
                           timestep_spacing=timestep_spacing, clip_sample=clip_sample,
                           clip_sample_range=clip_sample_range)
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, num_steps):
        """The inference timesteps, descending, as diffusers' `set_timesteps`."""
        train_steps, spacing = self.config["num_train_timesteps"], self.config["timestep_spacing"]
        if not 1 <= num_steps <= train_steps:
            raise ValueError(f"num_steps must be between 1 and {train_steps}, got {num_steps!r}.")
        if spacing == "leading":
            steps = np.arange(num_steps) * (train_steps // num_steps) + self.config["steps_offset"]
        elif spacing == "trailing":
            steps = np.round(np.arange(train_steps, 0, -train_steps / num_steps))[::-1] - 1
        else:
            steps = np.round(np.linspace(0, train_steps - 1, num_steps))
        return steps[::-1].astype(np.int64)

    def schedule(self, num_steps):
        """(timesteps, alpha_bar_t, alpha_bar of the step each one goes to) for `num_steps` steps."""
        timesteps = self.timesteps(num_steps)
        previous = timesteps - self.config["num_train_timesteps"] // num_steps
        alphas = self.alphas_cumprod[timesteps]
        alphas_prev = np.where(previous >= 0, self.alphas_cumprod[np.maximum(previous, 0)],
                               self.final_alpha_cumprod).astype(np.float32)
        return timesteps, alphas, alphas_prev

    def step(self, model_output, latents, alpha, alpha_prev):
        """One DDIM update x_t -> x_prev (eq. 12, eta = 0); alphas are (B,) tensors."""
        alpha, alpha_prev = alpha[:, None, None, None], alpha_prev[:, None, None, None]
        if self.config["prediction_type"] == "epsilon":
            noise = model_output
            clean = (latents - ops.sqrt(1 - alpha) * noise) / ops.sqrt(alpha)
        else:
            clean = ops.sqrt(alpha) * latents - ops.sqrt(1 - alpha) * model_output
            noise = ops.sqrt(alpha) * model_output + ops.sqrt(1 - alpha) * latents
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            clean = ops.clip(clean, -limit, limit)
        return ops.sqrt(alpha_prev) * clean + ops.sqrt(1 - alpha_prev) * noise
