"""The two training stages of the demo model: the VAE alone, then the UNet and text encoder jointly.

Every random draw comes from a generator seeded by (seed, stage, step) (`step_generator`), so a stage is
reproducible on one device and resumes from a checkpoint exactly where it left off. The run around the
stages, and why the recipe is what it is: `workbench.demo.train`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.demo.components import Components, build_schedulers
from workbench.demo.world import BACKGROUND
from workbench.io import atomic_path

if TYPE_CHECKING:
    from workbench.demo.config import TrainConfig


Log = Callable[[str], None]


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """A CPU generator for one step of one stage: the run's randomness never depends on what ran before."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_003 + step)


def lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 0."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def recent_loss(losses: list[float]) -> float:
    """Mean of the last 50 losses, as logged."""
    return sum(losses[-50:]) / len(losses[-50:])


def to_model_input(images_uint8: torch.Tensor, device) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 in [-1, 1]."""
    return (images_uint8.to(device).permute(0, 3, 1, 2).float() / 127.5) - 1.0


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
    background = torch.tensor(BACKGROUND, dtype=torch.float32, device=device).view(1, 3, 1, 1) / 127.5 - 1.0
    vae.train().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses, start = [], time.perf_counter()
    for step in range(config.vae_steps):
        g = step_generator(config.seed, 1, step)
        set_lr(optimizer, config.vae_lr * lr_factor(step, config.vae_steps))
        x = to_model_input(images[torch.randint(len(images), (config.vae_batch,), generator=g)], device)
        loss = _vae_loss(vae, x, background, config, g, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.vae_steps - 1:
            elapsed = time.perf_counter() - start
            log(f"vae step {step:5d}/{config.vae_steps} loss {recent_loss(losses):.4f} {elapsed:7.1f}s")
    return losses


@torch.no_grad()
def encode_dataset(
    vae, images: torch.Tensor, batch_size: int = 256, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of q(z|x) for every image, (N, 4, h, w) float32 each, on the CPU."""
    vae.eval().to(device)
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(to_model_input(images[start : start + batch_size], device)).latent_dist
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
    sample = mean + std * torch.randn(mean.shape, generator=step_generator(seed, 3, 0))
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


def encoded_stage(vae, images: torch.Tensor, device="cpu") -> VaeStage:
    """Stage 1 of a model already trained: its VAE's latents of `images` and its own scaling factor (no training;
    for fine-tuning its UNet on the data it was trained on, `workbench.tune`)."""
    t0 = time.perf_counter()
    latents = encode_dataset(vae, images, device=device)
    return VaeStage([], float(vae.config.scaling_factor), latents, {"encode": time.perf_counter() - t0})


_STAGE1_FIELDS = ("seed", "n_images", "image_size", "vae_channels", "vae_steps", "vae_batch", "vae_lr", "kl_weight")
_STAGE1_FIELDS += ("vae_foreground_weight",)


def _save_stage1(path: Path, config: TrainConfig, vae, stage: VaeStage) -> None:
    state = {"config": config.to_dict(), "vae": vae.state_dict(), "losses": stage.losses}
    state.update(scaling_factor=stage.scaling_factor, latent_mean=stage.latents[0], latent_std=stage.latents[1])
    state.update(seconds=stage.seconds)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
class Batch:
    """One training batch: scaled latents z (B, 4, h, w), noise like z, timesteps t (B,), token ids (B, L)."""

    z: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    ids: torch.Tensor


class UnetObjective:
    """Stage 2's data and loss, for the demo's training and for fine-tuning its UNet (`workbench.tune`).

    `batch(g)` draws images, a latent sample of each, noise, timesteps and caption dropout from `g` in this order;
    `loss(unet, text_encoder, batch)` is `train_unet`'s weighted MSE (its docstring).

    Args:
        stage1 (`VaeStage`): the latents and scaling factor.
        tokenizer: the demo's tokenizer; captions are tokenized once, as the pipeline does.
        captions (`list[str]`): one per image of the dataset.
        config (`TrainConfig`): `unet_batch`, `caption_dropout`, `prediction_type`, `zero_terminal_snr`,
            `snr_gamma`.
        device (`str`, defaults to "cpu"): where batches and the loss live.
    """

    def __init__(self, stage1: VaeStage, tokenizer, captions: list[str], config: TrainConfig, device="cpu") -> None:
        self.stage1, self.config, self.device = stage1, config, device
        self.noise_scheduler, _ = build_schedulers(config.prediction_type, config.zero_terminal_snr)
        self.weights = _loss_weights(self.noise_scheduler, config, device)
        self.num_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.ids, self.empty = _tokenize(tokenizer, captions), _tokenize(tokenizer, [""])

    def batch(self, g: torch.Generator) -> Batch:
        """A batch of `config.unet_batch` drawn from `g` (a dropped caption becomes "")."""
        config = self.config
        latent_mean, latent_std = self.stage1.latents
        idx = torch.randint(len(self.ids), (config.unet_batch,), generator=g)
        sample = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=g)
        z = sample * self.stage1.scaling_factor
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, self.num_timesteps, (config.unet_batch,), generator=g)
        drop = torch.rand(config.unet_batch, generator=g) < config.caption_dropout
        batch_ids = torch.where(drop[:, None], self.empty, self.ids[idx])
        device = self.device
        return Batch(z.to(device), noise.to(device), t.to(device), batch_ids.to(device))

    def prediction(self, unet, text_encoder, batch: Batch) -> torch.Tensor:
        """The UNet's prediction on the batch's noised latents, (B, 4, h, w)."""
        text = text_encoder(batch.ids)[0]
        return unet(self.noise_scheduler.add_noise(batch.z, batch.noise, batch.t), batch.t, text).sample

    def weighted_error(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """mean_i w_{t_i} * mean((pred_i - target_i)^2): the loss' weighting of any per-sample squared error."""
        return (self.weights[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()

    def target(self, batch: Batch) -> torch.Tensor:
        """epsilon, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z."""
        if self.config.prediction_type == "epsilon":
            return batch.noise
        return self.noise_scheduler.get_velocity(batch.z, batch.noise, batch.t)

    def loss(self, unet, text_encoder, batch: Batch) -> torch.Tensor:
        """Weighted MSE between the UNet's prediction and its target (epsilon or v)."""
        return self.weighted_error(self.prediction(unet, text_encoder, batch), self.target(batch), batch.t)


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
    models: Components,
    stage1: VaeStage,
    captions: list[str],
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

    Args:
        models (`Components`): its `unet`, `text_encoder` (trained in place) and `tokenizer`.
        stage1 (`VaeStage`): the latents and scaling factor stage 1 made.
        captions (`list[str]`): one per image of the dataset.
        config (`TrainConfig`): the run's settings.
        log (`Callable[[str], None]`): progress lines.
        device (`str`, defaults to "cpu"): training device.
        checkpoint (`Path`, *optional*): resumed from if it exists (and was made with `config`), and written
            every `config.checkpoint_every` steps and at the end.
    """
    objective = UnetObjective(stage1, models.tokenizer, captions, config, device)
    training = _UnetTraining(models.unet, models.text_encoder, config, device)
    first, losses = _resume_unet(checkpoint, training, config, device, log)
    start = time.perf_counter()
    for step in range(first, config.unet_steps):
        g = step_generator(config.seed, 2, step)
        set_lr(training.optimizer, config.unet_lr * lr_factor(step, config.unet_steps))
        loss = objective.loss(training.unet, training.text_encoder, objective.batch(g))
        training.step(loss, min(config.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        done = step + 1
        if step % 50 == 0 or done == config.unet_steps:
            rate = (time.perf_counter() - start) / (done - first)
            log(f"unet step {step:5d}/{config.unet_steps} loss {recent_loss(losses):.4f} {rate:.2f}s/step")
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.unet_steps):
            state = {"config": config.to_dict(), "step": done, "losses": losses, **training.state_dict()}
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    return training.ema_unet.eval(), training.ema_text.eval(), losses
