"""Palettization: n-bit lookup tables of float16 values, fitted exactly as Core ML fits them.

A palettized weight is a LUT of 2**nbits float16 values and, for every weight, a uint8 index into
it. `fit_palette` reproduces `coremltools.optimize.coreml.palettize_weights` (coremltools 9) bit for
bit: the weight is cast to float16; in `"kmeans"` mode a tensor (or channel group) with >= 10,000
elements gets exact 1-D k-means over its distinct values weighted by their counts, a smaller one
scikit-learn's KMeans with coremltools' settings; `"uniform"` mode is coremltools' linear LUT.

`"wkmeans"` (data-aware) palettes are ours: exact 1-D k-means weighted by each weight's importance (the
second moment of the input channel it multiplies, `workbench.importance`), minimising
`sum(importance * (w - lut[idx])**2)`, a proxy of the layer's output error. Core ML stores their LUT and
indices as given (`workbench.coreml.explicit_lut`).

Example:
    >>> cfg = PaletteConfig(nbits=4)
    >>> with palettized(pipe.unet, {"mid_block.attentions.0.proj_in": cfg}):
    ...     image = pipe(prompt).images[0]   # weights restored exactly on exit
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.errors import InvalidValueError
from workbench.fit_worker import FitProcess, FitProcessError
from workbench.kmeans import kmeans_float16
from workbench.layers import get_layer
from workbench.palette_config import (  # noqa: F401  (re-exported: the config belongs to palettization's API)
    DATA_AWARE_MODES,
    FLOAT_BITS,
    GRANULARITIES,
    GROUP_SIZES,
    IOS17_NBITS,
    KMEANS_1D_MIN_NUMEL,
    MODES,
    SUPPORTED_NBITS,
    TARGETS,
    PaletteConfig,
    as_config,
    candidate_configs,
    check_target,
)
from workbench.stash import WeightStash

BINNED = "binned"  # fit_palette's approximate solver (estimates only)


@dataclass(frozen=True, eq=False)
class Palette:
    """A fitted palette: `dense()[c, ...] == lut[c // group_size, indices[c, ...]]`.

    Attributes:
        lut (`np.ndarray`): float16, shape (n_groups, 2**nbits); unused entries are 0.
        indices (`np.ndarray`): uint8, the weight's shape.
        config (`PaletteConfig`): how it was fitted.
    """

    lut: np.ndarray
    indices: np.ndarray
    config: PaletteConfig = field(repr=False)

    def dense(self) -> np.ndarray:
        """The palettized weight, float16, in the weight's shape."""
        groups = self.lut.shape[0]
        rows = self.indices.reshape(groups, -1)
        return np.take_along_axis(self.lut, rows.astype(np.intp), axis=1).reshape(self.indices.shape)

    @property
    def nbytes(self) -> int:
        """Bytes on disk: indices packed at nbits each, plus the float16 LUT(s) (`PaletteConfig.nbytes`)."""
        return self.config.nbytes(self.indices.size, self.indices.shape[0])


def _as_float16_numpy(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float16).numpy()
    weight = np.asarray(weight).astype(np.float16, copy=False)
    if weight.ndim == 0 or weight.size == 0:
        raise ValueError(f"cannot palettize a weight of shape {weight.shape}")
    return weight


def sklearn_single_thread():
    """A context in which scikit-learn's KMeans (`fit_palette`'s path for groups under 10,000 weights) runs
    on one OpenMP thread in the calling thread.

    Its Lloyd iterations sum per-thread partial centroids, so the LUT of a small tensor (the path
    coremltools takes below 10,000 weights per tensor or channel group) changes in its last bits with the
    thread count: 2 threads and 1 give different float16 LUTs on our machines. Pinning one thread makes
    the simulation deterministic, the same in a background thread as in the main one, and bit-exact with
    coremltools when `workbench.coreml` runs its `palettize_weights` the same way. (An OpenMP thread count
    is per calling thread, so this does not slow the caller's other threads.)
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


def _fit_group_kmeans(values: np.ndarray, nbits: int, solver: str) -> tuple[np.ndarray, np.ndarray]:
    lut = np.zeros(1 << nbits)
    if values.size >= KMEANS_1D_MIN_NUMEL or solver == BINNED:
        clusters = kmeans_float16(values, len(lut), solver=solver, binned=solver == BINNED)
        lut[: len(clusters.centroids)] = clusters.centroids
        return lut, clusters.labels
    from sklearn.cluster import KMeans

    # coremltools' small-tensor path, with its exact settings, on the same float16 column.
    n_clusters = min(values.size, len(lut))
    kmeans = KMeans(n_clusters, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(values.reshape(-1, 1))
    lut[:n_clusters] = kmeans.cluster_centers_[:, 0]
    return lut, kmeans.labels_


def _fit_group_weighted(values: np.ndarray, nbits: int, solver: str, importance: np.ndarray):
    """Exact importance-weighted 1-D k-means of one group, whatever its size (no scikit-learn path)."""
    lut = np.zeros(1 << nbits)
    clusters = kmeans_float16(values, len(lut), solver=solver, weights=importance)
    lut[: len(clusters.centroids)] = clusters.centroids
    return lut, clusters.labels


def _importance_array(importance, config: PaletteConfig, shape: tuple) -> np.ndarray | None:
    """The importance of every weight (a read-only broadcast view), for data-aware configs; None for the others."""
    if not config.data_aware:
        return None
    if importance is None:
        raise InvalidValueError(
            f"the data-aware palette {config.key} needs per-weight importances (workbench.importance); "
            f"got none. Collect them with collect_importance, or use mode='kmeans'"
        )
    importance = np.asarray(importance, dtype=np.float64)
    try:
        return np.broadcast_to(importance, shape)
    except ValueError:
        raise InvalidValueError(
            f"importance of shape {importance.shape} does not broadcast to the weight's shape {shape}"
        ) from None


def _fit_group_uniform(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    # coremltools' arithmetic, kept in float16 as it does, so the LUT matches bit for bit.
    lo, hi = np.amin(values), np.amax(values)
    levels = (1 << nbits) - 1
    if hi == lo:
        return np.full(1 << nbits, lo), np.zeros(values.size, dtype=np.uint8)
    indices = np.round(((values - lo) / (hi - lo)) * levels).astype(np.uint8)
    return np.arange(1 << nbits) * ((hi - lo) / levels) + lo, indices


def fit_palette(
    weight: torch.Tensor | np.ndarray, config: PaletteConfig, solver: str = "auto", importance=None
) -> Palette:
    """Fit an n-bit palette to a weight, exactly as coremltools 9's `palettize_weights` does (k-means, uniform),
    or by importance-weighted exact k-means (`"wkmeans"`).

    Args:
        weight (`torch.Tensor` or `np.ndarray`): any float dtype; cast to float16 first, as Core ML stores it.
            Axis 0 is the output-channel axis that grouped palettes split.
        config (`PaletteConfig`): bits, mode and granularity.
        solver (`str`, defaults to `"auto"`): the 1-D k-means solver (see `workbench.kmeans.kmeans_1d`), or
            `"binned"`: an approximate k-means palette at any size (`kmeans_float16(binned=True)`, milliseconds
            where an 8-bit fit takes a second), for estimates only: not what Core ML stores.
        importance (`np.ndarray`, *optional*): for data-aware configs (required there, ignored by the others):
            finite importances >= 0 broadcastable to the weight's shape, e.g.
            `Importance.for_weight(name, weight.shape)` (the input channel's second moment of every weight).

    Returns:
        `Palette` with a float16 LUT per channel group and uint8 indices in the weight's shape.
    """
    if solver == BINNED and config.mode != "kmeans":
        raise ValueError(f"the {BINNED!r} solver approximates plain k-means palettes only, not {config.key!r}")
    w = _as_float16_numpy(weight)
    channels = w.shape[0]
    group_size = config.group_size if config.granularity == "per_grouped_channel" else channels
    if channels % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the {channels} output channels of a weight of shape {w.shape}"
        )
    importance = _importance_array(importance, config, w.shape)
    luts, indices = [], []
    small_groups = (
        config.mode == "kmeans" and solver != BINNED and w.size // (channels // group_size) < KMEANS_1D_MIN_NUMEL
    )
    # scikit-learn's path: pinned once per weight, not per group (setting the pin costs ~5 ms)
    with sklearn_single_thread() if small_groups else nullcontext():
        for start in range(0, channels, group_size):
            group = w[start : start + group_size]
            values = group.reshape(-1)
            if config.mode == "kmeans":
                lut, idx = _fit_group_kmeans(values, config.nbits, solver)
            elif config.data_aware:
                lut, idx = _fit_group_weighted(values, config.nbits, solver, importance[start : start + group_size])
            else:
                lut, idx = _fit_group_uniform(values, config.nbits)
            luts.append(lut.astype(np.float16))
            indices.append(np.asarray(idx).astype(np.uint8, copy=False).reshape(group.shape))
    return Palette(np.stack(luts), indices[0] if len(indices) == 1 else np.concatenate(indices, axis=0), config)


@torch.no_grad()
def palettize_tensor(weight: torch.Tensor, config: PaletteConfig, importance=None) -> torch.Tensor:
    """The weight with every value replaced by its palette entry; same shape, dtype and device (`importance`:
    see `fit_palette`)."""
    dense = fit_palette(weight, config, importance=importance).dense()
    return torch.from_numpy(dense).to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def linear_quantize_tensor(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Simulated 8-bit linear quantization, the reference's baselines.

    - `per_channel=False`: asymmetric uint8 over the whole tensor, the reference's `linear_8bit`:
      `scale = (max - min) / 255`, `zero = round(-min / scale)`, `q = clip(round(w / scale) + zero, 0, 255)`.
    - `per_channel=True`: symmetric int8 per output channel (coremltools' default `linear_symmetric`):
      `scale_c = max|w_c| / 127`, `q = clip(round(w / scale_c), -127, 127)`.

    Returns `(q - zero) * scale` in float16 precision, cast back to the weight's dtype.
    """
    w = weight.detach().float()
    if per_channel:
        scale = w.abs().flatten(1).amax(dim=1).clamp_min(1e-12) / 127.0
        scale = scale.view(-1, *([1] * (w.dim() - 1)))
        q = torch.clamp(torch.round(w / scale), -127, 127)
        out = q * scale
    else:
        lo, hi = w.min().clamp_max(0.0), w.max().clamp_min(0.0)
        scale = ((hi - lo) / 255.0).clamp_min(1e-12)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, 255)
        out = (q - zero) * scale
    return out.half().to(dtype=weight.dtype)


class PaletteCache:
    """Fitted palettes per (layer, config), so a sweep runs k-means once per layer and width, in bounded memory.

    Palettes are kept as uint8 indices plus LUTs (about a byte per weight), and expanded to a dense
    tensor on request. A weight that changed since its palette was fitted (another tensor, or
    modified in place) is refitted, never served stale.

    With `max_bytes`, the palettes held in memory never exceed that many bytes: the least recently used are
    written to `spill_dir` (and read back when asked for again, which is far cheaper than a refit) or, without a
    `spill_dir`, dropped (and refitted if asked for again). A full-size SDXL sweep at 5 widths fits about 13 GB
    of palettes; with a budget it holds at most `max_bytes` of them, whatever the number of widths.

    Args:
        solver (`str`, defaults to "auto"): the 1-D k-means solver (`workbench.kmeans.kmeans_1d`).
        max_bytes (`int`, *optional*): memory budget for the palettes held; None = unbounded.
        spill_dir (`str | os.PathLike`, *optional*): where palettes over the budget go (one .npz each).
        importance (`workbench.importance.Importance`, *optional*): per-layer importances, needed to fit
            data-aware (`"wkmeans"`) palettes; their cache keys carry its `digest`.

    Attributes:
        fits, reloads, spills (`int`): palettes fitted, read back from `spill_dir`, written to it.
        peak_nbytes (`int`): the most bytes of palettes held in memory at once.
    """

    def __init__(self, solver: str = "auto", *, max_bytes: int | None = None, spill_dir=None, importance=None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.solver = solver
        self.importance = importance
        self.max_bytes = max_bytes
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        # keys: (layer, config, the importance's digest for data-aware configs, else None)
        self._palettes: OrderedDict[tuple[str, PaletteConfig, str | None], tuple[tuple, Palette]] = OrderedDict()
        self._spilled: dict[tuple[str, PaletteConfig, str | None], tuple[tuple, Path]] = {}
        self._pending: dict[tuple[str, PaletteConfig, str | None], tuple[tuple, Future]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._urgent: ThreadPoolExecutor | None = None  # `prefetch(urgent=True)`: the next measurements' palettes
        self._process: FitProcess | None = None  # background fits of small tensors (scikit-learn holds the GIL)
        self._lock = threading.RLock()
        self._nbytes = 0
        self.peak_nbytes = 0
        self.fits = self.reloads = self.spills = 0

    @staticmethod
    def _identity(weight: torch.Tensor) -> tuple:
        return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype)

    def _key(
        self, name: str, config: PaletteConfig, approximate: bool = False
    ) -> tuple[str, PaletteConfig, str | None]:
        if approximate:
            if config.mode != "kmeans":
                raise ValueError(f"approximate palettes are plain k-means ones, not {config.key!r}")
            return (name, config, BINNED)
        return (name, config, self.importance.digest if config.data_aware and self.importance is not None else None)

    def _fit(self, name: str, weight: torch.Tensor, config: PaletteConfig, approximate: bool = False) -> Palette:
        if approximate:
            return fit_palette(weight, config, solver=BINNED)
        importance = None
        if config.data_aware and self.importance is not None:
            importance = self.importance.for_weight(name, tuple(weight.shape))
        return fit_palette(weight, config, solver=self.solver, importance=importance)

    @staticmethod
    def _in_process(weight: torch.Tensor, config: PaletteConfig, approximate: bool) -> bool:
        """Whether a background fit of this palette runs in the helper process: scikit-learn's path (plain k-means
        of groups under `KMEANS_1D_MIN_NUMEL` weights)."""
        groups = weight.shape[0] // config.group_size if config.granularity == "per_grouped_channel" else 1
        return not approximate and config.mode == "kmeans" and weight.numel() // groups < KMEANS_1D_MIN_NUMEL

    def _fit_in_background(self, name: str, weight: torch.Tensor, config: PaletteConfig, approximate: bool) -> Palette:
        """A prefetched fit: scikit-learn's (a plain k-means palette of groups under `KMEANS_1D_MIN_NUMEL` weights)
        in the helper process (`workbench.fit_worker`: the same palette, without holding this process' GIL while
        the UNet runs), any other in this thread; in this thread too if the process fails."""
        if self._in_process(weight, config, approximate):
            with self._lock:
                process = self._process
            try:
                if process is not None:
                    return process.fit(_as_float16_numpy(weight), config, self.solver)
            except FitProcessError:
                pass
        return self._fit(name, weight, config, approximate)

    def palette(self, name: str, weight: torch.Tensor, config: PaletteConfig, approximate: bool = False) -> Palette:
        """The palette of `weight` (layer `name`) under `config`: held, read back, taken from a background fit,
        or fitted now. `approximate`: the binned k-means palette instead (`fit_palette(solver="binned")`: fast at
        any width, for estimates only), held beside the exact one."""
        key, identity = self._key(name, config, approximate), self._identity(weight)
        palette = self._lookup(key, identity)
        if palette is None:
            with self._lock:
                pending = self._pending.pop(key, None)
            running = pending is not None and pending[0] == identity and not pending[1].cancel()
            if running and (pending[1].done() or not self._in_process(weight, config, approximate)):
                palette = pending[1].result()  # fitted in the background (see `prefetch`), or being fitted
            else:  # not submitted, stale, still queued (cancelled then), or in the helper process (which may still
                # be starting): fitting it here is sooner, and gives the same palette
                palette = self._fit(name, weight, config, approximate)
            self._store(key, identity, palette)
        return palette

    def _lookup(self, key, identity) -> Palette | None:
        """A held or spilled palette for `key` fitted to the weight `identity`, else None."""
        with self._lock:
            held = self._palettes.get(key)
            if held is not None and held[0] == identity:
                self._palettes.move_to_end(key)
                return held[1]
            spilled = self._spilled.get(key)
        if spilled is None or spilled[0] != identity:
            return None
        with np.load(spilled[1]) as data:
            palette = Palette(data["lut"], data["indices"], key[1])
        self.reloads += 1
        self._put(key, identity, palette)
        return palette

    def _store(self, key, identity, palette: Palette) -> None:
        """Hold a newly fitted palette (counted in `fits`), within the budget."""
        with self._lock:
            self.fits += 1
            self._spilled.pop(key, None)
        self._put(key, identity, palette)

    def _put(self, key, identity, palette: Palette) -> None:
        with self._lock:
            old = self._palettes.pop(key, None)
            if old is not None:
                self._nbytes -= _held_nbytes(old[1])
            self._palettes[key] = (identity, palette)
            self._nbytes += _held_nbytes(palette)
            while self.max_bytes is not None and self._nbytes > self.max_bytes and len(self._palettes) > 1:
                self._evict()
            self.peak_nbytes = max(self.peak_nbytes, self._nbytes)

    def _evict(self) -> None:
        """Drop the least recently used palette from memory, writing it to `spill_dir` first if there is one."""
        key, (identity, palette) = self._palettes.popitem(last=False)
        self._nbytes -= _held_nbytes(palette)
        if self.spill_dir is not None and self._spilled.get(key, (None,))[0] != identity:  # not on disk yet
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"{len(self._spilled) + self.spills:06d}_{key[1].key}.npz"
            np.savez(path, lut=palette.lut, indices=palette.indices)
            self._spilled[key] = (identity, path)
            self.spills += 1

    def _adopt(self, key, identity, weight: torch.Tensor, future: Future) -> None:
        """A background fit finished: move its palette under the budget (so queued results never pile up); one of
        a weight that changed since it was submitted is dropped (the caller will refit the new values)."""
        if future.cancelled() or future.exception() is not None or self._identity(weight) != identity:
            return
        with self._lock:
            if self._pending.get(key, (None, None))[1] is not future:
                return  # taken by `palette` meanwhile
            del self._pending[key]
        self._store(key, identity, future.result())

    def prefetch(
        self,
        jobs: Iterable[tuple[str, torch.Tensor, PaletteConfig]],
        workers: int = 1,
        approximate: bool = False,
        urgent: bool = False,
    ) -> None:
        """Start fitting palettes in background threads, in the order given, so they are ready when asked for.

        The fits spend their time in numpy and the compiled k-means solver (numba, nogil), which release the GIL,
        so on a machine with a core the model does not use they overlap its forward passes instead of adding to
        them; scikit-learn's fits of small tensors, which hold it, run in a helper process
        (`workbench.fit_worker`; the same palettes). `palette` waits for a fit that is running, and fits a
        still-queued one itself (cancelling the queued job), so submit the most expensive fits (the widest
        palettes) first and the caller works up from the cheap end. A weight that changed after it was submitted
        is refitted. Results are the same as without prefetching, and finished fits count against `max_bytes` like
        any other. Call `close` (or use the cache as a context manager) to stop the threads and the process.

        Args:
            jobs (`Iterable[tuple[str, torch.Tensor, PaletteConfig]]`): (layer name, its weight, config).
            workers (`int`, defaults to 1): background threads (of the first call; urgent fits have one more).
            approximate (`bool`, defaults to False): fit the approximate palettes (see `palette`).
            urgent (`bool`, defaults to False): palettes needed next (the measurements about to run), fitted on a
                thread of their own ahead of what earlier calls queued (a queued job of the same palette moves).
        """
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(workers, thread_name_prefix="palette-fit")
            if urgent and self._urgent is None:
                self._urgent = ThreadPoolExecutor(1, thread_name_prefix="palette-fit-urgent")
            pool = self._urgent if urgent else self._executor
        for name, weight, config in jobs:
            key = self._key(name, config, approximate)
            with self._lock:
                if key in self._palettes or key in self._spilled:
                    continue
                queued = self._pending.get(key)
                if queued is not None and not (urgent and queued[1].cancel()):
                    continue  # running or queued already (an urgent one moves to the urgent thread)
                weight = weight.detach()  # the current storage: later `.data` swaps of the layer do not reach it
                identity = self._identity(weight)
                if self._process is None and self._in_process(weight, config, approximate):
                    self._process = FitProcess()  # only where small tensors are fitted: it costs a process
                    self._process.start()  # it imports while the first fits run
                future = pool.submit(self._fit_in_background, name, weight, config, approximate)
                self._pending[key] = (identity, future)
            future.add_done_callback(lambda f, k=key, i=identity, w=weight: self._adopt(k, i, w, f))

    def settle(self, weight: torch.Tensor) -> None:
        """Make sure no background fit reads `weight`'s storage from now on (it is about to be overwritten in
        place): queued fits of it are cancelled (fitted later on demand), running ones are waited for."""
        ptr = weight.data_ptr()
        with self._lock:
            mine = [(key, future) for key, (identity, future) in self._pending.items() if identity[0] == ptr]
        for key, future in mine:
            if future.cancel():
                with self._lock:
                    if self._pending.get(key, (None, None))[1] is future:
                        del self._pending[key]
            else:
                wait([future])

    def close(self) -> None:
        """Cancel the fits not started yet, wait for the running ones and stop the background threads."""
        for pool in (self._executor, self._urgent):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._executor = self._urgent = None
        if self._process is not None:
            self._process.close()
            self._process = None
        with self._lock:
            self._pending.clear()

    def __enter__(self) -> PaletteCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, name: str, weight: torch.Tensor, palette: Palette) -> None:
        """Hold `palette`, fitted elsewhere (another process) to the values `weight` has now, as layer `name`'s
        palette under `palette.config` (not counted in `fits`)."""
        self._put(self._key(name, palette.config), self._identity(weight), palette)

    def get(self, name: str, weight: torch.Tensor, config: PaletteConfig, approximate: bool = False) -> torch.Tensor:
        dense = self.palette(name, weight, config, approximate).dense()
        return torch.from_numpy(dense).to(device=weight.device, dtype=weight.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the palettes held in memory now (indices and LUTs)."""
        return self._nbytes

    def __len__(self) -> int:
        """Palettes held in memory or spilled."""
        with self._lock:
            return len(self._palettes) + len(set(self._spilled) - set(self._palettes))


def _held_nbytes(palette: Palette) -> int:
    return palette.indices.nbytes + palette.lut.nbytes


def replacement_weight(
    name: str, layer: nn.Module, spec, cache: PaletteCache | None = None, importance=None
) -> torch.Tensor | None:
    """The weight `layer` (named `name`) takes under a recipe entry `spec` (`palettized`'s), or None (float16)."""
    if spec == "linear8" or spec == "linear8_per_channel":
        return linear_quantize_tensor(layer.weight, per_channel=spec == "linear8_per_channel")
    config = as_config(spec)
    if config is None:
        return None
    if cache is not None:
        return cache.get(name, layer.weight, config)
    weights = importance.for_weight(name, tuple(layer.weight.shape)) if importance and config.data_aware else None
    return palettize_tensor(layer.weight, config, importance=weights)


def _check_importance(cache: PaletteCache | None, importance) -> None:
    if cache is not None and importance is not None and cache.importance is not importance:
        raise ValueError("pass the importance to the PaletteCache (PaletteCache(importance=...)), not beside it")


@contextmanager
@torch.no_grad()
def palettized(
    model: nn.Module,
    recipe: Mapping[str, int | PaletteConfig | str | None],
    cache: PaletteCache | None = None,
    stash: WeightStash | None = None,
    importance=None,
) -> Iterator[nn.Module]:
    """Palettize `model`'s layers in place for the duration of a `with` block, then restore them exactly.

    Nothing is deep-copied. Each listed layer's weight takes its palettized values and its original comes back
    bitwise on exit, also on error: kept as the original tensor (the same object) while the originals fit in the
    stash's memory budget, else written to the stash's temporary file and the palettized values written into
    the weight's own storage, so palettizing a whole full-size model does not hold it twice (`workbench.stash`).

    Args:
        model (`nn.Module`): e.g. `pipe.unet`.
        recipe (`Mapping[str, int | PaletteConfig | str | None]`): layer name -> bit width (16 or None:
            leave it), a `PaletteConfig` or its key (`"wkmeans4_g16"`), or `"linear8"` / `"linear8_per_channel"`
            for the int8 baselines.
        cache (`PaletteCache`, *optional*): reuse palettes across calls (data-aware ones with its importance).
        stash (`WeightStash`, *optional*): where originals wait, shared by nested blocks (a cumulative curve);
            None = a stash of this block's own with the default memory budget.
        importance (`workbench.importance.Importance`, *optional*): for data-aware palettes without a cache.
    """
    _check_importance(cache, importance)
    own = stash is None
    stash = WeightStash() if own else stash
    replaced: list[str] = []
    try:
        for name, spec in recipe.items():
            layer = get_layer(model, name)
            new = replacement_weight(name, layer, spec, cache, importance)
            if new is not None:
                stash.swap(name, layer.weight, new, cache)
                replaced.append(name)
                del new  # on the disk path its values now live in the weight's storage
        yield model
    finally:
        for name in reversed(replaced):
            stash.restore(name, get_layer(model, name).weight)
        if own:
            stash.close()


@torch.no_grad()
def palettize_(model: nn.Module, recipe: Mapping[str, int | PaletteConfig | str | None], importance=None) -> nn.Module:
    """Palettize `model`'s layers in place, for good (see `palettized` for a reversible version)."""
    for name, spec in recipe.items():
        layer = get_layer(model, name)
        new = replacement_weight(name, layer, spec, None, importance)
        if new is not None:
            layer.weight.data = new
    return model
