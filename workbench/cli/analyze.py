"""`workbench analyze`: the mixed-bit pre-analysis of a model (`workbench.analysis.run.run_analysis`)."""

from __future__ import annotations

import argparse

from workbench.cli.common import (
    MODEL_HELP,
    add_layer_patterns,
    add_model_options,
    float_in_range,
    int_in_range,
    model_spec,
    palette_bits,
)
from workbench.errors import InvalidValueError
from workbench.models.loader import DTYPES


def _ray_executor(args: argparse.Namespace, device: str, dtype):
    """`--workers N` (and `--ray-address`): a `RayExecutor` to enter; without: a context that gives None."""
    import contextlib

    if not args.workers:
        if args.ray_address:
            raise InvalidValueError(f"--ray-address={args.ray_address} needs --workers N (N >= 1)")
        return contextlib.nullcontext()
    if getattr(args, "data_aware", False):  # before any worker starts
        raise InvalidValueError(f"--data-aware runs in one process (its importances are this process'); drop "
                                f"--workers {args.workers}")  # fmt: skip
    from workbench.sweep.ray_executor import RayExecutor

    return RayExecutor(args.model, args.workers, address=args.ray_address, device=device, dtype=dtype,
                       threads=args.threads)  # fmt: skip


def run(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    import torch

    from workbench.analysis.config import DEFAULT_PROMPTS, AnalysisConfig, config_for_model
    from workbench.analysis.run import run_analysis
    from workbench.io import read_prompts
    from workbench.models.loader import load_pipeline, model_dtype, pick_device

    try:
        prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    except (OSError, ValueError) as err:  # the prompts file the user named: missing, unreadable or empty
        raise InvalidValueError(str(err)) from err
    args.model = model_spec(args.model, args)  # a single-file checkpoint with its --config / --allow-pickle
    names = {f.name for f in dataclasses.fields(AnalysisConfig)}  # the options are named as the config's fields
    options = {k: v for k, v in vars(args).items() if k in names} | {"prompts": prompts}
    config = config_for_model(args.model, **options, resolution=args.resolution)
    torch.set_num_threads(args.threads)  # the CLI process is ours: set once, here
    device = pick_device(args.device)
    dtype = model_dtype(device, args.dtype)
    with _ray_executor(args, device.type, dtype) as executor:  # first: its workers load while this process does
        pipe = load_pipeline(args.model, device=device, dtype=dtype, progress=False)
        result = run_analysis(pipe, config, args.out, resume=args.resume, progress=not args.quiet, executor=executor)
    print(result.recipes_frame().to_string(index=False))
    for pair in result.matched_comparison():
        print(json.dumps(pair.to_dict()))
    if result.fast is not None:
        print(f"fast sweep: {result.fast.summary()}")
    t = result.timing
    print(
        f"wrote {args.out}/preanalysis.json, evaluations.csv, recipes.csv, run.json, psnr_vs_size.png; "
        f"{t.evaluations} evaluations ({t.new_evaluations} new), wall {t.wall_s:.1f} s, "
        f"UNet forward {t.forward_s:.1f} s, overhead {t.overhead:.3f}"
    )


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="mixed-bit pre-analysis: PSNR sweeps, recipes (reference + size-aware), plot")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_model_options(p)
    p.add_argument("--out", required=True, help="output folder (JSON, CSV, PNG, run.json, resumable store)")
    p.add_argument("--nbits", type=palette_bits, nargs="+", default=[1, 2, 4, 6, 8], help="widths (default 1 2 4 6 8)")
    p.add_argument(
        "--min-numel",
        type=int_in_range(0),
        default=None,
        help="candidate layers have more weights than this (default: 1e5 as the reference; 2048 for the demo "
        "model and tiny-sd / tiny-sdxl, whose layers are small)",
    )
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: 8 built-in prompts)")
    p.add_argument("--seed", type=int_in_range(0), default=0, help="generator seed (default 0)")
    p.add_argument(
        "--resolution",
        type=int_in_range(8),
        default=None,
        metavar="PX",
        help="square image size the analysis measures at, a multiple of 8 (default: the pipeline's own, e.g. 512 "
        "for SD-1.5, 1024 for SDXL; the reference uses 768; smaller is faster on a CPU)",
    )
    p.add_argument("--num-recipes", type=int_in_range(1), default=7, help="recipes per strategy (default 7)")
    _add_strategies(p)
    _add_execution(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _add_strategies(p: argparse.ArgumentParser) -> None:
    """The options that decide the recipes: strategies, sizes, refinement, sweep, trajectories."""
    p.add_argument(
        "--strategies",
        nargs="+",
        default=["apple", "size-aware", "refined"],
        choices=["apple", "size-aware", "refined"],
        help="apple: the reference's threshold rule; size-aware: the knapsack; refined: the knapsack's recipes "
        "refined where layers interact (default: all three)",
    )
    p.add_argument(
        "--targets",
        dest="size_aware_targets",
        type=float,
        nargs="+",
        default=[],
        help="extra sizes in bits/param: the reference rule's largest recipe within each, and the other strategies' "
        "recipes at its size",
    )
    p.add_argument(
        "--refine-rounds", type=int_in_range(1), default=4, help="refined: linearisations per recipe (default 4)"
    )
    p.add_argument(
        "--refine-min-gain",
        type=float_in_range(0),
        default=None,
        metavar="DB",
        help="refined: dB a round must gain for another to follow (default 0.1; 0: while anything is gained)",
    )
    p.add_argument(
        "--refine-evaluations",
        type=int_in_range(1),
        default=None,
        metavar="N",
        help="refined: candidates measured at most in all, shared evenly by the recipes (default: no cap)",
    )
    p.add_argument(
        "--data-aware",
        action="store_true",
        help="refined recipes may give a layer its width's data-aware palette (same size, iOS17); writes "
        "importance.npz, which export --importance needs",
    )
    p.add_argument(
        "--threshold-rule",
        default="curves",
        choices=["curves", "reference"],
        help="apple thresholds: from the measured curves (default) or linspace(original-1, lin8+5, K)",
    )
    p.add_argument("--group-size", type=int_in_range(0), default=0, help="> 0: add grouped-channel palette sweeps")
    p.add_argument(
        "--sweep",
        default="exhaustive",
        choices=["exhaustive", "fast"],
        help="exhaustive: every layer at every width and the cumulative curves (the reference's method); fast: "
        "every layer at one width, a few at all, the rest predicted and checked (far fewer UNet evaluations)",
    )
    p.add_argument(
        "--trajectory",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also compare full-trajectory images of every recipe with the float model's",
    )
    p.add_argument(
        "--trajectory-steps",
        type=int_in_range(1),
        default=None,
        help="steps for --trajectory (default: the pipeline's)",
    )


def _add_execution(p: argparse.ArgumentParser) -> None:
    """The options that decide where and how the analysis runs, not what it measures."""
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse finished evaluations of the same configuration in --out (default on)",
    )
    add_layer_patterns(p)
    p.add_argument(
        "--device", default=None, help="cuda, cuda:N, mps or cpu (default: the best here, cuda > mps > cpu)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="UNet dtype (default auto: float16 on cuda/mps, float32 on cpu); metrics are float64 either way",
    )
    p.add_argument(
        "--threads",
        type=int_in_range(1),
        default=1,
        help="torch CPU threads (default 1: 2 threads on a shared 2-core box contend badly)",
    )
    p.add_argument(
        "--workers",
        type=int_in_range(0),
        default=0,
        help="Ray workers, each loading the pipeline on its own device (one GPU each on cuda, --threads torch "
        "threads each on cpu); default 0: in this process",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster (auto, or ray://HOST:10001) instead of starting a local runtime; needs --workers",
    )
