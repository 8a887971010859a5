"""A helper process for `PaletteCache`'s background fits of small tensors.

coremltools fits a tensor (or channel group) under 10,000 weights with scikit-learn's KMeans, and so does
`workbench.palettes.fit.fit_palette` for bit-exactness. Unlike the 1-D solver of larger tensors (numba, which releases
the GIL), that path holds the GIL for much of its time, so in a background thread it slows the UNet's forward
passes it is meant to overlap (numba's fits, which release the GIL, leave them as fast as alone; the figures are
in docs/benchmarks.md). In a process of its own it costs the forward nothing. The process runs the same
`fit_palette` on the same float16 values, so its palettes are the same bits.

The protocol is this module's own (no `multiprocessing`, which would import the caller's `__main__` in the
child): `python -m workbench.palettes.fit_worker` reads length-prefixed pickles `(values, config, solver)` on stdin and
writes `("ok", lut, indices)` or `("error", message)` back on stdout, one at a time.

Example:
    >>> with FitProcess() as process:
    ...     palette = process.fit(weight, PaletteConfig(nbits=6))  # == fit_palette(weight, PaletteConfig(nbits=6))
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
import threading
from typing import BinaryIO

import numpy as np

from workbench.palettes.fit import Palette, fit_palette

_HEADER = struct.Struct("<Q")


class FitProcessError(RuntimeError):
    """The helper process could not fit (it failed to start, died, or the fit raised there)."""


def _send(stream: BinaryIO, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: BinaryIO):
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the stream ended")
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the stream ended inside a message")
    return pickle.loads(data)


class FitProcess:
    """One helper process, started on the first `fit` and stopped by `close` (or the context manager's exit).
    Thread-safe: fits from several threads take turns."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._failed: str | None = None  # once it failed, it is not started again (callers fit in their thread)

    def fit(self, values: np.ndarray, config, solver: str = "auto"):
        """`fit_palette(values, config, solver)` in the helper process (`values`: the weight's float16 array).

        Raises:
            FitProcessError: the process could not be started, died, or the fit raised there.
        """

        with self._lock:
            if self._failed is not None:
                raise FitProcessError(self._failed)
            try:
                self._start()
                _send(self._process.stdin, (np.ascontiguousarray(values, dtype=np.float16), config, solver))
                reply = _receive(self._process.stdout)
            except (OSError, EOFError, pickle.PickleError) as error:
                self._stop()
                self._failed = f"the palette fit process failed: {error}"
                raise FitProcessError(self._failed) from error
        if reply[0] != "ok":
            raise FitProcessError(f"the palette fit failed in the helper process: {reply[1]}")
        return Palette(reply[1], reply[2], config)

    def start(self) -> None:
        """Start the process now (it takes a second or two to import), if it is not running; a failure to start
        is left for `fit` to report."""
        with self._lock:
            try:
                self._start()
            except OSError:
                pass

    def _start(self) -> None:
        if self._process is None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "workbench.palettes.fit_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop the process (it exits when its input closes)."""
        with self._lock:
            self._stop()

    def __enter__(self) -> FitProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    """The helper's loop: fit each request until stdin closes."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's; this process ends when its input closes
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the replies

    while True:
        try:
            values, config, solver = _receive(stdin)
        except EOFError:
            return
        try:
            palette = fit_palette(values, config, solver=solver)
            reply = ("ok", palette.lut, palette.indices)
        except Exception as error:  # reported to the caller, which fits in its own thread instead
            reply = ("error", f"{type(error).__name__}: {error}")
        _send(stdout, reply)


if __name__ == "__main__":
    main()
