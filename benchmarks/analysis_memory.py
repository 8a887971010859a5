"""Where the analysis' memory goes: resident memory (RSS) after each import and load, and its peak in each phase.

Runs `workbench.analysis.run.run_analysis` as `workbench analyze` does on the demo model (its defaults: 8 prompts,
widths 1 2 4 6 8, every strategy, full trajectories, one torch thread; a fresh store), while a thread samples this
process' RSS (`/proc/self/statm`) every 20 ms with the analysis function the main thread is in (the innermost
`workbench.analysis` / `workbench.sweep` frame): the phase. Prints the RSS after each import and after loading the
pipeline, then each phase's peak and how far it rose above what the phase started at; the last line holds the
figures. Compare with `benchmarks/reference_preanalysis.py` (Apple's script) under `/usr/bin/time -v`.

Example:
    .venv/bin/python benchmarks/analysis_memory.py --out /tmp/mem
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
IMPORTS = ("numpy", "torch", "transformers", "diffusers", "sklearn", "numba", "coremltools", "workbench.analysis.run")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PhaseSampler(threading.Thread):
    """Samples RSS and the main thread's innermost analysis function until `stop` is set."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.stop = interval, threading.Event()
        self.main = threading.main_thread().ident
        self.phases: dict[str, list[float]] = {}  # phase -> [RSS when first seen, peak RSS]

    def phase(self) -> str:
        frame = sys._current_frames().get(self.main)
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module.startswith(("workbench.analysis", "workbench.sweep")):
                return f"{module.rsplit('.', 1)[-1]}.{frame.f_code.co_name}"
            frame = frame.f_back
        return "other"

    def run(self) -> None:
        while not self.stop.is_set():
            rss, phase = rss_mb(), self.phase()
            entry = self.phases.setdefault(phase, [rss, rss])
            entry[1] = max(entry[1], rss)
            time.sleep(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="analysis folder (its store is started afresh)")
    parser.add_argument("--model", default=None, help="default: the demo model")
    parser.add_argument("--nbits", type=int, nargs="+", default=None, help="widths (default: 1 2 4 6 8)")
    args = parser.parse_args()

    last = rss_mb()
    print(f"interpreter: {last:.0f} MB")
    for name in IMPORTS:
        importlib.import_module(name)
        now = rss_mb()
        print(f"import {name}: +{now - last:.0f} MB -> {now:.0f} MB")
        last = now
    from workbench.analysis.config import config_for_model
    from workbench.analysis.run import run_analysis
    from workbench.models.loader import load_pipeline
    from workbench.threads import torch_threads

    with torch_threads(1):
        pipe = load_pipeline(args.model, device="cpu", progress=False)
        loaded = rss_mb()
        print(f"pipeline loaded: +{loaded - last:.0f} MB -> {loaded:.0f} MB")
        sampler = PhaseSampler()
        sampler.start()
        start = time.perf_counter()
        config = config_for_model(args.model, nbits=None if args.nbits is None else tuple(args.nbits))
        run_analysis(pipe, config, out_dir=args.out, resume=False, progress=False)
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
    for phase, (first, peak) in sorted(sampler.phases.items(), key=lambda item: -item[1][1])[:12]:
        print(f"{phase:48s} peak {peak:6.0f} MB  (+{peak - first:5.0f} MB over its start {first:.0f} MB)")
    peak_phase, (_, peak) = max(sampler.phases.items(), key=lambda item: item[1][1])
    print(f"imports_mb={last:.0f} loaded_mb={loaded:.0f} peak_mb={peak:.0f} peak_phase={peak_phase} wall_s={wall:.0f}")


if __name__ == "__main__":
    main()
