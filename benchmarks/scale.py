"""Real scale on this machine: full-size SD-1.5 and SDXL UNets (random weights, published configs).

For each architecture, in a fresh subprocess (so peak memory is its own): build the pipeline at small latents
(`workbench.models.architectures`), run `run_analysis` on a layer subset (`--layers`), and report the UNet's
per-forward time, the analysis' peak resident memory minus the weights' bytes (Linux VmHWM, reset after the
build; reported as a bound for the full analysis: the subset's figure plus the palette budget it left
unused), and the extrapolated wall time of the reference's full analysis (1 + 10 N + 4 + 2 K evaluations at
widths 1 2 4 6 8) at these latents on this machine. Then, on the largest layer (29.5M weights), palette fit
times by width and the 8-bit fit against coremltools' own k-means path, with a bit-exactness check.
The last line holds the figures:

    sd15_rss_over_weights_gb=X sdxl_rss_over_weights_gb=Y fit8_speedup=Z exact=True ...

    .venv/bin/python benchmarks/scale.py [--archs sd15 sdxl-base] [--layers 'mid_block.*'] [--sample-size 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REFERENCE_WIDTHS, REFERENCE_RECIPES = 5, 7
# The analysed subsets: SD-1.5's middle block (18 layers); SDXL's is 10 transformer blocks deep, so its resnets.
DEFAULT_SUBSETS = {"sd15": ["mid_block.*"], "sd21-base": ["mid_block.*"], "sdxl-base": ["mid_block.resnets.*"]}


def _vm(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one(arch: str, layers: list[str], sample_size: int, nbits: list[int]) -> dict:
    """Build `arch`, analyse the `layers` subset, return the figures (runs in its own process)."""
    import tempfile

    import torch

    from workbench.analysis.config import AnalysisConfig
    from workbench.analysis.run import run_analysis
    from workbench.models.architectures import build_pipeline
    from workbench.models.layers import compressible_layers
    from workbench.palettes.cache import DEFAULT_PALETTE_MEMORY, PaletteCache

    torch.set_num_threads(1)
    start = time.perf_counter()
    pipe = build_pipeline(arch, sample_size=sample_size)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in pipe.components["unet"].parameters())
    weights += sum(
        p.numel() * p.element_size()
        for name, module in pipe.components.items()
        if name != "unet" and isinstance(module, torch.nn.Module)
        for p in module.parameters()
    )
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the build's own peak is not the analysis'
    config = AnalysisConfig(nbits=tuple(nbits), prompts=("a photo of a cat",), layers=tuple(layers), num_recipes=3)
    with tempfile.TemporaryDirectory() as spill:
        cache = PaletteCache(max_bytes=DEFAULT_PALETTE_MEMORY, spill_dir=spill)  # what run_analysis makes itself
        result = run_analysis(pipe, config, progress=False, cache=cache)
    peak = _vm("VmHWM")
    # A full analysis differs from the subset's by the palettes it holds: at most the budget (the stash of
    # originals is bounded the same way, and the int8 baselines already replaced every weight here).
    headroom = DEFAULT_PALETTE_MEMORY - cache.peak_nbytes
    t = result.timing
    n_all = len(compressible_layers(pipe.unet, config.min_numel))
    full_evals = 1 + 10 * n_all + 4 + 2 * REFERENCE_RECIPES
    per_eval_s = t.wall_s / t.evaluations
    return {
        "arch": arch,
        "build_s": build_s,
        "weights_gb": weights / 1e9,
        "peak_rss_gb": peak / 1e9,
        "subset_rss_over_weights_gb": (peak - weights) / 1e9,
        "rss_over_weights_gb": (peak - weights + headroom) / 1e9,  # the bound for the full analysis
        "palettes_peak_gb": cache.peak_nbytes / 1e9,
        "subset_layers": len(result.layers),
        "evaluations": t.evaluations,
        "wall_s": t.wall_s,
        "forward_s": t.forward_s / t.unet_evaluations,
        "overhead": t.overhead,
        "candidates": n_all,
        "full_evaluations": full_evals,
        "full_h": full_evals * per_eval_s / 3600,
    }


def fit_times(numel: int = 29_491_200) -> dict:
    """Fit times by width for a weight the size of SD-1.5's largest layer, and 8 bits against coremltools."""
    from workbench.palettes.config import PaletteConfig
    from workbench.palettes.fit import fit_palette

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    rng = np.random.default_rng(0)
    weight = (rng.standard_t(5, size=(1280, numel // 1280)) * 0.02).astype(np.float16)
    fit_palette(weight[:64], PaletteConfig(nbits=8))  # compile / load the solver once, outside the timings
    out = {}
    for nbits in (1, 2, 4, 6, 8):
        start = time.perf_counter()
        palette = fit_palette(weight, PaletteConfig(nbits=nbits))
        out[f"fit{nbits}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    lut, indices = _get_kmeans_lookup_table_and_weight(8, weight)
    out["ct8_s"] = time.perf_counter() - start
    theirs = lut.astype(np.float16)[indices.reshape(weight.shape)]
    out["exact"] = bool(np.array_equal(palette.dense().view(np.uint16), theirs.view(np.uint16)))
    out["fit8_speedup"] = out["ct8_s"] / out["fit8_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["sd15", "sdxl-base"])
    parser.add_argument("--layers", nargs="+", default=None, help="analysed subset (globs; default per architecture)")
    parser.add_argument("--sample-size", type=int, default=8, help="latent side (8: 64 px images)")
    parser.add_argument("--nbits", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one architecture, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.layers or DEFAULT_SUBSETS[args.one], args.sample_size, args.nbits)))
        return
    runs = {}
    for arch in args.archs:
        cmd = [sys.executable, __file__, "--one", arch, "--sample-size", str(args.sample_size)]
        cmd += ["--layers", *(args.layers or DEFAULT_SUBSETS[arch]), "--nbits", *map(str, args.nbits)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[arch] = json.loads(out.strip().splitlines()[-1])
        r = runs[arch]
        print(
            f"{arch}: built in {r['build_s']:.0f} s, weights {r['weights_gb']:.2f} GB, analysis of "
            f"{r['subset_layers']} layers ({r['evaluations']} evaluations) {r['wall_s']:.0f} s, forward "
            f"{r['forward_s']:.2f} s, overhead {r['overhead']:.2f}, peak RSS {r['peak_rss_gb']:.2f} GB "
            f"(+{r['subset_rss_over_weights_gb']:.2f} over the weights, palettes {r['palettes_peak_gb']:.2f} GB; "
            f"full analysis bound +{r['rss_over_weights_gb']:.2f}); full analysis ({r['candidates']} layers, "
            f"{r['full_evaluations']} evaluations) ~{r['full_h']:.1f} h",
            flush=True,
        )
    fits = fit_times()
    print("fits of a 29.5M-weight layer: " + ", ".join(f"{b}-bit {fits[f'fit{b}_s']:.2f} s" for b in (1, 2, 4, 6, 8)))
    figures = [f"{a.split('-')[0]}_rss_over_weights_gb={r['rss_over_weights_gb']:.2f}" for a, r in runs.items()]
    figures += [f"fit8_speedup={fits['fit8_speedup']:.1f}", f"exact={fits['exact']}"]
    figures += [f"{a.split('-')[0]}_forward_s={r['forward_s']:.2f}" for a, r in runs.items()]
    figures += [f"{a.split('-')[0]}_full_h={r['full_h']:.1f}" for a, r in runs.items()]
    print(" ".join(figures))


if __name__ == "__main__":
    main()
