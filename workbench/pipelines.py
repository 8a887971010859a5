"""Load Stable Diffusion pipelines (SD 1.x, 2.x, SDXL and their fine-tunes) from local folders or the HF cache.

Nothing here touches the network: hub ids are resolved in the local Hugging Face cache only
(`local_files_only=True`). Fetch a model once on a connected machine, e.g.
`huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0`, and point `HF_HOME` at that cache, or
pass the folder of a pipeline saved with `save_pretrained`.

Example:

    >>> pipe = load_pipeline("runwayml/stable-diffusion-v1-5", device="cpu")
    >>> pipe = load_pipeline("path/to/saved_pipeline")
    >>> pipe = load_pipeline()  # the demo model, DEMO_MODEL
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

DEMO_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-shapes"

# "name" or "owner/name" of letters, digits, "-", "_" and "." (huggingface_hub's rule, less its finer points)
_HUB_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


class ModelNotAvailableError(FileNotFoundError):
    """The model is neither a local pipeline folder nor in the local Hugging Face cache."""


def pick_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device to run on: `preferred` if given and available, else the best available (cuda > mps > cpu).

    Args:
        preferred (str | torch.device | None, defaults to None): e.g. "cpu", "cuda", "cuda:1", "mps".

    Returns:
        torch.device: the device.

    Raises:
        ValueError: `preferred` is not a device name, or that device is not available here.
    """
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_mps = torch.backends.mps.is_available()
    available = [*(f"cuda:{i}" for i in range(n_cuda)), *(["mps"] if has_mps else []), "cpu"]
    if preferred is None:
        return torch.device("cuda" if n_cuda else "mps" if has_mps else "cpu")
    try:
        device = torch.device(preferred)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{preferred!r} is not a device name; available here: {', '.join(available)}") from err
    index = device.index or 0
    if not (
        device.type == "cpu"
        or (device.type == "cuda" and index < n_cuda)
        or (device.type == "mps" and has_mps and index == 0)
    ):
        raise ValueError(f"device {str(device)!r} is not available here; available: {', '.join(available)}")
    return device


def _looks_like_path(model: str | os.PathLike) -> bool:
    """A path-like object, or a string that cannot be a hub id ("/abs", "./rel", "~/x", "a/b/c", "a\\b")."""
    if not isinstance(model, str):
        return True
    return model.startswith((".", "~", "/", os.sep)) or not _HUB_ID.match(model)


def _not_available(model: str | os.PathLike, why: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model {str(model)!r} is not available locally: {why}. This workbench never downloads. Either download it "
        f"on a connected machine (`huggingface-cli download {model}`) into the Hugging Face cache this machine uses "
        "(set HF_HOME to point at it), or pass the path of a local pipeline folder (one with a model_index.json, "
        "as written by `pipe.save_pretrained(path)`)."
    )


def _resolve(model: str | os.PathLike | None, variant: str | None) -> tuple[str, Path]:
    """(name to hand to from_pretrained, local folder holding its model_index.json); raises if there is none."""
    if model is None:
        if not (DEMO_MODEL / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"the demo model is not built yet: no pipeline at {DEMO_MODEL}. Until it is, pass a hub id or the "
                "path of a local pipeline folder."
            )
        return str(DEMO_MODEL), DEMO_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"{str(path)!r} is a folder but not a diffusers pipeline: it has no model_index.json. Pass a folder "
                "written by `pipe.save_pretrained(path)`; single-file .safetensors/.ckpt files are not supported."
            )
        return str(path), path
    if path.exists():
        raise ModelNotAvailableError(
            f"{str(path)!r} is a file; pass a diffusers pipeline folder (with a model_index.json) or a hub id. "
            "Single-file .safetensors/.ckpt checkpoints are not supported."
        )
    if _looks_like_path(model):
        raise ModelNotAvailableError(f"no such file or folder: {str(model)!r} (looked for {path.absolute()})")
    from diffusers import DiffusionPipeline

    try:  # finds the cached snapshot; with local_files_only it never opens a connection
        folder = DiffusionPipeline.download(str(model), local_files_only=True, variant=variant)
    except FileNotFoundError as err:  # huggingface_hub's LocalEntryNotFoundError is one
        raise _not_available(model, "it is not a local folder and not in the Hugging Face cache") from err
    return str(model), Path(folder)


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
) -> DiffusionPipeline:
    """Load a text-to-image diffusers pipeline from a local folder or the local Hugging Face cache.

    The pipeline class (SD 1.x/2.x `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, ...) comes from the
    model's model_index.json. Nothing is downloaded (`local_files_only=True`).

    Args:
        model (str | os.PathLike | None, defaults to None): a pipeline folder, a hub id such as
            "runwayml/stable-diffusion-v1-5" or "stabilityai/stable-diffusion-xl-base-1.0", or None for
            `DEMO_MODEL`.
        device (str | torch.device | None, defaults to None): where to put it; None picks the best available
            (`pick_device`: cuda > mps > cpu).
        dtype (torch.dtype, defaults to torch.float32): the weights' dtype.
        variant (str | None, defaults to None): weight file variant, e.g. "fp16" for
            `diffusion_pytorch_model.fp16.safetensors`.

    Returns:
        DiffusionPipeline: on `device`, in `dtype`, with the SD 1.x safety checker removed.

    Raises:
        ModelNotAvailableError: the path does not exist or is not a pipeline folder, or the hub id is not cached.
        ValueError: `device` is not available.
    """
    from diffusers import DiffusionPipeline

    target = pick_device(device)
    name, folder = _resolve(model, variant)
    components = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    extra = {}
    if "safety_checker" in components:
        # the checker is a second, 1.2 GB model that blanks flagged images; it would distort every comparison
        extra = {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(name, dtype=dtype, variant=variant, local_files_only=True, **extra)
    if pipe.dtype != dtype:  # older diffusers ignore `dtype` (they want `torch_dtype`)
        pipe = pipe.to(dtype=dtype)
    return pipe.to(target)
