"""Single-file Stable Diffusion checkpoints (`.safetensors`, `.ckpt`): the original (LDM / Stability) layout, read
offline and converted by diffusers into a pipeline identical to the diffusers-format one.

A single file holds weights only. The architecture (every component's config, the tokenizers, the scheduler) comes
from a diffusers pipeline of the same architecture: a local folder or a cached hub id given as `config`, or, without
one, the published pipeline diffusers infers from the checkpoint's keys (`stable-diffusion-v1-5/...`,
`stabilityai/stable-diffusion-2-1`, `stabilityai/stable-diffusion-xl-base-1.0`), which must then be in the local
Hugging Face cache. The loader (`workbench.models.loader.load_pipeline`) resolves that folder; this module reads the
file (`read_checkpoint`), names the architecture its keys show (`checkpoint_family`, `inferred_config`), and builds
the pipeline with diffusers' own conversions (`assemble_pipeline`), checking that the file and the config agree.

A `.ckpt` is a pickle: unpickling can run any code the file carries. It is read with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers; a file that needs more (PyTorch Lightning's training
state, an `argparse.Namespace` of hyper-parameters) is refused unless `allow_pickle=True` (`--allow-pickle`).

Example:
    >>> pipe = load_pipeline(SingleFile("v1-5-pruned-emaonly.safetensors", config="runwayml/stable-diffusion-v1-5"))
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import UserError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
CHECKPOINT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
UNET_PREFIX = "model.diffusion_model."  # every SD 1.x/2.x/SDXL original checkpoint keeps its UNet here

# Each family's text encoder prefix (what tells them apart by key) and its diffusers pipeline class.
FAMILIES = {
    "SD 1.x": ("cond_stage_model.transformer.", "StableDiffusionPipeline"),
    "SD 2.x": ("cond_stage_model.model.", "StableDiffusionPipeline"),
    "SDXL": ("conditioner.embedders.", "StableDiffusionXLPipeline"),
}
# The components a checkpoint holds; the tokenizers, scheduler and feature extractor come from the config folder.
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Components whose parameters are the checkpoint's tensors under one prefix, one to one.
_ONE_TO_ONE = {"unet": (UNET_PREFIX,), "vae": ("first_stage_model.", "vae.")}


class CheckpointError(UserError, ValueError):
    """A file that is not a Stable Diffusion single-file checkpoint, one that needs pickle without `allow_pickle`,
    or one whose weights do not fit the architecture it is loaded with."""


@dataclass(frozen=True)
class SingleFile:
    """A model spec for a single-file checkpoint (`workbench.models.loader.load_pipeline` takes it as `model`).

    Attributes:
        path: the `.safetensors` / `.ckpt` file.
        config: the architecture: a diffusers pipeline folder or a cached hub id of the same architecture; None
            infers it from the checkpoint's keys (the published pipeline diffusers names, from the local cache).
        allow_pickle: unpickle a `.ckpt` that holds more than tensors (only for a file you trust).
    """

    path: str
    config: str | None = None
    allow_pickle: bool = False

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path


def is_checkpoint_file(path: str | os.PathLike) -> bool:
    """Whether `path` is an existing file with a checkpoint's suffix (`CHECKPOINT_SUFFIXES`)."""
    path = Path(path).expanduser()
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


def _unsafe_globals(path: Path) -> list[str]:
    """The Python objects (beyond tensors and plain containers) a zip-format `torch.save` file would unpickle,
    found without unpickling anything; [] for other files (they are tried with `weights_only=True`)."""
    if not zipfile.is_zipfile(path):
        return []
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def _needs_pickle(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} needs pickle to load: it holds Python objects besides tensors ({what}), and unpickling runs "
        "whatever code the file names; pass --allow-pickle (allow_pickle=True) only if you trust its source, or "
        "use a .safetensors copy of it"
    )


def _read_pickle(path: Path, allow_pickle: bool) -> object:
    """`torch.load` of a `.ckpt`: tensors only (`weights_only=True`) unless `allow_pickle`."""
    unsafe = _unsafe_globals(path)
    if unsafe and not allow_pickle:
        raise _needs_pickle(path, ", ".join(unsafe[:3]))
    mmap = {"mmap": True} if zipfile.is_zipfile(path) else {}  # the zip format maps tensors instead of reading them
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, **mmap)
    except ModuleNotFoundError as err:  # allow_pickle: the file names a class from a package not installed here
        raise CheckpointError(
            f"{path} names Python objects from {err.name!r}, which is not installed; install it to unpickle the "
            "file, or use a .safetensors copy of it"
        ) from err
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # weights_only refused an object (an old, non-zip torch.save file)
            raise _needs_pickle(path, str(err).split("Unsupported global:")[-1].split(" was ")[0].strip()) from err
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({str(err).splitlines()[0]})") from err
    except (RuntimeError, KeyError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.load: {err!r})") from err


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a single-file SD 1.x/2.x/SDXL checkpoint, by their original names (a `.safetensors` file is
    memory-mapped; a Lightning `.ckpt`'s `state_dict` is unwrapped).

    Raises:
        CheckpointError: a suffix other than `CHECKPOINT_SUFFIXES`, a file that is not safetensors / a PyTorch
            checkpoint, a `.ckpt` that needs pickle without `allow_pickle`, or one without a UNet under
            `model.diffusion_model.` (a diffusers component file, a LoRA, a VAE...).
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a safetensors file ({err})") from err
    elif suffix in PICKLE_SUFFIXES:
        state = _read_pickle(path, allow_pickle)
    else:
        raise CheckpointError(f"{path} is not a checkpoint file; valid suffixes: {', '.join(CHECKPOINT_SUFFIXES)}")
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not any(key.startswith(UNET_PREFIX) for key in tensors):
        found = f"its keys start like {next(iter(tensors))!r}" if tensors else "it holds no tensors"
        raise CheckpointError(
            f"{path} is not a single-file Stable Diffusion checkpoint: no UNet weights under {UNET_PREFIX!r} "
            f"({found}); pass a full SD 1.x/2.x/SDXL checkpoint, or a diffusers pipeline folder"
        )
    return tensors


def checkpoint_family(checkpoint) -> str | None:
    """The family whose text encoder the checkpoint holds ("SD 1.x", "SD 2.x", "SDXL", see `FAMILIES`), or None."""
    for family, (prefix, _) in FAMILIES.items():
        if any(key.startswith(prefix) for key in checkpoint):
            return family
    return None


def inferred_config(path, checkpoint) -> str:
    """The hub id of the published pipeline diffusers infers from the checkpoint's keys (`infer_diffusers_model_type`:
    known keys and shapes of the full-size models; anything it does not know counts as SD 1.x).

    Raises:
        CheckpointError: an SD 2.x or SDXL checkpoint (by its text encoders) that diffusers takes for SD 1.x: one of
            another size than the published models (the architecture must then be given).
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    model_type, family = infer_diffusers_model_type(checkpoint), checkpoint_family(checkpoint)
    if family not in (None, "SD 1.x") and model_type in ("v1", "inpainting"):
        raise CheckpointError(
            f"the architecture of {path} cannot be inferred from its keys: an {family} checkpoint whose blocks are "
            "not a published model's; pass --config a pipeline folder or cached hub id of its architecture"
        )
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]


def check_config(path: str | os.PathLike, checkpoint, folder: Path, config: str) -> dict:
    """The config folder's `model_index.json`, if its pipeline is the checkpoint's family's.

    Raises:
        CheckpointError: the folder is another family's pipeline (an SDXL checkpoint with an SD 1.x config...).
    """
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    family = checkpoint_family(checkpoint)
    if family is not None and index.get("_class_name") != FAMILIES[family][1]:
        raise CheckpointError(
            f"{path} is an {family} checkpoint (keys under {FAMILIES[family][0]!r}), but the config {config!r} is "
            f"a {index.get('_class_name')}; pass --config a pipeline folder or cached hub id of the checkpoint's "
            "architecture"
        )
    return index


def _mismatch(path, config: str, component: str, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path} does not match the architecture of {config!r}: its {component} {detail}; pass --config a pipeline "
        "folder or cached hub id of the checkpoint's own architecture (same blocks, widths and text encoders)"
    )


def _convert(checkpoint, name: str, entry, folder: Path, dtype: torch.dtype):
    """One weight component from the checkpoint, with its config from `folder/name` (diffusers' conversion)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    library, class_name = entry
    cls = getattr(importlib.import_module(library), class_name)
    kwargs = {"config": str(folder), "subfolder": name, "torch_dtype": dtype, "local_files_only": True}
    if library == "transformers":
        return create_diffusers_clip_model_from_ldm(cls, checkpoint, **kwargs)
    return cls.from_single_file(checkpoint, **kwargs)


def _check_component(path, config: str, name: str, module, checkpoint) -> None:
    """Every parameter loaded (none left on the meta device), and for the UNet and VAE, whose tensors map one to
    one, no checkpoint tensor left over."""
    missing = [key for key, value in module.state_dict().items() if value.is_meta]
    if missing:
        raise _mismatch(path, config, name, f"has no weights for {len(missing)} parameters (e.g. {missing[0]!r})")
    for prefix in _ONE_TO_ONE.get(name, ()):
        stored = sum(key.startswith(prefix) for key in checkpoint)
        if stored and stored != len(module.state_dict()):
            raise _mismatch(
                path, config, name, f"holds {stored} tensors under {prefix!r}, the config's {len(module.state_dict())}"
            )


def assemble_pipeline(path, checkpoint, folder: Path, config: str, *, dtype: torch.dtype = torch.float32):
    """The pipeline of `folder`'s architecture with the checkpoint's weights.

    The UNet, VAE and text encoders are converted by diffusers (`from_single_file` of each model class,
    `create_diffusers_clip_model_from_ldm` for CLIP), with configs from `folder`; the tokenizers, scheduler and
    the rest load from `folder` (`DiffusionPipeline.from_pretrained`, offline). No safety checker.

    Args:
        path: the checkpoint file, for messages. checkpoint: `read_checkpoint(path)`.
        folder (`Path`): a local diffusers pipeline folder of the checkpoint's architecture; config (`str`): the
            name it was given by (folder or hub id), for messages.
        dtype (`torch.dtype`, defaults to float32): the weights' dtype.

    Raises:
        CheckpointError: `folder` is another family's pipeline, or its architecture does not fit the weights.
    """
    from diffusers import DiffusionPipeline

    index = check_config(path, checkpoint, folder, config)
    components = {}
    for name in WEIGHT_COMPONENTS:
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        try:
            module = _convert(checkpoint, name, entry, folder, dtype)
        except (KeyError, ValueError, RuntimeError, IndexError) as err:  # diffusers': a missing key, a shape
            raise _mismatch(path, config, name, f"does not load ({str(err).splitlines()[0][:200]})") from err
        _check_component(path, config, name, module, checkpoint)
        components[name] = module
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **components, **extra)
