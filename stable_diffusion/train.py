"""Training with Keras `fit`: a small Stable Diffusion from scratch on the synthetic shapes of
`data.py` (the demo model in `assets/demo`), fine-tuning a checkpoint's UNet on a folder of
captioned images, training a LoRA of it there (`train_lora`, Hu et al., 2022), saved as a
diffusers LoRA file, or teaching it a new word by textual inversion (`train_textual_inversion`, Gal et al.,
2022), saved as a diffusers `learned_embeds.safetensors`; DreamBooth builds on it (`dreambooth.py`). Under a
`keras.distribution` (e.g. `DataParallel` on JAX) every batch is split across the devices (`fit`).

Stage 1 trains the VAE (`Encoder` + `Decoder`) on reconstruction, weighted up on edges, plus a small KL term
(Rombach et al., 2022, sec. 3.1); stage 2 trains the UNet and the text encoder on the epsilon-prediction loss of
DDPM (Ho et al., 2020) over pre-encoded latents, with 10% of the captions dropped for
classifier-free guidance (Ho & Salimans, 2022), offset noise (Guttenberg, 2023, "Diffusion with
Offset Noise") and EMA weights; stage 3 trains the UNet alone on new images at a lower learning rate, stage 4 on
new small shapes, the hardest prompts. The trainers are `keras.Model`s whose `call` draws the noise with
`keras.random` and whose `compute_loss` holds the loss, so `fit` runs them on every backend. The diffusion loss is
diffusers' (`train_text_to_image.py`): `F.mse_loss(unet(noisy, t, text).sample, target)`, the target the noise or,
for v-prediction checkpoints, the velocity (Salimans & Ho, 2022).

    python -m stable_diffusion.train --output demo
    python -m stable_diffusion.train --checkpoint demo --data FOLDER --output OUT
    python -m stable_diffusion.train lora --checkpoint C --data FOLDER --output OUT.safetensors
                                          (its options: python -m stable_diffusion.train lora --help)
    python -m stable_diffusion.train textual-inversion --checkpoint C --data FOLDER --token "<pink>"
                                          --initializer-token red --output learned_embeds.safetensors
    python -m stable_diffusion.train dreambooth --checkpoint C --data FOLDER --instance-prompt P --class-prompt Q
                                                --output OUT                      (see `dreambooth.py`)
"""
import argparse
import json
import sys
from pathlib import Path

import keras
import numpy as np
from keras import ops
from PIL import Image

from . import checkpoints, embeddings, files, lora
from .arguments import in_flags, integer, non_empty_string, positive_number
from .bundle import write_safetensors
from .data import GRAMMAR, make_dataset
from .decoder import Decoder
from .encoder import Encoder
from .stable_diffusion import StableDiffusion
from .weights import Tensors, keras_layout, load_weights, named_variables, read_tensor, safetensors_header

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# LoRA training as diffusers' scripts do it: the UNet's attention projections (train_text_to_image_lora.py),
# the text encoder's with --train_text_encoder (train_dreambooth_lora.py), torch's AdamW with weight decay 1e-2.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TORCH_ADAMW = dict(weight_decay=1e-2, epsilon=1e-8)

# The demo model: 64x64 images, 16x16x4 latents, a 2-layer CLIP of width 32.
DEMO_CONFIG = {
    "text_encoder": dict(width=32, num_layers=2, num_heads=2, intermediate_size=128),
    "diffusion_model": dict(channels=(32, 64, 64), layers_per_block=1, attention_levels=(False, True, True),
                            num_heads=4, context_dim=32, norm_groups=16),
    "decoder": dict(channels=(16, 32, 32), layers_per_block=1, norm_groups=8, scaling_factor=1.0),
    "encoder": dict(channels=(16, 32, 32), layers_per_block=1, norm_groups=8),
    "scheduler": {},
    "grammar": GRAMMAR,  # text_to_image warns of prompts outside it
}


def edges(images):
    """Where images (B, H, W, C) in [-1, 1] change: per pixel, the largest over channels of the absolute differences
    to the next pixel down plus to the right, the maximum over its 3x3 neighbourhood, at most 1. (B, H, W, 1)."""
    down = ops.pad(ops.abs(images[:, 1:] - images[:, :-1]), [[0, 0], [0, 1], [0, 0], [0, 0]])
    right = ops.pad(ops.abs(images[:, :, 1:] - images[:, :, :-1]), [[0, 0], [0, 0], [0, 1], [0, 0]])
    change = ops.max(down + right, axis=-1, keepdims=True)
    return ops.minimum(ops.max_pool(change, 3, strides=1, padding="same"), 1.0)


class VAETrainer(keras.Model):
    """Stage 1: uint8 images -> reconstruction; loss: L1, weighted 1 + edge_weight * `edges` of the image, plus
    kl_weight * KL(posterior || N(0, I)). The edge weight makes a small shape, mostly outline, count as much as the
    background that fills most of the picture, so the VAE keeps its corners.

    Args:
        encoder, decoder: the VAE halves (`Encoder`, `Decoder`); the posterior samples are scaled by
            `decoder.scaling_factor`, which the decoder undoes.
        kl_weight: weight of the per-element KL against the per-pixel L1 error.
        edge_weight: extra weight of the pixels on edges; 0: plain L1.
        seed: seeds the posterior samples.
    """

    def __init__(self, encoder, decoder, kl_weight=1e-6, edge_weight=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder, self.kl_weight, self.edge_weight = encoder, decoder, kl_weight, edge_weight
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images):
        mean, logvar = ops.split(self.encoder(to_unit_range(images)), 2, axis=-1)  # (B, h, w, C) each
        logvar = ops.clip(logvar, -30.0, 20.0)
        z = mean + ops.exp(0.5 * logvar) * keras.random.normal(ops.shape(mean), seed=self.seed_generator)
        return self.decoder(z * self.decoder.scaling_factor), mean, logvar

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        reconstruction, mean, logvar = y_pred
        target = to_unit_range(x)
        weight = 1.0 + self.edge_weight * edges(target)
        l1 = ops.sum(weight * ops.abs(reconstruction - target)) / (ops.sum(weight) * ops.shape(target)[-1])
        kl = 0.5 * ops.mean(ops.square(mean) + ops.exp(logvar) - 1.0 - logvar)
        return l1 + self.kl_weight * kl


class DiffusionTrainer(keras.Model):
    """Stage 2, fine-tuning, LoRA: (latents (B, h, w, C) scaled to about unit variance, token ids (B, 77)) ->
    the UNet's prediction and its target (`prediction_and_target`) for drawn noise, timesteps and caption
    dropout; loss: their mean squared error.

    Args:
        text_encoder, diffusion_model: the models to train (set `trainable=False` to freeze one).
        alphas_cumprod: the training noise schedule, alpha_bar_t per timestep.
        empty_tokens: the token ids (77,) of "", which replace dropped captions.
        caption_dropout: fraction of captions dropped, for classifier-free guidance.
        offset_noise: std of a per-image, per-channel constant added to the noise.
        seed: seeds noise, timesteps and caption dropout.
        prediction_type: what the UNet predicts, "epsilon" (the noise) or "v_prediction" (the velocity).
    """

    def __init__(self, text_encoder, diffusion_model, alphas_cumprod, empty_tokens, caption_dropout=0.1,
                 offset_noise=0.1, seed=None, prediction_type="epsilon", **kwargs):
        super().__init__(**kwargs)
        self.text_encoder, self.diffusion_model = text_encoder, diffusion_model
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype="float32")
        self.empty_tokens = np.asarray(empty_tokens, dtype="int32").reshape(1, -1)
        self.caption_dropout, self.offset_noise = caption_dropout, offset_noise
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.prediction_type = prediction_type

    def call(self, inputs):
        latents, tokens = inputs
        batch, channels = ops.shape(latents)[0], ops.shape(latents)[-1]
        noise = keras.random.normal(ops.shape(latents), seed=self.seed_generator)
        noise = noise + self.offset_noise * keras.random.normal((batch, 1, 1, channels), seed=self.seed_generator)
        timesteps = keras.random.randint((batch,), 0, len(self.alphas_cumprod), seed=self.seed_generator)
        dropped = keras.random.uniform((batch, 1), seed=self.seed_generator) < self.caption_dropout
        tokens = ops.where(dropped, ops.convert_to_tensor(self.empty_tokens), tokens)
        return self.prediction_and_target(latents, noise, timesteps, tokens)

    def prediction_and_target(self, latents, noise, timesteps, tokens):
        """The UNet's output (B, h, w, C) for `latents` noised with `noise` (B, h, w, C) to the integer
        `timesteps` (B,) (q(x_t | x_0), diffusers' `add_noise`), given token ids (B, 77), and what it should
        be: the noise, or the velocity sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) latents (`get_velocity`)."""
        alpha = ops.take(ops.convert_to_tensor(self.alphas_cumprod), timesteps)[:, None, None, None]
        noisy = ops.sqrt(alpha) * latents + ops.sqrt(1.0 - alpha) * noise
        prediction = self.diffusion_model([noisy, ops.cast(timesteps, "float32"), self.text_encoder(tokens)])
        if self.prediction_type == "epsilon":
            return prediction, noise
        return prediction, ops.sqrt(alpha) * noise - ops.sqrt(1.0 - alpha) * latents

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        prediction, target = y_pred
        return ops.mean(ops.square(prediction - target))


class Backup(keras.callbacks.Callback):
    """Resumable training: after each epoch, writes what training changes (the trainable variables, the
    optimizer's variables and the trainer's seed generator), by variable path, with the epochs done, to
    `folder/backup.safetensors`; `restore` reads them back, and `remove` deletes them once training completes.
    Keras' `BackupAndRestore` saves the model's weights, in which a LoRA layer stores its merged kernel and
    no LoRA weights (they load back as zeros), and every frozen weight.

    Args:
        folder: where the backup goes, created when first written.
        trainer: a compiled, built trainer with a `seed_generator`, its optimizer built.
    """

    def __init__(self, folder, trainer):
        super().__init__()
        self.path = Path(folder) / "backup.safetensors"
        # Keyed by path, less the optimizer's name, which Keras numbers by the optimizers made before.
        optimizer = {"optimizer/" + variable.path.split("/", 1)[-1]: variable for variable in trainer.optimizer.variables}
        model = {variable.path: variable for variable in trainer.trainable_variables}
        self.variables = {**model, **optimizer, "seed_generator": trainer.seed_generator.state}
        if len(self.variables) != len(model) + len(optimizer) + 1 or len(model) != len(trainer.trainable_variables):
            raise ValueError(f"The {trainer.name} trainer's variables have repeated paths; a backup needs unique ones.")

    def restore(self):
        """Assigns the backed-up values, if there is a backup; returns the epochs it had done (else 0).
        ValueError if it holds other variables than this training's (another model, rank or optimizer)."""
        if not self.path.exists():
            return 0
        entries, metadata = safetensors_header(self.path)
        shapes = {key: tuple(variable.shape) for key, variable in self.variables.items()}
        if {key: entry["shape"] for key, entry in entries.items()} != shapes:
            raise ValueError(f"{self.path} is the backup of another training (other variables); remove it or "
                             f"train in another folder.")
        for key, variable in self.variables.items():
            variable.assign(read_tensor(self.path, entries[key]))
        return int(metadata["epochs"])

    def on_epoch_end(self, epoch, logs=None):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        write_safetensors(partial, self.variables, {"epochs": str(epoch + 1)}, alignment=1)
        partial.replace(self.path)

    def remove(self):
        """Deletes the backup, and its folder if that is left empty: training is done."""
        self.path.unlink(missing_ok=True)
        if self.path.parent.exists() and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()


def to_unit_range(images):
    """uint8 images -> float32 in [-1, 1]."""
    return ops.cast(images, "float32") / 127.5 - 1.0


def optimizer(learning_rate, total_steps, ema_momentum=None, adamw=None):
    """AdamW with cosine decay to a tenth of `learning_rate`, gradients clipped to norm 1, and an
    exponential moving average of the weights unless `ema_momentum` is None; `adamw`: other AdamW
    arguments (e.g. `TORCH_ADAMW`; default: Keras' weight decay 0.004 and epsilon 1e-7). Keras adds
    epsilon to sqrt(v) before the bias correction (Kingma & Ba's epsilon-hat), torch after it: with the
    same epsilon, the steps differ only where a gradient is within a few epsilon / sqrt(1 - beta_2^t)
    of zero."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(total_steps, 1), alpha=0.1)
    return keras.optimizers.AdamW(schedule, global_clipnorm=1.0, use_ema=ema_momentum is not None,
                                  ema_momentum=ema_momentum or 0.99, **(adamw or {}))


def batch_shards():
    """The number of parts each batch is split into by the `keras.distribution` set (e.g. `DataParallel` over
    several devices), 1 without one."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def check_batch_size(batch_size):
    """`batch_size` as an int, if it is an integer >= 1 that the distribution set splits evenly (`batch_shards`)."""
    batch_size, shards = integer(batch_size, "batch_size", 1), batch_shards()
    if batch_size % shards:
        raise ValueError(f"batch_size must be a multiple of {shards}, the parts the distribution splits batches "
                         f"into, got {batch_size}.")
    return batch_size


def padded(array, multiple):
    """`array` with rows from its start repeated after its end up to a multiple of `multiple` rows (as
    Accelerate evens out the batches of several devices)."""
    rows = -(-len(array) // multiple) * multiple
    return array if rows == len(array) else array[np.arange(rows) % len(array)]


def fit(trainer, x, epochs, batch_size, learning_rate, backup_dir=None, ema_momentum=None, verbose="auto",
        jit_compile=None, adamw=None, seed=None):
    """Compiles and fits a trainer on x (arrays), with a `Backup` in `backup_dir`, from which a rerun resumes;
    `ema_momentum`, `adamw`: see `optimizer`. Under a `keras.distribution` that splits batches in n parts
    (`batch_shards`), x is `padded` to a multiple of n rows, so that every batch splits; ValueError if `batch_size`
    is no multiple of n (`check_batch_size`).

    Epoch e takes the rows in the order of `Epochs` (from `seed` and e), so a resumed run sees the orders an
    uninterrupted one would. (Keras' `fit(shuffle=True)` shuffles once: on TensorFlow, under
    `keras.utils.set_random_seed`, every epoch repeats the first one's order.)

    Returns the last epoch's loss (None if the backup had finished all epochs); with `ema_momentum`,
    the EMA weights are copied into the trained variables at the end.
    `jit_compile` default: on for JAX (which otherwise runs op by op), off for TensorFlow, where XLA
    compiling these small models on CPU takes minutes (`benchmarks/RESULTS.md`, "XLA or not").
    """
    if jit_compile is None:
        jit_compile = keras.backend.backend() == "jax"
    check_batch_size(batch_size)
    x = keras.tree.map_structure(lambda array: padded(array, batch_shards()), x)
    rows = len(keras.tree.flatten(x)[0])
    trainer.compile(optimizer=optimizer(learning_rate, epochs * -(-rows // batch_size), ema_momentum, adamw),
                    jit_compile=jit_compile)
    trainer(keras.tree.map_structure(lambda array: array[:1], x))  # built, and the optimizer, as Backup needs
    trainer.optimizer.build(trainer.trainable_variables)
    backup = Backup(backup_dir, trainer) if backup_dir else None
    start = backup.restore() if backup else 0
    batches = Epochs(x, batch_size, seed, start)
    history = trainer.fit(batches, epochs=epochs, initial_epoch=start, steps_per_epoch=len(batches),
                          shuffle=False, callbacks=[backup] if backup else [], verbose=verbose)
    if backup:
        backup.remove()
    if ema_momentum is not None:
        trainer.optimizer.finalize_variable_values(trainer.trainable_variables)
    return history.history["loss"][-1] if history.history else None


class Epochs(keras.utils.PyDataset):
    """The batches of the rows of x (arrays of one length, or one array), epoch after epoch from epoch `start`:
    batch i of the stream is batch i % n of epoch start + i // n (n batches an epoch), whose rows come in the order
    `numpy.random.default_rng([seed, epoch]).permutation` draws (seed None: an unseeded one). A function of i
    alone, so Keras may read ahead across epochs; `fit` it with `steps_per_epoch=len(epochs)`."""

    def __init__(self, x, batch_size, seed, start):
        super().__init__()
        self.x, self.batch_size, self.seed, self.start = x, batch_size, seed, start
        self.rows = len(keras.tree.flatten(x)[0])
        self.orders = {}

    def __len__(self):
        return -(-self.rows // self.batch_size)

    @property
    def num_batches(self):
        return None  # endless: read as one stream across epochs

    def order(self, epoch):
        if epoch not in self.orders:
            rng = np.random.default_rng(None if self.seed is None else [self.seed, epoch])
            self.orders = {epoch: rng.permutation(self.rows)}  # the epoch being read; the one before is done
        return self.orders[epoch]

    def __getitem__(self, index):
        epoch, batch = divmod(index, len(self))
        rows = self.order(self.start + epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]
        return (keras.tree.map_structure(lambda array: array[rows], self.x),)  # x alone, no targets


def encode_latents(encoder, images, scaling_factor=1.0, batch_size=256):
    """Posterior means of uint8 images, times `scaling_factor`: (N, h, w, C) float32. Under a distribution,
    in batches that split evenly (see `fit`)."""
    shards = batch_shards()
    moments = encoder.predict(to_unit_range(padded(images, shards)), batch_size=max(1, batch_size // shards) * shards,
                              verbose=0)
    return np.split(np.asarray(moments)[:len(images)], 2, axis=-1)[0] * scaling_factor


def copy_weights(source, target):
    """Sets `target`'s variables from those of `source`, a model of the same configuration, by checkpoint
    key through the strict loader (`weights.load_weights`), never by order."""
    arrays = {key: variable.numpy() for key, variable in named_variables(source).items()}
    load_weights([target], Tensors.from_arrays(arrays, source.name), layout=keras_layout)


def train_diffusion(sd, latents, tokens, epochs, batch_size, learning_rate, backup_dir=None, seed=None,
                    ema_momentum=0.99, verbose="auto", caption_dropout=0.1, offset_noise=0.1, adamw=None):
    """Fits the trainable variables of sd's UNet and text encoder (freeze either with `trainable=False`) on
    scaled latents and token ids, against the target of the scheduler's prediction type, ending on the EMA
    weights (momentum 0.99: an average over about the last 100 steps, for runs of a few thousand steps;
    None: no EMA). `caption_dropout`, `offset_noise`: see `DiffusionTrainer`; `adamw`: see `optimizer`.
    Returns the last epoch's loss."""
    trainer = DiffusionTrainer(sd.text_encoder, sd.diffusion_model, sd.scheduler.alphas_cumprod,
                               sd.tokenize("")[0], caption_dropout, offset_noise, seed,
                               sd.scheduler.config["prediction_type"])
    return fit(trainer, (latents, tokens), epochs, batch_size, learning_rate, backup_dir, ema_momentum, verbose,
               adamw=adamw, seed=seed)


def deterministic():
    """Makes training on TensorFlow give the same weights run after run on one machine, resumed or not (not on a CPU
    of other vector instructions: AVX2 and AVX-512 kernels round differently): one op at a time, each still on all
    cores (with ops run side by side, two runs of `train_demo` drift apart within stage 1: `benchmarks/RESULTS.md`).
    Call it before TensorFlow runs its first op; RuntimeError after, and ValueError on other backends."""
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"Deterministic training is for the TensorFlow backend, not {keras.backend.backend()}.")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)


def run_stage(work_dir, name, models, train):
    """Runs `train()`, which returns the stage's final loss, and saves the models it trains in
    `work_dir`; if an earlier run finished the stage, loads them instead. Returns the final loss."""
    done = work_dir / f"{name}.json"
    files = [work_dir / f"{name}_{model.name}.weights.h5" for model in models]
    if done.exists():
        for model, file in zip(models, files):
            model.load_weights(file)
        return json.loads(done.read_text())["loss"]
    loss = train()
    for model, file in zip(models, files):
        model.save_weights(file)
    done.write_text(json.dumps({"loss": loss}))
    return loss


def train_demo(output, num_images=8000, seed=0, vae_epochs=4, epochs=32, tune_images=8000, tune_epochs=16,
               tune_rounds=2, small_images=24000, small_epochs=4, batch_size=64, vae_batch_size=32, vae_lr=2e-3,
               learning_rate=2e-3, tune_lr=5e-4, small_lr=2e-4, edge_weight=10.0, work_dir=None, config=None,
               verbose="auto"):
    """Trains a small Stable Diffusion from scratch on `make_dataset(num_images, seed)` and saves it; the defaults
    are the demo model's recipe.

    Stage 1 trains the VAE (edge-weighted L1, `VAETrainer`), stage 2 the UNet and text encoder on its latents,
    then each round of stage 3 the UNet alone (the text encoder frozen) on new images, round r on
    `make_dataset(tune_images, seed + r)`, at a lower learning rate. Stage 4 fits the UNet alone once more on the
    hardest prompts, small shapes: the images of `make_dataset(small_images, seed + tune_rounds + 1)` whose captions
    say "small" (about a third), at a lower rate still.

    Args:
        output: the bundle folder to write (`StableDiffusion.save`).
        num_images, seed: the synthetic dataset (64x64).
        vae_epochs, epochs, tune_epochs, small_epochs: epochs of stages 1, 2, of each round of 3, and of 4.
        tune_images, tune_rounds: images of each round of stage 3, and its rounds; 0 skips it.
        small_images: images drawn for stage 4, of which it keeps the small shapes; 0 skips it.
        batch_size, vae_batch_size: images per step of stages 2 to 4 and of stage 1.
        vae_lr, learning_rate, tune_lr, small_lr: peak learning rates of stages 1, 2, 3 and 4.
        edge_weight: see `VAETrainer`.
        work_dir: where stage checkpoints go; a rerun with the same folder resumes, within a stage from its last
            finished epoch.
        config: model configuration (`DEMO_CONFIG` by default), as for `StableDiffusion`.
    Returns:
        dict with the final losses, the latent scaling factor and the number of images.
    """
    config = json.loads(json.dumps(config or DEMO_CONFIG))
    work_dir = Path(work_dir or Path(output).with_name(f".{Path(output).name}.work"))
    work_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    images, captions = make_dataset(num_images, seed)
    size = images.shape[1]

    levels = 2 ** (len(config["decoder"]["channels"]) - 1)
    encoder = Encoder(size, size, **config["encoder"])
    decoder = Decoder(size // levels, size // levels, **config["decoder"])
    losses = dict(vae_loss=run_stage(work_dir, "vae", (encoder, decoder), lambda: fit(
        VAETrainer(encoder, decoder, edge_weight=edge_weight, seed=seed), images, vae_epochs, vae_batch_size, vae_lr,
        work_dir / "vae_backup", verbose=verbose, seed=seed)))

    latents = encode_latents(encoder, images)
    config["decoder"]["scaling_factor"] = scaling_factor = float(1.0 / latents.std())
    sd = StableDiffusion(size, size, config=config)  # its decoder undoes the new factor
    copy_weights(encoder, sd.encoder)
    copy_weights(decoder, sd.decoder)
    losses["diffusion_loss"] = run_stage(work_dir, "diffusion", (sd.text_encoder, sd.diffusion_model), lambda: (
        train_diffusion(sd, latents * scaling_factor, sd.tokenize(captions), epochs, batch_size, learning_rate,
                        backup_dir=work_dir / "diffusion_backup", seed=seed, verbose=verbose)))
    sd.text_encoder.trainable = False
    for r in range(1, (tune_rounds if tune_images else 0) + 1):
        images, captions = make_dataset(tune_images, seed + r)
        losses[f"tune_loss_{r}"] = run_stage(work_dir, f"tune_{r}", (sd.diffusion_model,), lambda: train_diffusion(
            sd, encode_latents(sd.encoder, images, scaling_factor), sd.tokenize(captions), tune_epochs, batch_size,
            tune_lr, backup_dir=work_dir / f"tune_{r}_backup", seed=seed, verbose=verbose))
    if small_images:
        small_seed = seed + tune_rounds + 1  # no earlier round's images
        images, captions = make_dataset(small_images, small_seed)
        small = [i for i, caption in enumerate(captions) if "small" in caption.split()]
        if not small:  # stages 1-3 are saved: a rerun with more images resumes at stage 4
            raise ValueError(f"The {small_images} images drawn for stage 4 hold no small shape; draw more "
                             "(small_images, --small-images).")
        losses["small_loss"] = run_stage(work_dir, "small", (sd.diffusion_model,), lambda: train_diffusion(
            sd, encode_latents(sd.encoder, images[small], scaling_factor), sd.tokenize([captions[i] for i in small]),
            small_epochs, batch_size, small_lr, backup_dir=work_dir / "small_backup", seed=small_seed,
            verbose=verbose))
    sd.text_encoder.trainable = True
    sd.save(output, overwrite=True)
    return dict(losses, scaling_factor=scaling_factor, num_images=num_images)


def data_folder(folder):
    """`folder` as a Path; FileNotFoundError if it is not a directory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Training data folder {folder} does not exist.")
    return folder


def load_folder(folder, img_height, img_width):
    """Images and captions of a folder: `captions.jsonl` (`{"file_name", "text"}` per line, as
    `data.write_folder` writes) or one `.txt` caption beside each image.

    Returns:
        uint8 images (N, img_height, img_width, 3) and N captions.
    """
    folder = data_folder(folder)
    listing = folder / "captions.jsonl"
    if listing.exists():
        rows = [json.loads(line) for line in listing.read_text().splitlines() if line.strip()]
        pairs = [(folder / row["file_name"], row["text"]) for row in rows]
    else:
        files = image_files(folder)
        missing = [f.name for f in files if not f.with_suffix(".txt").exists()]
        if missing:
            raise ValueError(f"{folder} has no captions.jsonl and no .txt caption for {missing[:5]}.")
        pairs = [(f, f.with_suffix(".txt").read_text().strip()) for f in files]
    if not pairs:
        raise ValueError(f"{folder} holds no captioned images ({', '.join(IMAGE_SUFFIXES)} with "
                         f"captions.jsonl or .txt captions).")
    absent = [path for path, _ in pairs if not path.exists()]
    if absent:
        raise FileNotFoundError(f"{absent[0]} is listed in {listing} but missing.")
    return read_images([path for path, _ in pairs], img_height, img_width), [caption for _, caption in pairs]


def image_files(folder):
    """The image files of a folder (`IMAGE_SUFFIXES`), sorted by name."""
    return sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def read_images(paths, img_height, img_width):
    """uint8 RGB images (N, img_height, img_width, 3) of image files; ValueError for one of another size."""
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    for path, image in zip(paths, images):
        if image.shape[:2] != (img_height, img_width):
            raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]} pixels; the model takes "
                             f"{img_width}x{img_height} images.")
    return np.stack(images)


def trainable(checkpoint):
    """`StableDiffusion.from_checkpoint(checkpoint)`, refused with a ValueError before any model is built for an SDXL
    checkpoint: these trainers train one text encoder's pipelines (SD 1.x / 2.x and the demo model's family)."""
    if "text_encoder_2" in checkpoints.read(checkpoint).config:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is an SDXL model, which this version does not train yet.")
    return StableDiffusion.from_checkpoint(checkpoint)


def fine_tune(checkpoint, data, output, epochs=10, batch_size=16, learning_rate=1e-4, work_dir=None,
              seed=0, verbose="auto"):
    """Fine-tunes a checkpoint's UNet (text encoder and VAE frozen) on a folder and saves a bundle.

    Returns:
        dict with the final loss and the number of images.
    """
    sd = trainable(checkpoint)
    images, captions = load_folder(data, sd.img_height, sd.img_width)
    keras.utils.set_random_seed(seed)
    latents = encode_latents(sd.encoder, images, sd.decoder.scaling_factor)
    sd.text_encoder.trainable = False
    loss = train_diffusion(sd, latents, sd.tokenize(captions), epochs, batch_size, learning_rate,
                           backup_dir=work_dir, seed=seed, verbose=verbose)
    sd.save(output, overwrite=True)
    return dict(diffusion_loss=loss, num_images=len(images))


def train_lora(checkpoint, data, output, *, rank=4, alpha=None, targets=UNET_TARGETS, train_text_encoder=False,
               epochs=10, batch_size=16, learning_rate=1e-4, caption_dropout=0.0, work_dir=None, seed=0,
               verbose="auto"):
    """Trains a LoRA of a checkpoint's UNet (and text encoder) with `fit` on a folder of captioned images and
    writes it as a diffusers LoRA file (`lora.write`), which `StableDiffusion.load_lora` and diffusers'
    `load_lora_weights` read. As diffusers' `train_text_to_image_lora.py` at its defaults: Keras' LoRA layers
    (`lora.enable`) on the UNet's attention projections, the loss of `DiffusionTrainer` without offset noise
    (and by default without caption dropout), no EMA, AdamW as torch's (`TORCH_ADAMW`), gradients clipped to norm 1; here
    the learning rate decays (cosine) to a tenth.

    Args:
        checkpoint: what `StableDiffusion.from_checkpoint` reads; None: the demo model.
        data: a folder of captioned images at the checkpoint's image size (see `load_folder`).
        output: the `.safetensors` file to write.
        rank, alpha: of every LoRA; alpha default: the rank (updates of alpha / rank * A @ B).
        targets: the UNet modules to adapt, names or suffixes (see `lora.enable`).
        train_text_encoder: also adapt the text encoder's attention projections (`TEXT_TARGETS`).
        epochs, batch_size, learning_rate: of the training; learning_rate is the peak.
        caption_dropout: the fraction of captions replaced by "", which keeps the unconditional prediction
            that classifier-free guidance uses from drifting (models trained with it: the demo model, 10%).
        work_dir: the folder of the resumable backup (`Backup`), default `.OUTPUT.work` beside `output`:
            a rerun with the same folder resumes.
        seed: seeds the training noise, timesteps and shuffling.
    Returns:
        dict with the final loss, the number of images and the number of adapted modules.
    Raises:
        ValueError, FileNotFoundError: for bad arguments (before loading anything), targets that fit no
            layer, data that does not fit the model (`load_folder`).
    """
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {str(output)!r}.")
    rank, epochs = integer(rank, "rank", 1), integer(epochs, "epochs", 1)
    alpha = None if alpha is None else positive_number(alpha, "alpha")
    batch_size, learning_rate = check_batch_size(batch_size), positive_number(learning_rate, "learning_rate")
    if not 0 <= caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout!r}.")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of module names, got {targets!r}.")
    data_folder(data)
    sd = trainable(checkpoint)
    images, captions = load_folder(data, sd.img_height, sd.img_width)
    keras.utils.set_random_seed(seed)  # A's initial values too
    modules = lora.enable(sd.diffusion_model, targets, rank=rank, alpha=alpha)
    if train_text_encoder:
        modules += lora.enable(sd.text_encoder, TEXT_TARGETS, rank=rank, alpha=alpha)
    else:
        sd.text_encoder.trainable = False
    latents = encode_latents(sd.encoder, images, sd.decoder.scaling_factor)
    loss = train_diffusion(sd, latents, sd.tokenize(captions), epochs, batch_size, learning_rate,
                           backup_dir=work_dir or output.with_name(f".{output.name}.work"), seed=seed,
                           ema_momentum=None, verbose=verbose, caption_dropout=caption_dropout, offset_noise=0.0,
                           adamw=TORCH_ADAMW)
    output.parent.mkdir(parents=True, exist_ok=True)
    lora.write(output, {"unet": sd.diffusion_model, "text_encoder": sd.text_encoder})
    return dict(loss=loss, num_images=len(images), modules=len(modules))


def parse(parser, argv):
    """`parser.parse_args(argv)` with --deterministic (`deterministic`) added and, when given, applied, its
    ValueError a usage error of the flag; the namespace has no `deterministic`."""
    parser.add_argument("--deterministic", action="store_true", help="the same weights every run on this machine, "
                        "resumed or not (TensorFlow: one op at a time)")
    args = parser.parse_args(argv)
    try:
        if vars(args).pop("deterministic"):
            deterministic()
    except ValueError as error:
        parser.error(f"--deterministic: {error}")
    return args


def run_command_line(parser, train, argv):
    """The command line of a training function: adds the options every one has (--work-dir, --seed, --verbose) to
    `parser`, whose other options each set one of `train`'s keywords, parses `argv`, calls `train` and prints what
    it returns as JSON. Errors of bad arguments (ValueError, OSError) exit with status 2 and the message in flags."""
    parser.add_argument("--work-dir", help="backup for resuming (default: .OUTPUT.work beside --output)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", default="auto", choices=("auto", "0", "1", "2"), help="Keras fit verbosity")
    options = vars(parse(parser, argv))
    options["verbose"] = "auto" if options["verbose"] == "auto" else int(options["verbose"])
    try:
        result = train(**options)
    except (OSError, ValueError) as error:
        parser.error(in_flags(error, parser))
    print(json.dumps(result))


def main_lora(argv):
    """`python -m stable_diffusion.train lora ...`: `train_lora` from the command line."""
    parser = argparse.ArgumentParser(prog="python -m stable_diffusion.train lora",
                                     description=train_lora.__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="the model to adapt (default: the built-in demo model)")
    parser.add_argument("--data", required=True, help="folder of images with captions.jsonl or .txt captions")
    parser.add_argument("--output", required=True, type=Path, help="the LoRA .safetensors file to write")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    parser.add_argument("--targets", nargs="+", default=UNET_TARGETS, metavar="MODULE",
                        help=f"UNet modules to adapt, names or suffixes (default: {' '.join(UNET_TARGETS)})")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help=f"also adapt the text encoder's {', '.join(TEXT_TARGETS)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="fraction of captions dropped (default: 0)")
    run_command_line(parser, train_lora, argv)


def train_embedding(sd, vectors, latents, tokens, epochs, batch_size, learning_rate, backup_dir=None, seed=None,
                    verbose="auto"):
    """Fits the rows `vectors` (n, width) appended to the token embedding of sd's text encoder, alone
    (`embeddings.with_trainable_rows`), on scaled latents and token ids (B, 77), in which the ids from the
    embedding's rows on (as `embeddings.with_tokens` gives a new token's) read them: textual inversion, with the
    loss of `DiffusionTrainer` without caption dropout or offset noise, AdamW as torch's (`TORCH_ADAMW`), no EMA.
    `sd` is left as it was. Returns (the trained rows (n, width) float32, the last epoch's loss)."""
    text_encoder, appended = embeddings.with_trainable_rows(sd.text_encoder, vectors)
    models = (sd.text_encoder, sd.diffusion_model)
    trainable = [model.trainable for model in models]
    for model in models:
        model.trainable = False
    try:
        trainer = DiffusionTrainer(text_encoder, sd.diffusion_model, sd.scheduler.alphas_cumprod, sd.tokenize("")[0],
                                   caption_dropout=0.0, offset_noise=0.0, seed=seed,
                                   prediction_type=sd.scheduler.config["prediction_type"])
        loss = fit(trainer, (latents, tokens), epochs, batch_size, learning_rate, backup_dir, verbose=verbose,
                   adamw=TORCH_ADAMW, seed=seed)
    finally:
        for model, flag in zip(models, trainable):
            model.trainable = flag
    return np.asarray(appended.rows.numpy(), "float32"), loss


def initial_vectors(sd, initializer_token, count):
    """`count` copies (count, width) of the token embedding row of `initializer_token`, as diffusers'
    `textual_inversion.py` starts every vector; ValueError unless it is one token of sd's tokenizer."""
    ids = sd.tokenizer.bpe_ids([initializer_token])[0]
    if len(ids) != 1:
        raise ValueError(f"initializer_token must be one token of the tokenizer, got {initializer_token!r} "
                         f"({len(ids)} tokens).")
    table = ops.convert_to_numpy(sd.text_encoder.get_layer(embeddings.TOKEN_EMBEDDING).embeddings)
    return np.repeat(table[ids], count, axis=0).astype("float32")


def train_textual_inversion(checkpoint, data, output, *, token, initializer_token="*", num_vectors=1, epochs=100,
                            batch_size=16, learning_rate=5e-3, work_dir=None, seed=0, verbose="auto"):
    """Teaches a checkpoint a new token by textual inversion (Gal et al., 2022) with `fit` on a folder of captioned
    images whose captions use it, and writes a diffusers `learned_embeds.safetensors` (`{token: (num_vectors,
    width)}`), which `StableDiffusion.load_textual_inversion` and diffusers' `load_textual_inversion` read. As
    diffusers' `textual_inversion.py`: the token's vectors (`token`, `token_1`, ... in the tokenizer) start as the
    initializer token's embedding and alone train (`train_embedding`), every weight of the model frozen; here
    gradients are clipped to norm 1 and the learning rate decays (cosine) to a tenth.

    Args:
        checkpoint: what `StableDiffusion.from_checkpoint` reads; None: the demo model.
        data: a folder of captioned images at the checkpoint's image size (see `load_folder`); captions name the
            token (matched as the tokenizer matches added tokens: whole, ignoring case); others may not.
        output: the `.safetensors` file to write (replaced whole, when training ends).
        token: the new token, e.g. "<pink>": a non-empty string not in the tokenizer.
        initializer_token: a word that is one token of the tokenizer, e.g. a near concept ("red").
        num_vectors: the embedding's vectors (rows of the token embedding) that the token stands for.
        epochs, batch_size, learning_rate: of the training; learning_rate is the peak.
        work_dir: the folder of the resumable backup (`Backup`), default `.OUTPUT.work` beside `output`:
            a rerun with the same folder resumes.
        seed: seeds the training noise, timesteps and shuffling.
    Returns:
        dict with the final loss, the number of images and of the captions that name the token.
    Raises:
        ValueError, OSError: for bad arguments or an output that cannot be written (before loading anything), a
            token the tokenizer has, an initializer of several tokens, no caption naming the token, data that does
            not fit the model (`load_folder`).
    """
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {str(output)!r}.")
    non_empty_string(token, "token")
    non_empty_string(initializer_token, "initializer_token")
    num_vectors, epochs = integer(num_vectors, "num_vectors", 1), integer(epochs, "epochs", 1)
    batch_size, learning_rate = check_batch_size(batch_size), positive_number(learning_rate, "learning_rate")
    data_folder(data)
    output.parent.mkdir(parents=True, exist_ok=True)
    files.check_writable(output)
    sd = trainable(checkpoint)
    vectors = initial_vectors(sd, initializer_token, num_vectors)
    first_id = sd.text_encoder.get_layer(embeddings.TOKEN_EMBEDDING).input_dim
    try:
        tokenizer = embeddings.with_tokens(sd.tokenizer, token, num_vectors, first_id=first_id)
    except ValueError as error:
        raise ValueError(f"token {token!r} cannot be learned: {error} Choose a new word.") from None
    images, captions = load_folder(data, sd.img_height, sd.img_width)
    tokens = tokenizer(captions)
    naming = int((tokens >= first_id).any(axis=1).sum())
    if not naming:
        raise ValueError(f"No caption in {data} names the token {token!r}: nothing would learn it.")
    keras.utils.set_random_seed(seed)
    latents = encode_latents(sd.encoder, images, sd.decoder.scaling_factor)
    vectors, loss = train_embedding(sd, vectors, latents, tokens, epochs, batch_size, learning_rate,
                                    backup_dir=work_dir or output.with_name(f".{output.name}.work"), seed=seed,
                                    verbose=verbose)
    with files.staged(output, overwrite=True) as partial:
        write_safetensors(partial, {token: vectors}, {"format": "pt"}, alignment=1)
    return dict(loss=loss, num_images=len(images), captions_with_token=naming)


def main_textual_inversion(argv):
    """`python -m stable_diffusion.train textual-inversion ...`: `train_textual_inversion` from the command line."""
    parser = argparse.ArgumentParser(prog="python -m stable_diffusion.train textual-inversion",
                                     description=train_textual_inversion.__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="the model to teach (default: the built-in demo model)")
    parser.add_argument("--data", required=True, help="folder of images with captions.jsonl or .txt captions, "
                        "which name the token")
    parser.add_argument("--output", required=True, type=Path, help="the .safetensors file to write, e.g. "
                        "learned_embeds.safetensors")
    parser.add_argument("--token", required=True, help='the new token, e.g. "<pink>"')
    parser.add_argument("--initializer-token", default="*", help="a one-token word the vectors start from "
                        "(default: *)")
    parser.add_argument("--num-vectors", type=int, default=1, help="vectors the token stands for (default: 1)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="peak learning rate (default: 5e-3)")
    run_command_line(parser, train_textual_inversion, argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lora"]:
        return main_lora(argv[1:])
    if argv[:1] == ["textual-inversion"]:
        return main_textual_inversion(argv[1:])
    if argv[:1] == ["dreambooth"]:
        from . import dreambooth  # which builds on this module

        return dreambooth.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="bundle folder to write")
    parser.add_argument("--checkpoint", help="fine-tune this checkpoint's UNet (with --data)")
    parser.add_argument("--data", help="folder of images with captions.jsonl or .txt captions")
    parser.add_argument("--num-images", type=int, default=8000, help="synthetic images (from scratch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-epochs", type=int, default=4, help="epochs of stage 1, the VAE (default: 4)")
    parser.add_argument("--tune-images", type=int, default=8000, help="new images of each round of stage 3, the "
                        "UNet alone (default: 8000; 0 skips it)")
    parser.add_argument("--tune-epochs", type=int, default=16, help="epochs of each round of stage 3 (default: 16)")
    parser.add_argument("--tune-rounds", type=int, default=2, help="rounds of stage 3 (default: 2)")
    parser.add_argument("--small-images", type=int, default=24000, help="images drawn for stage 4, the UNet on "
                        "their small shapes alone (default: 24000; 0 skips it)")
    parser.add_argument("--small-epochs", type=int, default=4, help="epochs of stage 4 (default: 4)")
    parser.add_argument("--epochs", type=int, help="diffusion epochs (default: 32, fine-tuning 10)")
    parser.add_argument("--batch-size", type=int, help="diffusion batch (default: 64, fine-tuning 16)")
    parser.add_argument("--learning-rate", type=float, help="default: 2e-3, fine-tuning 1e-4")
    parser.add_argument("--work-dir", help="checkpoints for resuming (default: beside --output)")
    parser.add_argument("--verbose", default="auto", help="Keras fit verbosity: auto, 0, 1 or 2")
    args = parse(parser, argv)
    if bool(args.checkpoint) != bool(args.data):
        parser.error("--checkpoint and --data go together (fine-tuning); give neither to train from scratch.")
    verbose = args.verbose if args.verbose == "auto" else int(args.verbose)
    options = {key: value for key, value in dict(epochs=args.epochs, batch_size=args.batch_size,
                                                  learning_rate=args.learning_rate).items() if value is not None}
    if args.checkpoint:
        result = fine_tune(args.checkpoint, args.data, args.output, work_dir=args.work_dir, seed=args.seed,
                           verbose=verbose, **options)
    else:
        result = train_demo(args.output, args.num_images, args.seed, args.vae_epochs,
                            tune_images=args.tune_images, tune_epochs=args.tune_epochs, tune_rounds=args.tune_rounds,
                            small_images=args.small_images, small_epochs=args.small_epochs,
                            work_dir=args.work_dir, verbose=verbose, **options)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
