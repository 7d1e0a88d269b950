"""Samplers of the denoising loop, computed from the betas of the training noise schedule.

- DDIM (Song et al., 2021, eq. 12 with eta = 0): diffusers' `DDIMScheduler`.
- Euler and Euler ancestral in sigma space (Karras et al., 2022, alg. 2; k-diffusion's `sample_euler`,
  `sample_euler_ancestral`): diffusers' `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`.
- DPM-Solver++(2M) (Lu et al., 2022), optionally on Karras sigmas: diffusers' `DPMSolverMultistepScheduler`.
- PNDM's linear multistep part, PLMS (Liu et al., 2022): diffusers' `PNDMScheduler(skip_prk_steps=True)`.

Each takes the keys of a diffusers scheduler config (a checkpoint's, often a `PNDMScheduler` one) and
gives the timesteps and updates of that diffusers class built `from_config` of it. A scheduler object
holds one run: `set_timesteps`, then per step `scale_model_input` and `step` (numpy, float32), which
keep the history the multistep methods need. The UNet call stays in the pipeline's compiled step.
"""
import numpy as np


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


class Scheduler:
    """The training noise schedule and one sampling run; subclasses are the samplers.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule: the training noise schedule
            (SD: 1000 steps, betas 0.00085-0.012 linear in sqrt(beta)).
        steps_offset: added to every inference timestep ("leading" spacing; SD: 1).
        set_alpha_to_one: whether the step after the last one is noise-free (DDIM, PNDM; SD: False).
        prediction_type: "epsilon" or "v_prediction".
        timestep_spacing: "leading", "trailing" or "linspace".
        clip_sample, clip_sample_range: clip the predicted clean latents (DDIM).
        **config: other keys of a diffusers scheduler config, which these samplers do not use.
    """
    init_noise_sigma = 1.0  # the standard deviation of the initial noise
    reliable_steps = 10  # fewer give poor images (demo model, `benchmarks/few_steps.py`): the pipeline warns

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
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # float32, ascending

    def spaced(self, num_steps, rounded=True, fit=True):
        """`num_steps` training timesteps, ascending, spaced as diffusers' `timestep_spacing`. With `fit`,
        "leading" lowers `steps_offset` where it would push the last one past the training timesteps
        (num_steps = num_train_timesteps: every training timestep, as "trailing" and "linspace")."""
        train_steps, spacing = self.config["num_train_timesteps"], self.config["timestep_spacing"]
        if spacing == "leading":
            ratio, offset = train_steps // num_steps, self.config["steps_offset"]
            if fit:
                offset = min(offset, train_steps - 1 - (num_steps - 1) * ratio)
            return (np.arange(num_steps) * ratio).round() + offset
        if spacing == "trailing":
            return np.round(np.arange(train_steps, 0, -train_steps / num_steps))[::-1] - 1
        steps = np.linspace(0, train_steps - 1, num_steps)
        return steps.round() if rounded else steps

    def set_timesteps(self, num_steps, strength=1.0):
        """Starts a run of `num_steps` steps of which only the last `strength` fraction runs (the
        image-to-image convention: `int(num_steps * strength)` steps); returns their timesteps.
        Raises ValueError, before any work, unless num_steps is an integer in [1, num_train_timesteps]
        and strength a number in (0, 1] leaving at least one step."""
        train_steps = self.config["num_train_timesteps"]
        integer = isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool)
        if not integer or not 1 <= num_steps <= train_steps:
            raise ValueError(f"num_steps must be an integer between 1 and {train_steps}, got {num_steps!r}.")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}.")
        if int(num_steps * strength) < 1:
            raise ValueError(f"strength {strength} leaves no step of {num_steps}; raise strength or num_steps.")
        self.num_steps, self.history = int(num_steps), []
        self.all_timesteps = self.make_timesteps(num_steps)
        self.begin = self.index = num_steps - min(int(num_steps * strength), num_steps)
        self.timesteps = self.all_timesteps[self.begin:]
        return self.timesteps

    def make_timesteps(self, num_steps):
        return self.spaced(num_steps)[::-1].astype(np.int64)

    def scale_model_input(self, latents):
        """The UNet's input at the current step (B, h, w, C)."""
        return latents

    def add_noise(self, latents, noise):
        """Latents (B, h, w, C) noised to the current step's timestep (image-to-image, inpainting)."""
        alpha = self.alphas_cumprod[self.all_timesteps[self.index]]
        return np.sqrt(alpha) * latents + np.sqrt(1 - alpha) * noise

    def step(self, model_output, latents, draw_noise):
        """The latents of the next step; `draw_noise()` gives fresh noise (B, h, w, C) if needed."""
        latents = self.update(np.asarray(model_output, "float32"), np.asarray(latents, "float32"), draw_noise)
        self.index += 1
        return latents.astype("float32")

    def alphas(self):
        """alpha_bar of the current timestep and of the one DDIM / PLMS step to."""
        t = self.all_timesteps[self.index]
        previous = t - self.config["num_train_timesteps"] // self.num_steps
        return self.alphas_cumprod[t], (self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod)


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0) for epsilon- or v-prediction models."""

    def update(self, model_output, latents, draw_noise):
        alpha, alpha_prev = self.alphas()
        if self.config["prediction_type"] == "epsilon":
            noise = model_output
            clean = (latents - np.sqrt(1 - alpha) * noise) / np.sqrt(alpha)
        else:
            clean = np.sqrt(alpha) * latents - np.sqrt(1 - alpha) * model_output
            noise = np.sqrt(alpha) * model_output + np.sqrt(1 - alpha) * latents
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            clean = np.clip(clean, -limit, limit)
        return np.sqrt(alpha_prev) * clean + np.sqrt(1 - alpha_prev) * noise


class PNDMScheduler(Scheduler):
    """PLMS: DDIM-like updates with a 4th-order Adams-Bashforth mix of the last noise predictions.

    As diffusers, the second timestep runs twice (a 2nd-order Heun-like start), so a run of n steps
    calls the UNet n + 1 times.
    """
    reliable_steps = 40  # its multistep start: on the demo model 0-3% of images right at 5-20 steps, 77% at 40

    def make_timesteps(self, num_steps):
        steps = self.spaced(num_steps).astype(np.int64)
        return np.concatenate([steps[:-1], steps[-2:-1], steps[-1:]])[::-1]

    def update(self, model_output, latents, draw_noise):
        counter, history = self.index - self.begin, self.history
        t = self.all_timesteps[self.index]
        delta = self.config["num_train_timesteps"] // self.num_steps
        if counter != 1:
            history[:] = history[-3:] + [model_output]
            alpha, alpha_prev = self.alphas()
        else:  # the repeated timestep: redo the first step with the mean of both predictions
            t, previous = t + delta, t
            alpha, alpha_prev = self.alphas_cumprod[t], self.alphas_cumprod[previous]
        if counter == 0:
            self.first_latents, eps = latents, model_output
        elif counter == 1:
            eps, latents = (model_output + history[-1]) / 2, self.first_latents
        else:
            weights = {2: (3, -1), 3: (23, -16, 5), 4: (55, -59, 37, -9)}[len(history)]
            eps = sum(w * e for w, e in zip(weights, reversed(history))) / {2: 2, 3: 12, 4: 24}[len(history)]
        if self.config["prediction_type"] == "v_prediction":
            eps = np.sqrt(alpha) * eps + np.sqrt(1 - alpha) * latents
        denominator = alpha * np.sqrt(1 - alpha_prev) + np.sqrt(alpha * (1 - alpha) * alpha_prev)
        return np.sqrt(alpha_prev / alpha) * latents - (alpha_prev - alpha) * eps / denominator


class EulerScheduler(Scheduler):
    """Euler steps of the probability-flow ODE in sigma = sqrt((1 - alpha_bar) / alpha_bar); with
    `ancestral=True`, Euler ancestral: a step down to sigma_down plus fresh noise of std sigma_up."""

    def __init__(self, ancestral=False, **config):
        super().__init__(**{"timestep_spacing": "linspace", **config})  # diffusers' default here
        self.ancestral = ancestral

    def make_timesteps(self, num_steps):
        # unfitted, as diffusers: beyond the last training timestep sigma stays the last one (a zero step)
        timesteps = self.spaced(num_steps, rounded=False, fit=False)[::-1].astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        max_sigma = self.sigmas.max()
        leading = self.config["timestep_spacing"] == "leading"
        self.init_noise_sigma = float((max_sigma**2 + 1) ** 0.5 if leading else max_sigma)
        return timesteps

    def scale_model_input(self, latents):
        return latents / (self.sigmas[self.index] ** 2 + 1) ** 0.5

    def add_noise(self, latents, noise):
        return latents + noise * self.sigmas[self.index]

    def update(self, model_output, latents, draw_noise):
        sigma, sigma_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        clean = denoised(model_output, latents, sigma, self.config["prediction_type"])
        if not self.ancestral:
            return latents + (latents - clean) / sigma * (sigma_next - sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        return latents + (latents - clean) / sigma * (sigma_down - sigma) + draw_noise() * sigma_up


class DPMSolverScheduler(Scheduler):
    """DPM-Solver++(2M), midpoint form: second order from the last two clean-latent predictions, first
    order on the first step of a run and on the last step (to sigma 0). `karras=True` spaces the
    sigmas as Karras et al. (rho = 7) and rounds their timesteps."""

    def __init__(self, karras=False, **config):
        super().__init__(**{"timestep_spacing": "linspace", **config})  # diffusers' default here
        self.karras = karras

    def make_timesteps(self, num_steps):
        log_sigmas = np.log(self.train_sigmas)
        if self.karras:
            rho, ramp = 7.0, np.linspace(0, 1, num_steps)
            low, high = float(self.train_sigmas[0]) ** (1 / rho), float(self.train_sigmas[-1]) ** (1 / rho)
            sigmas = (high + ramp * (low - high)) ** rho
            timesteps = sigma_to_t(sigmas, log_sigmas).round().astype(np.int64)
        else:
            # n + 1 spaced points, the lowest dropped (sigma 0 takes its place); no n + 1 distinct ones
            # exist for n = num_train_timesteps, which takes every training timestep
            every = num_steps == self.config["num_train_timesteps"]
            trailing = self.config["timestep_spacing"] == "trailing"
            timesteps = (self.spaced(num_steps) if trailing or every else self.spaced(num_steps + 1)[1:])[::-1]
            timesteps = timesteps.astype(np.int64)
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return timesteps

    def add_noise(self, latents, noise):
        alpha, sigma = vp(self.sigmas[self.index])
        return alpha * latents + sigma * noise

    def update(self, model_output, latents, draw_noise):
        s0, s = (float(x) for x in self.sigmas[self.index:self.index + 2])
        clean = denoised(model_output, latents / vp(s0)[0], s0, self.config["prediction_type"])
        self.history = [*self.history[-1:], clean]
        alpha, sigma = vp(s)
        first_order = len(self.history) == 1 or self.index == len(self.all_timesteps) - 1
        if first_order:  # exp(-h) = s / s0, since lambda = log(alpha / sigma) = -log(s)
            return sigma / vp(s0)[1] * latents - alpha * (s / s0 - 1) * clean
        s1 = float(self.sigmas[self.index - 1])
        r = np.log(s1 / s0) / np.log(s0 / s)  # h_0 / h
        d = clean + 0.5 * (clean - self.history[0]) / r
        return sigma / vp(s0)[1] * latents - alpha * (s / s0 - 1) * d


def vp(sigma):
    """(alpha_t, sigma_t) of the variance-preserving latents x_t = alpha_t x_0 + sigma_t eps."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def denoised(model_output, latents, sigma, prediction_type):
    """The predicted clean latents, where `latents` = x_0 + sigma eps (the VP latents / alpha_t)."""
    if prediction_type == "epsilon":
        return latents - sigma * model_output
    return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + latents / (sigma**2 + 1)


def sigma_to_t(sigmas, log_sigmas):
    """Fractional training timesteps of `sigmas`, interpolating log sigma (k-diffusion)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    distances = log_sigma - log_sigmas[:, None]
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerScheduler,
    "euler_a": lambda **config: EulerScheduler(ancestral=True, **config),
    "dpmpp_2m": DPMSolverScheduler,
    "dpmpp_2m_karras": lambda **config: DPMSolverScheduler(karras=True, **config),
    "pndm": PNDMScheduler,
}


def create(name, config):
    """A fresh scheduler `name` (one of `SCHEDULERS`) from a diffusers scheduler config dict."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(map(repr, SCHEDULERS))}; got {name!r}.")
    return SCHEDULERS[name](**config)
