"""`ditserve train-tiny`: train the shipped toy models (text-to-video `tiny`, or `tiny-i2v`
from it) on synthetic shape clips, on the CPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


def add_train_command(sub) -> None:
    train = sub.add_parser("train-tiny", help="train the tiny presets on synthetic shape clips (CPU, well under an hour)")
    train.add_argument("--task", choices=("t2v", "i2v"), default="t2v",
                       help="t2v: the `tiny` preset from scratch; i2v: `tiny-i2v`, starting from the shipped `tiny` "
                            "(its text encoder and VAE kept, its DiT taught the first-frame inputs)")
    train.add_argument("--out", type=Path, default=None,
                       help="folder to write, diffusers layout (default ./tiny-model or ./tiny-i2v-model; serve it "
                            "with DITSERVE_MODEL__PATH, or copy it over serving/models/weights/<preset>)")
    train.add_argument("--seed", type=int, default=0, help="the whole run follows from it (default 0)")
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    # Recipe settings default to train()'s own (the shipped model's), so they are None here.
    train.add_argument("--num-clips", type=int, default=None, help="synthetic clips to train on")
    train.add_argument("--vae-steps", type=int, default=None, help="t2v only")
    train.add_argument("--vae-from", type=Path, default=None,
                       help="t2v only: take the VAE of an earlier run's folder (e.g. serving/models/weights/tiny) "
                            "instead of training one: same result for the same seed, in half the time")
    train.add_argument("--dit-steps", type=int, default=None)
    train.add_argument("--dit-batch", type=int, default=None)
    train.add_argument("--dit-lr", type=float, default=None)
    train.add_argument("--partial-captions", type=float, default=None,
                       help="t2v only: share of captions saying only 1-2 attributes (off by default: it lowered the "
                            "held-out score)")


def _problems(args) -> list[str]:
    counts = {"num_clips": args.num_clips, "vae_steps": args.vae_steps, "dit_steps": args.dit_steps,
              "dit_batch": args.dit_batch}
    problems = [f"--{name.replace('_', '-')} must be at least 1" for name, value in counts.items()
                if value is not None and value < 1]
    if args.dit_lr is not None and not args.dit_lr > 0:
        problems.append("--dit-lr must be above 0")
    if args.partial_captions is not None and not 0 <= args.partial_captions <= 1:
        problems.append("--partial-captions must be between 0 and 1")
    if args.vae_from is not None and not (args.vae_from / "vae" / "config.json").is_file():
        problems.append(f"--vae-from {args.vae_from}: no vae/config.json there; expected the folder an earlier "
                        "train-tiny run wrote")
    if args.task == "i2v":
        problems += [f"--{name} is for --task t2v: tiny-i2v keeps the shipped tiny model's VAE and text encoder"
                     for name, value in (("vae-steps", args.vae_steps), ("vae-from", args.vae_from),
                                         ("partial-captions", args.partial_captions)) if value is not None]
    return problems


def run_train_tiny(args) -> int:
    from serving.cli import _quiet_libraries

    _quiet_libraries()
    problems = _problems(args)
    for problem in problems:
        print(f"ditserve train-tiny: error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    recipe = {name: value for name, value in {
        "num_clips": args.num_clips, "vae_steps": args.vae_steps, "dit_steps": args.dit_steps,
        "dit_batch": args.dit_batch, "dit_lr": args.dit_lr, "partial_captions": args.partial_captions,
    }.items() if value is not None}
    log = lambda line: print(line, flush=True)  # noqa: E731
    if args.task == "i2v":
        from serving.models.train_tiny_i2v import train as train_i2v

        train_i2v(args.out or Path("tiny-i2v-model"), seed=args.seed, threads=args.threads, log=log, **recipe)
        return 0
    from serving.models.train_tiny import train

    train(args.out or Path("tiny-model"), seed=args.seed, threads=args.threads, vae_from=args.vae_from, log=log,
          **recipe)
    return 0
