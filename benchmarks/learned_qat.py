"""Training-time palettization on the demo model: ours (`workbench.tune.qat`) vs coremltools' `DKMPalettizer`, with
the post-training palettes of the same recipe as the starting point.

For each size (uniform 2-bit, uniform 3-bit, a mixed recipe near 2.5 bits/param from `workbench analyze`):

1. post-training: plain k-means palettes of the recipe on the float model (`palettized`), no training;
2. ours: `train_palettized` fine-tunes the UNet (the demo's data and loss + the float UNet as teacher) with its
   weights palettized, in a process of its own, and writes the pipeline, `recipe.json` and `palettes.npz`;
3. DKM: `train_dkm`, the same data, loss, teacher, steps, optimizer and recipe, in a process of its own.

Each trained model is measured against the float model: image PSNR after full sampling (`generate_images`, image `i`
from seed `i`, the pipeline's default 50 steps and guidance, `workbench.metrics.image_psnr` per image, mean over
images as `workbench.compare.seed_matched`), one-step latent PSNR (`OneStepProbe`, the analysis' 8 prompts), and
the shapes scorer's adherence (mean of colour, shape and position adherence, as a fraction of the float model's)
on the same images; the benchmark's prompts are `benchmark_attributes(n)`'s captions. Peak memory is the training
process' peak RSS (`ru_maxrss`); the latents are encoded once, in a process of their own, and loaded by every run.
Ours is exported to Core ML with its palettes as given (`export_model(..., palettes_file=...)`) and read back
(`exact`).

Functions for `benchmarks/learned.py` (GIVEN_PALETTES_API.md): `run_qat(model_dir, recipe, name, work, smoke)` and
`run_dkm(...)`, each `-> dict` with `image_psnr_db`, `one_step_psnr_db`, `adherence`, `seconds`, `peak_gb`, `exact`
(and `palettes`, `steps`, `train_seconds`, `max_distinct`). Alone, it prints the three sizes and, as its last line:

    qat_gain_2b_db=C qat_image_psnr_2b_db=D qat_adherence_2b=E dkm_image_psnr_2b_db=F dkm_peak_gb=G ours_peak_gb=H
    exact=True

(`qat_gain_2b_db`: our image PSNR minus the post-training palettes' at uniform 2 bits.)

Usage:
    .venv/bin/python benchmarks/learned_qat.py [--work reports/learned-qat] [--steps 100] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEPS = 120  # optimizer steps of every training run (ours and DKM alike), batch BATCH
BATCH = 32
EVAL_IMAGES = 32
LR, DISTILL, RECLUSTER_EVERY, LUTS, LUT_LR, ASSIGNMENT, TEMPERATURE = 1e-3, 1.0, 0, "centroid", 0.01, "soft", 0.06
TRAINING = {"lr": LR, "distill": DISTILL, "recluster_every": RECLUSTER_EVERY, "luts": LUTS, "lut_lr": LUT_LR,
            "assignment": ASSIGNMENT, "temperature": TEMPERATURE, "anneal": False, "seed": 0}  # fmt: skip
SMOKE = {"steps": 2, "batch": 2, "n_images": 64, "eval_images": 2, "sample_steps": 3, **TRAINING}
MIXED_TARGET = 2.5


def _settings(smoke: bool) -> dict:
    full = {"steps": STEPS, "batch": BATCH, "n_images": None, "eval_images": EVAL_IMAGES, "sample_steps": None}
    return dict(SMOKE) if smoke else dict(full, **TRAINING)


def _peak_gb() -> float:
    """This process' peak resident set size, GB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# ------------------------------------------------------------------------------ the training processes


def _train_config(model_dir: Path, n_images: int | None):
    from workbench.demo.config import TrainConfig

    config = TrainConfig.from_dict(json.loads((model_dir / "training.json").read_text())["config"])
    return config if n_images is None else config.with_overrides([f"n_images={n_images}"])


def _child(args: argparse.Namespace) -> None:
    """One training run (or the latents' encoding) in this process; its record as `--out`/result.json."""
    import torch

    from workbench.demo.stages import VaeStage, encoded_stage
    from workbench.demo.world import make_dataset
    from workbench.models.loader import load_pipeline
    from workbench.tune.qat_config import QatConfig

    torch.set_num_threads(1)
    model_dir, out = Path(args.model), Path(args.out)
    train_config = _train_config(model_dir, args.n_images)
    pipe = load_pipeline(str(model_dir), device="cpu", dtype=torch.float32, progress=False)
    if args.child == "encode":
        data = make_dataset(train_config.n_images, seed=train_config.seed, image_size=train_config.image_size)
        stage = encoded_stage(pipe.vae, torch.from_numpy(data.images))
        torch.save({"latents": stage.latents, "scaling_factor": stage.scaling_factor, "seconds": stage.seconds}, out)
        return
    saved = torch.load(args.latents, weights_only=False)
    stage1 = VaeStage([], saved["scaling_factor"], saved["latents"], saved["seconds"])
    config = QatConfig(args.recipe, steps=args.steps, batch=args.batch, lr=args.lr, distill=args.distill)
    extra = {"recluster_every": args.recluster_every, "luts": args.luts, "lut_lr": args.lut_lr}
    extra.update(assignment=args.assignment, temperature=args.temperature, anneal=args.anneal, seed=args.seed)
    config = QatConfig.from_dict(dict(config.to_dict(), **extra))
    before, cpu = _peak_gb(), time.process_time()
    record = {"method": args.child, "qat": config.to_dict(), "steps": args.steps, "batch": args.batch}
    record["rss_before_gb"] = before
    if args.child == "qat":
        from workbench.tune.qat import train_palettized

        result = train_palettized(pipe, train_config, config, out, stage1=stage1, log=lambda line: None)
        record.update(seconds=result.seconds, exact_weights=result.exact, losses=result.losses)
    else:
        from workbench.tune.dkm import train_dkm

        record.update(train_dkm(pipe, train_config, config, stage1=stage1, log=lambda line: None))
        pipe.save_pretrained(out, safe_serialization=True)
    record["peak_gb"] = _peak_gb()
    record["cpu_seconds"] = time.process_time() - cpu  # CPU time: wall time on a shared CPU says little
    (out / "result.json").write_text(json.dumps(record, indent=1) + "\n")


def _spawn(child: str, model_dir: Path, out: Path, settings: dict, recipe: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", child, "--model", str(model_dir), "--out", str(out)]
    command += ["--latents", str(out.parent / "latents.pt"), "--steps", str(settings["steps"])]
    command += ["--batch", str(settings["batch"]), "--lr", str(settings["lr"]), "--distill", str(settings["distill"])]
    command += ["--recluster-every", str(settings["recluster_every"])]
    command += ["--luts", settings["luts"], "--lut-lr", str(settings["lut_lr"])]
    command += ["--assignment", settings["assignment"], "--temperature", str(settings["temperature"])]
    command += ["--seed", str(settings["seed"]), "--anneal" if settings["anneal"] else "--no-anneal"]
    if settings["n_images"] is not None:
        command += ["--n-images", str(settings["n_images"])]
    if recipe is not None:
        command += ["--recipe", str(recipe)]
    return subprocess.Popen(command)


def _latents(model_dir: Path, root: Path, settings: dict) -> Path:
    """The dataset's latents, encoded once (in a process of its own) for every run under `root`."""
    path = root / "latents.pt"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, __file__, "--child", "encode", "--model", str(model_dir), "--out", str(path)]
        if settings["n_images"] is not None:
            command += ["--n-images", str(settings["n_images"])]
        subprocess.run(command, check=True)
    return path


# ---------------------------------------------------------------------------------------- measuring

_FLOAT: dict = {}  # (model_dir, eval_images, sample_steps) -> the float model's pipeline, images, adherence, probe


def _float_reference(model_dir: Path, settings: dict) -> dict:
    """The float model's pipeline, images and adherence, and the one-step probe: measured once per process."""
    key = (str(model_dir), settings["eval_images"], settings["sample_steps"])
    if key not in _FLOAT:
        import torch

        from workbench.analysis.config import DEFAULT_PROMPTS
        from workbench.demo.adherence import benchmark_attributes
        from workbench.models.loader import load_pipeline
        from workbench.sweep.probe import OneStepProbe

        torch.set_num_threads(1)
        pipe = load_pipeline(str(model_dir), device="cpu", dtype=torch.float32, progress=False)
        attributes = benchmark_attributes(settings["eval_images"])
        images = _images(pipe, attributes, settings)
        probe = OneStepProbe(pipe, DEFAULT_PROMPTS, seed=0)
        _FLOAT[key] = {"pipe": pipe, "attributes": attributes, "images": images, "probe": probe}
        _FLOAT[key]["adherence"] = _adherence(images, attributes)
    return _FLOAT[key]


def _images(pipe, attributes, settings: dict) -> np.ndarray:
    from workbench.models.generation import generate_images

    captions = [a.caption for a in attributes]
    return generate_images(pipe, captions, seed=0, steps=settings["sample_steps"], batch_size=16)


def _adherence(images, attributes) -> float:
    """Mean of colour, shape and position adherence."""
    from workbench.demo.adherence import score_adherence

    report = score_adherence(images, attributes)
    return float(np.mean([report.color_adherence, report.shape_adherence, report.position_adherence]))


def _mean_image_psnr(reference: np.ndarray, images: np.ndarray) -> float:
    """Mean image PSNR over the images (identical ones, inf, left out), as `SeedMatchedImages.mean_psnr`."""
    from workbench.metrics import image_psnr

    values = [image_psnr(r, i) for r, i in zip(reference, images)]
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.inf


def measure(model_dir: Path, settings: dict, *, state: dict | None = None, recipe: dict | None = None) -> dict:
    """Image PSNR, one-step PSNR and adherence (fraction of the float model's) of the float model with either a
    whole trained UNet `state` (state dict) or a recipe's post-training palettes."""
    import torch

    from workbench.palettes.apply import palettized

    ref = _float_reference(model_dir, settings)
    pipe = ref["pipe"]
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    try:
        if state is not None:
            pipe.unet.load_state_dict(state)
        with palettized(pipe.unet, recipe or {}):
            images = _images(pipe, ref["attributes"], settings)
            one_step = float(np.mean(ref["probe"].psnr()))
    finally:
        pipe.unet.load_state_dict(original)
    with torch.no_grad():
        adherence = _adherence(images, ref["attributes"])
    return {
        "image_psnr_db": _mean_image_psnr(ref["images"], images),
        "one_step_psnr_db": one_step,
        "adherence": adherence / ref["adherence"],
    }


def _cached(path: Path, compute) -> dict:
    """The figures in `path` if a run wrote them, else `compute()`'s, written there (the benchmark resumes)."""
    if path.exists():
        return json.loads(path.read_text())
    figures = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def _tag(settings: dict) -> str:
    """What a measurement depends on beside the model: images and sampling steps."""
    return f"{settings['eval_images']}img_{settings['sample_steps'] or 'default'}steps"


def _unet_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _export_exact(folder: Path, work: Path) -> bool:
    """Export the fine-tuned UNet with its palettes as given and read it back bit-exact (`verification.json`)."""
    from workbench.coreml.export import export_model

    report = export_model(str(folder), work / f"coreml_{folder.name}", palettes_file=folder / "palettes.npz")
    return report.all_bit_exact


# ------------------------------------------------------------------------------- the two entry points


def _recipe_file(recipe: dict, name: str, work: Path) -> Path:
    from workbench.recipes.recipe import Recipe

    work.mkdir(parents=True, exist_ok=True)
    return Recipe(f"{name}_recipe", {layer: config.key for layer, config in recipe.items()}).save(
        work / f"recipe_{name}.json"
    )


def _start(method: str, model_dir: Path, recipe: dict, name: str, work: Path, settings: dict):
    """The training process of a run (None if an earlier one finished it)."""
    out = work / f"{method}_{name}"
    _latents(model_dir, work, settings)
    if (out / "result.json").exists():
        return None
    return _spawn(method, model_dir, out, settings, _recipe_file(recipe, name, work))


def _run(method: str, model_dir, recipe: dict, name: str, work, settings: dict, process=False) -> dict:
    """Train (unless `process`, the training already started, is given: then wait for it) and measure."""
    model_dir, work = Path(model_dir), Path(work)
    out = work / f"{method}_{name}"
    process = _start(method, model_dir, recipe, name, work, settings) if process is False else process
    if process is not None and process.wait() != 0:
        raise RuntimeError(f"the {method} {name} training process failed (exit {process.returncode})")
    record = json.loads((out / "result.json").read_text())

    def compute() -> dict:
        figures = measure(model_dir, settings, state=_unet_state(out))
        if method == "qat":
            figures["exact"] = record["exact_weights"] and _export_exact(out, work)
        return figures

    figures = _cached(out / f"figures_{_tag(settings)}.json", compute)
    figures.update(
        seconds=record["seconds"]["total"],
        train_seconds=record["seconds"]["train"],
        cpu_seconds=record["cpu_seconds"],
        peak_gb=record["peak_gb"],
        steps=record["steps"],
        batch=record["batch"],
    )
    if method == "qat":
        figures.update(palettes=str(out / "palettes.npz"))
    else:
        figures.update(exact=False, max_distinct=record["max_distinct"])
    return figures


def run_qat(model_dir, recipe: dict, name: str, work, smoke: bool = False) -> dict:
    """Ours at `recipe` (layer -> `PaletteConfig`): trained in a process of its own under `work`, then measured
    against the float model. `name` ("2b", "3b", "2p5") names its folder. Keys: see the module docstring."""
    return _run("qat", model_dir, recipe, name, work, _settings(smoke))


def run_dkm(model_dir, recipe: dict, name: str, work, smoke: bool = False) -> dict:
    """coremltools' `DKMPalettizer` at `recipe`, the same training as `run_qat`; `exact` is False (its palettes are
    not exported here), `max_distinct` the most distinct values of any palettized weight."""
    return _run("dkm", model_dir, recipe, name, work, _settings(smoke))


# ------------------------------------------------------------------------------------------ run alone


def _mixed_recipe(model_dir: Path, root: Path, smoke: bool) -> dict:
    """The size-aware recipe nearest `MIXED_TARGET` bits/param of `workbench analyze` (fast sweep) on the model."""
    from workbench.recipes.recipe import PreAnalysis

    analysis = root / "analysis"
    if not (analysis / "preanalysis.json").exists():
        command = [sys.executable, "-m", "workbench.cli", "analyze", str(model_dir), "--out", str(analysis)]
        command += ["--sweep", "fast", "--strategies", "size-aware", "--targets", str(MIXED_TARGET)]
        command += ["--no-trajectory", "--threads", "1", "--quiet"]
        command += ["--num-recipes", "1", "--nbits", "1", "2", "4"] if smoke else []
        subprocess.run(command, check=True)
    pre = PreAnalysis.load(analysis / "preanalysis.json")
    numels = _candidates(model_dir)
    sizes = {name: pre.recipe(name).bits_per_param(numels) for name in pre.recipes if "sizeaware" in name}
    best = min(sizes, key=lambda name: abs(sizes[name] - MIXED_TARGET))
    return pre.recipe(best).configs


def _candidates(model_dir: Path) -> dict[str, int]:
    """The UNet's candidate layers (more than 2048 weights, the analysis' default on the demo model) -> numel."""
    import torch

    from workbench.models.layers import compressible_layers
    from workbench.models.loader import load_pipeline

    pipe = load_pipeline(str(model_dir), device="cpu", dtype=torch.float32, progress=False)
    return {name: layer.weight.numel() for name, layer in compressible_layers(pipe.unet, min_numel=2048).items()}


def _line(name: str, bpp: float, post: dict, ours: dict, dkm: dict) -> str:
    def fmt(d):
        return f"image {d['image_psnr_db']:.2f} dB, one-step {d['one_step_psnr_db']:.2f} dB, adh {d['adherence']:.3f}"

    return (
        f"{name} ({bpp:.2f} b/p): post-training {fmt(post)} | ours {fmt(ours)}, {ours['train_seconds']:.0f} s, "
        f"peak {ours['peak_gb']:.2f} GB, exact={ours['exact']} | DKM {fmt(dkm)}, {dkm['train_seconds']:.0f} s, "
        f"peak {dkm['peak_gb']:.2f} GB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="reports/learned-qat", help="work folder (resumable: finished runs kept)")
    parser.add_argument("--model", default=None, help="pipeline folder (default: the demo model)")
    parser.add_argument("--smoke", action="store_true", help="2 steps on 64 images, 2 images: checks the plumbing")
    parser.add_argument("--sizes", default="2b,3b,2p5", help="comma-separated, of 2b, 3b, 2p5")
    for option in ("--child", "--out", "--latents", "--recipe"):
        parser.add_argument(option, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--methods", default="qat,dkm", help="comma-separated, of qat, dkm")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps of every run ({STEPS})")
    parser.add_argument("--batch", type=int, default=None, help=f"images per step ({BATCH})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({LR})")
    parser.add_argument("--distill", type=float, default=None, help=f"weight of the float teacher ({DISTILL})")
    parser.add_argument("--recluster-every", type=int, default=None, help=f"ours: re-fit period ({RECLUSTER_EVERY})")
    parser.add_argument("--luts", default=None, choices=("centroid", "learned"), help=f"ours: LUT training ({LUTS})")
    parser.add_argument("--lut-lr", type=float, default=None, help=f"ours, learned LUTs: step / layer RMS ({LUT_LR})")
    parser.add_argument(
        "--assignment",
        default=None,
        choices=("fixed", "nearest", "soft"),
        help=f"ours: weights' entries ({ASSIGNMENT})",
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help=f"ours, soft: first temperature ({TEMPERATURE})"
    )
    parser.add_argument(
        "--anneal", action=argparse.BooleanOptionalAction, default=None, help="ours, soft: anneal to hard (no)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seeds the training batches, ours and DKM's (0)")
    parser.add_argument("--eval-images", type=int, default=None, help=f"images per measurement ({EVAL_IMAGES})")
    parser.add_argument("--n-images", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from workbench.models.loader import DEMO_MODEL
    from workbench.palettes.config import PaletteConfig
    from workbench.palettes.size import bits_per_param

    args.model = args.model or str(DEMO_MODEL)
    if args.child:
        _child(args)
        return 0
    model_dir, work = Path(args.model), Path(args.work)
    started, settings, numels = time.perf_counter(), _settings(args.smoke), _candidates(model_dir)
    given = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "distill": args.distill}
    given.update(recluster_every=args.recluster_every, luts=args.luts, lut_lr=args.lut_lr, assignment=args.assignment)
    given.update(temperature=args.temperature, seed=args.seed, anneal=args.anneal)
    settings.update({k: v for k, v in dict(given, eval_images=args.eval_images).items() if v is not None})
    nan = dict.fromkeys(("image_psnr_db", "one_step_psnr_db", "adherence", "train_seconds", "peak_gb"), math.nan)
    figures = {}
    for name in args.sizes.split(","):
        bits = {"2b": 2, "3b": 3}.get(name)
        recipe = dict.fromkeys(numels, PaletteConfig(bits)) if bits else _mixed_recipe(model_dir, work, args.smoke)
        bpp = bits_per_param(recipe, numels)
        methods = [m for m in ("qat", "dkm") if m in args.methods.split(",")]
        # the trainings run in processes of their own (their peak RSS apart) while this one measures the float model
        started_runs = {m: _start(m, model_dir, recipe, name, work / "runs", settings) for m in methods}
        post_file = work / f"post_{name}_{_tag(settings)}.json"
        post = _cached(post_file, lambda: measure(model_dir, settings, recipe=recipe))
        runs = {m: _run(m, model_dir, recipe, name, work / "runs", settings, p) for m, p in started_runs.items()}
        ours, dkm = runs.get("qat", nan), runs.get("dkm", nan)
        figures[name] = (post, ours, dkm)
        print(_line(name, bpp, post, ours, dkm), flush=True)
    nan = dict(nan, exact=False)
    post, ours, dkm = figures.get("2b", (nan, nan, nan))  # the last line is the 2-bit figures' (nan if not run)
    print(f"steps {settings['steps']} batch {settings['batch']}, {time.perf_counter() - started:.0f} s")
    print(
        f"qat_gain_2b_db={ours['image_psnr_db'] - post['image_psnr_db']:.2f} "
        f"qat_image_psnr_2b_db={ours['image_psnr_db']:.2f} qat_adherence_2b={ours['adherence']:.3f} "
        f"dkm_image_psnr_2b_db={dkm['image_psnr_db']:.2f} dkm_peak_gb={dkm['peak_gb']:.2f} "
        f"ours_peak_gb={ours['peak_gb']:.2f} exact={all(f[1].get('exact', False) for f in figures.values())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
