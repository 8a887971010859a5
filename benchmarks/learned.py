"""Below 4 bits: learned LUTs (and, from `benchmarks/learned_qat.py`, training-time palettization and DKM) against
the best post-training recipe of the same size, on the demo model.

Sizes: uniform 2-bit, uniform 3-bit (per tensor) and a mixed recipe at 2.5 bits/param (`run_analysis`, fast sweep,
size-aware and refined strategies at exactly 2.5 b/p, stored under `--out` and resumed).

1. post-training (`--parts` always): every candidate recipe of a size is measured: uniform sizes plain k-means and
   data-aware k-means (`wkmeans`, input-channel importances of the analysis' prompts) at that width; 2.5 b/p the
   size-aware and the refined recipe. The best by image PSNR is "the best post-training recipe of that size".
2. `lut`: learned LUTs (`workbench.tune.learn.tune_luts`) from that best recipe's palettes (its indices kept),
   calibrated on the float model's own trajectories of other captions and seeds than the evaluation's; exported to
   Core ML with the palettes as given and read back (`exact`).
3. `qat`, `dkm`: `benchmarks/learned_qat.py`'s `run_qat` / `run_dkm` at the same recipes, if that module is present
   (its own training, evaluation images and peak memory; see its docstring).

Measured per recipe: image PSNR after full sampling (`--images` demo captions, image `i` from seed `i`, the
pipeline's default 50 steps and guidance; `workbench.metrics.image_psnr` per image through
`workbench.analysis.trajectory.compare_images`, mean over the finite ones as `workbench.compare.seed_matched`),
one-step latent PSNR (`OneStepProbe`, the analysis' prompts), adherence (mean colour, shape and position adherence
of the shapes scorer, as a fraction of the float model's on the same seeds), wall time, and the process' peak RSS.

The last line (gains: image PSNR of the learned LUTs minus the best post-training recipe's, same size; `nan` for
parts not run):

    lut_gain_2b_db=A lut_gain_2p5_db=B lut_gain_3b_db=C qat_gain_2b_db=.. qat_image_psnr_2b_db=.. qat_adherence_2b=..
    dkm_image_psnr_2b_db=.. dkm_peak_gb=.. ours_peak_gb=.. exact=True

Usage:
    .venv/bin/python benchmarks/learned.py [--out reports/learned-bench] [--parts lut,qat,dkm] [--steps 150]
        [--images 16] [--smoke]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {"2b": 2, "3b": 3, "2p5": 2.5}
MIXED_STRATEGIES = ("size-aware", "refined")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class Bench:
    """The demo pipeline, its float images and the one-step probe: `measure` scores a recipe (and given palettes)."""

    def __init__(self, images: int, smoke: bool):
        import torch

        from workbench.analysis.config import config_for_model
        from workbench.analysis.trajectory import compare_images
        from workbench.demo.world import make_dataset
        from workbench.models.generation import generate_images
        from workbench.models.loader import load_pipeline
        from workbench.sweep.probe import OneStepProbe

        self.pipe = load_pipeline(None, device="cpu", dtype=torch.float32, progress=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.analysis = config_for_model(None, size_aware_targets=(2.5,), sweep="fast")
        self.captions = list(make_dataset(images, seed=1).captions)  # the analysis' evaluation draw
        self.steps = 3 if smoke else None
        self.reference = generate_images(self.pipe, self.captions, seed=0, steps=self.steps)
        self.float = compare_images("float", self.captions, self.reference, self.reference)
        self.probe = OneStepProbe(self.pipe, self.analysis.prompts, self.analysis.seed)

    def measure(self, recipe: dict, given=None) -> dict:
        from workbench.analysis.trajectory import compare_images
        from workbench.models.generation import generate_images
        from workbench.palettes.apply import palettized

        with palettized(self.pipe.unet, recipe, given=given):
            images = generate_images(self.pipe, self.captions, seed=0, steps=self.steps)
            one_step = float(np.mean(self.probe.psnr()))
        result = compare_images("recipe", self.captions, self.reference, images)
        finite = [v for v in result.image_psnr if math.isfinite(v)]
        return {
            "image_psnr_db": float(np.mean(finite)) if finite else math.inf,
            "one_step_psnr_db": one_step,
            "adherence": _adherence(result.adherence) / _adherence(self.float.adherence),
        }


def _adherence(rates: dict | None) -> float:
    return float("nan") if rates is None else float(np.mean([rates["color"], rates["shape"], rates["position"]]))


def _candidates(bench: Bench, work: Path, smoke: bool) -> dict[str, dict[str, dict]]:
    """Size -> {candidate name: recipe (layer -> PaletteConfig)}: the post-training recipes each size compares."""
    from dataclasses import replace

    from workbench.analysis.run import run_analysis
    from workbench.models.layers import compressible_layers
    from workbench.palettes.config import PaletteConfig, as_config

    unet = bench.pipe.unet
    layers = compressible_layers(unet, min_numel=bench.analysis.min_numel)
    out = {}
    for size in ("2b", "3b"):
        nbits = SIZES[size]
        out[size] = {f"kmeans{nbits}": dict.fromkeys(layers, PaletteConfig(nbits))}
        out[size][f"wkmeans{nbits}"] = dict.fromkeys(layers, PaletteConfig(nbits, "wkmeans"))
    config = bench.analysis
    if smoke:
        config = replace(config, nbits=(1, 2, 4), num_recipes=2)
    result = run_analysis(bench.pipe, config, out_dir=work / "analysis", progress=False)
    mixed = [r for r in result.recipes if r.strategy in MIXED_STRATEGIES and abs(r.selector - 2.5) < 1e-6]
    out["2p5"] = {r.name: {n: as_config(b) for n, b in r.bits.items() if as_config(b) is not None} for r in mixed}
    return out


def _importance(bench: Bench):
    from workbench.models.layers import compressible_layers
    from workbench.palettes.importance import collect_importance

    layers = compressible_layers(bench.pipe.unet, min_numel=bench.analysis.min_numel)
    return collect_importance(bench.pipe.unet, layers, bench.probe)


def post_training(bench: Bench, candidates: dict) -> dict:
    """Size -> {"best": name, "recipe", "palettes": GivenPalettes, "figures": {name: measured}}."""
    from workbench.palettes.given import GivenPalettes

    importance = _importance(bench)
    out = {}
    for size, recipes in candidates.items():
        figures = {}
        for name, recipe in recipes.items():
            start = time.perf_counter()
            palettes = GivenPalettes.fit(bench.pipe.unet, recipe, importance)
            figures[name] = {**bench.measure(recipe, palettes), "seconds": time.perf_counter() - start}
            figures[name]["palettes"] = palettes
            print(f"  {size} {name}: {_fmt(figures[name])}", flush=True)
        best = max(figures, key=lambda k: figures[k]["image_psnr_db"])
        out[size] = {
            "best": best,
            "recipe": recipes[best],
            "palettes": figures[best].pop("palettes"),
            "figures": figures,
        }
        for f in figures.values():
            f.pop("palettes", None)
    return out


def run_lut(bench: Bench, post: dict, work: Path, steps: int, smoke: bool) -> dict:
    """Learned LUTs from each size's best post-training palettes: measured, saved, exported and read back."""
    from workbench.tune.config import TuneConfig
    from workbench.tune.learn import calibration_prompts, tune_luts

    config = TuneConfig(steps=steps)
    if smoke:
        config = TuneConfig(steps=2, prompts=2, timesteps=2, sampling_steps=3, batch=2, eval_every=1)
    out = {}
    for size, p in post.items():
        result = tune_luts(bench.pipe, config=config, start=p["palettes"], prompts=calibration_prompts(None, 64))
        figures = {**bench.measure(p["recipe"], result.palettes), "seconds": result.seconds}
        path = result.save(work / f"lut_{size}", recipe_name=f"{p['best']}_tuned", size=size, start=p["best"])
        figures.update(
            calibration_gain_db=result.gain_db,
            best_step=result.best_step,
            peak_gb=_peak_gb(),
            exact=_export_exact(path, work / f"lut_{size}" / "export"),
            gain_db=None,
        )
        figures["gain_db"] = figures["image_psnr_db"] - post[size]["figures"][p["best"]]["image_psnr_db"]
        out[size] = figures
        print(
            f"  {size} learned LUTs from {p['best']}: {_fmt(figures)} | gain {figures['gain_db']:+.2f} dB", flush=True
        )
    return out


def _export_exact(palettes: Path, out: Path) -> bool:
    """Export the demo UNet with the given palettes (their own recipe) and read it back: every weight bit-exact."""
    from workbench.coreml.export import export_model

    return export_model(None, out, palettes_file=palettes).all_bit_exact


def _fmt(f: dict) -> str:
    return (
        f"image {f['image_psnr_db']:.2f} dB, one-step {f['one_step_psnr_db']:.2f} dB, adherence {f['adherence']:.3f}, "
        f"{f.get('seconds', float('nan')):.0f} s"
    )


def _learned_qat():
    """`benchmarks/learned_qat.py` (training-time palettization and DKM, another module's work), if present."""
    path = Path(__file__).with_name("learned_qat.py")
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("learned_qat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_trained(parts: set[str], post: dict, work: Path, smoke: bool) -> dict:
    """# ---- qat / dkm: `benchmarks/learned_qat.py`'s run_qat / run_dkm (GIVEN_PALETTES_API.md), if present ----"""
    from workbench.resources import demo_model_dir

    module = _learned_qat() if parts & {"qat", "dkm"} else None
    out = {"qat": {}, "dkm": {}}
    if module is None:
        if parts & {"qat", "dkm"}:
            print("  qat/dkm: benchmarks/learned_qat.py is not here; those parts print nan")
        return out
    for part in sorted(parts & {"qat", "dkm"}):
        run = getattr(module, f"run_{part}")
        for size, p in post.items():
            out[part][size] = run(demo_model_dir(), p["recipe"], size, work / part, smoke)
            print(f"  {size} {part}: {_fmt(out[part][size])}", flush=True)
    return out


def _last_line(lut: dict, trained: dict, post: dict) -> str:
    nan = float("nan")

    def get(d: dict, size: str, key: str):
        return d.get(size, {}).get(key, nan)

    qat, dkm = trained["qat"], trained["dkm"]
    qat_gain = get(qat, "2b", "image_psnr_db") - post["2b"]["figures"][post["2b"]["best"]]["image_psnr_db"]
    exact = [f["exact"] for f in lut.values()] + [f.get("exact") for f in qat.values()]
    figures = {
        "lut_gain_2b_db": get(lut, "2b", "gain_db"),
        "lut_gain_2p5_db": get(lut, "2p5", "gain_db"),
        "lut_gain_3b_db": get(lut, "3b", "gain_db"),
        "qat_gain_2b_db": qat_gain,
        "qat_image_psnr_2b_db": get(qat, "2b", "image_psnr_db"),
        "qat_adherence_2b": get(qat, "2b", "adherence"),
        "dkm_image_psnr_2b_db": get(dkm, "2b", "image_psnr_db"),
        "dkm_peak_gb": get(dkm, "2b", "peak_gb"),
        "ours_peak_gb": get(qat, "2b", "peak_gb"),
    }
    text = " ".join(
        f"{k}={v:.2f}" if isinstance(v, float) and not math.isnan(v) else f"{k}=nan" for k, v in figures.items()
    )
    return text + f" exact={all(e is True for e in exact) if exact else 'n/a'}"


def main(argv: list[str] | None = None) -> None:
    from workbench.threads import torch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/learned-bench", help="work folder (the analysis is resumed)")
    parser.add_argument("--parts", default="lut,qat,dkm", help="comma-separated: lut, qat, dkm")
    parser.add_argument("--steps", type=int, default=150, help="learned-LUT Adam steps per size")
    parser.add_argument("--images", type=int, default=16, help="evaluation images (demo captions)")
    parser.add_argument("--sizes", default="2b,3b,2p5", help="comma-separated: 2b, 3b, 2p5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny settings, to check that it runs")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if parts - {"lut", "qat", "dkm"} or set(sizes) - set(SIZES) or "2b" not in sizes:
        sys.exit(f"--parts {args.parts!r} / --sizes {args.sizes!r}: parts lut,qat,dkm; sizes 2b,3b,2p5 (2b needed)")
    work = Path(args.out)
    began = time.perf_counter()
    with torch_threads(args.threads):
        bench = Bench(2 if args.smoke else args.images, args.smoke)
        candidates = {s: c for s, c in _candidates(bench, work, args.smoke).items() if s in sizes}
        print(f"post-training ({time.perf_counter() - began:.0f} s):", flush=True)
        post = post_training(bench, candidates)
        lut = run_lut(bench, post, work, args.steps, args.smoke) if "lut" in parts else {}
        trained = run_trained(parts, post, work, args.smoke)
    record = {"post": {s: {k: v for k, v in p.items() if k in ("best", "figures")} for s, p in post.items()}}
    record.update(lut=lut, trained=trained, seconds=time.perf_counter() - began, peak_gb=_peak_gb())
    (work / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    for size, p in post.items():
        line = f"{size}: best post-training {p['best']} {p['figures'][p['best']]['image_psnr_db']:.2f} dB"
        if size in lut:
            line += f" | learned LUTs {lut[size]['image_psnr_db']:.2f} dB ({lut[size]['gain_db']:+.2f})"
        print(line)
    print(f"wall {time.perf_counter() - began:.0f} s, peak {_peak_gb():.2f} GB")
    print(_last_line(lut, trained, post))


if __name__ == "__main__":
    main()
