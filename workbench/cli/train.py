"""`workbench train`: train the tiny-shapes demo model (`workbench.demo.train`), its options parsed and its config
checked without importing torch."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from workbench.demo.config import TrainConfig

    # the config file and `--set` overrides are read (strictly: `TrainConfig.with_overrides`) and checked before the
    # training code, and torch with it, is imported
    config = None if args.card_only else TrainConfig.load(args.config, args.set)
    from workbench.demo.train import run
    from workbench.resources import demo_model_dir

    args.out = str(demo_model_dir()) if args.out is None else args.out
    run(args, config)


def add_parser(sub) -> None:
    # the same options as `python -m workbench.demo.train` (workbench.demo.train.add_arguments), kept here so that
    # parsing does not import torch
    p = sub.add_parser("train", help="train the tiny-shapes demo model and write its pipeline folder and card")
    p.add_argument("--out", default=None, help="pipeline folder to write (default: the demo model's own folder)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (default: the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints here (not in the repo)")
    p.add_argument("--device", default="cpu", help="training device (default cpu)")
    p.add_argument("--no-card", action="store_true", help="skip the benchmark and README.md after training")
    p.add_argument("--card-only", action="store_true", help="only re-measure --out and rewrite its README.md")
    p.set_defaults(func=run)
