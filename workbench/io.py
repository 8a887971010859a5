"""Small file helpers: atomic writes, prompts files and the record of the environment a run used."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

from workbench.errors import InvalidValueError

RECORDED_PACKAGES = ("torch", "diffusers", "transformers", "coremltools", "numpy", "scikit-learn", "workbench")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
