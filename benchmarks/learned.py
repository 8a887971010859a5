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
   (its own training, evaluation images and peak memory; see its docstring), each from plain k-means palettes of
   that best recipe's widths (training re-fits plain k-means; the best may be data-aware).

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
MIXED_STRATEGIES = ("size-aware", "refined")  # and Apple's rule, at the size it gives


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


def _candidates(bench: Bench, size: str, work: Path, smoke: bool) -> dict[str, dict]:
    """{candidate name: recipe (layer -> PaletteConfig)}: the post-training recipes of a size."""
    from dataclasses import replace

    from workbench.analysis.run import run_analysis
    from workbench.models.layers import compressible_layers
    from workbench.palettes.config import PaletteConfig, as_config

    unet = bench.pipe.unet
    layers = compressible_layers(unet, min_numel=bench.analysis.min_numel)
    if size != "2p5":
        nbits = SIZES[size]
        configs = (PaletteConfig(nbits), PaletteConfig(nbits, "wkmeans"))
        return {config.key: dict.fromkeys(layers, config) for config in configs}
    config = bench.analysis
    if smoke:
        config = replace(config, nbits=(1, 2, 4), num_recipes=2)
    result = run_analysis(bench.pipe, config, out_dir=work / "analysis", progress=False)
    # the targets' recipes: Apple's largest at or under 2.5 b/p, size-aware and refined at exactly its size
    target = max(r.selector for r in result.recipes if r.strategy == "size-aware" and r.selector <= 2.5 + 1e-9)
    mixed = [r for r in result.recipes if r.strategy in MIXED_STRATEGIES and r.selector == target]
    mixed += [r for r in result.recipes if r.strategy == "apple" and abs(r.bits_per_param - target) < 1e-5]
    return {r.name: {n: as_config(b) for n, b in r.bits.items() if as_config(b) is not None} for r in mixed}


def _importance(bench: Bench):
    from workbench.models.layers import compressible_layers
    from workbench.palettes.importance import collect_importance

    layers = compressible_layers(bench.pipe.unet, min_numel=bench.analysis.min_numel)
    return collect_importance(bench.pipe.unet, layers, bench.probe)


def post_training(bench: Bench, recipes: dict, importance) -> dict:
    """One size's candidates measured: {"best": name, "recipe", "palettes": GivenPalettes, "figures": {name: ...}}."""
    from workbench.palettes.given import GivenPalettes

    figures, palettes = {}, {}
    for name, recipe in recipes.items():
        start = time.perf_counter()
        palettes[name] = GivenPalettes.fit(bench.pipe.unet, recipe, importance)
        figures[name] = {**bench.measure(recipe, palettes[name]), "seconds": time.perf_counter() - start}
        figures[name]["bits_per_param"] = _bits_per_param(bench, recipe)
        print(f"  {name}: {_fmt(figures[name])}", flush=True)
    best = max(figures, key=lambda k: figures[k]["image_psnr_db"])
    return {"best": best, "recipe": recipes[best], "palettes": palettes[best], "figures": figures}


def _bits_per_param(bench: Bench, recipe: dict) -> float:
    from workbench.models.layers import compressible_layers
    from workbench.palettes.size import bits_per_param

    layers = compressible_layers(bench.pipe.unet, min_numel=bench.analysis.min_numel)
    return bits_per_param(recipe, {n: m.weight.numel() for n, m in layers.items()})


def run_lut(bench: Bench, size: str, post: dict, work: Path, config) -> dict:
    """Learned LUTs from a size's best post-training palettes: measured, saved, exported and read back."""
    from workbench.tune.learn import calibration_prompts, tune_luts

    result = tune_luts(bench.pipe, config=config, start=post["palettes"], prompts=calibration_prompts(None, 64))
    figures = {**bench.measure(post["recipe"], result.palettes), "seconds": result.seconds}
    path = result.save(work / f"lut_{size}", recipe_name=f"{post['best']}_tuned", size=size, start=post["best"])
    figures.update(
        calibration_gain_db=result.gain_db,
        best_step=result.best_step,
        peak_gb=_peak_gb(),
        exact=_export_exact(path, work / f"lut_{size}" / "export"),
        gain_db=figures["image_psnr_db"] - post["figures"][post["best"]]["image_psnr_db"],
    )
    print(f"  learned LUTs from {post['best']}: {_fmt(figures)} | gain {figures['gain_db']:+.2f} dB", flush=True)
    return figures


def run_size(bench: Bench, size: str, work: Path, args, importance) -> dict:
    """A size's post-training candidates and (with `lut` in the parts) its learned LUTs, cached in
    `work/size_<size>.json` for the same settings (sizes can run in processes of their own, then be gathered)."""
    from workbench.tune.config import TuneConfig

    config = TuneConfig(steps=args.steps)
    if args.smoke:
        config = TuneConfig(steps=2, prompts=2, timesteps=2, sampling_steps=3, batch=2, eval_every=1)
    settings = {"tune": config.to_dict(), "images": len(bench.captions), "smoke": args.smoke}
    cache = work / f"size_{size}.json"
    if cache.exists() and json.loads(cache.read_text())["settings"] == settings:
        print(f"{size}: from {cache}")
        return json.loads(cache.read_text())
    print(f"{size}: post-training", flush=True)
    post = post_training(bench, _candidates(bench, size, work, args.smoke), importance)
    record = {"settings": settings, "best": post["best"], "post": post["figures"]}
    if "lut" in args.parts:
        record["lut"] = run_lut(bench, size, post, work, config)
    work.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(record, indent=2) + "\n")
    return record


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


def run_trained(parts: set[str], recipes: dict, work: Path, smoke: bool) -> dict:
    """# ---- qat / dkm: the other half of issue 25, in `benchmarks/learned_qat.py` when present ----

    It exposes `run_qat(model_dir, recipe, name, work, smoke) -> dict` and `run_dkm(...)` (recipe: layer ->
    `PaletteConfig`; name: "2b", "3b", "2p5"), each dict with `image_psnr_db`, `one_step_psnr_db`, `adherence`,
    `seconds`, `peak_gb`, `exact`; they are called here with each size's best post-training recipe."""
    from workbench.resources import demo_model_dir

    module = _learned_qat() if parts & {"qat", "dkm"} else None
    out = {"qat": {}, "dkm": {}}
    if module is None:
        if parts & {"qat", "dkm"}:
            print("  qat/dkm: benchmarks/learned_qat.py is not here; those parts print nan")
        return out
    for part in sorted(parts & {"qat", "dkm"}):
        run = getattr(module, f"run_{part}")
        for size, recipe in recipes.items():
            out[part][size] = run(demo_model_dir(), _plain_kmeans(recipe), size, work / part, smoke)
            print(f"  {size} {part}: {_fmt(out[part][size])}", flush=True)
    return out


def _plain_kmeans(recipe: dict) -> dict:
    """The recipe's widths and groupings as plain k-means palettes: training starts from those (it re-fits plain
    k-means as Core ML would), whatever palettes the best post-training recipe had (data-aware, uniform)."""
    from dataclasses import replace

    return {name: replace(config, mode="kmeans") for name, config in recipe.items()}


def _last_line(sizes: dict, trained: dict) -> str:
    nan = float("nan")

    def get(d: dict, size: str, key: str):
        return (d.get(size) or {}).get(key, nan)

    lut = {size: r["lut"] for size, r in sizes.items() if "lut" in r}
    qat, dkm = trained["qat"], trained["dkm"]
    post_2b = sizes["2b"]["post"][sizes["2b"]["best"]]["image_psnr_db"] if "2b" in sizes else nan
    exact = [f["exact"] for f in lut.values()] + [f.get("exact") for f in qat.values()]
    figures = {
        "lut_gain_2b_db": get(lut, "2b", "gain_db"),
        "lut_gain_2p5_db": get(lut, "2p5", "gain_db"),
        "lut_gain_3b_db": get(lut, "3b", "gain_db"),
        "qat_gain_2b_db": get(qat, "2b", "image_psnr_db") - post_2b,
        "qat_image_psnr_2b_db": get(qat, "2b", "image_psnr_db"),
        "qat_adherence_2b": get(qat, "2b", "adherence"),
        "dkm_image_psnr_2b_db": get(dkm, "2b", "image_psnr_db"),
        "dkm_peak_gb": get(dkm, "2b", "peak_gb"),
        "ours_peak_gb": get(qat, "2b", "peak_gb"),
    }
    text = " ".join(f"{k}={v:.2f}" if not math.isnan(v) else f"{k}=nan" for k, v in figures.items())
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
    if parts - {"lut", "qat", "dkm"} or set(sizes) - set(SIZES) or not sizes:
        sys.exit(f"--parts {args.parts!r} / --sizes {args.sizes!r}: parts of lut,qat,dkm; sizes of 2b,3b,2p5")
    work = Path(args.out)
    args.parts = parts
    began = time.perf_counter()
    with torch_threads(args.threads):
        bench = Bench(2 if args.smoke else args.images, args.smoke)
        importance = _importance(bench)
        results = {size: run_size(bench, size, work, args, importance) for size in sizes}
        recipes = {}
        if parts & {"qat", "dkm"}:
            recipes = {size: _candidates(bench, size, work, args.smoke)[r["best"]] for size, r in results.items()}
        trained = run_trained(parts, recipes, work, args.smoke)
    record = {"sizes": results, "trained": trained, "seconds": time.perf_counter() - began, "peak_gb": _peak_gb()}
    (work / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    for size, r in results.items():
        post = r["post"][r["best"]]
        line = f"{size} ({post['bits_per_param']:.2f} b/p): best post-training {r['best']} {_fmt(post)}"
        if "lut" in r:
            line += f" | learned LUTs {_fmt(r['lut'])}, gain {r['lut']['gain_db']:+.2f} dB, exact={r['lut']['exact']}"
        print(line)
    print(f"wall {time.perf_counter() - began:.0f} s, peak {_peak_gb():.2f} GB")
    print(_last_line(results, trained))


if __name__ == "__main__":
    main()
