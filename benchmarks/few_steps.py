"""Prompt adherence of each sampler at few steps, on the demo model: where is each one reliable?

Scores the same grammar prompts and seeds (`benchmarks/adherence.py`) for every sampler at each step
count and appends the table of "all attributes right" rates to benchmarks/RESULTS.md; the samplers'
`reliable_steps` (a warning below it) come from it.

    python -m benchmarks.few_steps --num-images 30 --steps 5 10 15 20 30 50
    python -m benchmarks.few_steps --num-images 30 --steps 30 35 40 45 50 --schedulers pndm
"""
import argparse
import sys
from datetime import datetime, timezone

from benchmarks.adherence import generate, machine, prompts
from benchmarks.results import append_entry
from stable_diffusion import StableDiffusion
from stable_diffusion.adherence import score
from stable_diffusion.schedulers import SCHEDULERS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 15, 20, 30, 50])
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=list(SCHEDULERS))
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    host = machine()
    sd = StableDiffusion.from_checkpoint(jit_compile=False)
    captions = prompts(args.num_images, seed=0)
    rows = []
    for name in args.schedulers:
        scores = [score(generate(sd, captions, args.batch_size, 0, num_steps=steps, scheduler=name), captions)["all"]
                  for steps in args.steps]
        rows.append(f"| {name} | " + " | ".join(f"{100 * value:.0f}%" for value in scores) + " |")
        print(rows[-1], flush=True)
    entry = "\n".join([
        f"### {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: demo model, {args.num_images} prompts",
        "",
        f"- Command: `python -m benchmarks.few_steps {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Machine: {host}",
        "- Share of images with colour, shape, background and size all right (`stable_diffusion.adherence`), "
        "guidance 7.5, prompts from `data.random_caption` with seed 0, image k seeded with k.",
        "",
        "| sampler | " + " | ".join(f"{steps} steps" for steps in args.steps) + " |",
        "|---|" + "---|" * len(args.steps),
        *rows,
    ])
    print(entry)
    if not args.no_record:
        append_entry("## Adherence by step count (`benchmarks/few_steps.py`)", entry)


if __name__ == "__main__":
    main()
