"""`workbench train`: train the tiny-shapes demo model and write its pipeline folder and card."""

from __future__ import annotations

import argparse

from workbench.errors import InvalidValueError, parse_bool


def check_overrides(texts: list[str], config_type: type) -> None:
    """Check `--set KEY=VALUE` overrides against a config dataclass's fields before they are applied: the key
    must be a field, a boolean's value must read as one (`parse_bool`: "ture" is an error, not False), and a
    number (or a comma-separated tuple of them) must parse.

    Raises:
        InvalidValueError: naming the key, the value and what is valid.
    """
    from dataclasses import fields

    types = {f.name: str(f.type) for f in fields(config_type)}  # "bool", "int", "tuple[int, ...]" (postponed)
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or key not in types:
            raise InvalidValueError(f"--set expects KEY=VALUE with KEY one of {sorted(types)}, got {text!r}")
        kind = types[key]
        if kind == "bool":
            parse_bool(value, name=f"--set {key}")
        elif kind in ("int", "float") or kind.startswith("tuple[int"):
            convert = float if kind == "float" else int
            try:
                [convert(part) for part in value.split("," if kind.startswith("tuple") else None)]
            except ValueError:
                raise InvalidValueError(f"--set {key}={value!r} is not of the field's type {kind}") from None


def run(args: argparse.Namespace) -> None:
    from workbench.demo.config import TrainConfig
    from workbench.demo.train import run
    from workbench.models.loader import DEMO_MODEL

    check_overrides(args.set, TrainConfig)
    args.out = str(DEMO_MODEL) if args.out is None else args.out
    run(args)


def add_parser(sub) -> None:
    # the same options as `python -m workbench.demo.train` (workbench.demo.train.add_arguments), kept here so that
    # parsing
    # does not import torch
    p = sub.add_parser("train", help="train the tiny-shapes demo model and write its pipeline folder and card")
    p.add_argument("--out", default=None, help="pipeline folder to write (default: the demo model's own folder)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (default: the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints here (not in the repo)")
    p.add_argument("--device", default="cpu", help="training device (default cpu)")
    p.add_argument("--no-card", action="store_true", help="skip the benchmark and README.md after training")
    p.add_argument("--card-only", action="store_true", help="only re-measure --out and rewrite its README.md")
    p.set_defaults(func=run)
