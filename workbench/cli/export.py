"""`workbench export`: a pipeline to palettized, verified Core ML packages (`workbench.coreml.export_model`).

The options become an `ExportConfig`; the recipe file is read (and its entries checked) before the pipeline
loads, and a recipe naming layers the model lacks fails before anything is converted or written.
"""

from __future__ import annotations

import argparse

from workbench.cli.common import (
    MODEL_HELP,
    add_layer_patterns,
    add_layout,
    add_model_options,
    float_in_range,
    int_in_range,
    model_spec,
    palette_bits,
)
from workbench.errors import InvalidValueError


def run(args: argparse.Namespace) -> None:
    from workbench.coreml import COMPONENTS, ExportConfig, export_model

    if args.recipe_name is not None and args.recipe is None:
        raise InvalidValueError("--recipe-name needs --recipe FILE")
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise InvalidValueError(f"--components={args.components!r}: unknown {unknown}; valid: {', '.join(COMPONENTS)}")
    config = ExportConfig(
        nbits=args.nbits,
        components=tuple(components),
        min_numel=args.min_numel,
        layers=tuple(args.layers),
        exclude=tuple(args.exclude),
        layout=args.layout,
        chunk_unet=args.chunk_unet,
        piece_bytes=None if args.piece_gb is None else int(args.piece_gb * 1e9),
    )
    report = export_model(
        model_spec(args.model, args),
        args.out,
        config,
        recipe_file=args.recipe,
        recipe_name=args.recipe_name,
        importance_file=args.importance,
        palettes_file=args.palettes,
    )
    print(report.summary())
    print(f"verification report: {report.out_dir}/verification.json")
    if args.layout == "apple":
        from workbench.coreml.layout import COMPILE_SCRIPT

        print(f"on a Mac: sh {report.out_dir}/{COMPILE_SCRIPT}  (compiles the packages into the Swift resources)")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a pipeline to Core ML packages, palettize and verify them")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_model_options(p)
    p.add_argument("--out", required=True, help="folder for the .mlpackage files and verification.json")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--recipe", default=None, help="recipe JSON (ours or the reference's pre-analysis); UNet only")
    how.add_argument("--nbits", type=palette_bits, default=None, help="uniform palette width for every component")
    p.add_argument("--recipe-name", default=None, help="which recipe of --recipe (default: the file's only one)")
    p.add_argument(
        "--components", default="unet", help="comma-separated: unet,text_encoder,text_encoder_2,vae_decoder"
    )
    p.add_argument("--min-numel", type=int_in_range(0), default=2048, help="--nbits layers: more weights (2048)")
    p.add_argument(
        "--importance", default=None, help="the analysis' importance.npz, for recipes with data-aware palettes"
    )
    p.add_argument(
        "--palettes",
        default=None,
        help="given palettes (workbench tune's palettes.npz) stored as they are; alone: with their own recipe",
    )
    p.add_argument(
        "--chunk-unet",
        action="store_true",
        help="write the UNet as UnetChunk1 + UnetChunk2 (about equal halves), as Apple's Swift pipeline loads on iOS",
    )
    p.add_argument(
        "--piece-gb",
        type=float_in_range(0.01),
        default=None,
        help="the most float32 UNet weights converted at once, in GB (1.5): export memory follows it",
    )
    add_layer_patterns(p)
    add_layout(p)
    p.set_defaults(func=run)
