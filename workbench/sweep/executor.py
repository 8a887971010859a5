"""Evaluation tasks and the executor that measures them in this process.

Every evaluation of an analysis (a baseline, an isolated layer, a cumulative point, a recipe) is the UNet with some
layers replaced, measured by the one-step probe. An `EvalTask` says which: its id in the store, its kind and the
whole `recipe` in force (layer -> spec, as `workbench.palettes.apply.palettized` takes). A cumulative point is the
recipe of the first k layers of the curve's order (`LayerPrefix`, no copy), so its tasks are independent of one
another once the order is known.

Each phase of `workbench.analysis.run.run_analysis` builds its tasks and hands them to one call, an executor's
`measure_all(tasks, runner)`, which returns their `Evaluation`s in task order, read back from the runner's store
or measured (and appended to it). The executors:

- `LocalExecutor`: in this process, in task order (the default). A task whose recipe extends the one in force
  (the next cumulative point) palettizes only the layers it adds, as a curve always did; any other task restores
  the UNet first. Stored tasks are skipped without palettizing anything.
- `workbench.sweep.ray_executor.RayExecutor`: the tasks not in the store, sent to Ray actors that each hold the
pipeline
  and run a `LocalExecutor` of their own; the driver alone writes the store.

Example:
    >>> executor = LocalExecutor(pipe.unet, PaletteCache())
    >>> tasks = [EvalTask(f"isolated/kmeans4/{n}", "isolated", {n: PaletteConfig(nbits=4)}) for n in names]
    >>> evaluations = executor.measure_all(tasks, runner)
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from workbench.models.layers import get_layer
from workbench.palettes.apply import replacement_weight
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import as_config
from workbench.palettes.stash import WeightStash
from workbench.sweep.store import Evaluation, EvaluationRunner
from workbench.threads import release_free_heap


class LayerPrefix(Mapping):
    """The first `length` layers of `order`, each with the same `spec`: a cumulative point's recipe, without a copy
    of the order (a curve of n layers holds n of these, not n**2 entries).

    Args:
        order (`tuple[str, ...]`): the curve's layers, in the order they are added.
        spec: what every layer gets (a `PaletteConfig`, a bit width, ...).
        length (`int`): how many layers of `order` are in force.
    """

    def __init__(self, order: tuple[str, ...], spec, length: int, positions: Mapping[str, int] | None = None):
        if not 0 <= length <= len(order):
            raise ValueError(f"length must be in [0, {len(order)}], got {length}")
        self.order, self.spec, self.length = tuple(order), spec, length
        self.positions = {name: i for i, name in enumerate(self.order)} if positions is None else positions

    @classmethod
    def points(cls, order: Sequence[str], spec) -> list[LayerPrefix]:
        """The prefixes of lengths 1..n of `order`, sharing one order and one index of it."""
        first = cls(tuple(order), spec, 0)
        return [cls(first.order, spec, k, first.positions) for k in range(1, len(first.order) + 1)]

    def __getitem__(self, name: str):
        if self.positions.get(name, self.length) >= self.length:
            raise KeyError(name)
        return self.spec

    def __iter__(self) -> Iterator[str]:
        return iter(self.order[: self.length])

    def __len__(self) -> int:
        return self.length

    def __reduce__(self):  # pickled as its fields (the points of a curve share the order and index in one message)
        return (LayerPrefix, (self.order, self.spec, self.length, self.positions))


def extends(recipe: Mapping, base: Mapping) -> bool:
    """Whether `recipe` is `base` with layers added after it: the same first `len(base)` entries, in order."""
    if isinstance(recipe, LayerPrefix) and isinstance(base, LayerPrefix):
        return (
            recipe.spec == base.spec
            and recipe.length >= base.length
            and recipe.order[: base.length] == (base.order[: base.length])
        )
    if len(recipe) < len(base):
        return False
    return all(a == b for a, b in zip(itertools.islice(recipe.items(), len(base)), base.items()))


@dataclass(frozen=True)
class EvalTask:
    """One evaluation to make: the UNet with `recipe` in force, measured by the one-step probe.

    Attributes:
        id: the evaluation's id in the store, e.g. `isolated/kmeans4/<layer>`.
        kind: `Evaluation.kind` ("baseline", "isolated", "cumulative", "recipe").
        recipe: layer -> spec (`palettized`'s recipe): every layer replaced for this evaluation, none = the float
            model. A `LayerPrefix` for cumulative points.
        fields: the other `Evaluation` fields (config, nbits, layer, position, recipe, bits_per_param, extra).
            `fields["config"]` (the palette key) is what the Ray executor groups tasks by, so that a layer's
            palettes are fitted on as few workers as possible.
    """

    id: str
    kind: str
    recipe: Mapping[str, Any]
    fields: Mapping[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    """What the phases of an analysis hand their tasks to."""

    def measure_all(self, tasks: Sequence[EvalTask], runner: EvaluationRunner) -> list[Evaluation]:
        """The tasks' evaluations in task order: each read back from `runner`'s store or measured and recorded."""

    def summary(self) -> dict:
        """What ran where, for `run.json`: {"executor": name, "workers": [{device, evaluations, busy_s, ...}]}."""


class UNetState:
    """The recipe in force on a UNet, changed with as little work as possible: a recipe that extends the one in
    force palettizes only the layers it adds (a cumulative curve); any other restores only the layers whose entry
    differs and palettizes them anew (a refinement's candidates differ from each other in a few layers). Originals
    wait in one `WeightStash` (its memory budget, then disk); `reset` restores every weight exactly.

    Args:
        unet (`torch.nn.Module`): the model, palettized in place.
        cache (`PaletteCache`, *optional*): fitted palettes to reuse.
        stash (`WeightStash`, *optional*): where originals wait, owned by the caller (an analysis shares one, so
            each original is written to disk once: see `WeightStash`); None = one of its own, closed by `reset`.

    Attributes:
        recipe: the recipe in force.
        replaced (`dict`): layer -> the entry whose weight is in place, in replacement order.
    """

    def __init__(self, unet: torch.nn.Module, cache: PaletteCache | None = None, stash: WeightStash | None = None):
        self.unet, self.cache = unet, cache
        self.recipe: Mapping = {}
        self._own_stash = stash is None
        self._stash: WeightStash | None = stash
        self.replaced: dict[str, Any] = {}

    def reach(self, recipe: Mapping) -> None:
        """Put `recipe` in force."""
        if extends(recipe, self.recipe):
            changed = dict(itertools.islice(recipe.items(), len(self.recipe), None))
        else:
            target = dict(recipe.items())
            for name in [n for n, spec in reversed(self.replaced.items()) if target.get(n) != spec]:
                self._restore(name)
            changed = {n: spec for n, spec in target.items() if n not in self.replaced}
        for name, spec in changed.items():
            layer = get_layer(self.unet, name)
            new = replacement_weight(name, layer, spec, self.cache)
            if new is None:
                continue
            if self._stash is None:  # one budget for the whole state: a curve ends with every layer replaced
                self._stash = WeightStash()
            self._stash.swap(name, layer.weight, new, self.cache)
            self.replaced[name] = spec
            del new  # on the disk path its values now live in the weight's storage
        self.recipe = recipe

    @property
    def stash(self) -> WeightStash | None:
        """Where the originals of the replaced weights wait."""
        return self._stash

    def _restore(self, name: str) -> None:
        self._stash.restore(name, get_layer(self.unet, name).weight)
        del self.replaced[name]

    def reset(self) -> None:
        """Restore every replaced weight (bitwise) and forget the recipe."""
        try:
            for name in reversed(list(self.replaced)):
                self._restore(name)
        finally:
            if self._stash is not None and self._own_stash:
                self._stash.close()
                self._stash = None
            self.replaced, self.recipe = {}, {}


class LocalExecutor:
    """Measures tasks in this process, in task order, with the probe of the runner it is given.

    Args:
        unet (`torch.nn.Module`): the probe's UNet, palettized in place for each task and restored exactly.
        cache (`PaletteCache`, *optional*): fitted palettes to reuse across tasks (k-means once per layer and
            config).
        keep_state (`bool`, defaults to False): leave the last recipe in force after `measure_all` (a worker whose
            next chunk continues the same curve); False restores the UNet at the end of each call.
        prefetch (`int`, defaults to 0): > 0: at the start of each `measure_all`, queue the palettes its tasks
            will need (not stored, not yet fitted; see `_prefetch` for the order), as urgent background fits
            (`PaletteCache.prefetch(urgent=True)`: a thread of their own, ahead of speculative ones), so the next
            tasks' k-means runs while the UNet measures this one (the same palettes as fitted on demand).
        replay (`bool`, defaults to True): tell the probe which layers each recipe replaced, so the UNet's
            computation upstream of the first of them is replayed from the float model's
            (`workbench.sweep.replay.UpstreamReplay`): bitwise the same PSNRs, and an isolated evaluation skips the
            UNet's work before its layer. The UNet must be the float model's but for the layers this executor replaces.

    Attributes:
        evaluations (`int`), busy_s (`float`): evaluations measured (not read back) and seconds spent measuring
            them (palettizing and probing).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        cache: PaletteCache | None = None,
        *,
        keep_state: bool = False,
        prefetch: int = 0,
        replay: bool = True,
        stash: WeightStash | None = None,
    ):
        self.state = UNetState(unet, cache, stash)
        self.keep_state = keep_state
        self.prefetch = prefetch
        self.replay = replay
        self.evaluations = 0
        self.busy_s = 0.0

    def measure_all(self, tasks: Sequence[EvalTask], runner: EvaluationRunner) -> list[Evaluation]:
        """Each task's evaluation, in order: read back from `runner`'s store, else its recipe put in force and
        `runner.probe.psnr()` measured (told which layers the recipe replaced: see `replay`)."""

        def measure(task: EvalTask) -> list[float]:
            start = time.perf_counter()
            self.state.reach(task.recipe)
            psnr = runner.probe.psnr(changed=self.state.replaced if self.replay else None)
            self.evaluations += 1
            self.busy_s += time.perf_counter() - start
            return psnr

        if self.prefetch and self.state.cache is not None:
            self._prefetch([t for t in tasks if runner.lookup(t.id) is None])
        try:
            return [runner.measure(t.id, t.kind, lambda t=t: measure(t), **t.fields) for t in tasks]
        finally:
            if not self.keep_state:
                self.state.reset()
            release_free_heap()  # what the fits and passes freed, before the next phase's peak stacks on it

    def _prefetch(self, tasks: Sequence[EvalTask]) -> None:
        """Queue the palettes of `tasks` (each once), of layers not replaced now (their weights are the originals
        the palettes are fitted to): in task order, and within a task from its last layer to its first. `reach`
        palettizes a task's layers first to last, fitting any still queued itself, so on a task that needs many
        palettes (a recipe's) it and the background fits work from both ends and meet in the middle, instead of
        racing for the same palette."""
        seen, jobs = set(), []
        for task in tasks:
            mine = []
            for name, spec in task.recipe.items():
                config = None if isinstance(spec, str) and spec.startswith("linear8") else as_config(spec)
                if config is None or (name, config) in seen or name in self.state.replaced:
                    continue
                seen.add((name, config))
                mine.append((name, get_layer(self.state.unet, name).weight, config))
            jobs += reversed(mine)
        self.state.cache.prefetch(jobs, workers=self.prefetch, urgent=True)

    def close(self) -> None:
        """Restore the UNet (only needed with `keep_state`)."""
        self.state.reset()

    def summary(self) -> dict:
        """This process as the one worker: device, pid, evaluations measured and seconds busy."""
        worker = {"worker": 0, "device": str(next(self.state.unet.parameters()).device), "pid": os.getpid(),
                  "evaluations": self.evaluations, "busy_s": round(self.busy_s, 3)}  # fmt: skip
        return {"executor": "local", "workers": [worker]}
