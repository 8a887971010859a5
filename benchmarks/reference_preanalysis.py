"""Apple's pre-analysis script, run unmodified on a local pipeline folder, to measure it beside `workbench analyze`.

The script (`python_coreml_stable_diffusion/mixed_bit_compression_pre_analysis.py` in apple/ml-stable-diffusion) is
not vendored: pass a checkout with --apple-src (e.g. a `git archive` of the repository). This shim runs its
`main(args)` as it is, with only what it cannot have offline or on a local folder put in place around it:

- it imports `python_coreml_stable_diffusion.torch2coreml` (which needs diffusionkit and the Core ML conversion
  stack) for two names only: `compute_psnr`, taken here from torch2coreml's own source (that one function, compiled
  from the file), and `get_pipeline`, which here loads the local folder in float32 on the CPU, as `workbench
  analyze` does (Apple's loads `variant="fp16"` weights from the hub);
- its int8 baseline builds a `coremltools.optimize.coreml._quantization_passes.AffineQuantParams`, a plain record
  of four attributes that coremltools 9 no longer has: an empty class stands in where it is missing;
- at import it fetches eight test images for img2img pipelines with `requests.get` (not reachable here; not used
  by a text-to-image pipeline): a stand-in returns a blank image;
- its fixed settings are set to `workbench analyze`'s defaults on the model: candidate layers over --min-numel
  weights (its `PALETTIZE_MIN_SIZE`, 1e5, is the default of `get_palettizable_modules`), images of --resolution px
  (its `TEST_RESOLUTION`, 768), one torch thread. Its 8 prompts, widths 1 2 4 6 8, 7 recipes are its own.

Peak RSS is the process's `ru_maxrss`; run it under `/usr/bin/time -v` for the same figure from outside. The
script resumes from the JSON in its output folder (its sweeps are kept there as they finish). The last
line holds the figures. Example:
    git -C ml-stable-diffusion archive HEAD python_coreml_stable_diffusion | tar -x -C /tmp/apple
    /usr/bin/time -v .venv/bin/python benchmarks/reference_preanalysis.py --apple-src /tmp/apple --out /tmp/ref
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import resource
import sys
import time
import types
from pathlib import Path

PACKAGE = "python_coreml_stable_diffusion"


def _compute_psnr(apple_src: Path):
    """torch2coreml's `compute_psnr`, compiled from its source file alone (the module needs what is not here)."""
    import numpy as np

    path = apple_src / PACKAGE / "torch2coreml.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compute_psnr")
    namespace = {"np": np}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["compute_psnr"]


def _install_stand_ins(apple_src: Path) -> None:
    """`python_coreml_stable_diffusion.torch2coreml` with `compute_psnr` and `get_pipeline`; `requests.get`."""
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

    def get_pipeline(args):
        return DiffusionPipeline.from_pretrained(args.model_version, torch_dtype=torch.float32)

    torch2coreml = types.ModuleType(f"{PACKAGE}.torch2coreml")
    torch2coreml.compute_psnr = _compute_psnr(apple_src)
    torch2coreml.get_pipeline = get_pipeline
    sys.modules[f"{PACKAGE}.torch2coreml"] = torch2coreml

    def blank_image(url, stream=False, **kwargs):  # what its img2img test images become offline
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        buffer.seek(0)
        return types.SimpleNamespace(raw=buffer)

    sys.modules["requests"] = types.SimpleNamespace(get=blank_image)

    from coremltools.optimize.coreml import _quantization_passes

    if not hasattr(_quantization_passes, "AffineQuantParams"):  # coremltools < 8 had it; the script sets 4 fields
        _quantization_passes.AffineQuantParams = type("AffineQuantParams", (), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apple-src", required=True, type=Path, help=f"folder holding {PACKAGE}/ (Apple's sources)")
    parser.add_argument("--model", default="data/tiny-shapes", help="a diffusers pipeline folder (default: the demo)")
    parser.add_argument("--out", required=True, help="its output folder (-o): the recipe JSON and the PSNR plot")
    parser.add_argument("--min-numel", type=int, default=2048, help="candidate layers have more weights (2048)")
    parser.add_argument("--resolution", type=int, default=0, help="image size in px (default: the pipeline's own)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.apple_src.resolve()))
    _install_stand_ins(args.apple_src)
    start = time.perf_counter()
    from python_coreml_stable_diffusion import mixed_bit_compression_pre_analysis as reference

    if args.resolution:
        reference.TEST_RESOLUTION = args.resolution
    else:
        config = json.loads((Path(args.model) / "unet" / "config.json").read_text())
        vae = json.loads((Path(args.model) / "vae" / "config.json").read_text())
        reference.TEST_RESOLUTION = config["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    reference.get_palettizable_modules.__defaults__ = (args.min_numel,)
    options = argparse.Namespace(
        o=args.out, model_version=str(Path(args.model).resolve()), default_nbits=16, num_recipes=7,
        custom_vae_version=None,
    )  # fmt: skip
    reference.main(options)
    wall_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    recipes = next(Path(args.out).glob("*_palettization_recipe.json"))
    distinct = len({json.dumps(r, sort_keys=True) for r in json.loads(recipes.read_text())["recipes"].values()})
    print(
        f"reference_peak_rss_mb={peak_mb:.0f} reference_wall_s={wall_s:.0f} resolution={reference.TEST_RESOLUTION} "
        f"distinct_recipes={distinct}"
    )


if __name__ == "__main__":
    main()
