"""Better recipes at the same size: the reference's rule vs the workbench's strategies, one-step and full sampling.

One run on the demo model (8 COCO prompts, CFG, seed 0, widths 1 2 4 6 8, its 180 candidates):

1. `run_analysis` with targets 2.5 3.0 3.5 4.0 4.5 bits/param: the reference rule ("apple") gives its largest
   recipe within each target; the size-aware knapsack and the "refined" strategy (`workbench.recipes.refine`) give
   theirs
   at exactly that recipe's bits/param; every recipe re-measured end to end (one-step latent PSNR);
2. "+ data-aware" (iOS17, the same bytes): the refined recipe with each layer free to take its width's plain or
   data-aware palette (`wkmeans`, input-channel importance), chosen by `refine_recipe` and measured;
3. "+ grouped" (iOS18): each layer free among every width's plain, data-aware and grouped (16 output channels per
   LUT) palettes and float16, under the reference recipe's exact stored bytes (every LUT counted), from the
   refined recipe by `refine_recipe`; the distortion of options the sweep did not measure is the measured
   same-width one scaled by the importance-weighted weight error (`palette_error`);
4. full sampling: images of the float model and of each size's recipes from the demo's own captions (seeds
   matched, the pipeline's default steps), image PSNR against the float model's images and adherence;
5. coremltools' `SKMPalettizer` at uniform 4 and 6 bits (`workbench.analysis.skm.compare_with_skm`) vs the workbench at
   the same uniform width: per layer the plain or the data-aware palette, chosen by `refine_recipe`.

The gain at a size is the best workbench recipe at that size (size-aware, refined, + data-aware; + grouped only if
its bytes are not above the reference's) minus the reference rule's recipe, one-step PSNR. The last line:

    gain_2.5=a gain_3.0=b gain_3.5=c gain_4.0=d gain_4.5=e mean_gain=m image_not_worse=B skm4_delta=s ...

    .venv/bin/python benchmarks/palettes.py [--out reports/palettes-bench] [--threads 2]

Measured (this 2-core CPU, 2 torch threads, 561 s with the analysis resumed from its store; 164 s of it the
analysis' recipes and refinement, 90 s full sampling, SKM about 200 s):

    2.5 b/p: best +data-aware 43.62 vs apple 38.96 (gain +4.66 dB) | image PSNR apple 29.33, best 31.31
    3.0 b/p: best +data-aware 48.06 vs apple 42.15 (gain +5.91 dB) | image PSNR apple 32.03, best 44.16
    3.5 b/p: best +grouped 50.52 vs apple 45.35 (gain +5.17 dB) | image PSNR apple 34.28, best 44.95
    4.0 b/p: best refined 52.67 vs apple 50.66 (gain +2.01 dB) | image PSNR apple 45.52, best 46.76
    4.5 b/p: best +data-aware 57.94 vs apple 54.83 (gain +3.11 dB) | image PSNR apple 47.69, best 51.88
    uniform 4-bit: SKM 41.56 | plain k-means 40.38 | plain or data-aware per layer 44.26 | delta +2.70
    uniform 6-bit: SKM 52.59 | plain k-means 52.09 | plain or data-aware per layer 56.39 | delta +3.80
    gain_2.5=4.66 gain_3.0=5.91 gain_3.5=5.17 gain_4.0=2.01 gain_4.5=3.11 mean_gain=4.17 image_not_worse=True
    skm4_delta=2.70 skm6_delta=3.80
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SIZES = (2.5, 3.0, 3.5, 4.0, 4.5)
GROUP = 16


def _image_psnr(trajectory) -> float:
    """Mean image PSNR over the prompts (identical images, inf, left out; inf if all are identical)."""
    finite = [v for v in trajectory.image_psnr if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("inf")


def _options_ios18(layer, numel: int, widths) -> dict:
    """Every width's plain, data-aware and grouped palette, and float16, by stored bytes."""
    from workbench.palettes.config import FLOAT_BITS, PaletteConfig

    out_channels = layer.weight.shape[0]
    options = {FLOAT_BITS: 2 * numel}
    for b in widths:
        configs = [PaletteConfig(b), PaletteConfig(b, "wkmeans")]
        if out_channels % GROUP == 0 and out_channels > GROUP and b < 8:
            configs.append(PaletteConfig(b, "kmeans", "per_grouped_channel", GROUP))
        for c in configs:
            options[b if c == PaletteConfig(b) else c.key] = c.nbytes(numel, out_channels)
    return options


def main() -> None:
    from workbench.analysis.config import AnalysisConfig
    from workbench.analysis.plan import sweep_measurements
    from workbench.analysis.refine import palette_distortions
    from workbench.analysis.run import run_analysis
    from workbench.analysis.skm import compare_with_skm
    from workbench.analysis.trajectory import evaluate_trajectories
    from workbench.demo.world import make_dataset
    from workbench.models.generation import Sampling
    from workbench.models.layers import get_layer
    from workbench.models.loader import default_min_numel, load_pipeline
    from workbench.palettes.apply import palettized
    from workbench.palettes.cache import PaletteCache
    from workbench.palettes.config import FLOAT_BITS, PaletteConfig
    from workbench.palettes.importance import collect_importance
    from workbench.palettes.size import bits_per_param, recipe_nbytes
    from workbench.recipes.allocation import layer_prompt_distortions
    from workbench.recipes.refine import OptionSpace, Pricing, RefineSettings, refine_recipe
    from workbench.sweep.probe import OneStepProbe
    from workbench.threads import torch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/palettes-bench", help="the analysis' folder (resumable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="full-sampling steps (default: the pipeline's)")
    args = parser.parse_args()
    start = time.perf_counter()
    with torch_threads(args.threads):
        pipe = load_pipeline(None, progress=False)
        pipe.set_progress_bar_config(disable=True)
        unet = pipe.unet
        config = AnalysisConfig(min_numel=default_min_numel(None), size_aware_targets=SIZES)
        result = run_analysis(pipe, config, out_dir=args.out, progress=False)
        numels = result.layers
        layers = {n: get_layer(unet, n) for n in numels}
        out_channels = {n: m.weight.shape[0] for n, m in layers.items()}
        print(f"analysis: {result.timing.evaluations} evaluations, {result.timing.wall_s:.0f} s")

        probe = OneStepProbe(pipe, config.prompts, config.seed)
        importance = collect_importance(unet, layers, probe)
        cache = PaletteCache(importance=importance)

        def measure(candidates, _round):
            out = []
            for c in candidates:
                with palettized(unet, c, cache):
                    out.append(probe.psnr())
            return out

        # the sweep's distortions; every option's by the palette-error ratio to the same-width plain one
        m = sweep_measurements_from(result, sweep_measurements)
        measured = layer_prompt_distortions(m)
        ios18 = {n: _options_ios18(layers[n], numels[n], m.widths) for n in numels}
        distortion = palette_distortions(unet, ios18, measured, cache, importance)
        print(f"options and palettes ready at {time.perf_counter() - start:.0f} s")

        rows = []
        for t in SIZES:
            apple = max((r for r in result.recipes if r.strategy == "apple" and r.bits_per_param <= t + 1e-9),
                        key=lambda r: r.bits_per_param)  # fmt: skip
            target = round(apple.bits_per_param, 6)
            same = {r.strategy: r for r in result.recipes if r.strategy != "apple" and r.selector == target}
            sized, refined = same["size-aware"], same["refined"]
            apple_bytes = recipe_nbytes(apple.bits, numels, out_channels)

            plain = {n: refined.bits.get(n, FLOAT_BITS) for n in numels}
            aware_opts = {n: {b: 0, **({PaletteConfig(b, "wkmeans").key: 0} if b != FLOAT_BITS else {})}
                          for n, b in plain.items()}  # fmt: skip
            aware = refine_recipe(probe, plain, OptionSpace(aware_opts, distortion), 0, measure,
                                  pricing=Pricing(cache, importance), settings=RefineSettings(rounds=3),
                                  start_psnr=refined.psnr)  # fmt: skip
            grouped = refine_recipe(probe, aware.recipe, OptionSpace(ios18, distortion), apple_bytes, measure,
                                    pricing=Pricing(cache, importance), settings=RefineSettings(rounds=4))  # fmt: skip
            row = {
                "size": t,
                "apple": apple,
                "recipes": {
                    "size-aware": sized.bits,
                    "refined": refined.bits,
                    "+data-aware": aware.recipe,
                    "+grouped": grouped.recipe,
                },  # fmt: skip
                "psnr": {
                    "apple": apple.psnr_mean,
                    "size-aware": sized.psnr_mean,
                    "refined": refined.psnr_mean,
                    "+data-aware": aware.psnr,
                    "+grouped": grouped.psnr,
                },  # fmt: skip
                "bytes": {
                    "apple": apple_bytes,
                    **{
                        k: recipe_nbytes(v, numels, out_channels)
                        for k, v in {
                            "size-aware": sized.bits,
                            "refined": refined.bits,
                            "+data-aware": aware.recipe,
                            "+grouped": grouped.recipe,
                        }.items()
                    },
                },  # fmt: skip
                "bpp": {"apple": apple.bits_per_param, "+grouped": bits_per_param(grouped.recipe, numels)},
            }
            rows.append(row)
            print(f"{t:.1f} b/p: apple {apple.name} {apple.psnr_mean:.2f} dB ({apple_bytes} B) | "
                  + " | ".join(f"{k} {row['psnr'][k]:.2f} ({row['bytes'][k]} B)" for k in row["recipes"])
                  + f" | {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip

        # full sampling, every size's recipes at once (the float model's images first)
        captions = tuple(make_dataset(len(config.prompts), seed=1).captions)
        recipes = {f"{k}@{r['size']}": bits for r in rows for k, bits in
                   {"apple": r["apple"].bits, **r["recipes"]}.items()}  # fmt: skip
        trajectories = {tr.recipe: tr for tr in evaluate_trajectories(pipe, recipes, captions,
                                                                         Sampling(seed=0, steps=args.steps),
                                                                         cache=cache)}  # fmt: skip
        print(f"full sampling done at {time.perf_counter() - start:.0f} s")
        for key, tr in trajectories.items():
            print(f"  {key}: image PSNR {_image_psnr(tr):.2f} dB, adherence {tr.adherence}")

        skm = compare_with_skm(pipe, (4, 6), config)
        uniform = {}
        for b in (4, 6):
            opts = {n: {b: 0, PaletteConfig(b, "wkmeans").key: 0} for n in numels}
            starts = [dict.fromkeys(numels, b), dict.fromkeys(numels, PaletteConfig(b, "wkmeans").key)]
            found = [refine_recipe(probe, s, OptionSpace(opts, distortion), 0, measure, pricing=Pricing(cache,
            importance),
                                   settings=RefineSettings(rounds=4)) for s in starts]  # fmt: skip
            uniform[b] = max(found, key=lambda f: f.psnr)
        cache.close()

    gains, image_ok, figures = [], True, []
    for r in rows:
        t = r["size"]
        eligible = [k for k in r["recipes"] if r["bytes"][k] <= r["bytes"]["apple"] or k != "+grouped"]
        best = max(eligible, key=lambda k: r["psnr"][k])
        gain = r["psnr"][best] - r["psnr"]["apple"]
        not_worse = _image_psnr(trajectories[f"{best}@{t}"]) >= _image_psnr(trajectories[f"apple@{t}"])
        image_ok &= not_worse
        gains.append(gain)
        figures.append(f"gain_{t:.1f}={gain:.2f}")
        images = " | ".join(f"{k} {_image_psnr(trajectories[f'{k}@{t}']):.2f}" for k in ("apple", *r["recipes"]))
        print(f"{t:.1f} b/p: best {best} {r['psnr'][best]:.2f} vs apple {r['psnr']['apple']:.2f} "
              f"(gain {gain:+.2f} dB) | image PSNR {images} | not worse: {not_worse}")  # fmt: skip
    for c in skm.comparisons:
        ours = max(uniform[c.nbits].psnr, c.ours_psnr)
        print(f"uniform {c.nbits}-bit: SKM {c.skm_psnr:.2f} | plain k-means {c.ours_psnr:.2f} | plain or data-aware "
              f"per layer {uniform[c.nbits].psnr:.2f} | delta {ours - c.skm_psnr:+.2f}")  # fmt: skip
    skm_delta = {c.nbits: max(uniform[c.nbits].psnr, c.ours_psnr) - c.skm_psnr for c in skm.comparisons}
    print(f"wall {time.perf_counter() - start:.0f} s")
    print(" ".join(figures) + f" mean_gain={np.mean(gains):.2f} image_not_worse={image_ok} "
          f"skm4_delta={skm_delta[4]:.2f} skm6_delta={skm_delta[6]:.2f}")  # fmt: skip


def sweep_measurements_from(result, _unused=None):
    """The allocation's `Measurements` of a finished analysis (its reference-format JSON content)."""
    from workbench.recipes.allocation import Measurements

    pre = result.preanalysis
    cumulative = {int(b): {n: v for n, v in c.items() if n != "metadata"} for b, c in pre.cumulative.items()}
    return Measurements(
        numels=dict(result.layers),
        isolated={int(b): d for b, d in pre.single_layer.items()},
        cumulative=cumulative,
        original=pre.baselines["original"],
        linear_8bit=pre.baselines["linear_8bit"],
    )


if __name__ == "__main__":
    main()
