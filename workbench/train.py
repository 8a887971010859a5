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
`build_unet`).

Every random draw comes from a generator seeded by (seed, stage, step), so a run is reproducible on one
device and a resumed run continues exactly where a checkpoint left off.

Usage:
    python -m workbench.train --out data/models/tiny-shapes --checkpoint-dir /tmp/tiny-shapes-ckpt
    workbench train --out data/models/tiny-shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from workbench.analysis import torch_threads

Log = Callable[[str], None]


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
            noise and ship DDIM with "trailing" spacing (see `build_schedulers`). Without it the noisiest
            training input still holds 7% of the image, and the UNet learned to find the shape in the noise
            rather than read its position from the prompt.
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


# ------------------------------------------------------------------------------------------ components


def build_tokenizer(directory: str | Path, config: TrainConfig):
    """A `CLIPTokenizer` in which every caption word is one token, written to `directory`."""
    from transformers import CLIPTokenizer

    from workbench.shapes import CAPTION_WORDS
    from workbench.tokenizer import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(
        write_clip_tokenizer(directory, CAPTION_WORDS, model_max_length=config.max_length)
    )


def build_text_encoder(tokenizer, config: TrainConfig):
    """`CLIPTextModel` with quick-GELU (as CLIP ViT-L), positions = tokenizer length."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=4 * config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_length,
            projection_dim=config.text_hidden,
            hidden_act="quick_gelu",
            # the pooled output is read at the first eos; CLIP's legacy eos_token_id=2 would mean "argmax id"
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_vae(config: TrainConfig):
    from diffusers import AutoencoderKL

    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(16, config.vae_channels[0]),
        sample_size=config.image_size,
    )


def build_unet(config: TrainConfig):
    """SD 1.x block types; no attention at full latent resolution (like SD's last level, but at the top: on a
    CPU, self-attention over 16x16 tokens costs more than the rest of the UNet).

    Where a shape goes needs absolute position, which a UNet has no embedding for: convolutions only see it
    through zero padding (the CoordConv problem, Liu et al. 2018). A 3-level UNet (16 -> 4x4) trained like this
    drew the asked-for colour and shape at a position set by the noise alone (position adherence 0.125, chance
    0.11). Two stock settings make padding say more: a 2x2 bottom level, where every cell has its own set of
    padded neighbours, and a 7x7 `conv_in`, whose output statistics differ with the distance to the border.
    """
    from diffusers import UNet2DConditionModel

    n = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=8,
        norm_num_groups=min(16, config.unet_channels[0]),
        conv_in_kernel=config.unet_conv_in_kernel,
    )


_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def build_schedulers(prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """(training DDPM, inference scheduler) with SD 1.x's scaled-linear betas.

    Without `zero_terminal_snr`: SD 1.x's PNDM, "leading" spacing, steps_offset=1. With it: the betas rescaled
    so that the last step is pure noise, and DDIM with "trailing" spacing so that sampling starts there (Lin et
    al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"; needs v-prediction).
    """
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    rescale = {"rescale_betas_zero_snr": True} if zero_terminal_snr else {}
    train = DDPMScheduler(**_SD_BETAS, clip_sample=False, prediction_type=prediction_type, **rescale)
    if zero_terminal_snr:
        infer = DDIMScheduler(
            **_SD_BETAS,
            **rescale,
            clip_sample=False,
            set_alpha_to_one=False,
            timestep_spacing="trailing",
            prediction_type=prediction_type,
        )
        return train, infer
    infer = PNDMScheduler(
        **_SD_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return train, infer


@dataclass(frozen=True)
class Components:
    """The untrained models of a run: a function of `config` (and its seed) alone."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any


def build_components(config: TrainConfig) -> Components:
    """Build the tokenizer and the three models under `config.seed`; the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vae = build_vae(config)  # built in this order: each model's weights are the next draws of the seed
        with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes the tokenizer into `out` later
            tokenizer = build_tokenizer(tmp, config)
        text_encoder = build_text_encoder(tokenizer, config)
        unet = build_unet(config)
    return Components(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _generator(seed: int, stage: int, step: int) -> torch.Generator:
    """A CPU generator for one step of one stage: the run's randomness never depends on what ran before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def _lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 0."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _recent_loss(losses: list[float]) -> float:
    """Mean of the last 50 losses, as logged."""
    return sum(losses[-50:]) / len(losses[-50:])


def _to_model_input(images_uint8: torch.Tensor, device) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [-1, 1]."""
    return (images_uint8.to(device).permute(0, 3, 1, 2).float() / 127.5) - 1.0


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ stage 1: the VAE


def _vae_loss(vae, x: torch.Tensor, background: torch.Tensor, config: TrainConfig, g: torch.Generator, device):
    """Foreground-weighted L1 + L2 reconstruction error of one sample of q(z|x), plus the weighted KL term."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
    recon = vae.decode(z).sample
    w = 1.0 + config.vae_foreground_weight * ((x - background).abs().amax(dim=1, keepdim=True) > 1e-3).float()
    error = ((recon - x).abs() + (recon - x).pow(2)) * w
    return error.mean() / w.mean() + config.kl_weight * posterior.kl().mean()


def train_vae(vae, images: torch.Tensor, config: TrainConfig, log: Log, device="cpu") -> list[float]:
    """Stage 1: loss = mean(w * (|x - x'| + (x - x')^2)) / mean(w) + kl_weight * mean KL(q(z|x) || N(0, I)),
    with w = 1 + vae_foreground_weight on pixels that differ from the background colour, 1 elsewhere."""
    from workbench.shapes import BACKGROUND

    background = torch.tensor(BACKGROUND, dtype=torch.float32, device=device).view(1, 3, 1, 1) / 127.5 - 1.0
    vae.train().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    for step in range(config.vae_steps):
        g = _generator(config.seed, 1, step)
        _set_lr(optimizer, config.vae_lr * _lr_factor(step, config.vae_steps))
        x = _to_model_input(images[torch.randint(len(images), (config.vae_batch,), generator=g)], device)
        loss = _vae_loss(vae, x, background, config, g, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.vae_steps - 1:
            elapsed = time.perf_counter() - start
            log(f"vae step {step:5d}/{config.vae_steps} loss {_recent_loss(losses):.4f} {elapsed:7.1f}s")
    return losses


@torch.no_grad()
def encode_dataset(
    vae, images: torch.Tensor, batch_size: int = 256, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z|x) for every image, (N, 4, h, w) float32 each, on the CPU."""
    vae.eval().to(device)
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(_to_model_input(images[start : start + batch_size], device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


@dataclass(frozen=True)
class VaeStage:
    """What stage 1 hands to stage 2.

    Args:
        losses (`list[float]`): the VAE's loss per step.
        scaling_factor (`float`): 1 / std of the sampled latents (SD's 0.18215).
        latents (`tuple[torch.Tensor, torch.Tensor]`): mean and std of q(z|x) per image, (N, 4, h, w) float32.
        seconds (`dict[str, float]`): "vae" (training) and "encode" wall time.
        resumed (`bool`): loaded from a checkpoint, so `seconds` were spent by an earlier run.
    """

    losses: list[float] = field(repr=False)
    scaling_factor: float
    latents: tuple[torch.Tensor, torch.Tensor] = field(repr=False)
    seconds: dict[str, float]
    resumed: bool = False


def _scaling_factor(latents: tuple[torch.Tensor, torch.Tensor], seed: int) -> float:
    """1 / std of one latent sample per image: like SD's 0.18215, unit variance for the diffusion model's inputs."""
    mean, std = latents
    sample = mean + std * torch.randn(mean.shape, generator=_generator(seed, 3, 0))
    return float(1.0 / sample.std())


def _train_vae_stage(vae, images: torch.Tensor, config: TrainConfig, log: Log, device) -> VaeStage:
    """Train the VAE, freeze it and encode the dataset once."""
    t0 = time.perf_counter()
    losses = train_vae(vae, images, config, log, device)
    trained = time.perf_counter()
    vae.requires_grad_(False)
    latents = encode_dataset(vae, images, device=device)
    seconds = {"vae": trained - t0, "encode": time.perf_counter() - trained}
    return VaeStage(losses, _scaling_factor(latents, config.seed), latents, seconds)


_STAGE1_FIELDS = ("seed", "n_images", "image_size", "vae_channels", "vae_steps", "vae_batch", "vae_lr", "kl_weight")
_STAGE1_FIELDS += ("vae_foreground_weight",)


def _save_stage1(path: Path, config: TrainConfig, vae, stage: VaeStage) -> None:
    state = {"config": config.to_dict(), "vae": vae.state_dict(), "losses": stage.losses}
    state.update(scaling_factor=stage.scaling_factor, latent_mean=stage.latents[0], latent_std=stage.latents[1])
    state.update(seconds=stage.seconds)
    _save_atomic(state, path)


def _load_stage1(path: Path, config: TrainConfig, vae, log: Log) -> VaeStage:
    """The stage-1 checkpoint, if it was made with the same stage-1 settings (UNet settings may differ)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    mine = {k: v for k, v in config.to_dict().items() if k in _STAGE1_FIELDS}
    theirs = {k: v for k, v in state["config"].items() if k in _STAGE1_FIELDS}
    if mine != theirs:
        raise ValueError(f"checkpoint {path} was written with other VAE settings ({theirs}); delete it")
    vae.load_state_dict(state["vae"])
    log(f"loaded the trained VAE and encoded latents from {path}")
    latents = (state["latent_mean"], state["latent_std"])
    return VaeStage(state["losses"], state["scaling_factor"], latents, state["seconds"], resumed=True)


def vae_stage(
    vae, images: torch.Tensor, config: TrainConfig, *, checkpoint: Path | None, log: Log, device="cpu"
) -> VaeStage:
    """Stage 1, or its checkpoint: the trained VAE (in place, frozen, its scaling factor set) and the latents.

    Args:
        vae (`AutoencoderKL`): from `build_vae`; trained or loaded in place.
        images (`torch.Tensor`): the dataset, NHWC uint8.
        config (`TrainConfig`): the run's settings.
        checkpoint (`Path`, *optional*): loaded if it exists (and was made with the same VAE settings), else
            written after training.
        log (`Callable[[str], None]`): progress lines.
        device (`str`, defaults to "cpu"): training device.

    Returns:
        `VaeStage`.
    """
    if checkpoint is not None and checkpoint.exists():
        stage = _load_stage1(checkpoint, config, vae, log)
    else:
        stage = _train_vae_stage(vae, images, config, log, device)
        if checkpoint is not None:
            _save_stage1(checkpoint, config, vae, stage)
    vae.register_to_config(scaling_factor=stage.scaling_factor)
    vae.requires_grad_(False).eval().to(device)
    log(f"vae: scaling_factor {stage.scaling_factor:.4f}")
    return stage


# --------------------------------------------------------------------- stage 2: UNet and text encoder


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids exactly as `StableDiffusionPipeline.encode_prompt` makes them (padded to max length)."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def _ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


class _UnetTraining:
    """Stage 2's state: the UNet and text encoder being trained, their EMA copies and the optimizer."""

    def __init__(self, unet, text_encoder, config: TrainConfig, device) -> None:
        self.unet = unet.train().to(device)
        self.text_encoder = text_encoder.train().to(device)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.ema_params = list(self.ema_unet.parameters()) + list(self.ema_text.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.unet_lr, weight_decay=0.01)

    def step(self, loss: torch.Tensor, ema_decay: float) -> None:
        """Backward, clip the gradient norm to 1, an AdamW step, then the EMA update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        _ema_update(self.ema_params, self.params, ema_decay)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "ema_text": self.ema_text.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.ema_unet.load_state_dict(state["ema_unet"])
        self.ema_text.load_state_dict(state["ema_text"])
        self.optimizer.load_state_dict(state["optimizer"])


def _loss_weights(noise_scheduler, config: TrainConfig, device) -> torch.Tensor:
    """Per-timestep weight of the squared error: min(base, gamma) / base with base = SNR (epsilon) or SNR + 1
    (v-prediction), so that the weight of the image error is the capped base; all ones when gamma is 0."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    base = snr if config.prediction_type == "epsilon" else snr + 1
    return torch.clamp(base, max=config.snr_gamma) / base if config.snr_gamma > 0 else torch.ones_like(snr)


@dataclass(frozen=True)
class _Batch:
    """One training batch: scaled latents z (B, 4, h, w), noise like z, timesteps t (B,), token ids (B, L)."""

    z: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    ids: torch.Tensor


def _draw_batch(
    g: torch.Generator, latents, scaling_factor: float, ids: torch.Tensor, empty: torch.Tensor, config, device
) -> _Batch:
    """Images, a latent sample of each, noise, timesteps and caption dropout, drawn from `g` in this order."""
    latent_mean, latent_std = latents
    idx = torch.randint(len(ids), (config.unet_batch,), generator=g)
    z = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)) * scaling_factor
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, _SD_BETAS["num_train_timesteps"], (config.unet_batch,), generator=g)
    drop = torch.rand(config.unet_batch, generator=g) < config.caption_dropout
    batch_ids = torch.where(drop[:, None], empty, ids[idx])
    return _Batch(z.to(device), noise.to(device), t.to(device), batch_ids.to(device))


def _unet_loss(training: _UnetTraining, noise_scheduler, weights: torch.Tensor, batch: _Batch, prediction_type):
    """Weighted MSE between the UNet's prediction on the noised latents and its target (epsilon or v)."""
    z, noise, t = batch.z, batch.noise, batch.t
    text = training.text_encoder(batch.ids)[0]
    pred = training.unet(noise_scheduler.add_noise(z, noise, t), t, text).sample
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(z, noise, t)
    return (weights[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


def _resume_unet(checkpoint: Path | None, training: _UnetTraining, config: TrainConfig, device, log: Log):
    """(first step, losses so far): from `checkpoint` when it exists and was made with `config`, else (0, [])."""
    if checkpoint is None or not checkpoint.exists():
        return 0, []
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    if state["config"] != config.to_dict():
        raise ValueError(f"checkpoint {checkpoint} was written with another config; delete it or use that one")
    training.load_state_dict(state)
    log(f"resumed the unet stage at step {state['step']} from {checkpoint}")
    return state["step"], state["losses"]


def train_unet(
    unet,
    text_encoder,
    tokenizer,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    scaling_factor: float,
    config: TrainConfig,
    log: Log,
    device="cpu",
    checkpoint: Path | None = None,
):
    """Stage 2: the UNet and text encoder together; returns (EMA UNet, EMA text encoder, losses).

    loss = mean_i w_i * |y_i - y_theta(sqrt(abar_t) z_i + sqrt(1 - abar_t) eps_i, t, text_i)|^2 with
    SNR_t = abar_t / (1 - abar_t) and, for epsilon, y = eps and w = min(SNR_t, gamma) / SNR_t (min-SNR); for
    v-prediction, y = v = sqrt(abar_t) eps - sqrt(1 - abar_t) z and w = min(SNR_t + 1, gamma) / (SNR_t + 1).
    Both make the weight of the image error |z - z'|^2 the capped SNR (+1 for v: >= 1 at every step).
    """
    noise_scheduler, _ = build_schedulers(config.prediction_type, config.zero_terminal_snr)
    weights = _loss_weights(noise_scheduler, config, device)
    training = _UnetTraining(unet, text_encoder, config, device)
    ids, empty = _tokenize(tokenizer, captions), _tokenize(tokenizer, [""])
    first, losses = _resume_unet(checkpoint, training, config, device, log)
    start = time.perf_counter()
    for step in range(first, config.unet_steps):
        g = _generator(config.seed, 2, step)
        _set_lr(training.optimizer, config.unet_lr * _lr_factor(step, config.unet_steps))
        batch = _draw_batch(g, latents, scaling_factor, ids, empty, config, device)
        loss = _unet_loss(training, noise_scheduler, weights, batch, config.prediction_type)
        training.step(loss, min(config.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        done = step + 1
        if step % 50 == 0 or done == config.unet_steps:
            rate = (time.perf_counter() - start) / (done - first)
            log(f"unet step {step:5d}/{config.unet_steps} loss {_recent_loss(losses):.4f} {rate:.2f}s/step")
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.unet_steps):
            _save_atomic(
                {"config": config.to_dict(), "step": done, "losses": losses, **training.state_dict()}, checkpoint
            )
    return training.ema_unet.eval(), training.ema_text.eval(), losses


# ------------------------------------------------------------------------------------------- the run


def assemble_pipeline(
    vae, text_encoder, tokenizer, unet, prediction_type: str = "epsilon", zero_terminal_snr: bool = False
):
    """A `StableDiffusionPipeline` around trained components, with `build_schedulers`' inference scheduler and
    no safety checker."""
    from diffusers import StableDiffusionPipeline

    _, scheduler = build_schedulers(prediction_type, zero_terminal_snr)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


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

    models = build_components(config)
    stage1 = vae_stage(
        models.vae, images, config, checkpoint=ckpt / "stage1_vae.pt" if ckpt else None, log=log, device=device
    )
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
        ckpt / "stage2_unet.pt" if ckpt else None,
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
    parser.add_argument("--out", default="data/models/tiny-shapes", help="pipeline folder to write")
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
