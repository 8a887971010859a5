"""Fitted palettes per (layer, config) within a memory budget (`PaletteCache`): spilled to disk past it, fitted in
the background while the UNet runs."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from workbench.palettes.config import (
    KMEANS_1D_MIN_NUMEL,
    PaletteConfig,
)
from workbench.palettes.fit_worker import FitProcess, FitProcessError

if TYPE_CHECKING:
    pass
from workbench.palettes.fit import BINNED, Palette, _as_float16_numpy, fit_palette


class PaletteCache:
    """Fitted palettes per (layer, config), so a sweep runs k-means once per layer and width, in bounded memory.

    Palettes are kept as uint8 indices plus LUTs (about a byte per weight), and expanded to a dense
    tensor on request. A weight that changed since its palette was fitted (another tensor, or
    modified in place) is refitted, never served stale.

    With `max_bytes`, the palettes held in memory never exceed that many bytes: the least recently used are
    written to `spill_dir` (and read back when asked for again, which is far cheaper than a refit) or, without a
    `spill_dir`, dropped (and refitted if asked for again). With `spill_dir=True` they go to a private folder
    under the system's temp dir (`SpillFolder`), deleted by `close` and at exit, or by the next cache that spills
    if this process was killed: never to the user's output folder. A full-size SDXL sweep at 5 widths fits about 13 GB
    of palettes; with a budget it holds at most `max_bytes` of them, whatever the number of widths.

    Args:
        solver (`str`, defaults to "auto"): the 1-D k-means solver (`workbench.palettes.kmeans.kmeans_1d`).
        max_bytes (`int`, *optional*): memory budget for the palettes held; None = unbounded.
        spill_dir (`str | os.PathLike | bool`, *optional*): where palettes over the budget go (one .npz each): a
            folder the caller owns, or True for a private temporary one the cache deletes (see above).
        importance (`workbench.palettes.importance.Importance`, *optional*): per-layer importances, needed to fit
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
        self._own_spill = spill_dir is True
        self._spill_folder: SpillFolder | None = None  # created on the first spill, deleted by `close`
        self.spill_dir = None if spill_dir is None or spill_dir is False or spill_dir is True else Path(spill_dir)
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
        in the helper process (`workbench.palettes.fit_worker`: the same palette, without holding this process' GIL
        while
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

    def held(
        self, name: str, weight: torch.Tensor, config: PaletteConfig, approximate: bool = False
    ) -> Palette | None:
        """The palette `palette` would return without fitting (held, or read back from the spill), else None: for a
        caller whose `weight` carries the original's identity but not (now) its values, which a fit would read."""
        return self._lookup(self._key(name, config, approximate), self._identity(weight))

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
        if self._own_spill and self._spill_folder is None:
            self._spill_folder = SpillFolder()
            self.spill_dir = self._spill_folder.path
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
        (`workbench.palettes.fit_worker`; the same palettes). `palette` waits for a fit that is running, and fits a
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
        """Cancel the fits not started yet, wait for the running ones and stop the background threads; delete a
        private spill folder (`spill_dir=True`: its palettes are refitted if asked for again)."""
        for pool in (self._executor, self._urgent):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._executor = self._urgent = None
        if self._process is not None:
            self._process.close()
            self._process = None
        with self._lock:
            self._pending.clear()
            if self._spill_folder is not None:
                self._spill_folder.remove()
                self._spill_folder = self.spill_dir = None
                self._spilled.clear()

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


SPILL_PREFIX = "workbench-palettes-"  # private spill folders under the system's temp dir
_LOCK = ".lock"


class SpillFolder:
    """A private folder under the system's temp dir for one cache's spilled palettes.

    Removed by `remove`, at interpreter exit, or when garbage collected. A process killed outright (SIGKILL, out
    of memory) cannot remove it: its lock (`flock` on `.lock` inside, which the kernel releases when the process
    dies) then tells the next `SpillFolder` it is abandoned, and that one deletes it. Without `fcntl` (Windows)
    abandoned folders stay in the temp dir.

    Attributes:
        path (`Path`): `<tempdir>/workbench-palettes-<pid>-<random>`.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        root = Path(tempfile.gettempdir() if root is None else root)
        remove_abandoned_spills(root)
        staging = Path(tempfile.mkdtemp(prefix=f".{SPILL_PREFIX}", dir=root))
        self._fd = _lock(staging / _LOCK, create=True)
        self.path = root / f"{SPILL_PREFIX}{os.getpid()}-{staging.name.rsplit('-', 1)[-1]}"
        staging.rename(self.path)  # locked before it has the name other processes look for
        self._finalizer = weakref.finalize(self, _remove_folder, self.path, self._fd, os.getpid())

    def remove(self) -> None:
        self._finalizer()


def _lock(path: Path, create: bool = False) -> int | None:
    """An fd holding an exclusive `flock` on `path`, or None where another process holds it (or no `fcntl`)."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_folder(path: Path, fd: int | None, owner: int | None = None) -> None:
    if owner is not None and owner != os.getpid():
        return  # a forked child exiting: the folder is its parent's
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        os.close(fd)


def remove_abandoned_spills(root: str | os.PathLike | None = None) -> list[Path]:
    """Delete the spill folders under `root` (default: the system's temp dir) whose process is gone (their lock is
    free); returns them."""
    removed = []
    for folder in Path(tempfile.gettempdir() if root is None else root).glob(f"{SPILL_PREFIX}*"):
        try:
            fd = _lock(folder / _LOCK)
        except OSError:  # no lock file (not ours) or not readable: leave it
            continue
        if fd is not None:
            _remove_folder(folder, fd)
            removed.append(folder)
    return removed


def _held_nbytes(palette: Palette) -> int:
    return palette.indices.nbytes + palette.lut.nbytes


DEFAULT_PALETTE_MEMORY = 512 << 20  # bytes of palettes an analysis holds in memory; the rest are spilled to disk
