"""Exact restore of weights that a palettized copy replaces, in bounded memory.

`workbench.palettes.apply.palettized` replaces layers' weights for the duration of a `with` block. Keeping every
original tensor alive while its replacement is in place holds the model twice whenever a phase replaces all the
weights (the int8 baselines, a cumulative curve, a recipe): 3.4 GB extra for SD-1.5 in float32, 10 GB for SDXL.
A `WeightStash` keeps originals in memory up to `memory_bytes`; beyond that it writes their bytes to an anonymous
temporary file and writes the replacement into the original tensor in place, so the model costs its own size
plus `memory_bytes`, and the restore (bytes read back into the same tensor) is exact.

An original is written once per stash: its bytes stay in the file after the restore, and a later swap of the same
weight, unchanged since (the same storage and autograd version), reads nothing and writes nothing until its
restore. So a stash that lives as long as an analysis writes at most the model's size to disk, however many whole
recipes the analysis puts in force (each used to write the model again: ~3.2 GB a recipe for SD-1.5 in float32).
A weight changed in place behind autograd's back (through `.data`) between two swaps is not detected, as in the
palette cache (`workbench.palettes.cache.PaletteCache`); the analysis changes weights only through a stash.

Example:
    >>> with WeightStash() as stash, palettized(unet, recipe, stash=stash):
    ...     latents = probe()
"""

from __future__ import annotations

import os
import tempfile

import torch

STASH_MEMORY_BYTES = 256 << 20  # originals kept in memory before the stash writes them to disk


class WeightStash:
    """Originals of replaced weights: in memory up to `memory_bytes`, then in a temporary file.

    Args:
        memory_bytes (`int`, *optional*): bytes of originals kept as tensors (the replacement gets its own
            storage, as a plain swap would); above it, originals go to disk and replacements are written in place.
            None = `STASH_MEMORY_BYTES` (256 MiB).
        dir (`str | os.PathLike`, *optional*): folder of the temporary file; None = the system's temp folder.

    Attributes:
        on_disk_bytes (`int`): bytes written to the file so far (each original once).
        reused (`int`): swaps that found their original in the file already (nothing written).
    """

    def __init__(self, memory_bytes: int | None = None, dir: str | os.PathLike | None = None):
        memory_bytes = STASH_MEMORY_BYTES if memory_bytes is None else memory_bytes
        if memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0, got {memory_bytes}")
        self.memory_bytes = memory_bytes
        self.dir = dir
        self._in_memory: dict[str, torch.Tensor] = {}
        self._on_disk: dict[str, tuple[int, int]] = {}  # name -> (offset, nbytes): replaced now
        self._written: dict[str, tuple[tuple, int, int]] = {}  # name -> (weight identity, offset, nbytes): in the file
        self._held = 0
        self._file = None
        self.on_disk_bytes = 0
        self.reused = 0

    def swap(self, name: str, weight: torch.Tensor, new: torch.Tensor, cache=None) -> None:
        """Put `new`'s values in place of `weight`'s (a layer's parameter), keeping the original for `restore`.

        Args:
            name (`str`): the layer, the key `restore` takes.
            weight (`torch.Tensor`): the parameter; its object and (on the disk path) its storage stay the same.
            new (`torch.Tensor`): the replacement, same shape, dtype and device.
            cache (`workbench.palettes.cache.PaletteCache`, *optional*): background fits of this weight are settled
                before it is overwritten in place, so none reads the replacement.
        """
        if name in self._in_memory or name in self._on_disk:
            raise ValueError(f"layer {name!r} is already replaced; restore it first")
        nbytes = weight.numel() * weight.element_size()
        if self._held + nbytes <= self.memory_bytes or not weight.is_contiguous():
            self._in_memory[name] = weight.data
            self._held += nbytes
            weight.data = new
            return
        if cache is not None:
            cache.settle(weight)
        written = self._written.get(name)
        if written is not None and written[0] == _identity(weight):
            self._on_disk[name] = written[1:]
            self.reused += 1
        else:
            self._write(name, weight)
        weight.data.copy_(new)  # `.data`: the same storage, and the parameter's version counter is untouched

    def _write(self, name: str, weight: torch.Tensor) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.dir)  # anonymous: removed when closed, even if killed
        raw = weight.detach().to("cpu").reshape(-1).view(torch.uint8).numpy()
        offset = self.on_disk_bytes
        self._file.seek(offset)
        self._file.write(memoryview(raw))
        self._on_disk[name] = (offset, raw.nbytes)
        self._written[name] = (_identity(weight), offset, raw.nbytes)
        self.on_disk_bytes += raw.nbytes

    def restore(self, name: str, weight: torch.Tensor) -> None:
        """Put back the original values of `name` into its parameter `weight`, bitwise."""
        if name in self._in_memory:
            original = self._in_memory.pop(name)
            self._held -= original.numel() * original.element_size()
            weight.data = original
            return
        offset, nbytes = self._on_disk.pop(name)
        target = weight.data.reshape(-1).view(torch.uint8)
        host = target if target.device.type == "cpu" else torch.empty(nbytes, dtype=torch.uint8)
        self._read(name, offset, host)
        if host is not target:
            target.copy_(host)

    def _read(self, name: str, offset: int, out: torch.Tensor) -> None:
        self._file.seek(offset)
        read = self._file.readinto(memoryview(out.numpy()))
        if read != out.numel():
            raise OSError(f"stash file truncated: read {read} of {out.numel()} bytes of {name!r}")

    def original(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The original values of `name` (its parameter `weight`) without restoring them: the weight itself if it
        is not replaced, the kept tensor if its original is in memory, else a copy read from the file (on the CPU).
        Read-only: the caller must not write to it."""
        if name in self._in_memory:
            return self._in_memory[name]
        if name not in self._on_disk:
            return weight.detach()
        offset, nbytes = self._on_disk[name]
        host = torch.empty(nbytes, dtype=torch.uint8)
        self._read(name, offset, host)
        return host.view(weight.dtype).reshape(weight.shape)

    def __len__(self) -> int:
        return len(self._in_memory) + len(self._on_disk)

    def close(self) -> None:
        """Delete the temporary file. Restore first: what is still stashed is lost."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._written.clear()

    def __enter__(self) -> WeightStash:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _identity(weight: torch.Tensor) -> tuple:
    """What tells a weight unchanged since its original was written: its storage and autograd version."""
    return (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device)
