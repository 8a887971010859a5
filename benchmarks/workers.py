"""Benchmark the sharded analysis: the same pre-analysis on 1 and 2 Ray workers (and optionally in one process).

Runs `workbench.analysis.run.run_analysis` fresh (no resume) with a `workbench.sweep.ray_executor.RayExecutor` of each
worker
count, in one Ray runtime started once (its start-up is printed, not counted), on the demo model if it is built,
else on the tiny SD pipeline, with the reference's settings (8 prompts, widths 1 2 4 6 8). Each run's wall time
counts everything the user waits for after the runtime is up: the workers loading the pipeline and recording the
probe, the sweeps, the recipes. It prints per run the wall time and per worker its load time, evaluations, busy
seconds and palette fits, then

- the speed-up: wall time with 1 worker / with the most workers;
- the per-worker overhead: how much longer than its share (wall with 1 worker / workers) each worker took;
- whether every run wrote a byte-identical `preanalysis.json` (with `--single`, the in-process run's too).

The last line holds the figures. On a 2-core machine, run it with nothing else running. Example:
    .venv/bin/python benchmarks/workers.py --out reports/workers-bench
    .venv/bin/python benchmarks/workers.py --nbits 2 4 --prompts 2   # a short check
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    import ray

    from workbench.analysis.config import DEFAULT_PROMPTS, AnalysisConfig
    from workbench.analysis.run import run_analysis
    from workbench.models.loader import DEMO_MODEL, load_pipeline
    from workbench.sweep.ray_executor import RayExecutor, init_ray
    from workbench.threads import torch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the demo model if built, else tiny-sd")
    parser.add_argument("--out", default="reports/workers-bench", help="output folder (one subfolder per run)")
    parser.add_argument("--nbits", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    parser.add_argument("--min-numel", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=len(DEFAULT_PROMPTS), help="the first N built-in prompts")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--single", action="store_true", help="also run in this process (1 torch thread)")
    args = parser.parse_args()

    model = args.model or (None if (DEMO_MODEL / "model_index.json").is_file() else "tiny-sd")
    config = AnalysisConfig(nbits=tuple(args.nbits), min_numel=args.min_numel, prompts=DEFAULT_PROMPTS[: args.prompts])
    out = Path(args.out)
    with torch_threads(1):
        pipe = load_pipeline(model, device="cpu", progress=False)
        t0 = time.perf_counter()
        init_ray(num_cpus=max(args.workers))
        print(f"model: {model or 'demo model'}; Ray runtime with {max(args.workers)} CPUs started in "
              f"{time.perf_counter() - t0:.1f} s (not counted)")  # fmt: skip
        walls, files = {}, {}
        try:
            if args.single:
                t0 = time.perf_counter()
                run_analysis(pipe, config, out_dir=out / "single", resume=False, progress=False)
                walls["single"] = time.perf_counter() - t0
                files["single"] = (out / "single" / "preanalysis.json").read_bytes()
                print(f"single process: wall {walls['single']:.1f} s")
            for n in args.workers:
                t0 = time.perf_counter()
                with RayExecutor(model, workers=n) as executor:
                    result = run_analysis(pipe, config, out_dir=out / f"w{n}", resume=False, progress=False,
                                          executor=executor)  # fmt: skip
                walls[n] = time.perf_counter() - t0
                files[n] = (out / f"w{n}" / "preanalysis.json").read_bytes()
                print(f"{n} worker(s): wall {walls[n]:.1f} s, {result.timing.evaluations} evaluations")
                for w in result.execution["workers"]:
                    print(f"  worker {w['worker']}: load {w['load_s']:.1f} s, {w['evaluations']} evaluations, "
                          f"busy {w['busy_s']:.1f} s (UNet {w['forward_s']:.1f} s), {w['kmeans_fits']} palettes "
                          f"fitted, {w['palettes_imported']} taken from other workers")  # fmt: skip
        finally:
            ray.shutdown()
    first, most = min(args.workers), max(args.workers)
    speedup = walls[first] / walls[most]
    overhead = walls[most] - walls[first] * first / most
    identical = len(set(files.values())) == 1
    single = f" single_s={walls['single']:.1f}" if "single" in walls else ""
    print(f"workers_speedup={speedup:.2f} identical={identical} workers={first}->{most} "
          f"wall_{first}_s={walls[first]:.1f} wall_{most}_s={walls[most]:.1f} "
          f"per_worker_overhead_s={overhead:.1f}{single}")  # fmt: skip


if __name__ == "__main__":
    main()
