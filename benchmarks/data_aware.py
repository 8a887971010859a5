"""Data-aware vs plain k-means palettes at equal width, layer by layer, on the demo model.

The analysis' calibration: the one-step probe on its 8 default prompts (CFG, seed 0). Importances are the input
channels' second moments gathered during that probe (`collect_importance`); every candidate layer (the demo's
`default_min_numel`, 180 layers) is palettized at 2, 3, 4 and 6 bits per tensor, once with plain k-means
(`kmeans<n>`) and once data-aware (`wkmeans<n>`), and compared by

- the layer-output MSE on the inputs the layer received in the probe (`layer_output_mse`; in-sample: the
  calibration inputs, which are also the inputs the analysis measures on),
- the same on held-out prompts: importances from the first 4 prompts, outputs on the last 4,
- with `--psnr`, the one-step latent PSNR with that layer alone palettized (mean over the prompts, unrounded).

Equal width means equal size: both store the same indices and one LUT of 2**n float16 values. The last line holds
the counts, "better" meaning a strictly lower error (a higher PSNR). Measured (2-core CPU shared with other jobs,
337 s; with `--psnr --psnr-widths 2 4` 1,440 s):

    data_aware_better=528/720 (layer-output MSE, layers x widths 2 3 4 6) w2=119/180 w3=132/180 w4=127/180
    w6=150/180 holdout_better=541/720 psnr_better=194/360 median_gain_db=0.27

    .venv/bin/python benchmarks/data_aware.py [--psnr [--psnr-widths 2 4]] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch

from workbench.analysis.config import DEFAULT_PROMPTS
from workbench.metrics import psnr_per_item
from workbench.models.layers import compressible_layers
from workbench.models.loader import default_min_numel, load_pipeline
from workbench.palettes.apply import palettized
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import fit_palette
from workbench.palettes.importance import capture_inputs, collect_importance, layer_output_mse
from workbench.sweep.probe import OneStepProbe

WIDTHS = (2, 3, 4, 6)


def _psnr(probe: OneStepProbe) -> float:
    return float(np.mean(psnr_per_item(probe.reference, probe(), decimals=None)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--psnr", action="store_true", help="also the one-step PSNR per (layer, width, mode)")
    parser.add_argument("--psnr-widths", type=int, nargs="+", default=list(WIDTHS), help="widths for --psnr")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    layers = compressible_layers(unet, default_min_numel(None))
    probe = OneStepProbe(pipe, DEFAULT_PROMPTS, seed=0)
    importance = collect_importance(unet, layers, probe)
    inputs = capture_inputs(unet, layers, probe)
    half = len(DEFAULT_PROMPTS) // 2
    calibration = collect_importance(unet, layers, OneStepProbe(pipe, DEFAULT_PROMPTS[:half], seed=0))
    held_out = capture_inputs(unet, layers, OneStepProbe(pipe, DEFAULT_PROMPTS[half:], seed=0))
    print(f"{len(layers)} layers, importances and inputs captured in {time.perf_counter() - start:.1f}s")

    better, holdout, psnr_better, gains = Counter(), Counter(), Counter(), {n: [] for n in WIDTHS}
    for i, (name, layer) in enumerate(layers.items()):
        if i % 30 == 0:
            print(f"layer {i}/{len(layers)} at {time.perf_counter() - start:.0f}s", flush=True)
        weight = layer.weight
        for nbits in WIDTHS:
            plain = fit_palette(weight, PaletteConfig(nbits))
            aware = fit_palette(
                weight, PaletteConfig(nbits, "wkmeans"), importance=importance.for_weight(name, weight.shape)
            )
            mse = [layer_output_mse(layer, inputs[name], p.dense()) for p in (plain, aware)]
            better[nbits] += mse[1] < mse[0]
            gains[nbits].append(10 * np.log10(mse[0] / mse[1]))
            cal = fit_palette(
                weight, PaletteConfig(nbits, "wkmeans"), importance=calibration.for_weight(name, weight.shape)
            )
            holdout[nbits] += layer_output_mse(layer, held_out[name], cal.dense()) < layer_output_mse(
                layer, held_out[name], plain.dense()
            )
            if args.psnr and nbits in args.psnr_widths:
                psnrs = []
                for config in (PaletteConfig(nbits), PaletteConfig(nbits, "wkmeans")):
                    with palettized(unet, {name: config}, importance=importance):
                        psnrs.append(_psnr(probe))
                psnr_better[nbits] += psnrs[1] > psnrs[0]
    total = len(layers) * len(WIDTHS)
    for n in WIDTHS:
        line = (
            f"{n}-bit: data-aware lower output MSE on {better[n]}/{len(layers)} layers (held out {holdout[n]}), "
            f"median gain {np.median(gains[n]):.2f} dB"
        )
        print(line + (f", higher one-step PSNR on {psnr_better[n]}" if args.psnr and n in args.psnr_widths else ""))
    print(f"total time {time.perf_counter() - start:.0f}s")
    psnr_total = len(layers) * len(set(args.psnr_widths) & set(WIDTHS))
    psnr_part = f" psnr_better={sum(psnr_better.values())}/{psnr_total}" if args.psnr else ""
    per_width = " ".join(f"w{n}={better[n]}/{len(layers)}" for n in WIDTHS)
    print(
        f"data_aware_better={sum(better.values())}/{total} (layer-output MSE, layers x widths 2 3 4 6) "
        f"{per_width} holdout_better={sum(holdout.values())}/{total}{psnr_part} "
        f"median_gain_db={np.median(np.concatenate([gains[n] for n in WIDTHS])):.2f}"
    )


if __name__ == "__main__":
    main()
