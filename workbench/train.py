"""Train the tiny-shapes demo model: a small Stable Diffusion 1.x-style pipeline on the procedural shapes world.

The components are the ones of SD 1.x at toy scale: a `CLIPTokenizer` (one token per caption word), a
`CLIPTextModel`, an `AutoencoderKL` with 4 latent channels and 4x downsampling (64x64 images, 16x16 latents),
a `UNet2DConditionModel` with cross-attention, SD 1.x's scaled-linear noise schedule (rescaled to zero terminal
SNR) and DDIM for inference, with SD 2.x's v-prediction. Training runs in two stages on `workbench.shapes` images:

1. the VAE alone: L1 + L2 reconstruction (shape pixels weighted up) + a small KL term; then it is frozen, the
   whole dataset is encoded once, and the scaling factor is set to 1 / std of the latents (SD's 0.18215 is the
   same idea);
2. the UNet and the text encoder jointly: v-prediction MSE under SD's scaled-linear DDPM schedule with capped
   loss weights, captions replaced by "" 10% of the time (for classifier-free guidance), and an EMA of the
   weights, which is what gets saved.

Where SD 1.x's recipe was changed, and why: where a shape goes is decided in the first, noisiest sampling
steps, and a first run with SD 1.x's recipe (epsilon-prediction, min-SNR weights, PNDM, 3-level UNet) drew the
asked-for colour (1.00) and shape (0.89) at a position set by the noise alone (0.125; chance is 0.11): the
same seed put the shape in the same place whatever position the prompt named. Three things push the other
way: v-prediction (the image error keeps weight >= 1 at high noise, where epsilon weights it by SNR ~0.01),
a zero-terminal-SNR schedule (the noisiest training input is pure noise, so position can only come from the
prompt, not from finding the faint shape in the noise), and a UNet that can tell where it is (see
`workbench.demo_model.build_unet`).

Every random draw comes from a generator seeded by (seed, stage, step), so a run is reproducible on one
device and a resumed run continues exactly where a checkpoint left off.

Modules: the components are built in `workbench.demo_model`, the two stages run in `workbench.training_stages`,
and the model card (`document`) is measured and written by `workbench.model_card`; this module holds the
settings (`TrainConfig`), the run (`train`) and its command line.

Usage:
    python -m workbench.train --out workbench/data/tiny-shapes --checkpoint-dir /tmp/tiny-shapes-ckpt
    workbench train --out workbench/data/tiny-shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from workbench.analysis import torch_threads
from workbench.demo_model import assemble_pipeline, build_components
from workbench.training_stages import Log, train_unet, vae_stage


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
            noise and ship DDIM with "trailing" spacing (see `workbench.demo_model.build_schedulers`). Without
            it the noisiest training input still holds 7% of the image, and the UNet learned to find the shape
            in the noise rather than read its position from the prompt.
        snr_gamma (`float`, defaults to 5.0): caps the weight of the low-noise steps; 0 turns weighting off.
            In terms of the image error |x0 - x0'|^2 the weight is min(SNR, gamma) for epsilon (min-SNR,
            Hang et al. 2023) and min(SNR + 1, gamma) for v-prediction.
        checkpoint_every (`int`, defaults to 250): UNet steps between checkpoints (when a folder is given).
        threads (`int`, defaults to 1): torch CPU threads during training. One, because on a CPU shared with
            other jobs two OpenMP threads spin at every barrier waiting for a descheduled sibling: measured here
            under load, a VAE step took 7-75 s with 2 threads and 2.7 s with 1.
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
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)


_AT_LEAST_ONE = ("n_images", "image_size", "text_hidden", "text_layers", "text_heads", "max_length", "vae_batch")
_AT_LEAST_ONE += ("unet_batch", "checkpoint_every", "threads", "unet_conv_in_kernel")
_AT_LEAST_ZERO = ("vae_steps", "unet_steps")
_FRACTIONS = ("caption_dropout", "ema_decay")  # in [0, 1)


def _check_counts(config: TrainConfig) -> None:
    """Sizes, batches and step counts: >= 1, or >= 0 for the step counts."""
    for name in _AT_LEAST_ONE:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in _AT_LEAST_ZERO:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")


def _check_architecture(config: TrainConfig) -> None:
    """Shapes that the text encoder, the VAE and the UNet can be built with."""
    if config.text_hidden % config.text_heads:
        raise ValueError(f"text_hidden={config.text_hidden} must be a multiple of text_heads={config.text_heads}")
    if config.max_length < 12:
        raise ValueError(f"max_length={config.max_length} is too short: captions take up to 11 tokens")
    if config.unet_conv_in_kernel % 2 == 0:
        raise ValueError(f"unet_conv_in_kernel must be odd, got {config.unet_conv_in_kernel}")
    if len(config.vae_channels) < 2 or len(config.unet_channels) < 2:
        raise ValueError("vae_channels and unet_channels need at least two levels")
    latent, halvings = config.latent_size, len(config.unet_channels) - 1
    if latent % 2**halvings:
        raise ValueError(f"{latent}x{latent} latents cannot be halved {halvings} times")


def _check_diffusion(config: TrainConfig) -> None:
    """Fractions in [0, 1) and a prediction type that the noise schedule supports."""
    for name in _FRACTIONS:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {config.prediction_type!r} is not 'epsilon' or 'v_prediction'")
    if config.zero_terminal_snr and config.prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr needs prediction_type='v_prediction' (epsilon is undefined at SNR 0)")


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

    def to_frame(self):
        """Loss curves, one row per logged step: stage, step, loss."""
        import pandas as pd

        rows = [("vae", i, v) for i, v in enumerate(self.vae_losses)]
        rows += [("unet", i, v) for i, v in enumerate(self.unet_losses)]
        return pd.DataFrame(rows, columns=["stage", "step", "loss"])


# ------------------------------------------------------------------------------------------- the run


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    device: str = "cpu",
    card: bool = True,
    log: Log = print,
) -> TrainResult:
    """Train the demo model and write the diffusers pipeline (safetensors), training.json and the model card.

    Args:
        config (`TrainConfig`): the run's settings.
        out (`str` or `Path`): pipeline folder to write (created; existing files are overwritten).
        checkpoint_dir (`str` or `Path`, *optional*): where to keep resumable checkpoints (the trained VAE
            with the encoded dataset, then the UNet stage every `checkpoint_every` steps). A run pointed at
            the same folder with the same config resumes.
        device (`str`, defaults to "cpu"): training device; results are reproducible on one device type.
        card (`bool`, defaults to True): then measure the saved model and write README.md
            (`workbench.model_card.document`).
        log (`Callable[[str], None]`, defaults to `print`): progress lines.

    Returns:
        `TrainResult`.
    """
    out = Path(out)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    with torch_threads(config.threads):
        result = _train(config, out, ckpt, device, log)
    if card:
        from workbench.model_card import document  # model_card imports this module

        document(out, log=log)
    return result


def _train(config: TrainConfig, out: Path, ckpt: Path | None, device: str, log: Log) -> TrainResult:
    """`train` without the card, under the thread count already set."""
    from workbench.shapes import make_dataset

    started = time.perf_counter()
    data = make_dataset(config.n_images, seed=config.seed, image_size=config.image_size)
    images = torch.from_numpy(data.images)
    seconds = {"dataset": time.perf_counter() - started}
    log(f"dataset: {len(data)} images in {seconds['dataset']:.1f}s")

    stage1_ckpt, stage2_ckpt = (ckpt / "stage1_vae.pt", ckpt / "stage2_unet.pt") if ckpt is not None else (None, None)
    models = build_components(config)
    stage1 = vae_stage(models.vae, images, config, checkpoint=stage1_ckpt, log=log, device=device)
    seconds.update(stage1.seconds)  # a resumed run reports the first run's stage-1 time

    t0 = time.perf_counter()
    unet, text_encoder, unet_losses = train_unet(
        models.unet,
        models.text_encoder,
        models.tokenizer,
        stage1.latents,
        data.captions,
        stage1.scaling_factor,
        config,
        log,
        device,
        stage2_ckpt,
    )
    seconds["unet"] = time.perf_counter() - t0

    pipe = assemble_pipeline(
        models.vae.cpu(),
        text_encoder.cpu(),
        models.tokenizer,
        unet.cpu(),
        config.prediction_type,
        config.zero_terminal_snr,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    parameters = {name: _count(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}
    seconds["total"] = time.perf_counter() - started + (sum(stage1.seconds.values()) if stage1.resumed else 0.0)
    result = TrainResult(out, config, seconds, parameters, stage1.scaling_factor, stage1.losses, unet_losses)
    (out / "training.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out}: {parameters}, seconds { ({k: round(v, 1) for k, v in seconds.items()}) }")
    return result


# ------------------------------------------------------------------------------------------- command line


def _parse_override(text: str) -> tuple[str, Any]:
    """'unet_steps=100' -> ('unet_steps', 100), typed like the TrainConfig field."""
    key, sep, value = text.partition("=")
    types = {f.name: f.type for f in fields(TrainConfig)}
    if not sep or key not in types:
        raise ValueError(f"--set expects KEY=VALUE with KEY one of {sorted(types)}, got {text!r}")
    kind = types[key]
    if "tuple" in str(kind):
        return key, tuple(int(v) for v in value.split(","))
    if kind in ("bool", bool):
        return key, value.lower() in ("1", "true", "yes")
    if kind in ("str", str):
        return key, value
    return key, float(value) if kind in ("float", float) else int(value)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options, shared by `python -m workbench.train` and `workbench train`."""
    parser.add_argument("--out", default="workbench/data/tiny-shapes", help="pipeline folder to write")
    parser.add_argument("--config", default=None, help="JSON file of TrainConfig fields (default: the defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--checkpoint-dir", default=None, help="resumable checkpoints here (not in the repo)")
    parser.add_argument("--device", default="cpu", help="training device (default cpu)")
    parser.add_argument("--no-card", action="store_true", help="skip the benchmark and README.md after training")
    parser.add_argument("--card-only", action="store_true", help="only re-measure --out and rewrite its README.md")
    return parser


def run(args: argparse.Namespace) -> TrainResult | None:
    """Build the config from parsed `add_arguments` options and train (or, with --card-only, document)."""

    def log(line: str) -> None:
        print(line, flush=True)

    if args.card_only:
        from workbench.model_card import document

        document(args.out, log=log)
        return None
    data = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    data.update(dict(_parse_override(text) for text in args.set))
    config = TrainConfig.from_dict(data)
    log(f"config: {json.dumps(config.to_dict())}")
    return train(
        config, args.out, checkpoint_dir=args.checkpoint_dir, card=not args.no_card, device=args.device, log=log
    )


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(
        argparse.ArgumentParser(prog="python -m workbench.train", description=__doc__.split("\n")[0])
    )
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
