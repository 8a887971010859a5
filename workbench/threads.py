"""Thread pinning that results depend on: torch's intra-op threads, and one OpenMP thread for scikit-learn's
small-tensor k-means (coremltools' LUTs differ with the thread count, so simulation and export pin the same); and
giving back to the system the heap those threads freed (`release_free_heap`)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

import torch


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


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with `torch.set_num_threads(n)`, then put the previous value back (None: leave it)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def _libc():
    """The C library, if it is glibc (the one with `malloc_trim`); None elsewhere (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> None:
    """Give the heap memory freed since the last call back to the system (glibc's `malloc_trim`; nothing
    elsewhere). glibc keeps what torch's threads free in per-thread arenas for reuse; after a backward pass through
    a full-size UNet that was about 0.65 GB held but unused, which the next phase's peak then stacks on."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
