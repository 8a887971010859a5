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
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

PIPELINE_DEFAULT_STEPS = 50  # StableDiffusionPipeline.__call__'s default num_inference_steps
PIPELINE_DEFAULT_GUIDANCE = 7.5


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
        positive = ["n_images", "image_size", "text_hidden", "text_layers", "text_heads", "max_length"]
        positive += ["vae_batch", "unet_batch", "checkpoint_every", "threads", "unet_conv_in_kernel"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vae_steps", "unet_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_hidden={self.text_hidden} must be a multiple of text_heads={self.text_heads}")
        if self.max_length < 12:
            raise ValueError(f"max_length={self.max_length} is too short: captions take up to 11 tokens")
        if self.unet_conv_in_kernel % 2 == 0:
            raise ValueError(f"unet_conv_in_kernel must be odd, got {self.unet_conv_in_kernel}")
        if len(self.vae_channels) < 2 or len(self.unet_channels) < 2:
            raise ValueError("vae_channels and unet_channels need at least two levels")
        latent = self.image_size // 2 ** (len(self.vae_channels) - 1)
        if latent % 2 ** (len(self.unet_channels) - 1):
            raise ValueError(f"{latent}x{latent} latents cannot be halved {len(self.unet_channels) - 1} times")
        for name in ("caption_dropout",):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not 'epsilon' or 'v_prediction'")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type='v_prediction' (epsilon is undefined at SNR 0)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

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
    from workbench.testing import write_clip_tokenizer

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


def _to_model_input(images_uint8: torch.Tensor, device) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [-1, 1]."""
    return (images_uint8.to(device).permute(0, 3, 1, 2).float() / 127.5) - 1.0


# -------------------------------------------------------------------------------------------- stages


def train_vae(vae, images: torch.Tensor, config: TrainConfig, log: Callable[[str], None], device="cpu") -> list[float]:
    """Stage 1: loss = mean(w * (|x - x'| + (x - x')^2)) / mean(w) + kl_weight * mean KL(q(z|x) || N(0, I)),
    with w = 1 + vae_foreground_weight on pixels that differ from the background colour, 1 elsewhere."""
    from workbench.shapes import BACKGROUND

    background = torch.tensor(BACKGROUND, dtype=torch.float32, device=device).view(1, 3, 1, 1) / 127.5 - 1.0
    vae.train().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    for step in range(config.vae_steps):
        g = _generator(config.seed, 1, step)
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _lr_factor(step, config.vae_steps)
        x = _to_model_input(images[torch.randint(len(images), (config.vae_batch,), generator=g)], device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        recon = vae.decode(z).sample
        w = 1.0 + config.vae_foreground_weight * ((x - background).abs().amax(dim=1, keepdim=True) > 1e-3).float()
        error = ((recon - x).abs() + (recon - x).pow(2)) * w
        loss = error.mean() / w.mean() + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.vae_steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"vae step {step:5d}/{config.vae_steps} loss {recent:.4f} {time.perf_counter() - start:7.1f}s")
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


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids exactly as `StableDiffusionPipeline.encode_prompt` makes them (padded to max length)."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def _ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_unet(
    unet,
    text_encoder,
    tokenizer,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    scaling_factor: float,
    config: TrainConfig,
    log: Callable[[str], None],
    device="cpu",
    checkpoint: Path | None = None,
):
    """Stage 2: the UNet and text encoder together; returns (EMA UNet, EMA text encoder, losses).

    loss = mean_i w_i * |y_i - y_theta(sqrt(abar_t) z_i + sqrt(1 - abar_t) eps_i, t, text_i)|^2 with
    SNR_t = abar_t / (1 - abar_t) and, for epsilon, y = eps and w = min(SNR_t, gamma) / SNR_t (min-SNR); for
    v-prediction, y = v = sqrt(abar_t) eps - sqrt(1 - abar_t) z and w = min(SNR_t + 1, gamma) / (SNR_t + 1).
    Both make the weight of the image error |z - z'|^2 the capped SNR (+1 for v: >= 1 at every step).
    """
    import copy

    noise_scheduler, _ = build_schedulers(config.prediction_type, config.zero_terminal_snr)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    base = snr if config.prediction_type == "epsilon" else snr + 1
    weights = torch.clamp(base, max=config.snr_gamma) / base if config.snr_gamma > 0 else torch.ones_like(snr)

    unet.train().to(device)
    text_encoder.train().to(device)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)
    ids, empty = _tokenize(tokenizer, captions), _tokenize(tokenizer, [""])
    latent_mean, latent_std = latents

    losses: list[float] = []
    first = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["config"] != config.to_dict():
            raise ValueError(f"checkpoint {checkpoint} was written with another config; delete it or use that one")
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        optimizer.load_state_dict(state["optimizer"])
        first, losses = state["step"], state["losses"]
        log(f"resumed the unet stage at step {first} from {checkpoint}")

    start = time.perf_counter()
    for step in range(first, config.unet_steps):
        g = _generator(config.seed, 2, step)
        for group in optimizer.param_groups:
            group["lr"] = config.unet_lr * _lr_factor(step, config.unet_steps)
        idx = torch.randint(len(ids), (config.unet_batch,), generator=g)
        z = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)) * scaling_factor
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.unet_batch,), generator=g)
        drop = torch.rand(config.unet_batch, generator=g) < config.caption_dropout
        batch_ids = torch.where(drop[:, None], empty, ids[idx])
        z, noise, t, batch_ids = z.to(device), noise.to(device), t.to(device), batch_ids.to(device)

        text = text_encoder(batch_ids)[0]
        pred = unet(noise_scheduler.add_noise(z, noise, t), t, text).sample
        target = noise if config.prediction_type == "epsilon" else noise_scheduler.get_velocity(z, noise, t)
        loss = (weights[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _ema_update(ema_params, params, min(config.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())

        done = step + 1
        if step % 50 == 0 or done == config.unet_steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            rate = (time.perf_counter() - start) / (done - first)
            log(f"unet step {step:5d}/{config.unet_steps} loss {recent:.4f} {rate:.2f}s/step")
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.unet_steps):
            state = {"config": config.to_dict(), "step": done, "losses": losses, "optimizer": optimizer.state_dict()}
            state.update(unet=unet.state_dict(), text_encoder=text_encoder.state_dict())
            state.update(ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict())
            _save_atomic(state, checkpoint)
    return ema_unet.eval(), ema_text.eval(), losses


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


_POSITION_ABBREVIATIONS = {"top left": "TL", "top": "T", "top right": "TR", "left": "L", "center": "C"}
_POSITION_ABBREVIATIONS.update({"right": "R", "bottom left": "BL", "bottom": "B", "bottom right": "BR"})


def adherence_grid(report, columns: int = 8, cell_size: int = 112):
    """The images of an `AdherenceReport` as a PIL grid, each captioned with its prompt (short form) and a
    `!` where the scorer found the wrong colour, shape or position."""
    from workbench.grids import image_grid

    if report.images is None:
        raise ValueError("this AdherenceReport has no images; make it with workbench.shapes.generate_and_score")
    cells, captions = [], []
    for i, (want, got) in enumerate(zip(report.expected, report.readings)):
        miss = any(getattr(want, a) != getattr(got, a) for a in ("color", "shape", "position"))
        short = f"{want.size[0]} {want.color} {want.shape} {_POSITION_ABBREVIATIONS[want.position]}"
        if i % columns == 0:
            cells.append([])
            captions.append([])
        cells[-1].append(report.images[i])
        captions[-1].append(("! " if miss else "") + short)
    while len(cells[-1]) < columns:  # pad the last row
        cells[-1].append(np.full_like(report.images[0], 255))
        captions[-1].append("")
    title = "prompt: s/l = small/large, position TL..BR; ! = scorer read a wrong colour, shape or position"
    return image_grid(cells, cell_captions=captions, cell_size=cell_size, title=title, font_size=12)


def _folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


@torch.no_grad()
def _vae_round_trip(pipe, n: int = 256, seed: int = 12345):
    """Score VAE reconstructions of held-out images: the best adherence the latent model could reach."""
    from workbench.shapes import make_dataset, score_adherence

    data = make_dataset(n, seed=seed)
    x = _to_model_input(torch.from_numpy(data.images), pipe.device)
    recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return score_adherence(images, data.attributes)


def document(out: str | Path, *, n_images: int = 64, log: Callable[[str], None] = print):
    """Measure a trained folder as a user would load it, save `sample_grid.png` and write its README.md card.

    Loads `out` with `workbench.pipelines.load_pipeline` (float32, CPU), runs the quality benchmark
    (`generate_and_score(pipe, benchmark_attributes(n_images))`, pipeline defaults), scores the VAE round trip
    and the scorer itself on held-out clean images, and writes the model card from these numbers and
    `training.json`.

    Returns:
        `AdherenceReport` of the benchmark.
    """
    import platform

    from workbench.pipelines import load_pipeline
    from workbench.shapes import benchmark_attributes, generate_and_score, make_dataset, score_adherence

    out = Path(out)
    info = json.loads((out / "training.json").read_text(encoding="utf-8"))
    config = TrainConfig.from_dict(info["config"])
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        pipe = load_pipeline(out, device="cpu", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        report = generate_and_score(pipe, benchmark_attributes(n_images), seed=0)
        bench_seconds = time.perf_counter() - t0
        log(f"benchmark: {report.summary()} ({bench_seconds:.0f}s)")
        adherence_grid(report).save(out / "sample_grid.png")
        round_trip = _vae_round_trip(pipe)
        held_out = make_dataset(1000, seed=12345)
        scorer = score_adherence(held_out.images, held_out.attributes)
    finally:
        torch.set_num_threads(threads)

    params = info["parameters"]
    seconds = info["seconds"]
    total = seconds.get("total", sum(seconds.values()))
    frame = report.to_frame()
    misses = frame[~(frame.color_ok & frame.shape_ok & frame.position_ok)]
    miss_rows = "\n".join(
        f"| {i} | {r.prompt} | {r.read_color} | {r.read_shape} | {r.read_position} |" for i, r in misses.iterrows()
    )
    targets = {"color": 0.90, "shape": 0.70, "position": 0.80}
    target_text = ", ".join(
        f"{name} {getattr(report, name + '_adherence'):.3f} "
        + ("meets" if getattr(report, name + "_adherence") >= floor else "**misses**")
        + f" >= {floor:.2f}"
        for name, floor in targets.items()
    )
    wrong_shape = frame[~frame.shape_ok]
    confusions = (wrong_shape["shape"] + " read as " + wrong_shape["read_shape"].fillna("nothing")).value_counts()
    confusion_text = "; ".join(f"{pair}: {count}" for pair, count in confusions.items()) or "none"
    unet_cfg = pipe.unet.config
    layer_sizes = [m.weight.numel() for m in pipe.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    over_2048, over_1e5 = sum(n > 2048 for n in layer_sizes), sum(n > 100_000 for n in layer_sizes)
    sc = pipe.scheduler.config
    scheduler_text = (
        f"SD 1.x's scaled-linear betas {sc.beta_start}-{sc.beta_end} over {sc.num_train_timesteps} steps"
        + (", rescaled to zero terminal SNR" if sc.get("rescale_betas_zero_snr") else "")
        + f', "{sc.timestep_spacing}" spacing, steps_offset {sc.steps_offset}, {sc.prediction_type}'
    )
    card = f"""# tiny-shapes: a small trained text-to-image latent diffusion model

A Stable Diffusion-style pipeline (CLIP tokenizer and text encoder, `AutoencoderKL`, `UNet2DConditionModel`
with cross-attention, a diffusers scheduler) trained in-house, on a CPU, on the procedural shapes world of
`workbench/shapes.py`: one flat-coloured circle, square or triangle on a dark grey background, in one of 6
colours, 9 grid positions and 2 sizes. It draws what a caption such as "a small red circle at the top left"
asks for, so a compressed copy can be checked for *prompt adherence*, not only PSNR. Not an image model for
any other use.

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("data/models/tiny-shapes")  # float32, offline
image = pipe("a large blue triangle at the bottom right", generator=torch.Generator().manual_seed(0)).images[0]
# or: workbench.pipelines.load_pipeline("data/models/tiny-shapes")
```

Defaults are the pipeline's: 50 {type(pipe.scheduler).__name__} steps, guidance 7.5, 64x64 images
(`unet.config.sample_size` {unet_cfg.sample_size} x VAE factor {pipe.vae_scale_factor}).

## Measured quality (float32, CPU)

`.venv/bin/python benchmarks/demo_quality.py`: {n_images} fixed prompts (a seeded shuffle of the 324 attribute
combinations), image i from `torch.Generator("cpu").manual_seed(i)`, the pipeline's defaults; images read by
the transparent scorer `workbench.shapes.read_shape`:

| attribute | adherence | VAE round trip of 256 held-out images (ceiling) | scorer on 1000 held-out clean images |
|---|---|---|---|
| colour | {report.color_adherence:.3f} | {round_trip.color_adherence:.3f} | {scorer.color_adherence:.3f} |
| shape | {report.shape_adherence:.3f} | {round_trip.shape_adherence:.3f} | {scorer.shape_adherence:.3f} |
| position | {report.position_adherence:.3f} | {round_trip.position_adherence:.3f} | {scorer.position_adherence:.3f} |
| size (not a target) | {report.size_adherence:.3f} | {round_trip.size_adherence:.3f} | {scorer.size_adherence:.3f} |

Benchmark wall time: {bench_seconds:.0f} s for {n_images} images x 50 steps with guidance (UNet batch 32),
{config.threads} torch thread(s). Last line: `{report.summary()}`

Against the targets this model was trained for: {target_text}. Shape errors by kind
({len(wrong_shape)} of {n_images}): {confusion_text}.

## Sample grid

![sample grid](sample_grid.png)

The {n_images} benchmark images in order (row-major), captioned with the prompt in short form. Prompts where
the scorer read a wrong colour, shape or position (`!` in the grid):

| # | prompt | read colour | read shape | read position |
|---|---|---|---|---|
{miss_rows}

## Architecture

| component | class | configuration | parameters |
|---|---|---|---|
| tokenizer | `CLIPTokenizer` | byte-level BPE, every caption word one token, \
`model_max_length` {config.max_length} | - |
| text encoder | `CLIPTextModel` | hidden {config.text_hidden}, {config.text_layers} layers, \
{config.text_heads} heads, MLP {4 * config.text_hidden}, quick-GELU, {config.max_length} positions \
| {params["text_encoder"]:,} |
| VAE | `AutoencoderKL` | `block_out_channels` {tuple(config.vae_channels)}, 1 layer per block, 4 latent channels, \
64x64 -> {config.latent_size}x{config.latent_size}, `scaling_factor` {info["scaling_factor"]:.4f} | {params["vae"]:,} |
| UNet | `UNet2DConditionModel` | `block_out_channels` {tuple(unet_cfg.block_out_channels)}, \
{list(unet_cfg.down_block_types)}, 1 layer per block, cross-attention dim {unet_cfg.cross_attention_dim}, \
8 heads, `conv_in` {unet_cfg.conv_in_kernel}x{unet_cfg.conv_in_kernel} | {params["unet"]:,} |
| scheduler | `{type(pipe.scheduler).__name__}` | {scheduler_text} | - |

Total {sum(params.values()):,} parameters; the folder is {_folder_megabytes(out):.1f} MB (float32 safetensors).
The UNet has {len(layer_sizes)} Linear/Conv2d layers, {over_2048} of them with more than 2048 weights
(coremltools' default palettization threshold) and {over_1e5} with more than 100,000 (the reference's
threshold for SD-size models: use `compressible_layers(unet, min_numel=2048)` here).

## Dataset

`workbench.shapes.make_dataset({config.n_images}, seed={config.seed})`: sample i drawn from
`np.random.default_rng([{config.seed}, i])`; shape, colour, position and size uniform; position jittered +-2 px
around the cell centre (12, 32 or 52 px), side 12 px (small) or 20 px (large) +-1 px; 4x4 supersampled
anti-aliasing. Captions "a <size> <colour> <shape> at the <position>". No downloads.

## Training

```
.venv/bin/python -m workbench.train --out data/models/tiny-shapes --checkpoint-dir /tmp/tiny-shapes-ckpt
# or: workbench train --out data/models/tiny-shapes
```

Seed {config.seed}; all settings are `workbench.train.TrainConfig` defaults, written to `training.json` with the
loss curves:

```json
{json.dumps(config.to_dict())}
```

1. VAE: {config.vae_steps} AdamW steps, batch {config.vae_batch}, lr {config.vae_lr} (5% warmup, cosine),
   loss L1 + L2 with shape pixels weighted {1 + config.vae_foreground_weight:g}x (the background is 90-98% of every
   image; unweighted, the VAE learned grey blobs) + {config.kl_weight} x KL; then frozen, the dataset encoded
   once, `scaling_factor` = 1 / std of the latents.
2. UNet + text encoder jointly: {config.unet_steps} AdamW steps, batch {config.unet_batch}, lr {config.unet_lr}
   (5% warmup, cosine), weight decay 0.01, grad-norm clip 1; {config.prediction_type} MSE under SD's DDPM
   schedule, image-error weight min(SNR (+1 for v), {config.snr_gamma:g}); captions dropped to "" with
   probability {config.caption_dropout} (classifier-free guidance); the EMA of the weights (decay
   min({config.ema_decay}, (1+n)/(10+n))) is what is saved.

Wall time: {total / 60:.1f} min in all (dataset {seconds.get("dataset", 0):.0f} s, VAE {seconds.get("vae", 0):.0f} s,
encoding {seconds.get("encode", 0):.0f} s, UNet {seconds.get("unet", 0):.0f} s) on {os.cpu_count()} CPU cores
({platform.machine()}, {config.threads} torch thread(s), shared with other jobs), torch {torch.__version__}.
Final losses: VAE {np.mean(info["vae_losses"][-50:]):.4f}, UNet {np.mean(info["unet_losses"][-50:]):.4f}
(mean of the last 50 steps).
"""
    (out / "README.md").write_text(card, encoding="utf-8")
    log(f"wrote {out / 'README.md'} and {out / 'sample_grid.png'}")
    return report


_STAGE1_FIELDS = ("seed", "n_images", "image_size", "vae_channels", "vae_steps", "vae_batch", "vae_lr", "kl_weight")
_STAGE1_FIELDS += ("vae_foreground_weight",)


def _load_stage1(path: Path, config: TrainConfig, vae, log):
    """The stage-1 checkpoint, if it was made with the same stage-1 settings (UNet settings may differ)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    mine = {k: v for k, v in config.to_dict().items() if k in _STAGE1_FIELDS}
    theirs = {k: v for k, v in state["config"].items() if k in _STAGE1_FIELDS}
    if mine != theirs:
        raise ValueError(f"checkpoint {path} was written with other VAE settings ({theirs}); delete it")
    vae.load_state_dict(state["vae"])
    log(f"loaded the trained VAE and encoded latents from {path}")
    return state["losses"], state["scaling_factor"], (state["latent_mean"], state["latent_std"]), state["seconds"]


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    device: str = "cpu",
    card: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the demo model and write the diffusers pipeline (safetensors), training.json and the model card.

    Args:
        config (`TrainConfig`): the run's settings.
        out (`str` or `Path`): pipeline folder to write (created; existing files are overwritten).
        checkpoint_dir (`str` or `Path`, *optional*): where to keep resumable checkpoints (the trained VAE
            with the encoded dataset, then the UNet stage every `checkpoint_every` steps). A run pointed at
            the same folder with the same config resumes.
        device (`str`, defaults to "cpu"): training device; results are reproducible on one device type.
        card (`bool`, defaults to True): then measure the saved model and write README.md (`document`).
        log (`Callable[[str], None]`, defaults to `print`): progress lines.

    Returns:
        `TrainResult`.
    """
    from workbench.shapes import make_dataset

    out = Path(out)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        seconds: dict[str, float] = {}
        started = t0 = time.perf_counter()
        data = make_dataset(config.n_images, seed=config.seed, image_size=config.image_size)
        images = torch.from_numpy(data.images)
        seconds["dataset"] = time.perf_counter() - t0
        log(f"dataset: {len(data)} images in {seconds['dataset']:.1f}s")

        with torch.random.fork_rng(devices=[]):  # weights from the seed alone; the caller's RNG is restored
            torch.manual_seed(config.seed)
            vae = build_vae(config)
            with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes the tokenizer into `out` later
                tokenizer = build_tokenizer(tmp, config)
            text_encoder = build_text_encoder(tokenizer, config)
            unet = build_unet(config)

        stage1 = ckpt / "stage1_vae.pt" if ckpt is not None else None
        if stage1 is not None and stage1.exists():
            vae_losses, scaling_factor, latents, stage1_seconds = _load_stage1(stage1, config, vae, log)
            seconds.update(stage1_seconds)  # a resumed run reports the first run's stage-1 time
        else:
            stage1_seconds = {}
            t0 = time.perf_counter()
            vae_losses = train_vae(vae, images, config, log, device)
            seconds["vae"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            vae.requires_grad_(False)
            latents = encode_dataset(vae, images, device=device)
            seconds["encode"] = time.perf_counter() - t0
            # like SD's 0.18215: unit variance for the diffusion model's inputs
            sample = latents[0] + latents[1] * torch.randn(latents[0].shape, generator=_generator(config.seed, 3, 0))
            scaling_factor = float(1.0 / sample.std())
            if stage1 is not None:
                state = {"config": config.to_dict(), "vae": vae.state_dict(), "losses": vae_losses}
                state.update(scaling_factor=scaling_factor, latent_mean=latents[0], latent_std=latents[1])
                state.update(seconds={k: seconds[k] for k in ("vae", "encode")})
                _save_atomic(state, stage1)
        vae.register_to_config(scaling_factor=scaling_factor)
        vae.requires_grad_(False).eval().to(device)
        log(f"vae: scaling_factor {scaling_factor:.4f}")

        t0 = time.perf_counter()
        unet_ckpt = ckpt / "stage2_unet.pt" if ckpt is not None else None
        unet, text_encoder, unet_losses = train_unet(
            unet, text_encoder, tokenizer, latents, data.captions, scaling_factor, config, log, device, unet_ckpt
        )
        seconds["unet"] = time.perf_counter() - t0

        pipe = assemble_pipeline(
            vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu(), config.prediction_type, config.zero_terminal_snr
        )
        pipe.save_pretrained(out, safe_serialization=True)
        parameters = {name: _count(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}
        seconds["total"] = time.perf_counter() - started + sum(stage1_seconds.values())
        result = TrainResult(out, config, seconds, parameters, scaling_factor, vae_losses, unet_losses)
        (out / "training.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
        log(f"wrote {out}: {parameters}, seconds { ({k: round(v, 1) for k, v in seconds.items()}) }")
    finally:
        torch.set_num_threads(threads)
    if card:
        document(out, log=log)
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
    if args.card_only:
        document(args.out, log=lambda line: print(line, flush=True))
        return None
    data = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    data.update(dict(_parse_override(text) for text in args.set))
    config = TrainConfig.from_dict(data)
    print(f"config: {json.dumps(config.to_dict())}", flush=True)
    return train(
        config,
        args.out,
        checkpoint_dir=args.checkpoint_dir,
        card=not args.no_card,
        device=args.device,
        log=lambda line: print(line, flush=True),
    )


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(
        argparse.ArgumentParser(prog="python -m workbench.train", description=__doc__.split("\n")[0])
    )
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
