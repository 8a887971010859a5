"""The `workbench` command line.

Each command's work lives in its own module; this file only parses arguments and turns the errors a
user can fix into one readable line and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, OSError)


def _cmd_layers(args: argparse.Namespace) -> None:
    import pandas as pd

    from workbench.analysis import default_min_numel, load_analysis_pipeline
    from workbench.layers import compressible_layers

    pipe = load_analysis_pipeline(args.model)
    min_numel = default_min_numel(args.model) if args.min_numel is None else args.min_numel
    layers = compressible_layers(pipe.unet, min_numel=min_numel)
    if not layers:
        raise ValueError(f"no layer of {args.model}'s UNet has more than {min_numel} weights; lower --min-numel")
    rows = [
        {"layer": n, "type": type(m).__name__, "shape": tuple(m.weight.shape), "numel": m.weight.numel()}
        for n, m in layers.items()
    ]
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(pd.DataFrame(rows).to_string(index=False))


def _cmd_recipe(args: argparse.Namespace) -> None:
    from collections import Counter

    from workbench.recipes import PreAnalysis

    analysis = PreAnalysis.load(args.file)
    names = [args.name] if args.name else list(analysis.recipes)
    numels = None
    if args.model is not None:
        from workbench.layers import compressible_layers
        from workbench.pipelines import load_pipeline

        layers = compressible_layers(load_pipeline(args.model).unet, min_numel=args.min_numel)
        numels = {name: layer.weight.numel() for name, layer in layers.items()}
    print(f"{args.file}: model_version={analysis.model_version!r}, {len(analysis.recipes)} recipes")
    for name in names:
        recipe = analysis.recipe(name)
        counts = ", ".join(f"{bits}-bit: {n}" for bits, n in sorted(Counter(recipe.bits.values()).items()))
        line = f"  {name}: {len(recipe.bits)} layers ({counts})"
        if numels is not None:
            recipe.validate(numels)
            line += f"; {recipe.bits_per_param(numels):.2f} bits/param on this model"
        psnr = analysis.baselines.get(name)
        print(line + (f"; PSNR {psnr} dB" if psnr is not None else ""))


def _cmd_export(args: argparse.Namespace) -> None:
    from workbench.coreml import export_model

    components = [c.strip() for c in args.components.split(",") if c.strip()]
    report = export_model(
        args.model,
        args.out,
        recipe_file=args.recipe,
        recipe_name=args.recipe_name,
        nbits=args.nbits,
        components=components,
        min_numel=args.min_numel,
    )
    print(report.summary())
    print(f"verification report: {report.out_dir}/verification.json")


def _cmd_train(args: argparse.Namespace) -> None:
    from workbench.train import run

    run(args)


def _cmd_analyze(args: argparse.Namespace) -> None:
    import json

    import torch

    from workbench.analysis import (
        DEFAULT_PROMPTS,
        AnalysisConfig,
        default_min_numel,
        is_demo_model,
        load_analysis_pipeline,
        read_prompts,
        run_analysis,
    )

    prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    trajectory_prompts = None
    if args.trajectory and is_demo_model(args.model):
        from workbench.shapes import make_dataset

        trajectory_prompts = tuple(make_dataset(len(prompts), seed=1).captions)  # the demo model's own world
    config = AnalysisConfig(
        nbits=tuple(args.nbits),
        min_numel=default_min_numel(args.model) if args.min_numel is None else args.min_numel,
        prompts=prompts,
        seed=args.seed,
        num_recipes=args.num_recipes,
        strategies=tuple(args.strategies),
        threshold_rule=args.threshold_rule,
        group_size=args.group_size,
        trajectory=args.trajectory,
        trajectory_steps=args.trajectory_steps,
        trajectory_prompts=trajectory_prompts,
    )
    torch.set_num_threads(args.threads)  # the CLI process is ours: set once, here
    pipe = load_analysis_pipeline(args.model, device=args.device)
    result = run_analysis(pipe, config, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    print(result.recipes_frame().to_string(index=False))
    for pair in result.matched_comparison():
        print(json.dumps(pair.to_dict()))
    t = result.timing
    print(
        f"wrote {args.out}/preanalysis.json, evaluations.csv, recipes.csv, run.json, psnr_vs_size.png; "
        f"{t.evaluations} evaluations ({t.new_evaluations} new), wall {t.wall_s:.1f} s, "
        f"UNet forward {t.forward_s:.1f} s, overhead {t.overhead:.3f}"
    )


def _cmd_report(args: argparse.Namespace) -> None:
    from workbench.report import ReportConfig, run_report, select_notebooks

    config = ReportConfig(
        run=args.run,
        model=args.model,
        smoke=args.smoke,
        notebooks=select_notebooks(args.notebooks),
        out_root=args.out_root,
        threads=args.threads,
    )
    result = run_report(config)
    if not result.ok:
        failed = ", ".join(r.notebook for r in result.runs if not r.ok)
        print(
            f"workbench report: error: {failed} stopped on an error; see {config.out_dir / 'index.html'}",
            file=sys.stderr,
        )
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    from workbench import __version__

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("layers", help="list the compressible layers of a pipeline's UNet")
    p.add_argument("model", nargs="?", default=None, help="hub id, local path or tiny-sd (default: the demo model)")
    p.add_argument(
        "--min-numel", type=int, default=None, help="layers with more weights than this (default 1e5; demo: 2048)"
    )
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("recipe", help="check and summarise a recipe file (ours or the reference's JSON)")
    p.add_argument("file", help="pre-analysis or recipe JSON")
    p.add_argument("--name", default=None, help="one recipe of the file (default: all)")
    p.add_argument("--model", default=None, help="validate layer names against this pipeline's UNet")
    p.add_argument("--min-numel", type=int, default=0, help="layers counted in bits/param (default: all)")
    p.set_defaults(func=_cmd_recipe)

    p = sub.add_parser("export", help="export a pipeline to Core ML packages, palettize and verify them")
    p.add_argument("model", nargs="?", default=None, help="hub id or local path (default: the demo model)")
    p.add_argument("--out", required=True, help="folder for the .mlpackage files and verification.json")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--recipe", default=None, help="recipe JSON (ours or the reference's pre-analysis); UNet only")
    how.add_argument("--nbits", type=int, default=None, help="uniform palette width for every component's layers")
    p.add_argument("--recipe-name", default=None, help="which recipe of --recipe (default: the file's only one)")
    p.add_argument(
        "--components", default="unet", help="comma-separated: unet,text_encoder,text_encoder_2,vae_decoder"
    )
    p.add_argument("--min-numel", type=int, default=2048, help="--nbits layers: more weights than this (2048)")
    p.set_defaults(func=_cmd_export)

    # the same options as `python -m workbench.train` (workbench.train.add_arguments), kept here so that parsing
    # does not import torch
    p = sub.add_parser("train", help="train the tiny-shapes demo model and write its pipeline folder and card")
    p.add_argument("--out", default="data/models/tiny-shapes", help="pipeline folder to write")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (default: the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints here (not in the repo)")
    p.add_argument("--device", default="cpu", help="training device (default cpu)")
    p.add_argument("--no-card", action="store_true", help="skip the benchmark and README.md after training")
    p.add_argument("--card-only", action="store_true", help="only re-measure --out and rewrite its README.md")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("analyze", help="mixed-bit pre-analysis: PSNR sweeps, recipes (reference + size-aware), plot")
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local pipeline folder, or tiny-sd / tiny-sdxl (default: the demo model)",
    )
    p.add_argument("--out", required=True, help="output folder (JSON, CSV, PNG, run.json, resumable store)")
    p.add_argument("--nbits", type=int, nargs="+", default=[1, 2, 4, 6, 8], help="palette widths (default 1 2 4 6 8)")
    p.add_argument(
        "--min-numel",
        type=int,
        default=None,
        help="candidate layers have more weights than this (default: 1e5 as the reference; 2048 for the demo "
        "model and tiny-sd / tiny-sdxl, whose layers are small)",
    )
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: 8 built-in prompts)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--num-recipes", type=int, default=7, help="recipes per strategy (default 7)")
    p.add_argument("--strategies", nargs="+", default=["apple", "size-aware"], choices=["apple", "size-aware"])
    p.add_argument(
        "--threshold-rule",
        default="curves",
        choices=["curves", "reference"],
        help="apple thresholds: from the measured curves (default) or linspace(original-1, lin8+5, K)",
    )
    p.add_argument("--group-size", type=int, default=0, help="> 0: add grouped-channel palette sweeps")
    p.add_argument(
        "--trajectory",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also compare full-trajectory images of every recipe with the float model's",
    )
    p.add_argument("--trajectory-steps", type=int, default=None, help="steps for --trajectory (default: pipeline's)")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse finished evaluations of the same configuration in --out (default on)",
    )
    p.add_argument("--device", default=None, help="cpu (default), cuda, mps")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: 2 threads on a shared 2-core box contend badly)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("report", help="execute the notebooks with papermill into reports/RUN/ (HTML, figures, tables)")
    p.add_argument("--run", default="demo", help="run name: the folder under --out-root (default demo)")
    p.add_argument("--model", default="", help="hub id or pipeline folder (default: the demo model; tiny-sd: random)")
    p.add_argument("--smoke", action="store_true", help="shrink every notebook (few prompts and steps), as CI does")
    p.add_argument("--notebooks", default="", help="comma-separated notebook names or numbers (default: all)")
    p.add_argument("--out-root", default="reports", help="parent folder of the run folder (default reports)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads inside the notebooks (default 2)")
    p.set_defaults(func=_cmd_report)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("workbench: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"workbench {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
