"""Load Stable Diffusion pipelines (SD 1.x, 2.x, SDXL and their fine-tunes): the workbench's one loader.

A model is named by a *model spec*, the same everywhere (CLI, notebooks, report, analysis, export):

- `None`: the demo model, `DEMO_MODEL` (the only sentinel for it; the CLI's and the notebooks' empty string
  becomes `None` in `model_from_text`, nowhere else);
- `"tiny-sd"` / `"tiny-sdxl"` (`BUILTIN_MODELS`): the random-weight test pipelines of `workbench.models.tiny`;
- a folder holding a pipeline saved with `save_pretrained` (a `model_index.json`);
- a hub id, resolved in the local Hugging Face cache only;
- a single-file checkpoint (`.safetensors`, `.ckpt`; `workbench.models.single_file`): its path, or a `SingleFile`
  that also names the architecture (`config`: a pipeline folder or cached hub id) or allows pickle.

Nothing here touches the network (`local_files_only=True`). Fetch a model once on a connected machine, e.g.
`huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0`, and point `HF_HOME` at that cache.

Example:

    >>> pipe = load_pipeline("runwayml/stable-diffusion-v1-5", device="cpu")
    >>> pipe = load_pipeline("path/to/saved_pipeline")
    >>> pipe = load_pipeline()  # the demo model, DEMO_MODEL
    >>> pipe = load_pipeline("tiny-sdxl", progress=False)
    >>> pipe = load_pipeline(SingleFile("sd_xl_base_1.0.safetensors", config="path/to/sdxl_pipeline"))
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from workbench.errors import InvalidValueError, UserError
from workbench.models.single_file import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    SingleFile,
    assemble_pipeline,
    inferred_config,
    read_checkpoint,
)
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from workbench.resources import demo_model_dir

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


DEMO_MODEL = demo_model_dir()
"""The demo model's pipeline folder: the checkout's `data/tiny-shapes/`, or the copy an installed wheel carries
(`workbench.resources`)."""

BUILTIN_MODELS = ("tiny-sd", "tiny-sdxl")  # random-weight test pipelines from workbench.models.tiny

ModelSpec = str | os.PathLike | SingleFile | None

# "name" or "owner/name" of letters, digits, "-", "_" and "." (huggingface_hub's rule, less its finer points)
_HUB_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


class ModelNotAvailableError(UserError, FileNotFoundError):
    """The model is neither a local pipeline folder nor in the local Hugging Face cache."""


def model_from_text(text: str) -> str | None:
    """A model spec given as text (a CLI option, a notebook's `model` parameter): `""` means the demo model.

    The one place where the empty string becomes the demo model's sentinel, `None`.
    """
    return text or None


def is_demo_model(model: ModelSpec) -> bool:
    """Whether `model` is the demo model: `None`, or a path to `DEMO_MODEL`."""
    if model is None:
        return True
    if isinstance(model, str) and model in BUILTIN_MODELS:
        return False
    return Path(model).expanduser().resolve() == DEMO_MODEL.resolve()


def default_min_numel(model: ModelSpec) -> int:
    """The candidate-layer threshold for `model`: the reference's 1e5 for real checkpoints, 2048 (coremltools'
    own palettization threshold) for the demo model and the tiny test pipelines, where 1e5 leaves 0-4 layers."""
    return 2048 if model in BUILTIN_MODELS or is_demo_model(model) else 100_000


DTYPES = ("auto", "float32", "float16", "bfloat16")


def model_dtype(device: str | torch.device, name: str = "auto") -> torch.dtype:
    """The dtype to run a model in on `device`: `name` if given, else float16 on cuda/mps and float32 on cpu.

    On an accelerator float16 halves the memory and runs on the tensor cores; on a CPU float16 convolutions
    are many times slower than float32. Metrics are computed in float64 either way (`workbench.metrics`), and palettes
    are fitted on the float16 weights whatever the model's dtype, so they stay bit-exact with Core ML.

    Raises:
        InvalidValueError: `name` is not one of `DTYPES`.
    """
    if name not in DTYPES:
        raise InvalidValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def pick_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device to run on: `preferred` if given and available, else the best available (cuda > mps > cpu).

    Args:
        preferred (str | torch.device | None, defaults to None): e.g. "cpu", "cuda", "cuda:1", "mps".

    Returns:
        torch.device: the device.

    Raises:
        InvalidValueError: `preferred` is not a device name, or that device is not available here (a
            `ValueError`).
    """
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_mps = torch.backends.mps.is_available()
    available = [*(f"cuda:{i}" for i in range(n_cuda)), *(["mps"] if has_mps else []), "cpu"]
    if preferred is None:
        return torch.device("cuda" if n_cuda else "mps" if has_mps else "cpu")
    try:
        device = torch.device(preferred)
    except (RuntimeError, TypeError) as err:
        raise InvalidValueError(f"{preferred!r} is not a device name; available here: {', '.join(available)}") from err
    index = device.index or 0
    if not (
        device.type == "cpu"
        or (device.type == "cuda" and index < n_cuda)
        or (device.type == "mps" and has_mps and index == 0)
    ):
        raise InvalidValueError(f"device {str(device)!r} is not available here; available: {', '.join(available)}")
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
    if isinstance(model, str) and not model:
        raise InvalidValueError(
            "model '' is empty: pass None for the demo model (`model_from_text` maps a CLI's or notebook's '' to it)"
        )
    if model is None:
        if not (DEMO_MODEL / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"the demo model is not built: no pipeline at {DEMO_MODEL}. Build it with "
                f"`workbench train --out {DEMO_MODEL}`, or pass a pipeline folder, a cached hub id, or one of "
                f"{', '.join(BUILTIN_MODELS)}."
            )
        return str(DEMO_MODEL), DEMO_MODEL
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"{str(path)!r} is a folder but not a diffusers pipeline: it has no model_index.json. Pass a folder "
                "written by `pipe.save_pretrained(path)`, or a single-file .safetensors/.ckpt checkpoint."
            )
        return str(path), path
    if path.exists():
        raise ModelNotAvailableError(
            f"{str(path)!r} is a file; pass a diffusers pipeline folder (with a model_index.json) or a hub id"
        )
    if _looks_like_path(model):
        raise ModelNotAvailableError(f"no such file or folder: {str(model)!r} (looked for {path.absolute()})")
    from diffusers import DiffusionPipeline

    try:  # finds the cached snapshot; with local_files_only it never opens a connection
        folder = DiffusionPipeline.download(str(model), local_files_only=True, variant=variant)
    except FileNotFoundError as err:  # huggingface_hub's LocalEntryNotFoundError is one
        raise _not_available(model, "it is not a local folder and not in the Hugging Face cache") from err
    return str(model), Path(folder)


def as_single_file(model: ModelSpec) -> SingleFile | None:
    """`model` as a `SingleFile` spec if it names a file (a path, or a `SingleFile` already), else None."""
    if isinstance(model, SingleFile):
        return model
    if model is None or (isinstance(model, str) and (not model or model in BUILTIN_MODELS)):
        return None
    return SingleFile(str(model)) if Path(model).expanduser().is_file() else None


def checkpoint_spec(
    model: ModelSpec, config: str | None = None, allow_pickle: bool = False, *, options=("config", "allow_pickle")
) -> ModelSpec:
    """`model` with a single-file checkpoint's options: a `SingleFile` (with `config`, the architecture, and
    `allow_pickle`) when `model` names a file, else `model` as it is.

    Args:
        options: how the caller names `config` and `allow_pickle` (e.g. `("--config", "--allow-pickle")`), for
            the error message.

    Raises:
        InvalidValueError: `config` or `allow_pickle` for a model that is not a file.
    """
    single = as_single_file(model)
    if single is None:
        if config or allow_pickle:
            option = options[0] if config else options[1]
            raise InvalidValueError(
                f"{option} is for a single-file checkpoint (.safetensors, .ckpt), and the model {str(model)!r} is "
                "not a file; drop it, or pass the checkpoint's path as the model"
            )
        return model
    return SingleFile(single.path, config=config or single.config, allow_pickle=allow_pickle or single.allow_pickle)


def check_model(model: ModelSpec, variant: str | None = None) -> None:
    """Fail early, without loading anything, when `model` cannot be loaded (demo model not built, no such folder,
    hub id not cached, a single file that is missing, not a checkpoint's type, or whose `config` is not local).

    Raises:
        ModelNotAvailableError: as `load_pipeline` would. CheckpointError: a file of another type.
    """
    single = as_single_file(model)
    if single is not None:
        _check_single_file(single)
    elif not (isinstance(model, str) and model in BUILTIN_MODELS):
        _resolve(model, variant)


def _check_single_file(spec: SingleFile) -> Path:
    """The checkpoint's path, if it is a file with a checkpoint's suffix and its `config` (if any) is local."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise ModelNotAvailableError(f"no such checkpoint file: {spec.path!r} (looked for {path.absolute()})")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"{spec.path} is not a checkpoint file; valid suffixes: {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    if spec.config is not None:
        _resolve(spec.config, None)
    return path


def load_pipeline(
    model: ModelSpec = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    progress: bool = True,
) -> DiffusionPipeline:
    """Load a text-to-image diffusers pipeline: the demo model, a built-in test pipeline, a local folder, a hub
    id in the local Hugging Face cache, or a single-file checkpoint (`.safetensors`, `.ckpt`).

    The pipeline class (SD 1.x/2.x `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, ...) comes from the
    model's model_index.json. Nothing is downloaded (`local_files_only=True`).

    Args:
        model (str | os.PathLike | None, defaults to None): None for `DEMO_MODEL`; "tiny-sd" or "tiny-sdxl" for
            the random-weight test pipelines (`workbench.models.tiny`, seed 0); a pipeline folder; or a hub id such
            as "runwayml/stable-diffusion-v1-5" or "stabilityai/stable-diffusion-xl-base-1.0"; or a single-file
            checkpoint: its path (the architecture inferred from its keys), or a `SingleFile` naming the
            architecture (`config`) or allowing pickle (`workbench.models.single_file`).
        device (str | torch.device | None, defaults to None): where to put it; None picks the best available
            (`pick_device`: cuda > mps > cpu).
        dtype (torch.dtype, defaults to torch.float32): the weights' dtype.
        variant (str | None, defaults to None): weight file variant, e.g. "fp16" for
            `diffusion_pytorch_model.fp16.safetensors`.
        progress (bool, defaults to True): diffusers' per-step progress bar when the pipeline runs.

    Returns:
        DiffusionPipeline: on `device`, in `dtype`, with the SD 1.x safety checker removed.

    Raises:
        ModelNotAvailableError: the path does not exist or is not a pipeline folder, the hub id is not cached, or
            the demo model is not built.
        CheckpointError: a file that is not an SD checkpoint, a `.ckpt` needing pickle without `allow_pickle`, or
            a checkpoint whose architecture is not `config`'s (or cannot be inferred).
        InvalidValueError: `device` is not available, or `model` is "" (use None).
    """
    target = pick_device(device)
    single = as_single_file(model)
    if isinstance(model, str) and model in BUILTIN_MODELS:
        pipe = (tiny_sd_pipeline if model == "tiny-sd" else tiny_sdxl_pipeline)(seed=0)
    elif single is not None:
        pipe = _from_single_file(single, dtype)
    else:
        pipe = _from_pretrained(model, dtype, variant)
    if pipe.dtype != dtype:  # older diffusers ignore `dtype` (they want `torch_dtype`); the test pipelines too
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(target)


def _from_pretrained(model: ModelSpec, dtype: torch.dtype, variant: str | None) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline

    name, folder = _resolve(model, variant)
    components = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    extra = {}
    if "safety_checker" in components:
        # the checker is a second, 1.2 GB model that blanks flagged images; it would distort every comparison
        extra = {"safety_checker": None, "requires_safety_checker": False}
    return DiffusionPipeline.from_pretrained(name, dtype=dtype, variant=variant, local_files_only=True, **extra)


def _inferred_config(path: Path, checkpoint) -> str:
    """The hub id of the architecture diffusers infers from the checkpoint's keys, if it is in the local cache."""
    config = inferred_config(path, checkpoint)
    try:
        _resolve(config, None)
    except ModelNotAvailableError as err:
        raise ModelNotAvailableError(
            f"the architecture of {path}, inferred from its keys, is {config}'s, which is not in the local Hugging "
            f"Face cache (this workbench never downloads); pass --config a local pipeline folder or cached hub id "
            "of the same architecture, or fetch its configs on a connected machine (`huggingface-cli download "
            f"{config} --include '*.json' '*.txt'`)"
        ) from err
    return config


def _from_single_file(spec: SingleFile, dtype: torch.dtype) -> DiffusionPipeline:
    """A single-file checkpoint with the architecture of `spec.config` (or the one inferred from its keys)."""
    path = _check_single_file(spec)
    checkpoint = read_checkpoint(path, spec.allow_pickle)
    config = spec.config if spec.config is not None else _inferred_config(path, checkpoint)
    _, folder = _resolve(config, None)
    return assemble_pipeline(path, checkpoint, folder, str(config), dtype=dtype)
