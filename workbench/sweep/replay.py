"""Skip what an evaluation shares with the float model: the UNet's computation upstream of the first changed layer.

An isolated evaluation palettizes one layer; everything the UNet computes before that layer runs is the float
model's own computation on the probe's fixed inputs, the same in every evaluation. `UpstreamReplay` records, in
one forward, the outputs of the UNet's blocks and of their direct children (`down_blocks.1`,
`down_blocks.1.attentions.0`, ...) and the order in which every module starts and finishes. In a later forward
whose changed layers are known, every recorded module that finished before the first of them started returns
its recorded output instead of running: the same tensors the float model computes there, so the evaluation is
bitwise the one without replay (a test compares every candidate layer of an SD and an SDXL UNet). An isolated
evaluation skips, on average, the part of the UNet before its layer, so a sweep of every candidate runs in a good
deal less time (measured in docs/benchmarks.md).

The recording holds activations of the probe's whole batch, so it is bounded (`max_bytes`: outputs are kept as
modules finish until the budget is spent, and never more is held; modules not kept always run). Only modules called
once per forward are replayed. Its size at batch 16 in float16 (shapes propagated on the meta device): SD-1.5 and
SD-2.1 at 512 px 0.35 GiB through `down_blocks.1`, 0.52 through `mid_block`, 0.76 through `up_blocks.2`; SDXL at
1024 px 1.09 GiB through `down_blocks.1`, 1.74 through `mid_block`, 3.65 through `up_blocks.2`. The default 1 GiB
covers most of SD's and the first third of SDXL's (float32 on a CPU doubles these).

Example:
    >>> replay = UpstreamReplay(unet)
    >>> with replay.skipping(["up_blocks.2.attentions.0.proj_in"]):  # only this layer differs from the float model
    ...     out = unet(*inputs)
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Collection, Iterator

import torch

DEFAULT_REPLAY_MEMORY = 1 << 30  # 1 GiB of recorded activations
REPLAY_DEPTH = 2  # blocks and their direct children: on the demo model, deeper levels (3, 4, 6) skipped no more
# of an isolated evaluation (35 %) and recorded 3-7x the activations


def replay_units(unet: torch.nn.Module, depth: int = REPLAY_DEPTH) -> dict[str, torch.nn.Module]:
    """The modules a forward can skip: the UNet's descendants `depth` levels down at most (the elements of a
    `ModuleList` count as the level of the list, which is never called), in registration order."""
    units = {}

    def visit(prefix: str, module: torch.nn.Module, level: int) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            items = [(f"{path}.{i}", m) for i, m in enumerate(child)] if isinstance(child, torch.nn.ModuleList) else [
                (path, child)]  # fmt: skip
            for unit, m in items:
                units[unit] = m
                if level < depth:
                    visit(f"{unit}.", m, level + 1)

    visit("", unet, 1)
    return units


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _recorded(output, *args, **kwargs):
    return output


class UpstreamReplay:
    """Recorded float outputs of a UNet's blocks, replayed upstream of the first changed layer.

    Args:
        unet (`torch.nn.Module`): the UNet; always called with the same inputs (the probe's).
        max_bytes (`int`, defaults to 1 GiB): recorded activations at most.

    Attributes:
        nbytes (`int`): bytes recorded.
        skipped (`int`): forwards that skipped at least one module.
    """

    def __init__(self, unet: torch.nn.Module, max_bytes: int = DEFAULT_REPLAY_MEMORY):
        self.unet = unet
        self.max_bytes = max_bytes
        self.units = replay_units(unet)
        self._names = {name for name, _ in unet.named_modules()}
        self._start: dict[str, int] = {}  # module name -> event index of its first start, in the recorded forward
        self._end: dict[str, int] = {}  # unit -> event index of its (last) finish
        self._outputs: dict[str, object] = {}  # unit -> its recorded output, in execution order
        self.nbytes = 0
        self.skipped = 0

    @property
    def recorded(self) -> bool:
        return bool(self._start)

    @contextlib.contextmanager
    def skipping(self, changed: Collection[str]) -> Iterator[None]:
        """Within the `with` block, a forward of the UNet (on the recorded inputs) whose weights differ from the
        float model's only in the layers `changed` skips every recorded module that finished before the first of
        them started. The first forward is the recording: it runs whole, hooked, and keeps the outputs of the
        modules that finish before the first changed layer starts (every module's with `changed` empty).

        Raises:
            ValueError: a name in `changed` that is no module of the UNet.
        """
        changed = set(changed)
        unknown = sorted(changed - self._names)
        if unknown:
            raise ValueError(f"changed layers {unknown[:3]} are not modules of the UNet")
        if not self.recorded:
            with self._recording(changed):
                yield
            return
        first = min((self._start.get(name, -1) for name in changed), default=math.inf)  # -1: never ran, skip nothing
        chosen: list[str] = []  # the outermost: a block replayed whole skips its children too
        for name in self._outputs:
            if self._end[name] < first and not any(name.startswith(c + ".") for c in chosen):
                chosen.append(name)
        for name in chosen:
            self.units[name].forward = functools.partial(_recorded, self._outputs[name])
        self.skipped += bool(chosen)
        try:
            yield
        finally:
            for name in chosen:
                del self.units[name].forward  # the instance attribute: the class' forward is back

    @contextlib.contextmanager
    def _recording(self, changed: set[str]) -> Iterator[None]:
        """Hook every module for the order of starts and finishes; keep a unit's output as it finishes if no
        changed layer has started yet and it fits the budget (held from the forward's start, so the recording
        never holds more than `max_bytes`); after it, keep those of units called once, in execution order."""
        events = iter(range(1 << 62))
        start: dict[str, int] = {}
        end: dict[str, int] = {}
        calls: dict[str, int] = {}
        outputs: dict[str, object] = {}
        state = {"first": math.inf, "kept": 0}

        def before(name):
            def hook(module, args):
                index = next(events)
                start.setdefault(name, index)
                calls[name] = calls.get(name, 0) + 1
                if name in changed:
                    state["first"] = min(state["first"], index)

            return hook

        def after(name):
            def hook(module, args, output):
                end[name] = next(events)
                size = _nbytes(output)
                if end[name] < state["first"] and state["kept"] + size <= self.max_bytes and name not in outputs:
                    outputs[name] = output
                    state["kept"] += size

            return hook

        handles = [m.register_forward_pre_hook(before(n)) for n, m in self.unet.named_modules() if n]
        handles += [m.register_forward_hook(after(n)) for n, m in self.units.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self._start, self._end = start, end
        for name in sorted((n for n in outputs if calls[n] == 1), key=start.get):
            self._outputs[name] = outputs[name]
            self.nbytes += _nbytes(outputs[name])
