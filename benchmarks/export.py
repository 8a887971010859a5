"""Core ML export: wall time of trace + convert, of palettization + save, of verification, and package sizes.

Exports the demo model (data/tiny-shapes, or the tiny random SD pipeline while it is not built) with
`workbench.coreml.export_pipeline`: UNet, text encoder and VAE decoder, uniformly palettized at --nbits
(the reference's `--quantize-nbits`, default 6) or by a recipe file for the UNet. Every package is read back
and compared with the simulation. The last line holds the figures.

    .venv/bin/python benchmarks/export.py [MODEL] [--nbits 6 | --recipe FILE --recipe-name NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="pipeline folder or hub id (default: the demo model)")
    parser.add_argument("--nbits", type=int, default=None, help="uniform width (default 6 unless --recipe)")
    parser.add_argument("--recipe", default=None, help="recipe JSON for the UNet (ours or the reference's)")
    parser.add_argument("--recipe-name", default=None)
    parser.add_argument("--components", default="unet,text_encoder,vae_decoder")
    parser.add_argument("--min-numel", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="keep the packages here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from workbench.coreml import ExportConfig, export_pipeline
    from workbench.models.loader import DEMO_MODEL, load_pipeline
    from workbench.recipes.recipe import load_recipe

    model = args.model or (DEMO_MODEL if (DEMO_MODEL / "model_index.json").is_file() else None)
    if model is None:
        from workbench.models.tiny import tiny_sd_pipeline

        pipe, source = tiny_sd_pipeline(), "tiny_sd_pipeline (random weights; demo model not built)"
    else:
        pipe, source = load_pipeline(model, device="cpu"), str(model)
    recipe = load_recipe(args.recipe, args.recipe_name) if args.recipe else None
    nbits = args.nbits if args.nbits is not None or recipe is not None else 6
    components = [c for c in args.components.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        start = time.perf_counter()
        config = ExportConfig(
            recipe=recipe,
            nbits=None if recipe is not None else nbits,
            components=components,
            min_numel=args.min_numel,
        )
        report = export_pipeline(pipe, args.out or tmp, config, source=source)
        total_s = time.perf_counter() - start
    frame = report.to_frame()
    print(report.summary())
    print(frame.drop(columns=["path"]).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    n_layers = sum(len(p.verification.layers) for p in report.packages)
    n_exact = sum(c.bit_exact for p in report.packages for c in p.verification.layers)
    parts = [
        f"export {source}: {report.recipe_name}",
        f"convert {frame.export_s.sum():.1f}s",
        f"palettize+save {frame.compress_s.sum():.1f}s",
        f"verify {frame.verify_s.sum():.1f}s",
        f"total {total_s:.1f}s",
        f"packages {frame.nbytes.sum() / 1e6:.2f} MB vs float16 {frame.float16_nbytes.sum() / 1e6:.2f} MB "
        f"({100 * frame.nbytes.sum() / frame.float16_nbytes.sum():.1f}%)",
        *(f"{p.component} {p.nbytes / 1e6:.2f} MB {p.bits_per_param:.2f} b/p" for p in report.packages),
        f"bit-exact {n_exact}/{n_layers}",
    ]
    print("; ".join(parts))


if __name__ == "__main__":
    main()
