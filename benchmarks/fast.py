"""Benchmark the fast sweep against the exhaustive one: UNet evaluations, wall time, and the recipes' quality.

In one process, on the demo model and then on the tiny SDXL pipeline, fresh (no store, no palette cache shared):

1. the exhaustive analysis (`sweep="exhaustive"`, strategies apple and size-aware: the reference's method and the
   knapsack on it, the reference's settings: 8 prompts, widths 1 2 4 6 8), with the reference rule's largest
   recipe within each of 2.5 3.0 3.5 4.0 4.5 bits/param;
2. the fast analysis (`sweep="fast"`, strategies size-aware and refined, as `workbench analyze --sweep fast` runs
   them) targeting the bits/param of those five apple recipes.

The tiny SDXL pipeline is slower per evaluation than the demo model on a CPU; it runs on 2 of the 8 prompts
(`--tiny-prompts`), which changes neither run's number of evaluations.

At each of the five sizes it compares the re-measured one-step PSNR of the fast run's recipe (the refined one;
the knapsack's on the fast curves is printed too) with the exhaustive size-aware recipe (`delta`) and with Apple's
rule (`vs_apple`). Both runs re-measure their recipes end to end, so these are measurements, not predictions.
UNet evaluations count every UNet call (a refinement's gradient counts one, a forward with backward, which costs
about three forwards: the wall-time ratio charges that), so the ratios charge the fast run for its refinement.

The last line starts `eval_ratio=A wall_ratio=B mean_delta_db=C worst_vs_apple_db=D` (demo model), then the same
for tiny SDXL and the fast sweep's validation errors. Example:
    .venv/bin/python benchmarks/fast.py
"""

from __future__ import annotations

import argparse
import math

import numpy as np

SIZES = (2.5, 3.0, 3.5, 4.0, 4.5)


def compare(model, threads: int, prompts: int | None = None) -> dict:
    """Run both analyses on `model` (the first `prompts` built-in prompts; None: all 8) and return the figures of
    one row of the last line."""
    from workbench.analysis.config import DEFAULT_PROMPTS, AnalysisConfig
    from workbench.analysis.run import run_analysis
    from workbench.models.loader import default_min_numel, load_pipeline
    from workbench.threads import torch_threads

    with torch_threads(threads):
        pipe = load_pipeline(model, device="cpu", progress=False)
        base = AnalysisConfig(min_numel=default_min_numel(model), prompts=DEFAULT_PROMPTS[:prompts],
                              strategies=("apple", "size-aware"), size_aware_targets=SIZES)  # fmt: skip
        full = run_analysis(pipe, base, progress=True)
        apple = [max((r for r in full.recipes if r.strategy == "apple" and r.bits_per_param <= t + 1e-9),
                     key=lambda r: r.bits_per_param) for t in SIZES]  # fmt: skip
        targets = tuple(round(r.bits_per_param, 6) for r in apple)
        fast_config = AnalysisConfig(min_numel=base.min_numel, prompts=base.prompts, sweep="fast",
                                     strategies=("size-aware", "refined"), size_aware_targets=targets)  # fmt: skip
        fast = run_analysis(pipe, fast_config, progress=True)
    rows = []
    for ref, t in zip(apple, targets):
        ex = next(r for r in full.recipes if r.strategy == "size-aware" and r.selector == t)
        knapsack = next(r for r in fast.recipes if r.strategy == "size-aware" and r.selector == t)
        fa = next(r for r in fast.recipes if r.strategy == "refined" and r.selector == t)
        rows.append((t, ref.psnr_mean, ex.psnr_mean, fa.psnr_mean, fa.bits_per_param))
        print(f"  {t:.2f} b/p: apple {ref.psnr_mean:6.2f} | exhaustive size-aware {ex.psnr_mean:6.2f} "
              f"({ex.bits_per_param:.3f}) | fast {fa.psnr_mean:6.2f} ({fa.bits_per_param:.3f}; knapsack alone "
              f"{knapsack.psnr_mean:.2f}) | delta {fa.psnr_mean - ex.psnr_mean:+.2f} | vs apple "
              f"{fa.psnr_mean - ref.psnr_mean:+.2f}")  # fmt: skip
    report = fast.fast
    print(f"  evaluations: exhaustive {full.timing.unet_evaluations}, fast {fast.timing.unet_evaluations}; wall "
          f"{full.timing.wall_s:.1f} s vs {fast.timing.wall_s:.1f} s; held-out error per width (dB) "
          f"{ {b: round(v, 2) for b, v in report.held_out_db.items()} }; checks {len(report.checks)}, mean abs "
          f"error {report.check_error_db:.2f} dB; recipe prediction error (dB) "
          f"{ {k: round(v, 2) for k, v in report.recipe_errors_db.items()} }")  # fmt: skip
    return {
        "eval_ratio": full.timing.unet_evaluations / fast.timing.unet_evaluations,
        "wall_ratio": full.timing.wall_s / fast.timing.wall_s,
        "mean_delta_db": float(np.mean([fa - ex for _, _, ex, fa, _ in rows])) if rows else math.nan,
        "worst_vs_apple_db": min((fa - ap for _, ap, _, fa, _ in rows), default=math.nan),
        "sizes": len(rows),
        "check_error_db": report.check_error_db,
        "recipe_error_db": float(np.mean(np.abs(list(report.recipe_errors_db.values())))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; palette fits use the rest)")
    parser.add_argument("--models", nargs="+", default=["demo", "tiny-sdxl"], help="demo and/or builtin names")
    parser.add_argument("--tiny-prompts", type=int, default=2, help="prompts for the tiny pipelines (default 2 of 8)")
    args = parser.parse_args()
    from workbench.palettes.kmeans import kmeans_float16

    kmeans_float16(np.arange(64, dtype=np.float16), 4)  # compile the numba solver before either run is timed
    figures = {}
    for name in args.models:
        print(f"{name}:")
        demo = name == "demo"
        figures[name] = compare(None if demo else name, args.threads, None if demo else args.tiny_prompts)
    parts = []
    for i, (name, f) in enumerate(figures.items()):
        tag = "" if i == 0 else f"{name}_"
        parts += [f"{tag}eval_ratio={f['eval_ratio']:.2f}", f"{tag}wall_ratio={f['wall_ratio']:.2f}",
                  f"{tag}mean_delta_db={f['mean_delta_db']:+.2f}",
                  f"{tag}worst_vs_apple_db={f['worst_vs_apple_db']:+.2f}"]  # fmt: skip
    for name, f in figures.items():
        parts += [f"{name}_sizes={f['sizes']}", f"{name}_check_error_db={f['check_error_db']:.2f}",
                  f"{name}_recipe_error_db={f['recipe_error_db']:.2f}"]  # fmt: skip
    print(" ".join(parts))


if __name__ == "__main__":
    main()
