"""Benchmark coremltools' SKMPalettizer against the workbench's plain per-tensor k-means at the same widths.

Runs `workbench.analysis.skm.compare_with_skm` on the demo model (or `--model`) with the analysis' settings (8 prompts,
CFG, seed 0, the model's `min_numel`): per width, SKM's sensitivity-weighted palettes (Fisher of the squared error
to the float UNet's output over 128 calibration samples: 8 prompts x 16 trajectory steps) and the workbench's
k-means palettes, both per-tensor LUTs on every candidate layer (the same size), measured as one-step latent PSNR
with the analysis' probe. Prints per width: SKM PSNR, ours, delta (ours minus SKM) and SKM's wall time; the
last line holds the deltas in dB. Example:
    .venv/bin/python benchmarks/skm.py

Measured (demo model, 180 candidates, 1 torch thread, shared 2-core CPU, 388 s): 4-bit skm 41.56 dB, ours
40.38 dB; 6-bit skm 52.59 dB, ours 52.09 dB; last line `skm4_delta=-1.19 skm6_delta=-0.50`. One-off checks of where
the gap comes from: coremltools' k-means with uniform importance (no Fisher) gives 41.34 dB at 4 bits, and exact
1-D k-means on every layer (`workbench.palettes.kmeans.kmeans_float16`, also on the 117 layers under 10,000 weights
that
Core ML's `palettize_weights` fits with scikit-learn's KMeans, tol=1e-2) gives 41.25 dB at 4 bits and 52.69 dB at
6 bits: most of the gap is the scikit-learn path of small layers, the Fisher weighting adds 0.2-0.3 dB at 4 bits.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from workbench.analysis.config import AnalysisConfig
    from workbench.analysis.skm import DEFAULT_CALIBRATION_SAMPLES, compare_with_skm
    from workbench.models.loader import default_min_numel, load_pipeline, model_from_text
    from workbench.threads import torch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model spec; default: the demo model")
    parser.add_argument("--nbits", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--num-calibration", type=int, default=DEFAULT_CALIBRATION_SAMPLES)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    model = model_from_text(args.model)
    with torch_threads(args.threads):
        pipe = load_pipeline(model, device="cpu", progress=False)
        start = time.perf_counter()
        config = AnalysisConfig(min_numel=default_min_numel(model))
        result = compare_with_skm(pipe, tuple(args.nbits), config, num_calibration=args.num_calibration)
        wall = time.perf_counter() - start
    print(f"model: {args.model or 'demo model'}; {result.layers} candidate layers (min_numel {config.min_numel}); "
          f"{result.num_calibration} calibration samples ({result.sensitivity_seconds:.1f} s for the trajectories and "
          f"the sensitivities); torch threads {args.threads}")  # fmt: skip
    for c in result.comparisons:
        print(f"{c.nbits}-bit ({c.bits_per_param:.2f} b/p): skm {c.skm_psnr:.2f} dB, ours {c.ours_psnr:.2f} dB, "
              f"delta {c.delta:+.2f} dB (skm k-means {c.skm_seconds:.1f} s)")  # fmt: skip
    print(f"wall_s={wall:.1f} (pipeline load excluded)")
    print(" ".join(f"skm{c.nbits}_delta={c.delta:.2f}" for c in result.comparisons))


if __name__ == "__main__":
    main()
