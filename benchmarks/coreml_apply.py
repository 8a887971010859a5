"""From a recipe to an app, on the demo model: Apple-layout export, then `workbench apply` to a float16 UNet package.

Runs the commands a user types (through `workbench.cli.main.main`), in --out (default: a temporary folder):

    workbench export --layout apple --nbits 6 --components unet,text_encoder,vae_decoder --out OUT/apple6
    workbench export --layout apple --components unet --out OUT/float16          # the float16 Unet.mlpackage
    workbench apply OUT/float16/Unet.mlpackage --recipe OUT/recipe.json --out OUT/applied

`OUT/recipe.json` is a mixed-bit recipe for the demo model's UNet (a reference-format pre-analysis file): widths
cycling through 2, 4, 6, 8 and 16 over the layers with more than 2048 weights (2, 4, 16 under 10,000 weights);
or pass `--recipe FILE --recipe-name NAME` (e.g. a recipe of `workbench analyze`).
Every palettized weight is read back from the saved packages and compared with the simulation bit for bit. The
last line holds the figures:

    export_bit_exact=True apply_bit_exact=True n_palettized=N unet_float16_mb=X unet_6bit_mb=Y unet_mixed_mb=Z ...

    .venv/bin/python benchmarks/coreml_apply.py [--out DIR] [--recipe FILE --recipe-name NAME]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def write_demo_recipe(path: Path) -> dict[str, int]:
    """A mixed-bit recipe over the demo UNet's layers with more than 2048 weights, saved as a pre-analysis file."""
    from workbench.models.layers import compressible_layers
    from workbench.models.loader import load_pipeline
    from workbench.recipes.recipe import PreAnalysis

    unet = load_pipeline(None, device="cpu", progress=False).unet
    small, large = (2, 4, 16), (2, 4, 6, 8, 16)
    bits = {}
    for i, (name, layer) in enumerate(compressible_layers(unet, 2048).items()):
        widths = small if layer.weight.numel() < 10_000 else large
        bits[name] = widths[i % len(widths)]
    PreAnalysis(model_version="tiny-shapes", baselines={}, recipes={"recipe_mixed": bits}).save(path)
    return bits


def _cli(*argv: str) -> float:
    from workbench.cli.main import main

    start = time.perf_counter()
    status = main(list(argv))
    if status != 0:
        raise SystemExit(f"workbench {' '.join(argv)} exited {status}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipe", default=None, help="recipe JSON (default: the cycling recipe above)")
    parser.add_argument("--recipe-name", default=None, help="which recipe of --recipe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.recipe is None:
            write_demo_recipe(out / "recipe.json")
        recipe = Path(args.recipe or out / "recipe.json")
        chosen = ["--recipe-name", args.recipe_name] if args.recipe_name else []
        comps = "unet,text_encoder,vae_decoder"
        t_export = _cli("export", "--layout", "apple", "--nbits", "6", "--components", comps, "--out", str(out / "a6"))
        t_float = _cli("export", "--layout", "apple", "--components", "unet", "--out", str(out / "float16"))
        unet = str(out / "float16" / "Unet.mlpackage")
        t_apply = _cli("apply", unet, "--recipe", str(recipe), *chosen, "--out", str(out / "applied"))
        exported = json.loads((out / "a6" / "verification.json").read_text())
        applied = json.loads((out / "applied" / "verification.json").read_text())
        sizes = {p["component"]: p["nbytes"] / 1e6 for p in exported["packages"]}
        mixed = applied["packages"][0]
        checks = mixed["verification"]["layers"]
        print(
            f"export_bit_exact={exported['all_bit_exact']} apply_bit_exact={applied['all_bit_exact']} "
            f"n_palettized={sum(c['bit_exact'] for c in checks)}/{len(checks)} "
            f"unet_float16_mb={mixed['float16_nbytes'] / 1e6:.2f} unet_6bit_mb={sizes['unet']:.2f} "
            f"unet_mixed_mb={mixed['nbytes'] / 1e6:.2f} mixed_bits_per_param={mixed['bits_per_param']:.2f} "
            f"text_encoder_6bit_mb={sizes['text_encoder']:.2f} vae_decoder_6bit_mb={sizes['vae_decoder']:.2f} "
            f"export_s={t_export:.0f} float16_export_s={t_float:.0f} apply_s={t_apply:.0f}"
        )


if __name__ == "__main__":
    main()
