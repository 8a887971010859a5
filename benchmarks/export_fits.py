"""Benchmark the export's palettization: Core ML fitting every palette itself vs the workbench's fits handed over.

Converts one pipeline's UNet to float16 Core ML once, then palettizes the converted model twice with the same plan
(every candidate layer at --nbits, per-tensor k-means, the reference's `--quantize-nbits`), each time through
`workbench.coreml.export.compress_model`:

1. `coreml_fit`: without the torch module, so `palettize_weights` runs Core ML's own k-means on every weight (what
   every export did before the explicit-LUT path covered every mode);
2. `explicit`: with the torch module, so every palette is fitted by `workbench.palettes.fit.fit_palette` and stored
   as fitted (`workbench.coreml.explicit_lut`), as `workbench export` does now.

Both packages are saved and read back; every palettized weight must be bit-identical between the two and equal to
the simulation (`fit_palette(...).dense()`). Times are wall seconds of palettize + save, measured in one run. The
last line holds the figures:

    .venv/bin/python benchmarks/export_fits.py [MODEL] [--nbits 6] [--threads 2]

MODEL is a pipeline folder (e.g. a full-size SD-1.5 written by `workbench.models.architectures.save_pipeline`) or
omitted for the demo model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="pipeline folder or hub id (default: the demo model)")
    parser.add_argument("--nbits", type=int, default=6)
    parser.add_argument("--min-numel", type=int, default=None, help="default: the model's (2048 demo, 1e5 others)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from workbench.coreml.components import layer_weight_names
    from workbench.coreml.compress import compress_model
    from workbench.coreml.export import convert_component
    from workbench.coreml.verify import package_weights
    from workbench.models.layers import compressible_layers
    from workbench.models.loader import default_min_numel, load_pipeline
    from workbench.palettes.config import PaletteConfig
    from workbench.palettes.fit import fit_palette

    pipe = load_pipeline(args.model, device="cpu", progress=False)
    min_numel = default_min_numel(args.model) if args.min_numel is None else args.min_numel
    layers = compressible_layers(pipe.unet, min_numel=min_numel)
    config = PaletteConfig(args.nbits)
    plan = dict.fromkeys(layers, config)
    start = time.perf_counter()
    model = convert_component(pipe, "unet")
    convert_s = time.perf_counter() - start
    seconds, weights = {}, {}
    with tempfile.TemporaryDirectory(prefix="export-fits-") as tmp:
        for mode, module in (("coreml_fit", None), ("explicit", pipe.unet)):
            start = time.perf_counter()
            compressed = compress_model(model, plan, prefix="unet", module=module)
            path = Path(tmp) / f"{mode}.mlpackage"
            compressed.save(str(path))
            seconds[mode] = time.perf_counter() - start
            del compressed
            weights[mode] = package_weights(path)
            print(f"{mode}: palettize + save {seconds[mode]:.1f} s", flush=True)
    names = layer_weight_names(plan, "unet")
    identical = all(np.array_equal(weights["coreml_fit"][names[n]].view(np.uint16),
                                   weights["explicit"][names[n]].view(np.uint16)) for n in plan)  # fmt: skip
    simulated = True
    for n in plan:
        expected = fit_palette(layers[n].weight.detach(), config).dense()
        got = weights["explicit"][names[n]]
        simulated &= got.size == expected.size and np.array_equal(
            expected.view(np.uint16), got.view(np.uint16).reshape(expected.shape)
        )
    params = sum(m.weight.numel() for m in layers.values())
    print(
        f"model={args.model or 'demo'} layers={len(plan)} params={params} nbits={args.nbits} convert_s={convert_s:.1f}"
    )
    print(
        f"coreml_fit_s={seconds['coreml_fit']:.1f} explicit_s={seconds['explicit']:.1f} "
        f"speedup={seconds['coreml_fit'] / seconds['explicit']:.2f} identical={identical} exact={simulated}"
    )


if __name__ == "__main__":
    main()
