"""Converts a checkpoint into a Keras bundle once, so later loads skip the conversion.

    python -m stable_diffusion.convert v1-5-pruned-emaonly.safetensors sd15-bundle
    python -m stable_diffusion.convert 768-v-ema.ckpt sd2-bundle --vae vae-ft-mse-840000-ema-pruned.safetensors

SRC: an original SD 1.x / 2.x / XL base `.safetensors` / `.ckpt`, a diffusers folder, or a bundle. The bundle
is written under a temporary name and renamed at the end: DST appears only once complete.
"""
import argparse
import json
import sys
from pathlib import Path

from .checkpoints import PREDICTION_TYPES
from .stable_diffusion import StableDiffusion


def convert(source, destination, overwrite=False, **options):
    """Writes checkpoint `source` as a bundle folder `destination`; options as `from_checkpoint`'s."""
    StableDiffusion.from_checkpoint(source, jit_compile=False, **options).save(destination, overwrite=overwrite)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m stable_diffusion.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="checkpoint file or folder")
    parser.add_argument("destination", type=Path, help="bundle folder to write")
    parser.add_argument("--vae", type=Path, help="a VAE file replacing the checkpoint's VAE")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                        help="override the prediction type (default: as diffusers decides for the file)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, dest="use_ema",
                        help="files with EMA and training weights: which to convert (default: EMA)")
    parser.add_argument("--config", type=json.loads, help="JSON per-model settings the tensors do not "
                        'determine, e.g. \'{"diffusion_model": {"num_heads": 8}}\'')
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    args = parser.parse_args(argv)
    if args.destination.exists() and not args.overwrite:
        parser.exit(1, f"error: {args.destination} exists; pass --overwrite to replace it.\n")
    try:
        convert(args.source, args.destination, args.overwrite, vae=args.vae,
                prediction_type=args.prediction_type, use_ema=args.use_ema, config=args.config)
    except (OSError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"Wrote {args.destination}", file=sys.stderr)


if __name__ == "__main__":
    main()
