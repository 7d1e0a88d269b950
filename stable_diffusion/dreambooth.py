"""DreamBooth (Ruiz et al., 2022, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation") with prior preservation, trained with Keras `fit`: a few images of one subject, captioned with a
prompt that holds a rare identifier ("a photo of sks dog"), teach it to the UNet (and optionally the text encoder,
or LoRAs of them), while images the model itself makes from the class prompt ("a photo of dog"), trained on
alongside, keep it from forgetting what the class looks like (the prior-preservation loss, sec. 4.2).

As diffusers' `examples/dreambooth/train_dreambooth.py` and the keras.io tutorial do it: the class images are
generated before training (50 steps, guidance 7.5) into a folder, where a rerun finds them; each batch holds as
many class images as instance images, the instances cycled over the class images; the loss is the diffusion loss
(`train.DiffusionTrainer`, no caption dropout, no offset noise) of the instance half plus `prior_loss_weight` times
that of the class half; torch's AdamW settings, gradients clipped to norm 1, no EMA. Here, as in `train.py`, the
learning rate decays (cosine) to a tenth and the latents are the VAE posterior's means, encoded once.

    python -m stable_diffusion.train dreambooth --checkpoint C --data FOLDER --instance-prompt "a photo of sks dog"
        --class-prompt "a photo of dog" --output OUT [--lora-rank 4]
"""
import argparse
import hashlib
from pathlib import Path

import keras
import numpy as np
from keras import ops
from PIL import Image

from . import lora, progress
from .arguments import integer, non_empty_string, positive_number
from .train import (IMAGE_SUFFIXES, TEXT_TARGETS, TORCH_ADAMW, UNET_TARGETS, DiffusionTrainer, check_batch_size,
                    encode_latents, fit, image_files, read_images, run_command_line, trainable)

LEARNING_RATES = {"full": 5e-6, "lora": 1e-4}  # diffusers' train_dreambooth.py; our LoRA training's default


class DreamBoothTrainer(DiffusionTrainer):
    """DreamBooth with prior preservation: (instance latents, their token ids, class latents, their token ids),
    as many class rows as instance rows -> `DiffusionTrainer`'s prediction and target for the two concatenated,
    instances first (diffusers' `collate_fn`); loss: the mean squared error of the instance half plus
    `prior_loss_weight` times that of the class half.

    Args:
        prior_loss_weight: the weight of the class images' loss.
        args, kwargs: see `DiffusionTrainer`.
    """

    def __init__(self, *args, prior_loss_weight=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior_loss_weight = prior_loss_weight

    def call(self, inputs):
        instance_latents, instance_tokens, class_latents, class_tokens = inputs
        return super().call((ops.concatenate([instance_latents, class_latents]),
                             ops.concatenate([instance_tokens, class_tokens])))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        prediction, target = y_pred
        instance, prior = ops.split(ops.square(prediction - target), 2)
        return ops.mean(instance) + self.prior_loss_weight * ops.mean(prior)


def class_images(sd, folder, prompt, count, *, batch_size, seed, verbose=True):
    """The first `count` images of `folder` (`train.image_files`) as uint8 (count, H, W, 3), after generating the
    ones it lacks with `sd` from `prompt`, `batch_size` at a time (seeds `seed`, `seed` + `batch_size`, ...), and
    writing them there as `class_<index>_<hash>.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    starts = range(len(image_files(folder)), count, batch_size)
    for start in progress.report(starts, f"class images into {folder}", verbose):
        images = sd.text_to_image(prompt, batch_size=min(batch_size, count - start), seed=seed + start, verbose=False)
        for index, image in enumerate(images, start):
            digest = hashlib.sha1(image.tobytes()).hexdigest()[:8]
            Image.fromarray(image).save(folder / f"class_{index:05d}_{digest}.png")
    return read_images(image_files(folder)[:count], sd.img_height, sd.img_width)


def train_dreambooth(checkpoint, instance_data, output, *, instance_prompt, class_prompt, class_data=None,
                     num_class_images=100, prior_loss_weight=1.0, lora_rank=None, train_text_encoder=False,
                     epochs=16, batch_size=4, learning_rate=None, work_dir=None, seed=0, verbose="auto"):
    """Teaches a checkpoint one subject by DreamBooth with prior preservation, as the module's docstring says, and
    saves the fine-tuned model as a bundle (`StableDiffusion.save`), or, with `lora_rank`, LoRAs of it as a
    diffusers LoRA file (`lora.write`, as `train.train_lora` writes).

    Args:
        checkpoint: what `StableDiffusion.from_checkpoint` reads; None: the demo model.
        instance_data: a folder of the subject's images (`train.IMAGE_SUFFIXES`) at the model's image size.
        output: the bundle folder to write, or with `lora_rank` the `.safetensors` file.
        instance_prompt: the caption of every instance image, with the identifier, e.g. "a photo of sks dog".
        class_prompt: the prompt of the class images, e.g. "a photo of dog".
        class_data: the folder of class images, default `.OUTPUT.class_images` beside `output`; if it holds fewer
            than `num_class_images`, the rest are generated from `class_prompt` and written there.
        num_class_images: the class images trained on; an epoch is max(num_class_images, instance images) pairs.
        prior_loss_weight: the weight of the class images' loss (>= 0).
        lora_rank: train LoRAs of this rank (alpha: the rank) of the UNet's attention projections
            (`train.UNET_TARGETS`) instead of the whole UNet.
        train_text_encoder: also train the text encoder (with `lora_rank`: LoRAs of `train.TEXT_TARGETS`).
        epochs, batch_size: of the training; a step takes `batch_size` instance and as many class images; class
            images are generated `batch_size` at a time.
        learning_rate: the peak learning rate; default 5e-6 (diffusers' default), with `lora_rank` 1e-4.
        work_dir: the folder of the resumable backup (`train.Backup`), default `.OUTPUT.work` beside `output`:
            a rerun with the same folder resumes.
        seed: seeds the class images, the training noise, timesteps and shuffling, and the LoRAs' initial values.
        verbose: Keras `fit` verbosity; 0 also hides the class images' progress.
    Returns:
        dict with the final loss, the numbers of instance and class images, the class folder and, with
        `lora_rank`, the number of adapted modules.
    Raises:
        ValueError, FileNotFoundError: for bad arguments (before loading anything; each message starts with the
            argument's name), and for images of another size than the model's.
    """
    output = Path(output)
    if lora_rank is not None and output.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file with lora_rank, got {str(output)!r}.")
    if lora_rank is None and output.suffix == ".safetensors":
        raise ValueError(f"output must be a bundle folder without lora_rank (which writes a LoRA file), got "
                         f"{str(output)!r}.")
    non_empty_string(instance_prompt, "instance_prompt")
    non_empty_string(class_prompt, "class_prompt")
    num_class_images, epochs, seed = (integer(value, name, minimum) for value, name, minimum in (
        (num_class_images, "num_class_images", 1), (epochs, "epochs", 1), (seed, "seed", 0)))
    batch_size = check_batch_size(batch_size)
    lora_rank = None if lora_rank is None else integer(lora_rank, "lora_rank", 1)
    prior_loss_weight = positive_number(prior_loss_weight, "prior_loss_weight", zero=True)
    learning_rate = positive_number(LEARNING_RATES["lora" if lora_rank else "full"] if learning_rate is None
                                    else learning_rate, "learning_rate")
    if not Path(instance_data).is_dir():
        raise FileNotFoundError(f"instance_data {str(instance_data)!r} is not a folder.")
    instance_files = image_files(instance_data)
    if not instance_files:
        raise ValueError(f"instance_data {str(instance_data)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    class_data = Path(class_data or output.with_name(f".{output.name}.class_images"))
    if class_data.exists() and not class_data.is_dir():
        raise ValueError(f"class_data {str(class_data)!r} is not a folder.")

    sd = trainable(checkpoint)
    instances = read_images(instance_files, sd.img_height, sd.img_width)
    classes = class_images(sd, class_data, class_prompt, num_class_images, batch_size=batch_size, seed=seed,
                           verbose=verbose != 0)
    keras.utils.set_random_seed(seed)  # the LoRAs' initial values
    modules = []
    if lora_rank:
        modules = lora.enable(sd.diffusion_model, UNET_TARGETS, rank=lora_rank)
        if train_text_encoder:
            modules += lora.enable(sd.text_encoder, TEXT_TARGETS, rank=lora_rank)
    if not train_text_encoder:
        sd.text_encoder.trainable = False
    rows = np.arange(max(len(instances), num_class_images))  # diffusers' DreamBoothDataset: each index, both cycled
    scale = sd.decoder.scaling_factor
    x = (encode_latents(sd.encoder, instances, scale)[rows % len(instances)],
         np.repeat(sd.tokenize(instance_prompt), len(rows), axis=0),
         encode_latents(sd.encoder, classes, scale)[rows % num_class_images],
         np.repeat(sd.tokenize(class_prompt), len(rows), axis=0))
    trainer = DreamBoothTrainer(sd.text_encoder, sd.diffusion_model, sd.scheduler.alphas_cumprod, sd.tokenize("")[0],
                                caption_dropout=0.0, offset_noise=0.0, seed=seed,
                                prediction_type=sd.scheduler.config["prediction_type"],
                                prior_loss_weight=prior_loss_weight)
    loss = fit(trainer, x, epochs, batch_size, learning_rate, work_dir or output.with_name(f".{output.name}.work"),
               verbose=verbose, adamw=TORCH_ADAMW, seed=seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    if lora_rank:
        lora.write(output, {"unet": sd.diffusion_model, "text_encoder": sd.text_encoder})
    else:
        sd.save(output, overwrite=True)
    return dict(loss=loss, num_images=len(instances), num_class_images=num_class_images, class_data=str(class_data),
                **(dict(modules=len(modules)) if lora_rank else {}))


def main(argv):
    """`python -m stable_diffusion.train dreambooth ...`: `train_dreambooth` from the command line."""
    parser = argparse.ArgumentParser(prog="python -m stable_diffusion.train dreambooth", description=(
        "DreamBooth with prior preservation: teaches a checkpoint one subject from a few images and writes the "
        "fine-tuned model as a bundle, or with --lora-rank LoRAs of it as a diffusers LoRA file."))
    parser.add_argument("--checkpoint", help="the model to teach (default: the built-in demo model)")
    parser.add_argument("--data", required=True, dest="instance_data",
                        help="folder of the subject's images, at the model's image size")
    parser.add_argument("--instance-prompt", required=True, help='their caption, e.g. "a photo of sks dog"')
    parser.add_argument("--class-prompt", required=True, help='the prompt of the class, e.g. "a photo of dog"')
    parser.add_argument("--class-data", help="folder of class images, the missing ones generated into it "
                                             "(default: .OUTPUT.class_images beside --output)")
    parser.add_argument("--num-class-images", type=int, default=100, help="class images (default: 100)")
    parser.add_argument("--prior-loss-weight", type=float, default=1.0,
                        help="weight of the class images' loss (default: 1)")
    parser.add_argument("--output", required=True, type=Path,
                        help="the bundle folder to write; with --lora-rank, the LoRA .safetensors file")
    parser.add_argument("--lora-rank", type=int, help=f"train LoRAs of this rank of {', '.join(UNET_TARGETS)} "
                                                      "instead of the whole UNet")
    parser.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder (or LoRAs)")
    parser.add_argument("--epochs", type=int, default=16,
                        help="passes over max(--num-class-images, the images) pairs of images (default: 16)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="instance images per step, and as many class images (default: 4)")
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: 5e-6, with --lora-rank 1e-4)")
    run_command_line(parser, train_dreambooth, argv)
