"""`workbench tune`: learned LUTs for a recipe (`workbench.tune.learn.tune_luts`): the recipe's post-training
palettes, their indices kept and their LUT values fitted to the float UNet's output; writes the palettes
(`palettes.npz`) that `workbench export --palettes` stores as given, their recipe and the run's record.

The options are the fields of `TuneConfig`; they, the recipe file and the importances are checked before the
pipeline loads.
"""

from __future__ import annotations

import argparse

from workbench.cli.common import (
    MODEL_HELP,
    add_model_options,
    candidate_layers,
    int_in_range,
    model_spec,
    palette_bits,
)
from workbench.errors import InvalidValueError
from workbench.tune.config import LOSSES, TuneConfig


def _config(args: argparse.Namespace) -> TuneConfig:
    fields = ("steps", "lr", "prompts", "timesteps", "sampling_steps", "resolution", "batch", "chunk", "loss")
    fields += ("eval_every", "seed")
    return TuneConfig(**{f: getattr(args, f) for f in fields}, checkpointing=args.checkpointing)


def run(args: argparse.Namespace) -> None:
    import torch

    from workbench.models.loader import load_pipeline
    from workbench.palettes.given import GivenPalettes
    from workbench.palettes.importance import Importance
    from workbench.recipes.recipe import load_recipe
    from workbench.threads import torch_threads
    from workbench.tune.learn import calibration_prompts, tune_luts

    if args.recipe_name is not None and args.recipe is None:
        raise InvalidValueError("--recipe-name needs --recipe FILE")
    config = _config(args)
    recipe = None if args.recipe is None else load_recipe(args.recipe, args.recipe_name)
    importance = None if args.importance is None else Importance.load(args.importance)
    model = model_spec(args.model, args)
    with torch_threads(args.threads):
        pipe = load_pipeline(model, device="cpu", dtype=torch.float32, progress=False)
        pipe.set_progress_bar_config(disable=True)
        if recipe is None:
            bits = dict.fromkeys(candidate_layers(pipe, args.min_numel, model), args.nbits)
            name = f"uniform_{args.nbits}bit"
        else:
            bits, name = dict(recipe.validate(list(candidate_layers(pipe, 0, model))).bits), recipe.name
        if recipe is not None and recipe.needs_importance and importance is None:
            raise InvalidValueError(f"recipe {recipe.name!r} has data-aware palettes: pass --importance FILE")
        start = GivenPalettes.fit(pipe.unet, bits, importance)
        result = tune_luts(pipe, config=config, start=start, prompts=calibration_prompts(model, config.prompts))
    path = result.save(args.out, recipe_name=f"{name}_tuned", source=str(model or "demo"), recipe=name)
    print(
        f"tuned {len(result.palettes)} LUTs ({result.palettes.bits_per_param():.2f} bits/param over them): "
        f"calibration loss {result.start_loss:.4g} -> {result.loss:.4g} ({result.gain_db:+.2f} dB, step "
        f"{result.best_step}) in {result.seconds:.0f} s"
    )
    print(f"palettes: {path}  (export them: workbench export --palettes {path} --out DIR)")


def add_parser(sub) -> None:
    d = TuneConfig()
    p = sub.add_parser("tune", help="learn a recipe's LUT values by distillation from the float UNet (learned LUTs)")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_model_options(p)
    p.add_argument("--out", required=True, help="folder for palettes.npz, recipe.json and tune.json")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--recipe", default=None, help="recipe JSON (ours or the reference's pre-analysis)")
    how.add_argument("--nbits", type=palette_bits, default=None, help="uniform width over the candidate layers")
    p.add_argument("--recipe-name", default=None, help="which recipe of --recipe (default: the file's only one)")
    p.add_argument("--importance", default=None, help="the analysis' importance.npz, for data-aware palettes")
    p.add_argument("--min-numel", type=int_in_range(0), default=2048, help="--nbits layers: more weights (2048)")
    p.add_argument("--steps", type=int_in_range(0), default=d.steps, help=f"Adam steps ({d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"step size relative to each layer's weight RMS ({d.lr})")
    p.add_argument("--prompts", type=int_in_range(1), default=d.prompts, help=f"calibration prompts ({d.prompts})")
    p.add_argument("--timesteps", type=int_in_range(1), default=d.timesteps, help="calibration timesteps per prompt")
    p.add_argument("--sampling-steps", type=int_in_range(1), default=None, help="calibration trajectories' steps")
    p.add_argument("--resolution", type=int_in_range(8), default=None, help="calibration images' side (pixels)")
    p.add_argument("--batch", type=int_in_range(1), default=d.batch, help=f"samples per step ({d.batch})")
    p.add_argument("--chunk", type=int_in_range(1), default=None, help="samples per forward/backward (memory)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss, help=f"what is compared ({d.loss})")
    p.add_argument("--eval-every", type=int_in_range(1), default=d.eval_every, help="steps between evaluations")
    p.add_argument("--seed", type=int_in_range(0), default=d.seed, help=f"calibration and batch seed ({d.seed})")
    p.add_argument("--checkpointing", action="store_true", help="the UNet's gradient checkpointing (large UNets)")
    p.add_argument("--threads", type=int_in_range(1), default=1, help="torch threads (1)")
    p.set_defaults(func=run)
