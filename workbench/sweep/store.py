"""The resumable store of an analysis' measurements: its identity, the JSONL store and the evaluation records.

Every measurement an analysis makes is an `Evaluation`, appended to an `EvaluationStore` (one JSONL file) as soon as it
is measured. The store is keyed by a hash of everything that determines the measurements (`analysis_identity`: the
config, the weights' fingerprint, the scheduler, the device), so an interrupted analysis resumes where it stopped and a
changed one starts afresh. `EvaluationRunner` is the one path from "an evaluation id" to its record: read back from
the store, or measured and appended.

Example:
    >>> store = EvaluationStore("out/store/ab12.jsonl", analysis_identity(pipe, config, probe))
    >>> runner = EvaluationRunner(probe, store)
    >>> runner.measure("baseline/original", "baseline", config="original").psnr_mean
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from workbench.errors import UserError

if TYPE_CHECKING:
    from workbench.sweep.probe import OneStepProbe


SCHEMA_VERSION = 1


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 over the modules' parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_version(pipe) -> str:
    """The pipeline's hub id or path (`name_or_path`), or its class name for an in-memory pipeline."""
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return str(name) if name else type(pipe).__name__


def scheduler_settings(scheduler) -> dict:
    """The scheduler's class and config, without diffusers' bookkeeping keys (`_use_default_values`, whose order
    changes from one Python process to the next, `_class_name`, `_diffusers_version`)."""
    settings = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, **settings}


def pipeline_fingerprint(pipe) -> str:
    """`weights_fingerprint` of the UNet and the text encoders: the weights every measurement depends on."""
    return weights_fingerprint(pipe.unet, *[getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")])


def identity_key(identity: Mapping) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


class StoreMismatchError(UserError, ValueError):
    """A store file that belongs to another configuration."""


class EvaluationStore:
    """Append-only JSONL of finished evaluations for one analysis identity.

    Line 1 is a header `{"store": key, "identity": {...}}`; each later line one evaluation record, written
    with flush + fsync as soon as it is measured. A truncated last line (a kill mid-write) is dropped on open.
    A file whose header key differs raises `StoreMismatchError`: stale results are never reused.
    """

    def __init__(self, path: str | os.PathLike, identity: Mapping, resume: bool = True):
        self.path = Path(path)
        self.key = identity_key(identity)
        self.identity = dict(identity)
        self.records: dict[str, dict] = {}
        self.complete = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and resume:
            self._load()
        else:
            self._write_lines([{"store": self.key, "identity": identity}], mode="w")

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
        lines = raw[:good_end].decode("utf-8").splitlines()
        if not lines:
            raise StoreMismatchError(f"{self.path} has no header line; delete it or pass resume=False")
        header = json.loads(lines[0])
        if header.get("store") != self.key:
            raise StoreMismatchError(
                f"{self.path} was written for another configuration (key {str(header.get('store'))[:12]}, "
                f"this run {self.key[:12]}); use another output folder or run without resume"
            )
        for line in lines[1:]:
            record = json.loads(line)
            if record.get("event") == "complete":
                self.complete = True
            elif "id" in record:
                self.records[record["id"]] = record
        if good_end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def _write_lines(self, records: list[dict], mode: str = "a") -> None:
        with open(self.path, mode, encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __contains__(self, eval_id: str) -> bool:
        return eval_id in self.records

    def get(self, eval_id: str) -> dict | None:
        return self.records.get(eval_id)

    def append(self, record: dict) -> None:
        self._write_lines([record])
        self.records[record["id"]] = record

    def mark_complete(self) -> None:
        if not self.complete:
            self._write_lines([{"event": "complete"}])
            self.complete = True


@dataclass(frozen=True)
class Evaluation:
    """One measured state of the UNet.

    Attributes:
        id: unique within an analysis, e.g. `isolated/kmeans4/<layer>` or `recipe/<name>`.
        kind: "baseline", "isolated", "cumulative", "recipe" or "trajectory".
        psnr: the reference's latent PSNR per prompt (rounded to 0.1 dB); for "trajectory", image PSNR.
        config: palette key (`kmeans4`, `kmeans4_g16`) for sweeps, the baseline's name, or the strategy.
        nbits, layer, position: what a sweep point palettized (position = index in the cumulative order).
        recipe, bits_per_param: for recipes and baselines.
        extra: other measured values (SSIM, adherence, thresholds, targets).
        forward_s: seconds inside UNet forward for this evaluation (0 when read back from a store by a later run).
    """

    id: str
    kind: str
    psnr: tuple[float, ...]
    config: str = ""
    nbits: int | None = None
    layer: str | None = None
    position: int | None = None
    recipe: str | None = None
    bits_per_param: float | None = None
    extra: dict = field(default_factory=dict)
    forward_s: float = 0.0

    @property
    def psnr_mean(self) -> float:
        return float(np.mean(self.psnr))

    def to_record(self) -> dict:
        d = asdict(self)
        d["psnr"] = list(self.psnr)
        return d

    @classmethod
    def from_record(cls, d: Mapping) -> Evaluation:
        return cls(**{**d, "psnr": tuple(d["psnr"])})


class EvaluationRunner:
    """Looks an evaluation up in the store or measures it, and keeps the progress bar and counters.

    Args:
        probe (`OneStepProbe`): measures the UNet's current weights (`probe.psnr()`) and times its forward calls.
        store (`EvaluationStore`, *optional*): where finished evaluations are read back from and appended to;
            None keeps them in memory only.
        progress (`bool`, defaults to True): a tqdm bar (notebook-aware) with done/left and ETA.
        callback (`Callable[[Evaluation], None]`, *optional*): called after each newly measured evaluation.

    Attributes:
        evaluations (`list[Evaluation]`): every evaluation asked for, in order (read back or measured).
        new (`int`): how many of them were measured by this runner (not read back).
    """

    def __init__(
        self,
        probe: OneStepProbe,
        store: EvaluationStore | None = None,
        progress: bool = True,
        callback: Callable[[Evaluation], None] | None = None,
    ):
        self.probe, self.store, self.callback = probe, store, callback
        self.evaluations: list[Evaluation] = []
        self.new = 0
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc="analysis", unit="eval", dynamic_ncols=True)

    def plan(self, n: int) -> None:
        """Add `n` evaluations to the progress bar's total."""
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def lookup(self, eval_id: str) -> Evaluation | None:
        """The evaluation `eval_id` as stored (its `forward_s` 0: not measured by this run), or None."""
        record = None if self.store is None else self.store.get(eval_id)
        return None if record is None else Evaluation.from_record({**record, "forward_s": 0.0})

    def record(self, evaluation: Evaluation) -> Evaluation:
        """A newly measured evaluation (here or by a worker): appended to the store, counted in `new`, passed to the
        callback. It joins `evaluations` only through `measure` or `extend` (so they stay in planned order)."""
        if self.store is not None:
            self.store.append(evaluation.to_record())
        self.new += 1
        if self.callback is not None:
            self.callback(evaluation)
        return evaluation

    def extend(self, evaluations: list[Evaluation]) -> None:
        """Add evaluations measured elsewhere (already `record`ed, or read back) to `evaluations`, in planned order."""
        self.evaluations.extend(evaluations)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar by `n` evaluations."""
        if self.bar is not None:
            self.bar.update(n)

    def measure(
        self, eval_id: str, kind: str, measure: Callable[[], list[float] | dict] | None = None, **fields
    ) -> Evaluation:
        """The evaluation `eval_id`: its stored record, else measured now (`measure()`, default `probe.psnr()`) and
        appended to the store. `measure` may return `{"psnr": [...], "extra": {...}}` for richer measurements;
        `fields` are the other `Evaluation` fields (config, nbits, layer, ...)."""
        evaluation = self.lookup(eval_id)
        if evaluation is None:
            before = self.probe.forward_seconds
            measured = measure() if measure is not None else self.probe.psnr()
            if isinstance(measured, dict):  # {"psnr": [...], "extra": {...}} from richer measurements
                fields = {**fields, "extra": {**fields.get("extra", {}), **measured["extra"]}}
                measured = measured["psnr"]
            evaluation = self.record(
                Evaluation(
                    id=eval_id, kind=kind, psnr=tuple(measured), forward_s=self.probe.forward_seconds - before,
                    **fields,
                )
            )  # fmt: skip
        self.evaluations.append(evaluation)
        self.advance()
        return evaluation

    def alias(self, eval_id: str, kind: str, psnr: Sequence[float], **fields) -> Evaluation:
        """The evaluation `eval_id` of a configuration this run already measured under another id (the same
        recipe in force, so the same PSNRs): stored (`forward_s` 0) and listed like any, not counted in `new`."""
        evaluation = self.lookup(eval_id)
        if evaluation is None:
            evaluation = Evaluation(id=eval_id, kind=kind, psnr=tuple(psnr), forward_s=0.0, **fields)
            if self.store is not None:
                self.store.append(evaluation.to_record())
        self.evaluations.append(evaluation)
        self.advance()
        return evaluation

    def close(self):
        if self.bar is not None:
            self.bar.close()


def open_store(out_dir: str | os.PathLike, identity: Mapping, resume: bool = True) -> EvaluationStore:
    """The store of `identity` in an analysis folder: `out_dir/store/<first 16 hex digits of its key>.jsonl`."""
    return EvaluationStore(Path(out_dir) / "store" / f"{identity_key(identity)[:16]}.jsonl", identity, resume=resume)
