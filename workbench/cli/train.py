"""`workbench train`: train the tiny-shapes demo model (`workbench.demo.train`), its options parsed and its config
checked without importing torch."""

from __future__ import annotations

import argparse

from workbench.demo.config import TrainConfig, add_arguments
from workbench.resources import demo_model_dir


def run(args: argparse.Namespace) -> None:
    # the config file and `--set` overrides are read (strictly: `TrainConfig.with_overrides`) and checked before the
    # training code, and torch with it, is imported
    config = None if args.card_only else TrainConfig.load(args.config, args.set)
    from workbench.demo.train import run as train

    args.out = str(demo_model_dir()) if args.out is None else args.out
    train(args, config)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the tiny-shapes demo model and write its pipeline folder and card")
    add_arguments(p)  # the same options as `python -m workbench.demo.train`
    p.set_defaults(func=run)
