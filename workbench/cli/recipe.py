"""`workbench recipe`: list the recipes of a pre-analysis file, or check one against a model."""

from __future__ import annotations

import argparse

from workbench.cli.common import add_model_options, int_in_range, model_spec


def run(args: argparse.Namespace) -> None:
    from collections import Counter

    from workbench.recipes.recipe import PreAnalysis

    analysis = PreAnalysis.load(args.file)
    names = [args.name] if args.name else list(analysis.recipes)
    numels, model = None, model_spec(args.model, args)
    if model is not None:
        from workbench.models.layers import compressible_layers
        from workbench.models.loader import load_pipeline

        layers = compressible_layers(load_pipeline(model, device="cpu").unet, min_numel=args.min_numel)
        numels = {name: layer.weight.numel() for name, layer in layers.items()}
    print(f"{args.file}: model_version={analysis.model_version!r}, {len(analysis.recipes)} recipes")
    for name in names:
        recipe = analysis.recipe(name)
        entries = sorted(
            Counter(recipe.bits.values()).items(), key=lambda e: (isinstance(e[0], str), str(e[0]).zfill(3))
        )
        counts = ", ".join(f"{e}-bit: {n}" if isinstance(e, int) else f"{e}: {n}" for e, n in entries)
        line = f"  {name}: {len(recipe.bits)} layers ({counts}), {recipe.target}"
        if numels is not None:
            recipe.validate(numels)
            line += f"; {recipe.bits_per_param(numels):.2f} bits/param on this model"
        psnr = analysis.baselines.get(name)
        print(line + (f"; PSNR {psnr} dB" if psnr is not None else ""))


def add_parser(sub) -> None:
    p = sub.add_parser("recipe", help="check and summarise a recipe file (ours or the reference's JSON)")
    p.add_argument("file", help="pre-analysis or recipe JSON")
    p.add_argument("--name", default=None, help="one recipe of the file (default: all)")
    p.add_argument("--model", default=None, help="validate layer names against this pipeline's UNet")
    add_model_options(p)
    p.add_argument("--min-numel", type=int_in_range(0), default=0, help="layers counted in bits/param (default: all)")
    p.set_defaults(func=run)
