"""Prompt adherence of the tiny-shapes demo model: does it draw the colour, shape and position it is asked for?

Generates `--n` images (default 64) for fixed prompts (`workbench.demo.adherence.benchmark_attributes`) and seeds
(image i: `torch.Generator("cpu").manual_seed(seed + i)`) with the pipeline's own defaults (its scheduler,
`num_inference_steps=50`, `guidance_scale=7.5`, 64x64) in float32 on the CPU, reads every image with the
transparent scorer `workbench.demo.adherence.read_shape`, and prints, as its last line:

    color_adherence=X shape_adherence=Y position_adherence=Z

Usage:
    .venv/bin/python benchmarks/demo_quality.py [--model data/tiny-shapes] [--n 64] [--grid grid.png]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from workbench.demo.adherence import benchmark_attributes, generate_and_score
from workbench.models.loader import DEMO_MODEL, load_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="pipeline folder (default: the demo model)")
    parser.add_argument("--n", type=int, default=64, help="images to generate (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: best on a shared CPU)")
    parser.add_argument("--grid", default=None, help="also save the images as a PNG grid here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    report = generate_and_score(pipe, benchmark_attributes(args.n), seed=args.seed, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    frame = report.to_frame()
    print(f"model {args.model}: {args.n} images, {type(pipe.scheduler).__name__}, default steps, {seconds:.1f}s")
    for attribute in ("color", "shape", "position", "size"):
        by_value = frame.groupby(attribute)[f"{attribute}_ok"].mean().round(2).to_dict()
        print(f"  {attribute:8s} {frame[f'{attribute}_ok'].mean():.3f}  by requested value: {by_value}")
    if args.grid:
        from workbench.demo.card import adherence_grid

        adherence_grid(report).save(args.grid)
        print(f"grid: {args.grid}")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
