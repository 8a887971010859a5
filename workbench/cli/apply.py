"""`workbench apply`: a recipe applied to a float16 Core ML UNet package converted elsewhere, weights matched by
content (`workbench.coreml.apply.apply_model`)."""

from __future__ import annotations

import argparse

from workbench.cli.common import MODEL_HELP, add_model_options, int_in_range, model_spec


def run(args: argparse.Namespace) -> None:
    from workbench.coreml.apply import apply_model

    report = apply_model(
        args.package,
        args.out,
        recipe_file=args.recipe,
        recipe_name=args.recipe_name,
        model=model_spec(args.model, args),
        min_numel=args.min_numel,
        importance_file=args.importance,
        chunk=args.chunk_unet,
    )
    print(report.summary())
    print(f"verification report: {report.out_dir}/verification.json")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "apply", help="palettize an existing float16 Core ML UNet package with a recipe (weights matched by content)"
    )
    p.add_argument("package", help="the float16 UNet .mlpackage (e.g. Unet.mlpackage from torch2coreml or export)")
    p.add_argument("--recipe", required=True, help="recipe JSON (ours or the reference's pre-analysis)")
    p.add_argument("--recipe-name", default=None, help="which recipe of --recipe (default: the file's only one)")
    p.add_argument("--model", default=None, help="the pipeline the package was converted from; " + MODEL_HELP)
    add_model_options(p)
    p.add_argument(
        "--out",
        required=True,
        help="folder (not ending in .mlpackage) for the palettized package (same file name) and its report",
    )
    p.add_argument(
        "--importance", default=None, help="the analysis' importance.npz, for recipes with data-aware palettes"
    )
    p.add_argument(
        "--chunk-unet",
        action="store_true",
        help="write UnetChunk1 + UnetChunk2 for iOS (split by coremltools' bisect_model, as Apple's chunk_mlprogram)",
    )
    p.add_argument("--min-numel", type=int_in_range(0), default=2048, help="layers counted in bits/param (2048)")
    p.set_defaults(func=run)
