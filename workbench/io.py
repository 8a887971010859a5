"""Small file helpers: atomic writes (`atomic_path`, which every atomic write of the package goes through), prompts
files and the record of the environment a run used."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from workbench.errors import InvalidValueError

RECORDED_PACKAGES = ("torch", "diffusers", "transformers", "coremltools", "numpy", "scikit-learn", "workbench")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path for the new content of `path`: written by the body, then flushed to disk and renamed
    over `path`, so that readers see the old file or the whole new one, never a part. On an exception `path` is
    left as it was and the temporary file is removed.

    The temporary file has `path`'s own name, in a hidden folder beside it (same file system, so the rename is
    atomic): writers that take a path and look at its name (`torch.save` names its archive after the file,
    `savefig` picks the format from the suffix) write exactly what they would write to `path`.

    Example:
        >>> with atomic_path(out / "stage1_vae.pt") as tmp:
        ...     torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp = folder / path.name
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (`atomic_path`), in the locale's encoding as `open(path, "w")` would."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """`json.dump(data, indent=2)` (the reference's layout), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def environment() -> dict:
    """Library versions and machine facts, to write beside every result."""
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions}


def read_prompts(path: str | os.PathLike) -> tuple[str, ...]:
    """Prompts from a text file, one per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(f"cannot read prompts file {str(path)!r}: {err.strerror or err}") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise InvalidValueError(f"prompts file {str(path)!r} holds no prompts (one per line)")
    return prompts
