"""The demo model's training settings (`TrainConfig`, read from JSON and `--set KEY=VALUE` overrides, checked
when built) and what a run produced (`TrainResult`). No torch here: the command line checks a config before it
imports the training code."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from workbench.errors import InvalidValueError, from_known_fields, parse_bool


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run decides. Frozen; `to_dict`/`from_dict` round-trip through JSON.

    Args:
        seed (`int`, defaults to 0): seeds the dataset (`make_dataset(n_images, seed)`), the weights and every draw.
        n_images (`int`, defaults to 8192): training images.
        text_hidden (`int`, defaults to 64): CLIP text encoder width (= the UNet's cross-attention dim).
        text_layers (`int`, defaults to 3), text_heads (`int`, defaults to 4): text encoder depth and heads.
        max_length (`int`, defaults to 16): tokenizer length = text encoder positions (captions use <= 11).
        vae_channels (`tuple[int, ...]`, defaults to (16, 32, 64)): VAE `block_out_channels`; the image is
            downsampled 2**(len - 1) times per side.
        vae_steps, vae_batch, vae_lr, kl_weight: VAE stage (AdamW, cosine decay after a 5% warmup).
        vae_foreground_weight (`float`, defaults to 10.0): extra reconstruction weight of shape pixels; without
            it the background (90-98% of every image) dominates the loss and the VAE learns grey blobs.
        unet_channels (`tuple[int, ...]`, defaults to (32, 64, 96, 80)): UNet `block_out_channels`; cross-attention
            at all but the first (full-resolution) level. Four levels take 16x16 latents down to 2x2.
        unet_conv_in_kernel (`int`, defaults to 7): kernel of the UNet's first conv.
        unet_steps, unet_batch, unet_lr: UNet + text encoder stage (AdamW, 5% warmup, cosine decay).
        ema_decay (`float`, defaults to 0.999): EMA of the UNet and text encoder weights (warmup (1+n)/(10+n)).
        caption_dropout (`float`, defaults to 0.1): probability that a caption is replaced by "".
        prediction_type (`str`, defaults to "v_prediction"): the UNet's target, "epsilon" (SD 1.x) or
            "v_prediction" (SD 2.x); written to the scheduler config.
        zero_terminal_snr (`bool`, defaults to True): rescale the betas so that the last training step is pure
            noise and ship DDIM with "trailing" spacing (see `workbench.demo.components.build_schedulers`). Without
            it the noisiest training input still holds 7% of the image, and the UNet learned to find the shape
            in the noise rather than read its position from the prompt.
        snr_gamma (`float`, defaults to 5.0): caps the weight of the low-noise steps; 0 turns weighting off.
            In terms of the image error |x0 - x0'|^2 the weight is min(SNR, gamma) for epsilon (min-SNR,
            Hang et al. 2023) and min(SNR + 1, gamma) for v-prediction.
        checkpoint_every (`int`, defaults to 250): UNet steps between checkpoints (when a folder is given).
        threads (`int`, defaults to 1): torch CPU threads during training. One, because on a CPU shared with
            other jobs two OpenMP threads spin at every barrier waiting for a descheduled sibling, which made a VAE
            step many times slower with 2 threads than with 1 (docs/benchmarks.md).
    """

    seed: int = 0
    n_images: int = 8192
    image_size: int = 64
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 16
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_steps: int = 1200
    vae_batch: int = 8
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    vae_foreground_weight: float = 10.0
    unet_channels: tuple[int, ...] = (32, 64, 96, 80)
    unet_conv_in_kernel: int = 7
    unet_steps: int = 1600
    unet_batch: int = 64
    unet_lr: float = 5e-4
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    snr_gamma: float = 5.0
    checkpoint_every: int = 250
    threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "vae_channels", tuple(self.vae_channels))
        object.__setattr__(self, "unet_channels", tuple(self.unet_channels))
        _check_counts(self)
        _check_architecture(self)
        _check_diffusion(self)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_known_fields(cls, data)

    def with_overrides(self, pairs: Iterable[str]) -> TrainConfig:
        """This config with `KEY=VALUE` overrides (`--set`) applied, each value read strictly as its field's type.

        A boolean must read as one (`workbench.errors.parse_bool`: "ture" is an error, not False), an int or float
        must parse whole, a tuple is comma-separated ints; a later pair for the same key wins.

        Args:
            pairs (`Iterable[str]`): e.g. `["unet_steps=100", "zero_terminal_snr=no", "unet_channels=32,64"]`.

        Raises:
            InvalidValueError: a pair without `=`, an unknown key, or a value its field cannot take (naming the key,
                the value and what is valid).

        Example:
            >>> TrainConfig().with_overrides(["unet_steps=10"]).unet_steps
            10
        """
        pairs = list(pairs)
        changes = dict(_parse_override(text) for text in pairs)
        try:
            return replace(self, **changes)
        except InvalidValueError as err:
            raise InvalidValueError(f"--set {' '.join(pairs)}: {err}") from None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
        """The config of a JSON file of fields (`--config`; None: the defaults), with `overrides` applied
        (`with_overrides`)."""
        base = cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8"))) if path is not None else cls()
        return base.with_overrides(overrides)


def _parse_tuple(value: str) -> tuple[int, ...]:
    return tuple(int(part) for part in value.split(","))


# a field's (postponed) annotation -> (reader raising ValueError, what is valid)
_READERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "int": (int, "an integer"),
    "float": (float, "a number"),
    "str": (str, "any text"),
    "tuple[int, ...]": (_parse_tuple, "comma-separated integers, e.g. 32,64"),
}


def _parse_override(text: str) -> tuple[str, Any]:
    """'unet_steps=100' -> ('unet_steps', 100): the value read strictly as the TrainConfig field's type."""
    types = {f.name: str(f.type) for f in fields(TrainConfig)}
    key, sep, value = text.partition("=")
    if not sep or key not in types:
        raise InvalidValueError(f"--set expects KEY=VALUE with KEY one of {sorted(types)}, got {text!r}")
    kind = types[key]
    if kind == "bool":
        return key, parse_bool(value, name=f"--set {key}")
    read, valid = _READERS[kind]
    try:
        return key, read(value)
    except ValueError:
        raise InvalidValueError(f"--set {key}={value!r} is not of the field's type {kind}; valid: {valid}") from None


_AT_LEAST_ONE = ("n_images", "image_size", "text_hidden", "text_layers", "text_heads", "max_length", "vae_batch")
_AT_LEAST_ONE += ("unet_batch", "checkpoint_every", "threads", "unet_conv_in_kernel")
_AT_LEAST_ZERO = ("vae_steps", "unet_steps")
_FRACTIONS = ("caption_dropout", "ema_decay")  # in [0, 1)


def _check_counts(config: TrainConfig) -> None:
    """Sizes, batches and step counts: >= 1, or >= 0 for the step counts."""
    for name in _AT_LEAST_ONE:
        if getattr(config, name) < 1:
            raise InvalidValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in _AT_LEAST_ZERO:
        if getattr(config, name) < 0:
            raise InvalidValueError(f"{name} must be >= 0, got {getattr(config, name)}")


def _check_architecture(config: TrainConfig) -> None:
    """Shapes that the text encoder, the VAE and the UNet can be built with."""
    if config.text_hidden % config.text_heads:
        raise InvalidValueError(
            f"text_hidden={config.text_hidden} must be a multiple of text_heads={config.text_heads}"
        )
    if config.max_length < 12:
        raise InvalidValueError(f"max_length={config.max_length} is too short: captions take up to 11 tokens")
    if config.unet_conv_in_kernel % 2 == 0:
        raise InvalidValueError(f"unet_conv_in_kernel must be odd, got {config.unet_conv_in_kernel}")
    if len(config.vae_channels) < 2 or len(config.unet_channels) < 2:
        raise InvalidValueError("vae_channels and unet_channels need at least two levels")
    latent, halvings = config.latent_size, len(config.unet_channels) - 1
    if latent % 2**halvings:
        raise InvalidValueError(f"{latent}x{latent} latents cannot be halved {halvings} times")


def _check_diffusion(config: TrainConfig) -> None:
    """Fractions in [0, 1) and a prediction type that the noise schedule supports."""
    for name in _FRACTIONS:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise InvalidValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise InvalidValueError(f"prediction_type {config.prediction_type!r} is not 'epsilon' or 'v_prediction'")
    if config.zero_terminal_snr and config.prediction_type != "v_prediction":
        raise InvalidValueError(
            "zero_terminal_snr needs prediction_type='v_prediction' (epsilon is undefined at SNR 0)"
        )


TRAINING_FILE = "training.json"  # a trained folder's record (`TrainResult`)


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: where, how long each stage took, the parameter counts and loss curves."""

    out: Path
    config: TrainConfig
    seconds: dict[str, float]
    parameters: dict[str, int]
    scaling_factor: float
    vae_losses: list[float] = field(repr=False)
    unet_losses: list[float] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "config": self.config.to_dict(),
            "seconds": self.seconds,
            "parameters": self.parameters,
            "scaling_factor": self.scaling_factor,
            "vae_losses": self.vae_losses,
            "unet_losses": self.unet_losses,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        """The inverse of `to_dict`, e.g. of a folder's training.json."""
        return cls(
            out=Path(data["out"]),
            config=TrainConfig.from_dict(data["config"]),
            seconds=data["seconds"],
            parameters=data["parameters"],
            scaling_factor=data["scaling_factor"],
            vae_losses=data["vae_losses"],
            unet_losses=data["unet_losses"],
        )

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TrainResult:
        """The record of a trained pipeline folder (its `training.json`): how it was trained, on which data."""
        path = Path(folder) / TRAINING_FILE
        if not path.is_file():
            raise InvalidValueError(f"{folder} has no {TRAINING_FILE}: it was not trained by the workbench")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def to_frame(self):
        """Loss curves, one row per logged step: stage, step, loss."""
        import pandas as pd

        rows = [("vae", i, v) for i, v in enumerate(self.vae_losses)]
        rows += [("unet", i, v) for i, v in enumerate(self.unet_losses)]
        return pd.DataFrame(rows, columns=["stage", "step", "loss"])


# ------------------------------------------------------------------------------------------- the run


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def add_arguments(parser, out_default: str | None = None):
    """The training options, shared by `workbench train` and `python -m workbench.demo.train` (here, beside the
    settings they fill, so that parsing them imports no torch). `out_default`: the pipeline folder to write; None
    for the demo model's own folder."""
    where = "the demo model's own folder" if out_default is None else out_default
    parser.add_argument("--out", default=out_default, help=f"pipeline folder to write (default: {where})")
    parser.add_argument("--config", default=None, help="JSON file of TrainConfig fields (default: the defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints here (not in the repo)")
    parser.add_argument("--device", default="cpu", help="training device (default cpu)")
    parser.add_argument("--no-card", action="store_true", help="skip the benchmark and README.md after training")
    parser.add_argument("--card-only", action="store_true", help="only re-measure --out and rewrite its README.md")
    return parser
