"""Benchmark the pre-analysis: UNet evaluations, wall time, time inside UNet forward, overhead, and ours vs reference.

Runs `workbench.analysis.run.run_analysis` fresh (no resume) on the demo model if it is built, else on the tiny SD
pipeline, with the reference's settings (8 prompts, CFG, widths 1 2 4 6 8, 1 step, latent PSNR), and prints

- UNet evaluations (each one CFG-batch forward), wall time of the whole analysis (probe, k-means, sweeps,
  recipes, store writes; pipeline loading excluded), time inside UNet forward (perf_counter around the call),
  overhead = wall / forward (the reference measured 1.40 on this machine: 399 s / 285 s);
- end-to-end PSNR of every reference-rule recipe and the best size-aware recipe at equal or smaller bits/param.

The last line holds the figures. Example:
    .venv/bin/python benchmarks/sweep.py --out reports/sweep-bench
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from workbench.analysis.config import AnalysisConfig
    from workbench.analysis.run import run_analysis
    from workbench.models.loader import DEMO_MODEL, is_demo_model, load_pipeline
    from workbench.threads import torch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the demo model if built, else tiny-sd")
    parser.add_argument("--out", default="reports/sweep-bench", help="output folder (its store is started afresh)")
    parser.add_argument("--nbits", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    parser.add_argument("--min-numel", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    model = args.model or (None if (DEMO_MODEL / "model_index.json").is_file() else "tiny-sd")
    with torch_threads(args.threads):
        t0 = time.perf_counter()
        pipe = load_pipeline(model, device="cpu", progress=False)
        load_s = time.perf_counter() - t0
        config = AnalysisConfig(nbits=tuple(args.nbits), min_numel=args.min_numel)
        result = run_analysis(pipe, config, out_dir=args.out, resume=False, progress=True)
    t = result.timing
    name = "demo model" if model is None or is_demo_model(model) else model
    print(f"model: {name}; {len(result.layers)} candidate layers; UNet batch {t.unet_batch}; torch threads "
          f"{args.threads}; pipeline load {load_s:.1f} s (not counted)")  # fmt: skip
    print(result.recipes_frame().round(3).to_string(index=False))
    matched = result.matched_comparison()
    for p in matched:
        ref = f"ref {p.reference} ({p.reference_bpp:.3f} b/p): {p.reference_psnr:.2f} dB"
        ours = f"ours {p.ours} ({p.ours_bpp:.3f} b/p): {p.ours_psnr:.2f} dB"
        print(f"  {ref} | {ours} | gain {p.gain_db:+.2f} dB")
    gain = matched.mean_gain_db(min_bpp=3.0, max_bpp=6.0)
    vs = "; ".join(f"{p.reference_bpp:.2f}b/p ref {p.reference_psnr:.1f} ours {p.ours_psnr:.1f}" for p in matched)
    print(
        f"unet_evals={t.unet_evaluations} wall_s={t.wall_s:.1f} forward_s={t.forward_s:.1f} "
        f"overhead={t.overhead:.3f} kmeans_fits={t.kmeans_fits} mean_gain_3to6_bpp_db={gain:+.2f} | {vs}"
    )


if __name__ == "__main__":
    main()
