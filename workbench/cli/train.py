"""`workbench train`: train the tiny-shapes demo model (`workbench.demo.train`), or with `--palettize` fine-tune a
trained model's UNet while its weights are palettized (`workbench.tune.qat`). Options are parsed and the configs
checked without importing torch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workbench.cli.common import UsageError, float_in_range, int_in_range
from workbench.demo.config import TRAINING_FILE, TrainConfig, TrainResult, add_arguments
from workbench.errors import InvalidValueError
from workbench.resources import demo_model_dir
from workbench.tune.qat_config import ASSIGNMENTS, LUT_MODES, QatConfig

# `--palettize`'s options, each named as its `QatConfig` field
_QAT_OPTIONS = (
    "recipe_name", "steps", "batch", "lr", "recluster_every", "distill", "luts", "assignment", "temperature",
    "anneal", "lut_lr", "min_numel", "seed",
)  # fmt: skip


def run(args: argparse.Namespace) -> None:
    # a namespace of the demo's own options alone (`add_arguments`) trains the demo model
    if getattr(args, "palettize", None) is not None:
        return _run_palettized(args)
    options = (*_QAT_OPTIONS, "model")
    given = [f"--{name.replace('_', '-')}" for name in options if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} only apply with --palettize", "workbench train")
    # the config file and `--set` overrides are read (strictly: `TrainConfig.with_overrides`) and checked before the
    # training code, and torch with it, is imported
    config = None if args.card_only else TrainConfig.load(args.config, args.set)
    from workbench.demo.train import run as train

    args.out = str(demo_model_dir()) if args.out is None else args.out
    train(args, config)


def _base_config(args: argparse.Namespace, model: Path) -> TrainConfig:
    """The data and loss the model was trained with: `--config`, else the model's `training.json`; `--set` on top."""
    if args.config is not None:
        return TrainConfig.load(args.config, args.set)
    if not (model / TRAINING_FILE).is_file():
        raise InvalidValueError(f"{model} has no {TRAINING_FILE} (the data it was trained on); give --config")
    return TrainResult.load(model).config.with_overrides(args.set)


def _run_palettized(args: argparse.Namespace) -> None:
    for option in ("card_only", "checkpoint_dir"):
        if getattr(args, option):
            raise UsageError(f"--{option.replace('_', '-')} does not apply with --palettize", "workbench train")
    if args.out is None:
        raise UsageError("--palettize needs --out (the fine-tuned pipeline folder)", "workbench train")
    model = Path(args.model) if args.model is not None else demo_model_dir()
    fields = {name: getattr(args, name) for name in _QAT_OPTIONS if getattr(args, name) is not None}
    qat = QatConfig(args.palettize, **fields)
    train_config = _base_config(args, model)
    print(f"qat: {json.dumps(qat.to_dict())}", flush=True)

    import torch

    from workbench.models.loader import load_pipeline
    from workbench.threads import torch_threads
    from workbench.tune.qat import train_palettized

    pipe = load_pipeline(str(model), device=args.device, dtype=torch.float32, progress=False)
    with torch_threads(train_config.threads):
        result = train_palettized(pipe, train_config, qat, args.out, log=lambda line: print(line, flush=True))
    print(f"wrote {result.out} ({result.recipe.name}, exact={result.exact}); export it with: "
          f"workbench export {result.out} --recipe {result.out / 'recipe.json'} --out OUT")  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the tiny-shapes demo model, or fine-tune it palettized (--palettize)")
    add_arguments(p)  # the same options as `python -m workbench.demo.train`
    q = p.add_argument_group(
        "training-time palettization", "fine-tune a trained model's UNet while its weights are palettized"
    )
    q.add_argument("--palettize", default=None, metavar="BITS_OR_RECIPE", help="a width (2, 3...) or a recipe JSON")
    q.add_argument("--recipe-name", default=None, help="which recipe of the file (default: its only one)")
    q.add_argument("--model", default=None, help="the trained pipeline folder (default: the demo model)")
    q.add_argument("--steps", type=int_in_range(1), default=None, help="optimizer steps (120)")
    q.add_argument("--batch", type=int_in_range(1), default=None, help="images per step (32)")
    q.add_argument("--lr", type=float_in_range(1e-12), default=None, help="peak learning rate (1e-3)")
    q.add_argument(
        "--recluster-every", type=int_in_range(0), default=None, help="steps between k-means re-fits (0: never)"
    )
    q.add_argument("--distill", type=float_in_range(0.0), default=None, help="weight of the float teacher (1.0)")
    q.add_argument(
        "--luts", choices=LUT_MODES, default=None,
        help="centroid: each LUT entry the mean of its float masters; learned: the entries trained (centroid)",
    )  # fmt: skip
    q.add_argument(
        "--assignment", choices=ASSIGNMENTS, default=None,
        help="fixed: the post-training k-means'; nearest: re-assigned every step; soft: a softmax over the entries, "
        "annealed to hard (soft)",
    )  # fmt: skip
    q.add_argument(
        "--temperature",
        type=float_in_range(0.0),
        default=None,
        help="soft: temperature / squared entry spacing (0.06)",
    )
    q.add_argument(
        "--anneal", action=argparse.BooleanOptionalAction, default=None,
        help="soft: anneal the temperature to hard at three quarters of the steps (default: constant)",
    )  # fmt: skip
    q.add_argument(
        "--lut-lr", type=float_in_range(1e-12), default=None, help="learned LUTs: step size / layer RMS (0.01)"
    )
    q.add_argument("--min-numel", type=int_in_range(0), default=None, help="a width: layers over this (2048)")
    q.add_argument("--seed", type=int_in_range(0), default=None, help="seeds the batches (0)")
    p.set_defaults(func=run)
