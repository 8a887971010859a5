"""Sharded analysis on Ray: the tasks of every phase spread over workers on all the cores, GPUs and machines.

`RayExecutor` is an executor (`workbench.sweep.executor`) for `workbench.analysis.run.run_analysis`. It starts N actors
(`SweepWorker`), each of which loads the pipeline once on its own device (one GPU per actor where the device is
cuda; on a CPU, `threads` torch threads, default 1), records the same one-step probe (same prompts, seed and size:
the same float reference latents) and measures the chunks of tasks it is sent with a `LocalExecutor` and a
`PaletteCache` of its own. The driver alone writes the store, as results come back, so an analysis resumes the
same with any number of workers, or none.

Scheduling: the tasks not already in the store are queued per palette key (`EvalTask.fields["config"]`:
`kmeans4` for the isolated sweep at 4 bits and for the 4-bit curve alike) in task order. A free worker takes the
next chunk of the key it worked on last, else of a key no other worker is on (one it worked on before first), else
steals from the back of the longest queue, so each layer's palettes are fitted on few workers and a curve's points
run on one worker, palettized incrementally, or on two that split it once. Chunks shrink as the work runs out (a
quarter of a worker's share of what is left, at most `max_chunk`), so the workers finish together.

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
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workbench.errors import InvalidValueError, UserError
from workbench.models.layers import get_layer
from workbench.models.loader import ModelSpec, load_pipeline
from workbench.palettes.cache import DEFAULT_PALETTE_MEMORY, PaletteCache
from workbench.palettes.config import PaletteConfig, as_config
from workbench.palettes.fit import Palette
from workbench.sweep.executor import EvalTask, LocalExecutor
from workbench.sweep.probe import OneStepProbe
from workbench.sweep.store import Evaluation, EvaluationRunner, pipeline_fingerprint


def init_ray(address: str | None = None, num_cpus: int | None = None, attempts: int = 3) -> None:
    """`ray.init`: join the cluster at `address`, or start a local runtime with `num_cpus` CPUs (None: all) and
    no dashboard. A local start is tried again (up to `attempts` times) when the node times out starting: Ray's
    raylet gives its agents a fixed 15 s to come up, which a loaded machine exceeds (ray-project/ray#65983)."""
    import ray

    if address is not None:
        ray.init(address=address)
        return
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
            return
        except Exception as err:  # Ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(err) or attempt == attempts - 1:
                raise


class WorkerMismatchError(UserError, ValueError):
    """A worker measures another model, dtype or device than the analysis' store was opened for."""


class _SharingCache(PaletteCache):
    """A `PaletteCache` that keeps the palettes it fitted since they were last taken (`new`), to share them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.new: dict[tuple[str, PaletteConfig], Palette] = {}

    def palette(self, name: str, weight: torch.Tensor, config: PaletteConfig, approximate: bool = False) -> Palette:
        fits = self.fits
        palette = super().palette(name, weight, config, approximate)
        if self.fits > fits and not approximate:  # approximate palettes are estimates, not for the driver
            self.new[(name, config)] = palette
        return palette


class SweepWorker:
    """A Ray actor's state: the pipeline on this worker's device, its palettes, and the probe of the current
    analysis. Created by `RayExecutor`; `run` measures a chunk of tasks.

    Args:
        model: as `workbench.models.loader.load_pipeline` (None = the demo model, "tiny-sd", a folder, a hub id).
        device (`str`): "cpu", "cuda" (the GPU Ray assigned to this actor) or "mps".
        dtype (`torch.dtype`): the pipeline's dtype.
        threads (`int`): torch threads on a CPU (this process is the worker's own).
        palette_memory (`int`, *optional*): bytes of palettes held in memory; the rest spill to a temporary folder.
    """

    def __init__(self, model: ModelSpec, device: str, dtype: torch.dtype, threads: int, palette_memory: int | None):
        start = time.perf_counter()
        if torch.device(device).type == "cpu":
            torch.set_num_threads(threads)
        self.pipe = load_pipeline(model, device=device, dtype=dtype, progress=False)
        self.cache = _SharingCache(max_bytes=palette_memory, spill_dir=True)  # private, cleaned up if killed
        self.executor = LocalExecutor(self.pipe.unet, self.cache, keep_state=True)
        self.runner: EvaluationRunner | None = None
        self.probe_spec: tuple | None = None
        self.forward_s, self.unet_calls, self.imported = 0.0, 0, 0  # over every probe this worker recorded
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

    def _import(self, palettes: Sequence[tuple]) -> None:
        """Hold the palettes other workers fitted, (layer, config, object ref) each; one whose worker died (its
        object lost) is skipped, and fitted here if needed."""
        import ray
        from ray.exceptions import RayError

        self.executor.close()  # the original weights back: the palettes were fitted to them
        for name, _, ref in palettes:
            try:
                palette = ray.get(ref)
            except RayError:
                continue
            self.cache.add(name, get_layer(self.pipe.unet, name).weight, palette)
            self.imported += 1

    @torch.no_grad()
    def run(self, probe_spec: tuple, tasks: Sequence[EvalTask], palettes: Sequence[tuple] = ()) -> dict:
        """Measure `tasks` (none is in the store) with the probe of `probe_spec` = (prompts, seed, height, width),
        recorded anew when it changes, after taking in `palettes` fitted by other workers.

        Returns:
            `dict`: the tasks' records, the seconds it took, this worker's totals (UNet calls and seconds, fits,
            palettes imported) and the palettes it fitted, (layer, config, object ref) each, for the others.
        """
        import ray

        start = time.perf_counter()
        if palettes:
            self._import(palettes)
        if probe_spec != self.probe_spec:
            self.executor.close()  # the probe runs the float model
            self.runner = EvaluationRunner(OneStepProbe(self.pipe, *probe_spec), progress=False)
            self.probe_spec = probe_spec
            reference = self.runner.probe.reference.detach().cpu().contiguous()
            self.info["reference"] = hashlib.sha256(reference.view(torch.uint8).numpy().tobytes()).hexdigest()
        probe = self.runner.probe
        seconds, calls = probe.forward_seconds, probe.forward_calls
        evaluations = self.executor.measure_all(tasks, self.runner)
        self.runner.evaluations.clear()
        self.forward_s += probe.forward_seconds - seconds
        self.unet_calls += probe.forward_calls - calls
        fitted = [(name, config, ray.put(p)) for (name, config), p in self.cache.new.items()]
        self.cache.new.clear()
        return {
            "records": [e.to_record() for e in evaluations],
            "busy_s": time.perf_counter() - start,
            "totals": {
                "forward_s": self.forward_s,
                "unet_calls": self.unet_calls,
                "kmeans_fits": self.cache.fits,
                "palettes_imported": self.imported,
            },  # fmt: skip
            "reference": self.info["reference"],
            "palettes": fitted,
        }

    def close(self) -> None:
        """Restore the UNet, stop the cache and delete its spilled palettes."""
        self.executor.close()
        self.cache.close()


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
    held: set = field(default_factory=set)  # (layer, PaletteConfig) it fitted or was sent
    alive: bool = True

    def to_dict(self) -> dict:
        return {"worker": self.index, **{k: v for k, v in self.info.items() if k not in ("weights", "pending")},
                "evaluations": self.evaluations, "busy_s": round(self.busy_s, 3),
                "forward_s": round(self.totals["forward_s"], 3), "unet_calls": self.totals["unet_calls"],
                "kmeans_fits": self.totals["kmeans_fits"],
                "palettes_imported": self.totals.get("palettes_imported", 0), "alive": self.alive}  # fmt: skip


def _palettes_needed(chunk: Sequence[EvalTask]) -> set[tuple[str, PaletteConfig]]:
    """The (layer, palette config) pairs the chunk's recipes palettize (int8 baselines and float16 entries need
    none)."""
    needed = set()
    for task in chunk:
        for name, spec in task.recipe.items():
            config = None if isinstance(spec, str) else as_config(spec)
            if config is not None:
                needed.add((name, config))
    return needed


def _lane(task: EvalTask) -> str:
    return str(task.fields.get("config", task.kind))


@dataclass(frozen=True)
class Scheduling:
    """How `RayExecutor` sends work, replaces dead workers and shares palettes.

    Attributes:
        max_chunk (`int`, defaults to 32): most tasks sent in one call (results come back, and are stored, per call).
        max_replacements (`int`, *optional*): workers started in place of dead ones before giving up; None =
            2 x the executor's `workers`.
        share_palettes (`bool`, defaults to True): a palette one worker fitted is sent (through Ray's object store)
            to the others that need it, instead of fitted again; the object store then holds every palette of the
            analysis (about 5 bytes per weight at 5 widths), spilling to disk beyond its size.
    """

    max_chunk: int = 32
    max_replacements: int | None = None
    share_palettes: bool = True

    def __post_init__(self):
        if self.max_chunk < 1:
            raise InvalidValueError(f"max_chunk must be >= 1, got {self.max_chunk}")
        if self.max_replacements is not None and self.max_replacements < 0:
            raise InvalidValueError(f"max_replacements must be >= 0 or None, got {self.max_replacements}")


class RayExecutor:
    """Measures an analysis' tasks on Ray actors (see the module docstring); use it as a context manager.

    Args:
        model: what each worker loads (`workbench.models.loader.load_pipeline`): None = the demo model, "tiny-sd",
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
        scheduling (`Scheduling`, defaults to `Scheduling()`): chunk size, replacements of dead workers, palette
            sharing.

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
        scheduling: Scheduling = Scheduling(),
    ):
        if workers < 1:
            raise InvalidValueError(f"workers must be >= 1, got {workers}")
        self.model, self.num_workers, self.address = model, workers, address
        self.device, self.dtype, self.threads, self.palette_memory = str(device), dtype, threads, palette_memory
        self.max_chunk = scheduling.max_chunk
        self.max_replacements = 2 * workers if scheduling.max_replacements is None else scheduling.max_replacements
        self.share_palettes = scheduling.share_palettes
        self.workers: list[_Worker] = []
        self.replacements = 0
        self._palettes: dict[tuple[str, PaletteConfig], tuple] = {}  # fitted by a worker: (object ref, its index)
        self._started_ray = False

    # ----------------------------------------------------------------------------------------------------------
    # Life cycle.

    def __enter__(self) -> RayExecutor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Join or start the Ray runtime and start the workers; they load the pipeline while this process goes on
        (`measure_all` waits for them)."""
        import ray

        if not ray.is_initialized():
            init_ray(self.address, num_cpus=None if self.address else self.num_workers)
            self._started_ray = True
        if not self.workers:
            self.workers = [self._new_worker(i) for i in range(self.num_workers)]

    def _new_worker(self, index: int) -> _Worker:
        import ray

        gpus = 1 if torch.device(self.device).type == "cuda" else 0
        actor_class = ray.remote(SweepWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=0)
        actor = actor_class.remote(self.model, self.device, self.dtype, self.threads, self.palette_memory)
        return _Worker(index, actor, {"pending": actor.describe.remote()})

    def _ready(self) -> None:
        """Wait for the workers still loading and take their descriptions."""
        import ray

        for w in self.workers:
            if w.alive and "pending" in w.info:
                w.info = ray.get(w.info["pending"])

    def _replace(self, dead: _Worker, error: Exception) -> None:
        """Mark `dead`, forget the palettes it held for the others, and start a worker in its place."""
        dead.alive = False
        self._palettes = {k: v for k, v in self._palettes.items() if v[1] != dead.index}
        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise RuntimeError(f"{self.replacements} workers died (the last: {error}); giving up") from error
        self.workers.append(self._new_worker(len(self.workers)))
        self._ready()

    def close(self) -> None:
        """Stop the workers, and the Ray runtime if `start` started it."""
        import ray
        from ray.exceptions import RayError

        alive = [w for w in self.workers if w.alive]
        try:  # let them delete their spilled palettes
            ray.get([w.actor.close.remote() for w in alive], timeout=60)
        except RayError:
            pass
        for w in alive:
            ray.kill(w.actor)
            w.alive = False
        self._palettes.clear()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def worker_pids(self) -> list[int]:
        """The process ids of the live workers (on their nodes); waits for those still loading."""
        self._ready()
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
        """The next tasks for `worker`: the front of its palette key's queue; else of a queue no other worker is on
        (one it worked on before first, else the longest); else the back of the longest queue (another worker
        goes on from its front, so a curve is split once, not interleaved)."""
        ready = {k: q for k, q in lanes.items() if q}
        if not ready:
            return []
        alive = [w for w in self.workers if w.alive]
        taken = {w.keys[-1] for w in alive if w is not worker and w.keys}
        size = max(1, math.ceil(sum(len(q) for q in ready.values()) / (4 * len(alive))))
        free = [k for k in reversed(worker.keys) if k in ready and k not in taken]
        free += sorted((k for k in ready if k not in taken and k not in free), key=lambda k: -len(ready[k]))
        if free:
            key = free[0]
            if key in worker.keys:
                worker.keys.remove(key)
            worker.keys.append(key)
            return [ready[key].popleft() for _ in range(min(size, self.max_chunk, len(ready[key])))]
        queue = max(ready.values(), key=len)
        return [queue.pop() for _ in range(min(size, self.max_chunk, math.ceil(len(queue) / 2)))][::-1]

    def measure_all(self, tasks: Sequence[EvalTask], runner: EvaluationRunner) -> list[Evaluation]:
        """The tasks' evaluations in task order: read back from `runner`'s store, or measured by the workers and
        recorded (store, progress bar, callback) here as each chunk comes back."""
        import ray
        from ray.exceptions import RayActorError

        self.start()
        self._ready()
        self._check(runner)
        probe = runner.probe
        spec = (tuple(probe.prompts), probe.seed, probe.height, probe.width)
        found = {t.id: runner.lookup(t.id) for t in tasks}
        runner.advance(sum(e is not None for e in found.values()))
        lanes: dict[str, deque] = {}
        for t in tasks:
            if found[t.id] is None:
                lanes.setdefault(_lane(t), deque()).append(t)
        order = {t.id: i for i, t in enumerate(tasks)}
        inflight: dict = {}
        finished: list = []  # records of chunks back but not yet in the store
        while any(lanes.values()) or inflight or finished:
            for w in self.workers:  # first keep every worker busy, then write the store
                if w.alive and all(w is not v for v, _ in inflight.values()):
                    chunk = self._next_chunk(w, lanes)
                    if chunk:
                        inflight[w.actor.run.remote(spec, chunk, self._palettes_for(w, chunk))] = (w, chunk)
            for record in finished:
                found[record["id"]] = runner.record(Evaluation.from_record(record))
                runner.advance()
            finished.clear()
            if not inflight:
                continue
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            w, chunk = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except RayActorError as err:  # the worker died: its chunk goes back to its queue, in task order
                lane = _lane(chunk[0])
                lanes[lane] = deque(sorted([*lanes[lane], *chunk], key=lambda t: order[t.id]))
                self._replace(w, err)
                self._check(runner)
                continue
            self._account(w, out)  # before the next chunks go out: they may use the palettes it fitted
            finished.extend(out["records"])
        evaluations = [found[t.id] for t in tasks]
        runner.extend(evaluations)
        return evaluations

    def _palettes_for(self, worker: _Worker, chunk: Sequence[EvalTask]) -> list[tuple]:
        """The palettes `chunk` needs that another worker fitted and `worker` does not hold: (layer, config, ref)."""
        if not self.share_palettes:
            return []
        needed = _palettes_needed(chunk) - worker.held
        worker.held |= needed  # after the chunk it holds them: sent now, or fitted there
        return [(name, config, self._palettes[(name, config)][0]) for name, config in needed
                if (name, config) in self._palettes]  # fmt: skip

    def _account(self, w: _Worker, out: dict) -> None:
        """Add a finished chunk to its worker's counts; keep the palettes it fitted for the others."""
        w.evaluations += len(out["records"])
        w.busy_s += out["busy_s"]
        w.totals = out["totals"]
        w.info["reference"] = out["reference"]
        if self.share_palettes:
            for name, config, ref in out["palettes"]:
                self._palettes.setdefault((name, config), (ref, w.index))
