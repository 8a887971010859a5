"""Sharded analysis on Ray: the tasks of every phase spread over workers on all the cores, GPUs and machines.

`RayExecutor` is an executor (`workbench.executor`) for `workbench.analysis.run_analysis`. It starts N actors
(`SweepWorker`), each of which loads the pipeline once on its own device (one GPU per actor where the device is
cuda; on a CPU, `threads` torch threads, default 1), records the same one-step probe (same prompts, seed and size:
the same float reference latents) and measures the chunks of tasks it is sent with a `LocalExecutor` and a
`PaletteCache` of its own. The driver alone writes the store, as results come back, so an analysis resumes the
same with any number of workers, or none.

Scheduling: the tasks not already in the store are queued per palette key (`EvalTask.fields["config"]`:
`kmeans4` for the isolated sweep at 4 bits and for the 4-bit curve alike) in task order. A free worker takes the
next chunk of the key it worked on last, else of a key it worked on before, else of the longest queue, so each
layer's palettes are fitted on few workers and a curve's points mostly run on one worker, palettized incrementally.
Chunks shrink as the work runs out (a quarter of a worker's share of what is left, at most `max_chunk`), so the
workers finish together.

Faults: a worker that dies (its process killed, its node lost) has its chunk queued again and is replaced by a new
actor; nothing measured is lost, since each finished chunk is in the store.

Results: on CPUs every evaluation is bitwise the one a single process with the same torch thread count measures
(the probe, the palettes and the UNet's float arithmetic are the same; only where they run differs), so
`preanalysis.json` is identical. On GPUs, kernels that are not deterministic (cuDNN's autotuned convolutions,
atomics in reductions) may change the last bits of a forward pass from one process to the next, as they do from one
single-process run to the next; the PSNRs then differ within that run-to-run noise.

Example:
    >>> with RayExecutor("tiny-sd", workers=2) as executor:
    ...     result = run_analysis(pipe, config, out_dir="out", executor=executor)
    >>> result.execution["workers"]  # per worker: device, pid, evaluations, busy seconds
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workbench.analysis import DEFAULT_PALETTE_MEMORY
from workbench.errors import InvalidValueError, UserError
from workbench.executor import EvalTask, LocalExecutor
from workbench.pipelines import ModelSpec
from workbench.store import Evaluation, EvaluationRunner, pipeline_fingerprint


class WorkerMismatchError(UserError, ValueError):
    """A worker measures another model, dtype or device than the analysis' store was opened for."""


class SweepWorker:
    """A Ray actor's state: the pipeline on this worker's device, its palettes, and the probe of the current
    analysis. Created by `RayExecutor`; `run` measures a chunk of tasks.

    Args:
        model: as `workbench.pipelines.load_pipeline` (None = the demo model, "tiny-sd", a folder, a hub id).
        device (`str`): "cpu", "cuda" (the GPU Ray assigned to this actor) or "mps".
        dtype (`torch.dtype`): the pipeline's dtype.
        threads (`int`): torch threads on a CPU (this process is the worker's own).
        palette_memory (`int`, *optional*): bytes of palettes held in memory; the rest spill to a temporary folder.
    """

    def __init__(self, model: ModelSpec, device: str, dtype: torch.dtype, threads: int, palette_memory: int | None):
        from workbench.palettize import PaletteCache
        from workbench.pipelines import load_pipeline

        start = time.perf_counter()
        if torch.device(device).type == "cpu":
            torch.set_num_threads(threads)
        self.pipe = load_pipeline(model, device=device, dtype=dtype, progress=False)
        self.spill = tempfile.TemporaryDirectory(prefix="palettes-")
        self.cache = PaletteCache(max_bytes=palette_memory, spill_dir=self.spill.name)
        self.executor = LocalExecutor(self.pipe.unet, self.cache, keep_state=True)
        self.runner: EvaluationRunner | None = None
        self.probe_spec: tuple | None = None
        self.forward_s, self.unet_calls = 0.0, 0  # over every probe this worker recorded
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(self.pipe.unet.device),
            "dtype": str(self.pipe.unet.dtype),
            "weights": pipeline_fingerprint(self.pipe),
            "load_s": round(time.perf_counter() - start, 3),
        }

    def describe(self) -> dict:
        """pid, host, device, dtype, weights fingerprint and the seconds it took to load."""
        return self.info

    @torch.no_grad()
    def run(self, probe_spec: tuple, tasks: Sequence[EvalTask]) -> dict:
        """Measure `tasks` (none is in the store) with the probe of `probe_spec` = (prompts, seed, height, width),
        recorded anew when it changes. Returns their records, the seconds it took, and this worker's totals."""
        from workbench.probe import OneStepProbe

        start = time.perf_counter()
        if probe_spec != self.probe_spec:
            self.executor.close()  # the probe runs the float model
            self.runner = EvaluationRunner(OneStepProbe(self.pipe, *probe_spec), progress=False)
            self.probe_spec = probe_spec
            self.info["reference"] = hashlib.sha256(self.runner.probe.reference.cpu().numpy().tobytes()).hexdigest()
        probe = self.runner.probe
        seconds, calls = probe.forward_seconds, probe.forward_calls
        evaluations = self.executor.measure_all(tasks, self.runner)
        self.runner.evaluations.clear()
        self.forward_s += probe.forward_seconds - seconds
        self.unet_calls += probe.forward_calls - calls
        return {
            "records": [e.to_record() for e in evaluations],
            "busy_s": time.perf_counter() - start,
            "totals": {"forward_s": self.forward_s, "unet_calls": self.unet_calls, "kmeans_fits": self.cache.fits},
            "reference": self.info["reference"],
        }

    def close(self) -> None:
        self.executor.close()
        self.cache.close()
        self.spill.cleanup()


@dataclass
class _Worker:
    """The driver's view of one actor."""

    index: int
    actor: object
    info: dict
    evaluations: int = 0
    busy_s: float = 0.0
    totals: dict = field(default_factory=lambda: {"forward_s": 0.0, "unet_calls": 0, "kmeans_fits": 0})
    keys: list = field(default_factory=list)  # palette keys worked on, the last one last
    alive: bool = True

    def to_dict(self) -> dict:
        return {"worker": self.index, **{k: v for k, v in self.info.items() if k != "weights"},
                "evaluations": self.evaluations, "busy_s": round(self.busy_s, 3),
                "forward_s": round(self.totals["forward_s"], 3), "unet_calls": self.totals["unet_calls"],
                "kmeans_fits": self.totals["kmeans_fits"], "alive": self.alive}  # fmt: skip


def _lane(task: EvalTask) -> str:
    return str(task.fields.get("config", task.kind))


class RayExecutor:
    """Measures an analysis' tasks on Ray actors (see the module docstring); use it as a context manager.

    Args:
        model: what each worker loads (`workbench.pipelines.load_pipeline`): None = the demo model, "tiny-sd",
            "tiny-sdxl", a pipeline folder (on every node) or a hub id in every node's cache. It must be the
            driver's pipeline: a worker with other weights raises `WorkerMismatchError`.
        workers (`int`, defaults to 2): actors to start.
        address (`str`, *optional*): a Ray cluster to join ("auto": the one this machine belongs to, or
            "ray://host:10001"); None starts a local runtime with `workers` CPUs (and this machine's GPUs), or uses
            the runtime already started in this process.
        device (`str`, defaults to "cpu"): the workers' device type, "cpu", "cuda" (one GPU per worker) or "mps".
        dtype (`torch.dtype`, defaults to float32): the workers' pipeline dtype.
        threads (`int`, defaults to 1): torch threads per worker on a CPU.
        palette_memory (`int`, *optional*, defaults to 512 MiB): bytes of palettes a worker holds in memory.
        max_chunk (`int`, defaults to 32): most tasks sent in one call (results come back, and are stored, per call).
        max_replacements (`int`, *optional*): workers started in place of dead ones before giving up; None =
            2 x `workers`.

    Attributes:
        workers (`list`): the actors, with their device, pid, counts (`summary()["workers"]`).
    """

    def __init__(
        self,
        model: ModelSpec = None,
        workers: int = 2,
        *,
        address: str | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        threads: int = 1,
        palette_memory: int | None = DEFAULT_PALETTE_MEMORY,
        max_chunk: int = 32,
        max_replacements: int | None = None,
    ):
        if workers < 1:
            raise InvalidValueError(f"workers must be >= 1, got {workers}")
        if max_chunk < 1:
            raise InvalidValueError(f"max_chunk must be >= 1, got {max_chunk}")
        self.model, self.num_workers, self.address = model, workers, address
        self.device, self.dtype, self.threads, self.palette_memory = str(device), dtype, threads, palette_memory
        self.max_chunk = max_chunk
        self.max_replacements = 2 * workers if max_replacements is None else max_replacements
        self.workers: list[_Worker] = []
        self.replacements = 0
        self._started_ray = False

    # ----------------------------------------------------------------------------------------------------------
    # Life cycle.

    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Join or start the Ray runtime and start the workers (each loads the pipeline; waits until all have)."""
        import ray

        if not ray.is_initialized():
            if self.address is None:
                ray.init(num_cpus=self.num_workers, include_dashboard=False)
            else:
                ray.init(address=self.address)
            self._started_ray = True
        if not self.workers:
            actors = [self._new_actor() for _ in range(self.num_workers)]
            infos = ray.get([a.describe.remote() for a in actors])
            self.workers = [_Worker(i, a, info) for i, (a, info) in enumerate(zip(actors, infos))]

    def _new_actor(self):
        import ray

        gpus = 1 if torch.device(self.device).type == "cuda" else 0
        actor_class = ray.remote(SweepWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=0)
        return actor_class.remote(self.model, self.device, self.dtype, self.threads, self.palette_memory)

    def _replace(self, dead: _Worker, error: Exception) -> None:
        """Mark `dead` and start a worker in its place (waits until it has loaded)."""
        import ray

        dead.alive = False
        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise RuntimeError(f"{self.replacements} workers died (the last: {error}); giving up") from error
        actor = self._new_actor()
        self.workers.append(_Worker(len(self.workers), actor, ray.get(actor.describe.remote())))

    def close(self) -> None:
        """Stop the workers, and the Ray runtime if `start` started it."""
        import ray

        for w in self.workers:
            if w.alive:
                ray.kill(w.actor)
                w.alive = False
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def worker_pids(self) -> list[int]:
        """The process ids of the live workers (on their nodes)."""
        return [w.info["pid"] for w in self.workers if w.alive]

    def summary(self) -> dict:
        """What ran where, for `run.json`: the address, replacements, and per worker (dead ones too) its host, pid,
        device, load seconds, evaluations, busy seconds, UNet calls and forward seconds, palette fits."""
        return {"executor": "ray", "address": self.address or "local", "threads": self.threads,
                "replacements": self.replacements, "workers": [w.to_dict() for w in self.workers]}  # fmt: skip

    # ----------------------------------------------------------------------------------------------------------
    # Measuring.

    def _check(self, runner: EvaluationRunner) -> None:
        """The workers measure the model, dtype and device the store is for."""
        identity = getattr(runner.store, "identity", None)
        if identity is None:
            return
        for w in self.workers:
            if not w.alive:
                continue
            got = (w.info["weights"], w.info["dtype"], torch.device(w.info["device"]).type)
            want = (identity["weights"], identity["dtype"], identity["device"])
            if got != want:
                raise WorkerMismatchError(
                    f"worker {w.index} on {w.info['host']} loaded {self.model!r} as (weights {got[0][:12]}, "
                    f"{got[1]}, {got[2]}), but the analysis is of (weights {want[0][:12]}, {want[1]}, {want[2]}); "
                    "give the workers the driver's model, dtype and device"
                )

    def _next_chunk(self, worker: _Worker, lanes: dict[str, deque]) -> list[EvalTask]:
        """The next tasks for `worker`: from its last palette key, else one it used before, else the longest."""
        ready = {k: q for k, q in lanes.items() if q}
        if not ready:
            return []
        known = [k for k in reversed(worker.keys) if k in ready]
        key = known[0] if known else max(ready, key=lambda k: len(ready[k]))
        left = sum(len(q) for q in ready.values())
        alive = sum(w.alive for w in self.workers)
        size = min(self.max_chunk, max(1, math.ceil(left / (4 * alive))), len(ready[key]))
        if key in worker.keys:
            worker.keys.remove(key)
        worker.keys.append(key)
        return [lanes[key].popleft() for _ in range(size)]

    def measure_all(self, tasks: Sequence[EvalTask], runner: EvaluationRunner) -> list[Evaluation]:
        """The tasks' evaluations in task order: read back from `runner`'s store, or measured by the workers and
        recorded (store, progress bar, callback) here as each chunk comes back."""
        import ray
        from ray.exceptions import RayActorError

        self.start()
        self._check(runner)
        probe = runner.probe
        spec = (tuple(probe.prompts), probe.seed, probe.height, probe.width)
        found = {t.id: runner.lookup(t.id) for t in tasks}
        runner.advance(sum(e is not None for e in found.values()))
        lanes: dict[str, deque] = {}
        for t in tasks:
            if found[t.id] is None:
                lanes.setdefault(_lane(t), deque()).append(t)
        inflight: dict = {}
        while any(lanes.values()) or inflight:
            for w in self.workers:
                if w.alive and all(w is not v for v, _ in inflight.values()):
                    chunk = self._next_chunk(w, lanes)
                    if chunk:
                        inflight[w.actor.run.remote(spec, chunk)] = (w, chunk)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            w, chunk = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except RayActorError as err:  # the worker died: its chunk goes back to the front of its queue
                lanes[_lane(chunk[0])].extendleft(reversed(chunk))
                self._replace(w, err)
                self._check(runner)
                continue
            for record in out["records"]:
                found[record["id"]] = runner.record(Evaluation.from_record(record))
                runner.advance()
            self._account(w, out)
        evaluations = [found[t.id] for t in tasks]
        runner.extend(evaluations)
        return evaluations

    @staticmethod
    def _account(w: _Worker, out: dict) -> None:
        w.evaluations += len(out["records"])
        w.busy_s += out["busy_s"]
        w.totals = out["totals"]
        w.info["reference"] = out["reference"]
