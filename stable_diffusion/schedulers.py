"""Samplers of the denoising loop, computed from the betas of the training noise schedule.

- DDIM (Song et al., 2021, eq. 12 with eta = 0): diffusers' `DDIMScheduler`.
- Euler and Euler ancestral in sigma space (Karras et al., 2022, alg. 2; k-diffusion's `sample_euler`,
  `sample_euler_ancestral`): diffusers' `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`.
- DPM-Solver++(2M) (Lu et al., 2022), optionally on Karras sigmas: diffusers' `DPMSolverMultistepScheduler`.
- PNDM's linear multistep part, PLMS (Liu et al., 2022): diffusers' `PNDMScheduler(skip_prk_steps=True)`.

Each takes the keys of a diffusers scheduler config (a checkpoint's, often a `PNDMScheduler` one) and
gives the timesteps and updates of that diffusers class built `from_config` of it. A pipeline's default sampler is
the one its config's `_class_name` and options name (`CLASSES`, `default_name`), else DDIM. A scheduler object
holds one run: `set_timesteps`, then per step `scale_model_input` and `step` (numpy, float32), which
keep the history the multistep methods need. The UNet call stays in the pipeline's compiled step.

A sampler's step is two halves: `coefficients(index)`, a dict of the step's scalars, computed on the host
(in float64, then rounded to float32), and its one update rule, `update(c, model_output, latents, memory,
noise, xp)` -> (latents, memory), which mixes the latents, the model output, the `memory` carried between
steps (`memory_size` latent-shaped arrays: the multistep history) and, for ancestral samplers, fresh `noise`
with those scalars `c`, in float32 array arithmetic (`xp`: the module with `clip`): numpy here (`step`),
keras.ops inside one compiled program that reads the coefficients from tables (`compiled_loop.py`).
"""
import warnings

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
    memory_size = 0  # latent-shaped arrays that `update` carries from one step to the next
    ancestral = False  # whether each step adds fresh noise

    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                 prediction_type="epsilon", timestep_spacing="leading", clip_sample=False,
                 clip_sample_range=1.0, **config):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}.")
        unsupported = [key for key in ("thresholding", "trained_betas", "rescale_betas_zero_snr")
                       if config.get(key) not in (None, False)]
        if unsupported:
            raise ValueError(f"Scheduler configs with {' or '.join(unsupported)} are not supported.")
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

    def set_timesteps(self, num_steps, strength=1.0, denoising_start=None, denoising_end=None):
        """Starts a run of `num_steps` steps of which only the last `strength` fraction runs (the
        image-to-image convention: `int(num_steps * strength)` steps); returns their timesteps. As diffusers'
        SDXL pipelines, `denoising_start` in (0, 1) runs, instead, the steps whose timesteps are below the
        cutoff `round(T - denoising_start T)` (T: the training timesteps; strength is then ignored), and
        `denoising_end` keeps of those the steps at or above `round(T - denoising_end T)`.
        Raises ValueError, before any work, unless num_steps is an integer in [1, num_train_timesteps],
        strength a number in (0, 1], denoising_start and denoising_end None or floats in (0, 1), the start
        below the end, and at least one step is left."""
        train_steps = self.config["num_train_timesteps"]
        integer = isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool)
        if not integer or not 1 <= num_steps <= train_steps:
            raise ValueError(f"num_steps must be an integer between 1 and {train_steps}, got {num_steps!r}.")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}.")
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and not (isinstance(value, (float, np.floating)) and 0 < value < 1):
                raise ValueError(f"{name} must be None or a float in (0, 1), got {value!r}.")
        if None not in (denoising_start, denoising_end) and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}.")
        if denoising_start is None and int(num_steps * strength) < 1:
            raise ValueError(f"strength {strength} leaves no step of {num_steps}; raise strength or num_steps.")
        self.num_steps, self.memory = int(num_steps), (np.float32(0),) * self.memory_size
        self.all_timesteps = self.make_timesteps(num_steps)
        cutoff = lambda fraction: int(round(train_steps - fraction * train_steps))  # diffusers' discrete cutoff
        if denoising_start is None:
            self.begin = num_steps - min(int(num_steps * strength), num_steps)
        else:
            self.begin = int(np.sum(self.all_timesteps >= cutoff(denoising_start)))
        kept = self.all_timesteps[self.begin:]
        self.end = self.begin + (len(kept) if denoising_end is None else int(np.sum(kept >= cutoff(denoising_end))))
        if self.end == self.begin:
            raise ValueError(f"denoising_start={denoising_start}, denoising_end={denoising_end} leave no step of "
                             f"{num_steps}; raise num_steps or widen the range.")
        self.index, self.timesteps = self.begin, self.all_timesteps[self.begin:self.end]
        return self.timesteps

    def make_timesteps(self, num_steps):
        return self.spaced(num_steps)[::-1].astype(np.int64)

    def input_scale(self, index):
        """The factor of the latents in the UNet's input at step `index`."""
        return 1.0

    def scale_model_input(self, latents):
        """The UNet's input at the current step (B, h, w, C)."""
        return latents * np.float32(self.input_scale(self.index))

    def levels(self, index):
        """(signal, noise): the scales of clean latents and of noise in latents noised to step `index`."""
        alpha = self.alphas_cumprod[self.all_timesteps[index]]
        return np.sqrt(alpha), np.sqrt(1 - alpha)

    def add_noise(self, latents, noise):
        """Latents (B, h, w, C) noised to the current step's timestep (image-to-image, inpainting)."""
        signal, level = self.levels(self.index)
        return signal * latents + level * noise

    def step(self, model_output, latents, draw_noise):
        """The latents of the next step; `draw_noise()` gives fresh noise (B, h, w, C) if the sampler is `ancestral`."""
        coefficients = {name: np.float32(value) for name, value in self.coefficients(self.index).items()}
        noise = draw_noise() if self.ancestral else None
        latents, self.memory = self.update(coefficients, np.asarray(model_output, "float32"),
                                           np.asarray(latents, "float32"), self.memory, noise, np)
        self.index += 1
        return latents

    def alphas(self, index):
        """alpha_bar of step `index`'s timestep and of the one DDIM / PLMS step to."""
        t = self.all_timesteps[index]
        previous = t - self.config["num_train_timesteps"] // self.num_steps
        return self.alphas_cumprod[t], (self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod)


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0) for epsilon- or v-prediction models."""

    def coefficients(self, index):
        alpha, alpha_prev = (float(alpha) for alpha in self.alphas(index))
        a, s = alpha**0.5, (1 - alpha) ** 0.5  # latents = a clean + s noise
        if self.config["prediction_type"] == "epsilon":  # clean and noise as mixes of latents and model output
            clean, noise = (1 / a, -s / a), (0.0, 1.0)
        else:  # v = a noise - s clean
            clean, noise = (a, -s), (s, a)
        return dict(clean_latents=clean[0], clean_output=clean[1], noise_latents=noise[0], noise_output=noise[1],
                    next_clean=alpha_prev**0.5, next_noise=(1 - alpha_prev) ** 0.5)

    def update(self, c, model_output, latents, memory, noise, xp):
        clean = c["clean_latents"] * latents + c["clean_output"] * model_output
        eps = c["noise_latents"] * latents + c["noise_output"] * model_output
        if self.config["clip_sample"]:
            clean = xp.clip(clean, -self.config["clip_sample_range"], self.config["clip_sample_range"])
        return c["next_clean"] * clean + c["next_noise"] * eps, memory


class PNDMScheduler(Scheduler):
    """PLMS: DDIM-like updates with a 4th-order Adams-Bashforth mix of the last noise predictions.

    As diffusers, the second timestep runs twice (a 2nd-order Heun-like start), so a run of n steps
    calls the UNet n + 1 times.
    """
    reliable_steps = 40  # its multistep start: on the demo model 0-3% of images right at 5-20 steps, 77% at 40
    memory_size = 4  # the last three model outputs kept, newest first; the latents before the step

    def make_timesteps(self, num_steps):
        steps = self.spaced(num_steps).astype(np.int64)
        return np.concatenate([steps[:-1], steps[-2:-1], steps[-1:]])[::-1]

    def coefficients(self, index):
        counter, t = index - self.begin, self.all_timesteps[index]
        if counter == 1:  # the repeated timestep: redo the first step with the mean of both predictions
            delta = self.config["num_train_timesteps"] // self.num_steps
            alpha, alpha_prev = self.alphas_cumprod[t + delta], self.alphas_cumprod[t]
            weights = (0.5, 0.5, 0.0, 0.0)
        else:  # Adams-Bashforth on the outputs kept, of order 1 to 4 as they accumulate
            alpha, alpha_prev = self.alphas(index)
            order = 1 if counter == 0 else min(counter, 4)
            steps = {1: (1,), 2: (3, -1), 3: (23, -16, 5), 4: (55, -59, 37, -9)}[order]
            weights = tuple(w / sum(steps) for w in steps) + (0.0,) * (4 - order)
        alpha, alpha_prev = float(alpha), float(alpha_prev)
        denominator = alpha * (1 - alpha_prev) ** 0.5 + (alpha * (1 - alpha) * alpha_prev) ** 0.5
        to_latents, to_noise = (alpha_prev / alpha) ** 0.5, -(alpha_prev - alpha) / denominator
        if self.config["prediction_type"] == "v_prediction":  # noise = a v + s latents
            to_latents, to_noise = to_latents + to_noise * (1 - alpha) ** 0.5, to_noise * alpha**0.5
        return dict(zip(("output", "kept_0", "kept_1", "kept_2"), weights), latents=to_latents, eps=to_noise,
                    restart=counter == 1, keep=counter != 1)

    def update(self, c, model_output, latents, memory, noise, xp):
        *kept, before = memory
        latents = c["restart"] * before + (1 - c["restart"]) * latents  # the repeated step starts where the first did
        eps = c["output"] * model_output + c["kept_0"] * kept[0] + c["kept_1"] * kept[1] + c["kept_2"] * kept[2]
        kept = [c["keep"] * new + (1 - c["keep"]) * old for new, old in zip([model_output, *kept], kept)]
        return c["latents"] * latents + c["eps"] * eps, (*kept, latents)


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

    def input_scale(self, index):
        return 1 / (self.sigmas[index] ** 2 + 1) ** 0.5

    def levels(self, index):
        return 1.0, self.sigmas[index]

    def coefficients(self, index):
        sigma, sigma_next = (float(s) for s in self.sigmas[index:index + 2])
        clean_latents, clean_output = denoising(sigma, self.config["prediction_type"])
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5 if self.ancestral else 0.0
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5 if self.ancestral else sigma_next
        return dict(clean_latents=clean_latents, clean_output=clean_output, step=(sigma_down - sigma) / sigma,
                    noise=sigma_up)

    def update(self, c, model_output, latents, memory, noise, xp):
        clean = c["clean_latents"] * latents + c["clean_output"] * model_output
        latents = latents + (latents - clean) * c["step"]  # the derivative (latents - clean) / sigma, times dsigma
        return (latents + c["noise"] * noise if self.ancestral else latents), memory


class DPMSolverScheduler(Scheduler):
    """DPM-Solver++(2M), midpoint form: second order from the last two clean-latent predictions, first
    order on the first step of a run and on the last step (to sigma 0). `karras=True` spaces the
    sigmas as Karras et al. (rho = 7) and rounds their timesteps."""
    memory_size = 1  # the previous step's clean-latent prediction

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

    def levels(self, index):
        return vp(self.sigmas[index])

    def coefficients(self, index):
        s0, s = (float(x) for x in self.sigmas[index:index + 2])
        clean_latents, clean_output = denoising(s0, self.config["prediction_type"])  # of latents / alpha_t(s0)
        first_order = index in (self.begin, len(self.all_timesteps) - 1)
        h_ratio = 0.0 if first_order else np.log(float(self.sigmas[index - 1]) / s0) / np.log(s0 / s)  # h_0 / h
        alpha, sigma = vp(s)  # exp(-h) = s / s0, since lambda = log(alpha / sigma) = -log(s)
        return dict(clean_latents=clean_latents / vp(s0)[0], clean_output=clean_output, latents=sigma / vp(s0)[1],
                    clean=-alpha * (s / s0 - 1), extrapolate=0.0 if first_order else 0.5 / h_ratio)

    def update(self, c, model_output, latents, memory, noise, xp):
        clean = c["clean_latents"] * latents + c["clean_output"] * model_output
        extrapolated = clean + c["extrapolate"] * (clean - memory[0])  # D = clean + (clean - previous) / 2r
        return c["latents"] * latents + c["clean"] * extrapolated, (clean,)


def vp(sigma):
    """(alpha_t, sigma_t) of the variance-preserving latents x_t = alpha_t x_0 + sigma_t eps."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def denoising(sigma, prediction_type):
    """(a, b): the predicted clean latents are a x + b model_output, x = x_0 + sigma eps (VP latents / alpha_t)."""
    if prediction_type == "epsilon":
        return 1.0, -sigma
    return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5


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
# Each sampler as a diffusers scheduler config names it: its class (`_class_name`) and the options of that class that
# select our method, at our values; `DEFAULT_OPTIONS`: diffusers' values of those options where a config has none.
SIGMAS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, final_sigmas_type="zero")
DPM_SOLVER = dict(SIGMAS, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", use_lu_lambdas=False,
                  use_flow_sigmas=False, lambda_min_clipped=-float("inf"), variance_type=None)
CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", dict(SIGMAS, interpolation_type="linear", timestep_type="discrete")),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", DPM_SOLVER),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", dict(DPM_SOLVER, use_karras_sigmas=True)),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=True)),
}
DEFAULT_OPTIONS = dict(DPM_SOLVER, interpolation_type="linear", timestep_type="discrete", skip_prk_steps=False)


class Repaint:
    """Inpainting with a 4-channel UNet, as diffusers: after each step of `sampler`, the latents keep the region to
    repaint, `mask` (B, h, w, 1) = 1, and elsewhere take the picture's latents `known` (B, h, w, C) noised with
    `noise` to the next step (clean after the last)."""

    def __init__(self, sampler, mask, known, noise):
        self.sampler, self.mask, self.known, self.noise = sampler, mask, known, noise

    def levels(self, index):
        """The (signal, noise) scales of `known` and `noise` with the sampler at step `index`."""
        return (1.0, 0.0) if index == len(self.sampler.all_timesteps) else self.sampler.levels(index)

    def __call__(self, latents):
        """The latents (B, h, w, C) after the sampler's last step, blended (numpy)."""
        return self.blend(latents, self.mask, self.known, self.noise, *self.levels(self.sampler.index))

    @staticmethod
    def blend(latents, mask, known, noise, signal, level):
        """The blend in array arithmetic (numpy, or keras.ops in the compiled loop)."""
        return mask * latents + (1 - mask) * (signal * known + level * noise)


def create(name, config):
    """A fresh scheduler `name` (one of `SCHEDULERS`) from a diffusers scheduler config dict."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(map(repr, SCHEDULERS))}; got {name!r}.")
    return SCHEDULERS[name](**config)


def default_name(config):
    """The sampler of `SCHEDULERS` a diffusers scheduler config names (`CLASSES`): a diffusers folder's class and
    options. "ddim" for a config that names no class (original single files, older bundles) and, with a warning, for
    a class or options of a method none of ours is."""
    found = config.get("_class_name")
    variants = {name: options for name, (class_name, options) in CLASSES.items() if class_name == found}
    value = lambda key: config.get(key, DEFAULT_OPTIONS[key])
    for name, options in variants.items():
        if all(value(key) == wanted for key, wanted in options.items()):
            return name
    if found is not None:
        keys = dict.fromkeys(key for options in variants.values() for key in options)  # in order, once each
        other = [f"{key}={value(key)!r:.40}" for key in keys if all(value(key) != o[key] for o in variants.values())]
        warnings.warn(f"The checkpoint names the sampler {found!r:.80}{' with ' if other else ''}{', '.join(other)}"
                      f", which this library does not implement: it samples with DDIM unless given a scheduler (one of "
                      f"{', '.join(map(repr, SCHEDULERS))}).", stacklevel=3)
    return "ddim"


def diffusers_config(name, config):
    """The scheduler config `config` naming the sampler `name` (`CLASSES`), as `default_name` reads it."""
    class_name, options = CLASSES[name]
    return dict(config, _class_name=class_name, **options)
