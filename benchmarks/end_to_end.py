"""The whole job at full size, as a user runs it: SD-1.5 analysed and exported, SDXL exported, chunks checked.

Full-size models are built from their published configs with RANDOM WEIGHTS (`workbench.models.architectures`,
latents 8x8 = 64 px, so the UNet forwards stay cheap on a CPU while every layer has its real shape); their images
are noise, their time, memory and layer shapes are real. Every step is the `workbench` command a user types, run
in its own process; its wall time and peak RSS (`os.wait4`'s `ru_maxrss`, the figure `/usr/bin/time -v` reports)
are measured. Parts:

- `chain`: `workbench analyze <SD-1.5> --sweep fast` (all 280 layers, default strategies, refinement included),
  then `workbench export` of its best recipe at or under 4.5 bits/param (the headline size), verified bit-exact.
  `sd15_chain_min` is the sum; the analysis' peak is reported over the UNet's float32 weights, and its overhead
  (wall / UNet forward) from its `run.json`.
- `sd15`: `workbench export <SD-1.5> --nbits 6` (the reference's uniform export), and with `--chunk-unet`, whose
  two chunks are then run in sequence in torch with the packages' weights and compared with the unchunked UNet.
- `sdxl`: `workbench export <SDXL> --recipe R --chunk-unet` with a mixed 4/6/8-bit recipe at about 4.5 bits/param
  over every candidate layer (widths by layer size, largest layers narrowest: a stand-in for an analysed recipe, which
  an SDXL analysis of every layer would take hours to make here), verified bit-exact.

    .venv/bin/python benchmarks/end_to_end.py [--work DIR] [--parts chain sd15 sdxl]

Each part's figures are kept in `<work>/results.json`, so parts can run apart (one at a time, each wanting the cores
to itself); the last line, for scripts, holds every part measured in that folder (a part never run prints NA):

    sd15_chain_min=A sd15_analysis_peak_over_weights_gb=G sd15_export_min=B sd15_export_peak_gb=C
    sdxl_export_min=D sdxl_export_peak_gb=E fullsize_overhead=F chunks_equal=True exact=True
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
HEADLINE_BITS = 4.5


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """Run a command (output to `log`); (wall seconds, peak RSS in GB). Fails loudly on a non-zero exit."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(command)}; see {log}")
    peak = usage.ru_maxrss * 1024 / 1e9  # KiB on Linux
    WRITTEN[log.stem] = usage.ru_oublock * 512 / 1e9  # blocks of 512 bytes, as getrusage counts them
    print(f"  {seconds / 60:.2f} min, peak RSS {peak:.2f} GB, wrote {WRITTEN[log.stem]:.2f} GB to disk", flush=True)
    return seconds, peak


WRITTEN: dict[str, float] = {}  # log name -> GB the step wrote to disk (its getrusage output blocks)


FOLDERS: dict[str, Path] = {}  # arch -> an existing full-size folder (--sd15 / --sdxl)


def full_size(arch: str, work: Path) -> Path:
    """The random-weight full-size pipeline folder, built once (or the one given on the command line)."""
    if arch in FOLDERS:
        return FOLDERS[arch]
    folder = work / f"{arch}-random"
    if not (folder / "model_index.json").exists():
        from workbench.models.architectures import save_pipeline

        save_pipeline(arch, folder)
    return folder


def unet_weight_gb(folder: Path) -> float:
    """The UNet's float32 weight bytes, in GB, from its config (meta device: nothing is allocated)."""
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(folder / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return sum(p.numel() for p in unet.parameters()) * 4 / 1e9


def exact(out: Path) -> bool:
    return json.loads((out / "verification.json").read_text())["all_bit_exact"]


def chain(work: Path, results: dict) -> None:
    sd15 = full_size("sd15", work)
    analysis = work / "an-sd15"
    seconds, peak = timed(
        [str(BIN / "workbench"), "analyze", str(sd15), "--sweep", "fast", "--threads", "2", "--out", str(analysis)],
        work / "analyze-sd15.log",
    )
    run = json.loads((analysis / "run.json").read_text())
    import pandas as pd

    recipes = pd.read_csv(analysis / "recipes.csv")
    best = recipes[recipes.bits_per_param <= HEADLINE_BITS].sort_values("psnr_mean").iloc[-1]
    print(
        f"  best recipe at <= {HEADLINE_BITS} bits/param: {best['name']} ({best.bits_per_param:.2f} b/p, "
        f"{best.psnr_mean:.2f} dB)"
    )
    out = work / "pk-sd15-chain"
    export_s, _ = timed(
        [
            str(BIN / "workbench"),
            "export",
            str(sd15),
            "--recipe",
            str(analysis / "preanalysis.json"),
            "--recipe-name",
            best["name"],
            "--out",
            str(out),
        ],
        work / "export-sd15-chain.log",
    )
    results.update(
        sd15_chain_min=(seconds + export_s) / 60,
        sd15_analysis_peak_over_weights_gb=peak - unet_weight_gb(sd15),
        fullsize_overhead=run["timing"]["overhead"],
        sd15_analysis_written_gb=WRITTEN["analyze-sd15"],
    )
    results.setdefault("exact", []).append(exact(out))


def sd15(work: Path, results: dict) -> None:
    folder = full_size("sd15", work)
    out = work / "pk-sd15-6bit"
    seconds, peak = timed(
        [str(BIN / "workbench"), "export", str(folder), "--nbits", "6", "--out", str(out)], work / "export-sd15.log"
    )
    results.update(sd15_export_min=seconds / 60, sd15_export_peak_gb=peak)
    results.setdefault("exact", []).append(exact(out))
    chunked = work / "pk-sd15-6bit-chunks"
    timed(
        [str(BIN / "workbench"), "export", str(folder), "--nbits", "6", "--chunk-unet", "--out", str(chunked)],
        work / "export-sd15-chunks.log",
    )
    results.setdefault("exact", []).append(exact(chunked))
    results["sd15_chunk_mb"] = _chunk_sizes(chunked)
    results["chunks_equal"] = chunks_equal(folder, chunked)


def _chunk_sizes(out: Path) -> list[float]:
    packages = json.loads((out / "verification.json").read_text())["packages"]
    return [round(p["nbytes"] / 1e6, 1) for p in packages]


def chunks_equal(folder: Path, chunked: Path) -> bool:
    """The chunks run in sequence (torch, the packages' weights) == the unchunked UNet with the same weights."""
    import torch

    from workbench.coreml import coreml_pipeline
    from workbench.coreml.chunks import chunk_pieces, emulate_chunks
    from workbench.coreml.layout import AppleUNet, apple_inputs
    from workbench.models.loader import load_pipeline

    pipe = load_pipeline(str(folder), device="cpu", dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(v.shape, generator=generator) for k, v in apple_inputs(pipe, "unet").items()}
    with coreml_pipeline(pipe, chunked) as emulated, torch.no_grad():
        pieces = chunk_pieces(pipe.unet, emulated.packages["unet"], "apple")
        equal = torch.equal(emulate_chunks(pieces, inputs)["noise_pred"], AppleUNet(pipe.unet)(**inputs))
    print(f"  chunks in sequence == unchunked UNet: {equal}")
    return equal


def size_recipe(folder: Path, target_bits: float = HEADLINE_BITS) -> dict[str, int]:
    """A mixed 4/6/8-bit recipe over every candidate layer at about `target_bits`: the largest layers at 4 bits
    until they hold (6 - target) / 2 of the weights, the other layers of over a million weights at 6, the rest at 8
    (a stand-in for an analysed recipe: the widths and sizes an export handles, not the choices)."""
    import torch
    from diffusers import UNet2DConditionModel

    from workbench.models.layers import compressible_layers
    from workbench.models.loader import default_min_numel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    layers = compressible_layers(unet, min_numel=default_min_numel(str(folder)))
    numels = {name: layer.weight.numel() for name, layer in layers.items()}
    total, share, recipe = sum(numels.values()), (6 - target_bits) / 2, {}
    running = 0
    for name in sorted(numels, key=numels.get, reverse=True):
        recipe[name] = 4 if running < share * total else (6 if numels[name] > 1_000_000 else 8)
        running += numels[name]
    return recipe


def sdxl(work: Path, results: dict) -> None:
    folder = full_size("sdxl-base", work)
    recipe = size_recipe(folder)
    path = work / "sdxl-size-recipe.json"
    path.write_text(json.dumps({"recipes": {"sdxl_size_recipe_4.5": recipe}}))
    out = work / "pk-sdxl"
    seconds, peak = timed(
        [str(BIN / "workbench"), "export", str(folder), "--recipe", str(path), "--chunk-unet", "--out", str(out)],
        work / "export-sdxl.log",
    )
    packages = json.loads((out / "verification.json").read_text())["packages"]
    print(
        f"  SDXL chunks: {_chunk_sizes(out)} MB, {packages[0]['bits_per_param']:.2f} / "
        f"{packages[1]['bits_per_param']:.2f} bits/param"
    )
    results.update(sdxl_export_min=seconds / 60, sdxl_export_peak_gb=peak, sdxl_chunk_mb=_chunk_sizes(out))
    results.setdefault("exact", []).append(exact(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-end-to-end", help="folder for the models, packages and logs")
    parser.add_argument("--parts", nargs="+", choices=("chain", "sd15", "sdxl"), default=["chain", "sd15", "sdxl"])
    parser.add_argument("--sd15", type=Path, help="an existing full-size SD-1.5 folder (save_pipeline('sd15', ...))")
    parser.add_argument("--sdxl", type=Path, help="an existing full-size SDXL folder")
    args = parser.parse_args()
    FOLDERS.update({arch: path for arch, path in (("sd15", args.sd15), ("sdxl-base", args.sdxl)) if path})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"  # parts measured by earlier runs in this folder are kept, each under its name
    by_part = json.loads(saved.read_text()) if saved.exists() else {}
    for part in args.parts:
        by_part[part] = {}
        {"chain": chain, "sd15": sd15, "sdxl": sdxl}[part](work, by_part[part])
        saved.write_text(json.dumps(by_part, indent=2, default=str))
    results = {k: v for part in by_part.values() for k, v in part.items() if k != "exact"}
    results["exact"] = [flag for part in by_part.values() for flag in part.get("exact", [])]
    keys = (
        "sd15_chain_min",
        "sd15_analysis_peak_over_weights_gb",
        "sd15_export_min",
        "sd15_export_peak_gb",
        "sdxl_export_min",
        "sdxl_export_peak_gb",
        "fullsize_overhead",
        "chunks_equal",
    )
    fields = [
        f"{k}={results[k]:.2f}" if isinstance(results.get(k), float) else f"{k}={results.get(k, 'NA')}" for k in keys
    ]
    flags = results.get("exact", [])
    print(" ".join(fields), f"exact={bool(flags) and all(flags)}")


if __name__ == "__main__":
    main()
