"""The `workbench` command line.

Each command's work lives in its own module; this file parses and checks the arguments up front, and turns
the errors a user can fix (`workbench.errors.UserError`) into one line and exit status 2. Any other exception
is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from workbench.errors import InvalidValueError, UserError, is_user_error, parse_bool
from workbench.pipelines import DTYPES

EXIT_USER_ERROR = 2


class UsageError(UserError):
    """A command line argparse rejects; `prog` is the (sub)command it belongs to."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises `UsageError` (one line from `main`) instead of printing the
    usage block and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)", self.prog)


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer in [low, high] (no upper bound when `high` is None); the error names the
    value and the valid range."""
    valid = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; valid: {valid}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; valid: {valid}")
        return value

    parse.__name__ = valid  # argparse names the type in some messages
    return parse


def palette_bits(text: str) -> int:
    """An argparse `type`: a supported palette width (`workbench.palettize.SUPPORTED_NBITS`)."""
    from workbench.palettize import SUPPORTED_NBITS  # imports torch: only when --nbits is given

    valid = ", ".join(map(str, SUPPORTED_NBITS))
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer bit width; valid: {valid}") from None
    if value not in SUPPORTED_NBITS:
        raise argparse.ArgumentTypeError(f"unsupported bit width {value}; valid: {valid}")
    return value


def _candidate_layers(pipe, min_numel: int, model) -> dict:
    """The UNet's compressible layers over `min_numel` weights; a user error when there are none."""
    from workbench.layers import compressible_layers

    layers = compressible_layers(pipe.unet, min_numel=min_numel)
    if not layers:
        largest = max(m.weight.numel() for m in compressible_layers(pipe.unet, 0).values())
        name = "the demo model" if model is None else repr(str(model))
        raise InvalidValueError(
            f"no Linear/Conv2d layer in the UNet of {name} has more than --min-numel={min_numel} weights; lower it "
            f"(the largest layer has {largest})"
        )
    return layers


def _cmd_layers(args: argparse.Namespace) -> None:
    import pandas as pd

    from workbench.pipelines import default_min_numel, load_pipeline

    pipe = load_pipeline(args.model, device="cpu", progress=False)
    min_numel = default_min_numel(args.model) if args.min_numel is None else args.min_numel
    layers = _candidate_layers(pipe, min_numel, args.model)
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

        layers = compressible_layers(load_pipeline(args.model, device="cpu").unet, min_numel=args.min_numel)
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


def _cmd_export(args: argparse.Namespace) -> None:
    from workbench.coreml import COMPONENTS, export_model

    if args.recipe_name is not None and args.recipe is None:
        raise InvalidValueError("--recipe-name needs --recipe FILE")
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise InvalidValueError(f"--components={args.components!r}: unknown {unknown}; valid: {', '.join(COMPONENTS)}")
    report = export_model(
        args.model,
        args.out,
        recipe_file=args.recipe,
        recipe_name=args.recipe_name,
        nbits=args.nbits,
        components=components,
        min_numel=args.min_numel,
        layers=tuple(args.layers),
        exclude=tuple(args.exclude),
        layout=args.layout,
        importance_file=args.importance,
    )
    print(report.summary())
    print(f"verification report: {report.out_dir}/verification.json")
    if args.layout == "apple":
        from workbench.coreml.layout import COMPILE_SCRIPT

        print(f"on a Mac: sh {report.out_dir}/{COMPILE_SCRIPT}  (compiles the packages into the Swift resources)")


def _cmd_apply(args: argparse.Namespace) -> None:
    from workbench.coreml.apply import apply_model

    report = apply_model(
        args.package,
        args.out,
        recipe_file=args.recipe,
        recipe_name=args.recipe_name,
        model=args.model,
        min_numel=args.min_numel,
    )
    print(report.summary())
    print(f"verification report: {report.out_dir}/verification.json")


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


def _cmd_train(args: argparse.Namespace) -> None:
    from workbench.pipelines import DEMO_MODEL
    from workbench.train import TrainConfig, run

    check_overrides(args.set, TrainConfig)
    args.out = str(DEMO_MODEL) if args.out is None else args.out
    run(args)


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
    from workbench.ray_executor import RayExecutor

    return RayExecutor(args.model, args.workers, address=args.ray_address, device=device, dtype=dtype,
                       threads=args.threads)  # fmt: skip


def _cmd_analyze(args: argparse.Namespace) -> None:
    import json

    import torch

    from workbench.analysis import DEFAULT_PROMPTS, AnalysisConfig, run_analysis
    from workbench.io import read_prompts
    from workbench.layers import select_layers
    from workbench.pipelines import default_min_numel, is_demo_model, load_pipeline, model_dtype, pick_device

    try:
        prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    except (OSError, ValueError) as err:  # the prompts file the user named: missing, unreadable or empty
        raise InvalidValueError(str(err)) from err
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
        size_aware_targets=tuple(args.targets),
        refine_rounds=args.refine_rounds,
        data_aware=args.data_aware,
        threshold_rule=args.threshold_rule,
        group_size=args.group_size,
        trajectory=args.trajectory,
        trajectory_steps=args.trajectory_steps,
        trajectory_prompts=trajectory_prompts,
        layers=tuple(args.layers),
        exclude=tuple(args.exclude),
        sweep=args.sweep,
    )
    torch.set_num_threads(args.threads)  # the CLI process is ours: set once, here
    device = pick_device(args.device)
    dtype = model_dtype(device, args.dtype)
    with _ray_executor(args, device.type, dtype) as executor:  # first: its workers load while this process does
        pipe = load_pipeline(args.model, device=device, dtype=dtype, progress=False)
        layers = select_layers(_candidate_layers(pipe, config.min_numel, args.model), config.layers, config.exclude)
        misfits = sorted({m.weight.shape[0] for m in layers.values()} if args.group_size else ())
        misfits = [c for c in misfits if c % args.group_size]
        if misfits:
            raise InvalidValueError(
                f"--group-size={args.group_size} does not divide the output channels "
                f"{', '.join(map(str, misfits))} of the candidate layers"
            )
        result = run_analysis(pipe, config, args.out, resume=args.resume, progress=not args.quiet, executor=executor)
    print(result.recipes_frame().to_string(index=False))
    for pair in result.matched_comparison():
        print(json.dumps(pair.to_dict()))
    if result.fast is not None:
        f = result.fast
        held_out = ", ".join(f"{b}-bit {v:.1f}" for b, v in f.held_out_db.items())
        print(
            f"fast sweep: {f.measured_points} isolated points measured, {f.predicted_points} predicted; held-out "
            f"error (dB) {held_out}; {len(f.checks)} checks, mean abs error {f.check_error_db:.2f} dB"
        )
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


def _add_layers(sub) -> None:
    p = sub.add_parser("layers", help="list the compressible layers of a pipeline's UNet")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument(
        "--min-numel",
        type=int_in_range(0),
        default=None,
        help="layers with more weights than this (default 1e5; demo model and tiny-sd / tiny-sdxl: 2048)",
    )
    p.set_defaults(func=_cmd_layers)


def _add_recipe(sub) -> None:
    p = sub.add_parser("recipe", help="check and summarise a recipe file (ours or the reference's JSON)")
    p.add_argument("file", help="pre-analysis or recipe JSON")
    p.add_argument("--name", default=None, help="one recipe of the file (default: all)")
    p.add_argument("--model", default=None, help="validate layer names against this pipeline's UNet")
    p.add_argument("--min-numel", type=int_in_range(0), default=0, help="layers counted in bits/param (default: all)")
    p.set_defaults(func=_cmd_recipe)


def _add_layer_patterns(p) -> None:
    """--layers / --exclude: UNet layer globs (fnmatch, `*` spans dots), as `workbench.layers.select_layers`."""
    p.add_argument(
        "--layers", nargs="+", default=[], metavar="GLOB", help="only UNet layers matching, e.g. 'mid_block.*'"
    )
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="leave out UNet layers matching these")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a pipeline to Core ML packages, palettize and verify them")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
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
    _add_layer_patterns(p)
    _add_layout(p)
    p.set_defaults(func=_cmd_export)


def _add_layout(p) -> None:
    """--layout: the exported packages' inputs, outputs and names (`workbench.coreml.layout`)."""
    p.add_argument(
        "--layout",
        choices=("apple", "workbench"),
        default="apple",
        help="apple (default): the packages Apple's Swift StableDiffusion pipeline and apps load (Unet.mlpackage, "
        "...), with vocab.json, merges.txt and compile_for_swift.sh; workbench: <component>.mlpackage, int32 ids",
    )


def _add_apply(sub) -> None:
    p = sub.add_parser(
        "apply", help="palettize an existing float16 Core ML UNet package with a recipe (weights matched by content)"
    )
    p.add_argument("package", help="the float16 UNet .mlpackage (e.g. Unet.mlpackage from torch2coreml or export)")
    p.add_argument("--recipe", required=True, help="recipe JSON (ours or the reference's pre-analysis)")
    p.add_argument("--recipe-name", default=None, help="which recipe of --recipe (default: the file's only one)")
    p.add_argument("--model", default=None, help="the pipeline the package was converted from; " + MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the palettized package (same file name) and its report")
    p.add_argument("--min-numel", type=int_in_range(0), default=2048, help="layers counted in bits/param (2048)")
    p.set_defaults(func=_cmd_apply)


def _add_train(sub) -> None:
    # the same options as `python -m workbench.train` (workbench.train.add_arguments), kept here so that parsing
    # does not import torch
    p = sub.add_parser("train", help="train the tiny-shapes demo model and write its pipeline folder and card")
    p.add_argument("--out", default=None, help="pipeline folder to write (default: the demo model's own folder)")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields (default: the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints here (not in the repo)")
    p.add_argument("--device", default="cpu", help="training device (default cpu)")
    p.add_argument("--no-card", action="store_true", help="skip the benchmark and README.md after training")
    p.add_argument("--card-only", action="store_true", help="only re-measure --out and rewrite its README.md")
    p.set_defaults(func=_cmd_train)


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="mixed-bit pre-analysis: PSNR sweeps, recipes (reference + size-aware), plot")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
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
    p.add_argument("--num-recipes", type=int_in_range(1), default=7, help="recipes per strategy (default 7)")
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
        "every layer at one width, a few at all, the rest predicted and checked (~7x fewer UNet evaluations)",
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
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse finished evaluations of the same configuration in --out (default on)",
    )
    _add_layer_patterns(p)
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_analyze)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="execute the notebooks with papermill into reports/RUN/ (HTML, figures, tables)")
    p.add_argument("--run", default="demo", help="run name: the folder under --out-root (default demo)")
    p.add_argument("--model", default="", help='as MODEL of the other commands (default "": the demo model)')
    p.add_argument("--smoke", action="store_true", help="shrink every notebook (few prompts and steps), as CI does")
    p.add_argument("--notebooks", default="", help="comma-separated notebook names or numbers (default: all)")
    p.add_argument("--out-root", default="reports", help="parent folder of the run folder (default reports)")
    p.add_argument("--threads", type=int_in_range(1), default=2, help="torch CPU threads in the notebooks (default 2)")
    p.set_defaults(func=_cmd_report)


MODEL_HELP = "hub id (local cache only), pipeline folder, or tiny-sd / tiny-sdxl (default: the demo model)"


def build_parser() -> argparse.ArgumentParser:
    from workbench import __version__

    parser = _Parser(prog="workbench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_layers, _add_recipe, _add_export, _add_apply, _add_train, _add_analyze, _add_report):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `workbench` command line; returns the exit status.

    A `UserError` (a bad option, a missing model, a recipe naming unknown layers) becomes one line on stderr and
    exit status 2. Any other exception propagates with its traceback (a bug; exit status 1 from Python).
    """
    parser = build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        command = args.command
        args.func(args)
    except KeyboardInterrupt:
        print("workbench: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        prog = err.prog if isinstance(err, UsageError) else f"workbench {command}"
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
