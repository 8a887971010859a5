"""`workbench layers`: a model's compressible UNet layers (the candidates of an analysis)."""

from __future__ import annotations

import argparse

from workbench.cli.common import MODEL_HELP, add_model_options, candidate_layers, int_in_range, model_spec


def run(args: argparse.Namespace) -> None:
    import pandas as pd

    from workbench.models.loader import default_min_numel, load_pipeline

    model = model_spec(args.model, args)
    pipe = load_pipeline(model, device="cpu", progress=False)
    min_numel = default_min_numel(model) if args.min_numel is None else args.min_numel
    layers = candidate_layers(pipe, min_numel, model)
    rows = [
        {"layer": n, "type": type(m).__name__, "shape": tuple(m.weight.shape), "numel": m.weight.numel()}
        for n, m in layers.items()
    ]
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(pd.DataFrame(rows).to_string(index=False))


def add_parser(sub) -> None:
    p = sub.add_parser("layers", help="list the compressible layers of a pipeline's UNet")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_model_options(p)
    p.add_argument(
        "--min-numel",
        type=int_in_range(0),
        default=None,
        help="layers with more weights than this (default 1e5; demo model and tiny-sd / tiny-sdxl: 2048)",
    )
    p.set_defaults(func=run)
