"""What the commands share: the argument parser that raises `UsageError`, argument types, common options."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from workbench.errors import InvalidValueError, UserError

EXIT_USER_ERROR = 2


class UsageError(UserError):
    """A command line argparse rejects; `prog` is the (sub)command it belongs to."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises `UsageError` (one line from `main`) instead of printing the
    usage block and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)", self.prog)


def int_in_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an integer in [low, high] (no upper bound when `high` is None); the error names the
    value and the valid range."""
    valid = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; valid: {valid}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; valid: {valid}")
        return value

    parse.__name__ = valid  # argparse names the type in some messages
    return parse


def float_in_range(low: float) -> Callable[[str], float]:
    """An argparse `type`: a number >= low; the error names the value and the valid range."""
    valid = f"a number >= {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: {valid}") from None
        if not value >= low:  # NaN too
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; valid: {valid}")
        return value

    parse.__name__ = valid
    return parse


def palette_bits(text: str) -> int:
    """An argparse `type`: a supported palette width (`workbench.palettes.config.SUPPORTED_NBITS`)."""
    from workbench.palettes.config import SUPPORTED_NBITS

    valid = ", ".join(map(str, SUPPORTED_NBITS))
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer bit width; valid: {valid}") from None
    if value not in SUPPORTED_NBITS:
        raise argparse.ArgumentTypeError(f"unsupported bit width {value}; valid: {valid}")
    return value


def candidate_layers(pipe, min_numel: int, model) -> dict:
    """The UNet's compressible layers over `min_numel` weights; a user error when there are none."""
    from workbench.models.layers import compressible_layers

    layers = compressible_layers(pipe.unet, min_numel=min_numel)
    if not layers:
        largest = max(m.weight.numel() for m in compressible_layers(pipe.unet, 0).values())
        name = "the demo model" if model is None else repr(str(model))
        raise InvalidValueError(
            f"no Linear/Conv2d layer in the UNet of {name} has more than --min-numel={min_numel} weights; lower it "
            f"(the largest layer has {largest})"
        )
    return layers


def add_layer_patterns(p) -> None:
    """--layers / --exclude: UNet layer globs (fnmatch, `*` spans dots), as `workbench.models.layers.select_layers`."""
    p.add_argument(
        "--layers", nargs="+", default=[], metavar="GLOB", help="only UNet layers matching, e.g. 'mid_block.*'"
    )
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="leave out UNet layers matching these")


def add_layout(p) -> None:
    """--layout: the exported packages' inputs, outputs and names (`workbench.coreml.layout`)."""
    p.add_argument(
        "--layout",
        choices=("apple", "workbench"),
        default="apple",
        help="apple (default): the packages Apple's Swift StableDiffusion pipeline and apps load (Unet.mlpackage, "
        "...), with vocab.json, merges.txt and compile_for_swift.sh; workbench: <component>.mlpackage, int32 ids",
    )


MODEL_HELP = (
    "hub id (local cache only), pipeline folder, single-file .safetensors/.ckpt checkpoint, or tiny-sd / tiny-sdxl "
    "(default: the demo model)"
)


def add_model_options(p) -> None:
    """--config / --allow-pickle: how to load a single-file checkpoint given as the model (`model_spec`)."""
    p.add_argument(
        "--config",
        default=None,
        metavar="FOLDER_OR_HUB_ID",
        help="single-file checkpoint: the architecture, a pipeline folder or cached hub id of the same model "
        "(default: inferred from the checkpoint's keys, then looked up in the local Hugging Face cache)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="single-file .ckpt: unpickle a file that holds more than tensors (runs code the file names; only for "
        "a file you trust)",
    )


def model_spec(model, args):
    """The model spec the loader takes for the command's `model` text: a `SingleFile` (with --config and
    --allow-pickle) when it names a file, else the text as it is (`workbench.models.loader.checkpoint_spec`).

    Raises:
        InvalidValueError: --config or --allow-pickle for a model that is not a file.
    """
    from workbench.models.loader import checkpoint_spec

    return checkpoint_spec(model, args.config, args.allow_pickle, options=("--config", "--allow-pickle"))
