"""Training-time palettization: fine-tune a UNet on its own training data while its weights are palettized.

The design (argued in docs/training_time.md): every palettized layer keeps a float32 *master* weight and a palette
(`workbench.palettes.fit.Palette`'s LUT and indices). By default (`QatConfig.assignment="soft"`) the forward pass
reads each weight through a soft assignment over its group's entries (a softmax of the squared distances at a
temperature relative to the squared spacing of the entries), the centroids being the attention-weighted means of the
masters: one differentiable k-means iteration, recomputed in the backward pass, so a cluster's masters move together
and a master near a midpoint may cross it. After every optimizer step each weight takes its nearest entry and each
entry becomes the float16-rounded mean of its masters (k-means' two steps, O(weights)). `assignment="fixed"` keeps the
post-training assignment and hands the gradient of `LUT[indices]` straight through to the masters; `"nearest"`
re-assigns after each step; `recluster_every` re-fits from scratch by the exact k-means Core ML runs (on the demo
model it raised the loss). Nothing of size weights x clusters is kept beyond one layer's forward pass.

The first palettes are the post-training ones (`fit_palette` on the float weights), so step 0 is plain k-means
palettization; the model written at the end holds `LUT[indices]` exactly, so `workbench export` with the same recipe
re-fits the same palettes (a weight of at most 2**nbits distinct values is its own k-means optimum), and
`palettes.npz` beside it (`workbench.palettes.given.GivenPalettes`) hands them to `workbench export --palettes` as
they are.

Example:
    >>> result = train_palettized(pipe, TrainConfig.from_dict(training_json["config"]), QatConfig("2"), "out/")
    >>> result.exact
    True
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from workbench.demo.config import TrainConfig
from workbench.demo.stages import (
    Log,
    UnetObjective,
    VaeStage,
    encoded_stage,
    lr_factor,
    recent_loss,
    step_generator,
)
from workbench.demo.world import make_dataset
from workbench.errors import InvalidValueError
from workbench.models.layers import compressible_layers
from workbench.palettes.config import PaletteConfig
from workbench.palettes.fit import Palette, fit_palette
from workbench.palettes.given import GivenPalettes
from workbench.recipes.recipe import Recipe, load_recipe
from workbench.tune.luts import LutWeight
from workbench.tune.qat_config import QatConfig

PALETTES_FILE = "palettes.npz"  # beside the fine-tuned pipeline
QAT_STAGE = 4  # `step_generator`'s stage number of fine-tuning draws (the demo's training uses 1-3)


# ------------------------------------------------------------------------------------------ the recipe


def qat_recipe(unet: nn.Module, config: QatConfig) -> Recipe:
    """The recipe `config.palettize` names on `unet`: a uniform width on every candidate layer (more than
    `config.min_numel` weights), or a recipe file's, checked against the UNet's layers and limited to plain k-means
    palettes (per tensor or grouped), the ones a master's exact k-means re-fits."""
    bits = config.uniform_bits
    if bits is not None:
        layers = compressible_layers(unet, min_numel=config.min_numel)
        if not layers:
            raise InvalidValueError(f"the UNet has no Linear/Conv2d layer over min_numel={config.min_numel} weights")
        return Recipe(f"uniform_{bits}_bit", dict.fromkeys(layers, bits))
    recipe = load_recipe(config.palettize, config.recipe_name or None)
    names = [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    recipe.validate(names)
    other = sorted({c.key for c in recipe.configs.values() if c.mode != "kmeans"})
    if other:
        raise InvalidValueError(
            f"recipe {recipe.name!r} has {', '.join(other)} palettes; training-time palettization re-fits plain "
            "k-means palettes only (per tensor or grouped)"
        )
    return recipe


# ------------------------------------------------------------------------------ the palettized weight


class _StraightThrough(torch.autograd.Function):
    """Forward: the palettized weight, exactly. Backward: its gradient goes to the master unchanged."""

    @staticmethod
    def forward(ctx, master: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return dense.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class TrainedPalette(nn.Module):
    """A layer's palette during training, registered as the parametrization of its weight
    (`torch.nn.utils.parametrize`): `layer.weight` reads `lut[g, indices]` and its gradient reaches the master.

    Attributes:
        config (`PaletteConfig`): plain k-means, per tensor or grouped.
        lut (`torch.Tensor`): float32 holding float16 values, (n_groups, 2**nbits).
        indices (`torch.Tensor`): int64, the weight's shape.
    """

    def __init__(self, master: torch.Tensor, config: PaletteConfig, *, soft: bool = False) -> None:
        super().__init__()
        self.config = config
        self.soft = soft  # `QatConfig.assignment == "soft"`: the forward pass is `soft_weight`
        self.temperature = 0.0  # of the soft assignment, relative to `spacing`; set by the loop every step
        self.register_buffer("lut", torch.empty(0), persistent=False)
        self.register_buffer("indices", torch.empty(0, dtype=torch.long), persistent=False)
        self.refit(master)
        groups = self.lut.shape[0]
        # the squared mean spacing of each group's first entries, (max - min) / (2**nbits - 1): the soft assignment's
        # scale, so that a temperature mixes the same share of a gap at every width
        gap = (self.lut.amax(dim=1) - self.lut.amin(dim=1)) / max(1, self.lut.shape[1] - 1)
        self.register_buffer("spacing", gap.square().clamp_min(1e-12).reshape(groups, 1, 1), persistent=False)

    @torch.no_grad()
    def refit(self, master: torch.Tensor) -> None:
        """Re-fit from scratch: Core ML's exact k-means (`fit_palette`) on the float16 master."""
        palette = fit_palette(master.detach(), self.config)
        self.lut = torch.from_numpy(palette.lut.astype(np.float32)).to(master.device)
        self.indices = torch.from_numpy(palette.indices.astype(np.int64)).to(master.device)

    @torch.no_grad()
    def reassign(self, master: torch.Tensor) -> None:
        """Each weight <- the index of its group's LUT entry nearest to its master (ties to the lower index): k-means'
        assignment step, warm-started from the current LUT, so only weights that crossed a midpoint move."""
        groups, size = self.lut.shape
        rows = master.detach().reshape(groups, -1).float()
        indices = torch.empty(rows.shape, dtype=torch.long, device=rows.device)
        chunk = max(1, (1 << 22) // (groups * size))  # bounds the distances held at once to 4M floats
        for start in range(0, rows.shape[1], chunk):
            part = rows[:, start : start + chunk]
            indices[:, start : start + chunk] = (part.unsqueeze(-1) - self.lut.unsqueeze(1)).abs().argmin(-1)
        self.indices = indices.reshape(self.indices.shape)

    def _flat_indices(self) -> torch.Tensor:
        """Every weight's index into the flattened LUT (group g's entries start at g * 2**nbits)."""
        groups, size = self.lut.shape
        rows = self.indices.reshape(groups, -1)
        offsets = torch.arange(groups, device=rows.device).unsqueeze(1) * size
        return (rows + offsets).reshape(-1)

    def dense(self) -> torch.Tensor:
        """`lut[g, indices]` in the weight's shape, float32."""
        return self.lut.reshape(-1)[self._flat_indices()].reshape(self.indices.shape)

    @torch.no_grad()
    def update_lut(self, master: torch.Tensor) -> None:
        """Each used entry <- the float16-rounded mean of the masters assigned to it; unused entries are kept."""
        flat = self._flat_indices()
        sums = torch.zeros(self.lut.numel(), dtype=torch.float64, device=flat.device)
        counts = torch.zeros_like(sums)
        sums.index_add_(0, flat, master.detach().reshape(-1).double())
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        means = (sums / counts.clamp_min(1)).half().float()
        self.lut = torch.where(counts > 0, means, self.lut.reshape(-1)).reshape(self.lut.shape)

    def soft_weight(self, master: torch.Tensor) -> torch.Tensor:
        """The weight under a soft assignment (differentiable in the master): each weight's attention over its
        group's entries is `softmax(-(w - lut)**2 / (temperature * spacing))`, the centroids are the attention-
        weighted means of the masters (one differentiable k-means iteration from the current LUT), and the weight is
        its attention's mix of them. At temperature 0 the attention is the nearest entry, and the weight is its
        cluster's mean: every master of a cluster gets the same gradient, the cluster's."""
        groups = self.lut.shape[0]
        weights = master.reshape(groups, -1, 1)
        start = self.lut.unsqueeze(1)
        if self.temperature > 0:
            attention = torch.softmax(-((weights - start) ** 2) / (self.temperature * self.spacing), dim=-1)
        else:
            nearest = (weights.detach() - start).abs().argmin(-1)
            attention = torch.nn.functional.one_hot(nearest, self.lut.shape[1]).to(weights.dtype)
        mass = attention.sum(1, keepdim=True)
        centroids = (attention * weights).sum(1, keepdim=True) / mass.clamp_min(1e-12)
        centroids = torch.where(mass > 1e-6, centroids, start)
        return (attention * centroids).sum(-1).reshape(master.shape)

    def forward(self, master: torch.Tensor) -> torch.Tensor:
        if self.soft:  # recomputed in the backward pass: nothing of size weights x entries is kept
            return torch.utils.checkpoint.checkpoint(self.soft_weight, master, use_reentrant=False)
        return _StraightThrough.apply(master, self.dense().to(master.dtype))

    def palette(self) -> Palette:
        """The palette as the rest of the workbench holds one: float16 LUT, uint8 indices."""
        return Palette(self.lut.cpu().half().numpy(), self.indices.cpu().to(torch.uint8).numpy(), self.config)


def attach_palettes(
    unet: nn.Module, recipe: Recipe, luts: str = "centroid", assignment: str = "fixed"
) -> dict[str, TrainedPalette | LutWeight]:
    """Palettize `unet`'s recipe layers for training (their weights read `LUT[indices]`); layer -> palette.
    `luts` (`QatConfig.luts`): "centroid", float masters and `TrainedPalette`s (soft ones with `assignment="soft"`);
    "learned", the LUTs themselves trained (`LutWeight`, started from the post-training k-means), the masters
    frozen."""
    palettes = {}
    for name, config in recipe.configs.items():
        layer = unet.get_submodule(name)
        if luts == "learned":
            palettes[name] = LutWeight(fit_palette(layer.weight.detach(), config)).to(layer.weight.device)
        else:
            palettes[name] = TrainedPalette(layer.weight, config, soft=assignment == "soft")
        parametrize.register_parametrization(layer, "weight", palettes[name])
        if luts == "learned":
            layer.parametrizations.weight.original.requires_grad_(False)
    return palettes


@torch.no_grad()
def detach_palettes(unet: nn.Module, palettes: dict[str, TrainedPalette | LutWeight]) -> dict[str, Palette]:
    """Make every palettized weight a plain parameter holding exactly `LUT[indices]` (float16 values); layer ->
    final palette."""
    out = {}
    for name, trained in palettes.items():
        layer = unet.get_submodule(name)
        out[name] = trained.palette()
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        layer.weight.requires_grad_(True)
        layer.weight.copy_(torch.from_numpy(out[name].dense().astype(np.float32)))
    return out


def param_groups(unet: nn.Module, config: QatConfig) -> list[dict]:
    """The optimizer's groups, each with its peak learning rate under "peak": every trainable parameter at
    `config.lr`, except learned LUTs (`LutWeight`), each at `config.lut_lr` times its layer's weight RMS."""
    luts = [m for m in unet.modules() if isinstance(m, LutWeight)]
    held = {id(m.lut) for m in luts}
    rest = [p for p in unet.parameters() if p.requires_grad and id(p) not in held]
    return [{"params": rest, "peak": config.lr}, *({"params": [m.lut], "peak": config.lut_lr * max(m.rms(), 1e-8)}
                                                    for m in luts)]  # fmt: skip


def master(unet: nn.Module, name: str) -> torch.Tensor:
    """The float master weight of a palettized layer."""
    return unet.get_submodule(name).parametrizations.weight.original


# --------------------------------------------------------------------------------------------- the loop

AfterStep = Callable[[int], None]  # called with the step just taken (0-based), after the optimizer step


@dataclass(frozen=True)
class FineTuning:
    """What a fine-tuning loop needs beside the model: the data and loss, the frozen text encoder and the float
    teacher (None when `distill` is 0)."""

    objective: UnetObjective
    text_encoder: nn.Module
    teacher: nn.Module | None


def fine_tune(unet: nn.Module, tuning: FineTuning, config: QatConfig, after_step: AfterStep, log: Log) -> list[float]:
    """`config.steps` AdamW steps on every trainable parameter of `unet` (learning rate `config.lr`, learned LUTs
    their own: `param_groups`; the demo's warmup and cosine decay, gradient norm clipped to 1, no weight decay);
    the loss is the demo's weighted MSE to the data's target plus `config.distill` times the same to the float
    teacher's prediction. Batch `step` is drawn from `step_generator(config.seed, QAT_STAGE, step)`. Returns the
    loss of every step."""
    from tqdm.auto import tqdm

    objective, text_encoder, teacher = tuning.objective, tuning.text_encoder, tuning.teacher
    groups = param_groups(unet, config)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    unet.train()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="palettized training", unit="step", mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * lr_factor(step, config.steps)
        batch = objective.batch(step_generator(config.seed, QAT_STAGE, step))
        pred = objective.prediction(unet, text_encoder, batch)
        loss = objective.weighted_error(pred, objective.target(batch), batch.t)
        if teacher is not None and config.distill > 0:
            with torch.no_grad():
                taught = objective.prediction(teacher, text_encoder, batch)
            loss = loss + config.distill * objective.weighted_error(pred, taught, batch.t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        after_step(step)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{recent_loss(losses):.4f}", refresh=False)
        if step % 50 == 0 or step + 1 == config.steps:
            log(f"palettized step {step:5d}/{config.steps} loss {recent_loss(losses):.4f}")
    unet.eval()
    return losses


def prepare_tuning(pipe, stage1: VaeStage, captions: list[str], train_config: TrainConfig, qat: QatConfig):
    """The `FineTuning` of `pipe` (its text encoder frozen, a float copy of its UNet as the teacher)."""
    from dataclasses import replace

    text_encoder = pipe.text_encoder.requires_grad_(False).eval()
    objective = UnetObjective(stage1, pipe.tokenizer, captions, replace(train_config, unet_batch=qat.batch))
    teacher = copy.deepcopy(pipe.unet).requires_grad_(False).eval() if qat.distill > 0 else None
    return FineTuning(objective, text_encoder, teacher)


# ------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class QatResult:
    """What a palettized fine-tuning wrote and measured.

    Attributes:
        out (`Path`): the pipeline folder (its UNet's palettized weights are exactly `LUT[indices]`).
        recipe (`Recipe`): the palettes' configs per layer (also written as `recipe.json`).
        palettes (`dict[str, Palette]`): the final palettes.
        losses (`list[float]`): the loss of every step.
        seconds (`dict[str, float]`): "encode", "train", "total".
        exact (`bool`): every palettized weight equals its `LUT[indices]` and Core ML's k-means re-fit of it.
    """

    out: Path
    recipe: Recipe
    palettes: dict[str, Palette] = field(repr=False)
    losses: list[float] = field(repr=False)
    seconds: dict[str, float]
    exact: bool

    def to_dict(self) -> dict:
        return {"out": str(self.out), "recipe": self.recipe.name, "seconds": self.seconds, "exact": self.exact,
                "losses": self.losses}  # fmt: skip


def check_exact(unet: nn.Module, palettes: dict[str, Palette]) -> bool:
    """Whether every palettized weight of `unet` is exactly its palette's `LUT[indices]`, and Core ML's k-means
    (`fit_palette`) re-fitted on that weight reproduces it (what `workbench export` stores)."""
    for name, palette in palettes.items():
        weight = unet.get_submodule(name).weight.detach().cpu()
        dense = torch.from_numpy(palette.dense().astype(np.float32))
        if not torch.equal(weight, dense):
            return False
        if not np.array_equal(fit_palette(weight, palette.config).dense(), palette.dense()):
            return False
    return True


def soft_temperature(step: int, config: QatConfig) -> float:
    """The soft assignment's temperature at `step`: with `config.anneal`, `config.temperature` falling as a half
    cosine to 0 at three quarters of the steps, then 0 (hard: the last quarter trains the palettes the package will
    hold); without, `config.temperature` throughout (the palettes are the nearest entries after the last step)."""
    if not config.anneal:
        return config.temperature
    soft_steps = max(1, (3 * config.steps) // 4)
    if step >= soft_steps:
        return 0.0
    return config.temperature * 0.5 * (1 + math.cos(math.pi * step / soft_steps))


def _ours_after_step(unet: nn.Module, palettes: dict[str, TrainedPalette], config: QatConfig) -> AfterStep:
    """After every optimizer step: with `assignment` "nearest" or "soft" the assignment step, then the centroid step
    (and the next step's temperature); the exact re-fit instead every `recluster_every` steps (not after the last:
    the model written is the one the last step trained)."""

    def after(step: int) -> None:
        refit = config.recluster_every and (step + 1) % config.recluster_every == 0 and step + 1 < config.steps
        for name, trained in palettes.items():
            weights = master(unet, name)
            if refit:
                trained.refit(weights)
                continue
            if config.assignment != "fixed":
                trained.reassign(weights)
            trained.update_lut(weights)
            trained.temperature = soft_temperature(step + 1, config)

    return after


def training_setup(pipe, train_config: TrainConfig, config: QatConfig, stage1: VaeStage | None = None):
    """What a palettized fine-tuning of `pipe` needs, ours or DKM's: the recipe `config.palettize` names, the
    dataset's latents (`stage1`, encoded here if not given) and the `FineTuning` (data, loss, teacher)."""
    recipe = qat_recipe(pipe.unet, config)
    data = make_dataset(train_config.n_images, seed=train_config.seed, image_size=train_config.image_size)
    if stage1 is None:
        stage1 = encoded_stage(pipe.vae, torch.from_numpy(data.images))
    return recipe, stage1, prepare_tuning(pipe, stage1, data.captions, train_config, config)


def train_palettized(
    pipe,
    train_config: TrainConfig,
    config: QatConfig,
    out: str | Path | None,
    *,
    stage1: VaeStage | None = None,
    log: Log = print,
) -> QatResult:
    """Fine-tune `pipe.unet` (in place) with the demo's data and loss while its weights are palettized, then write
    the pipeline folder (`out`, unless None) with `recipe.json`, `palettes.npz` (`GivenPalettes`) and `qat.json`
    beside it.

    Args:
        pipe: an SD pipeline whose VAE makes `train_config`'s latents (the demo model, a tiny test pipeline).
        train_config (`TrainConfig`): the data and loss: the base model's own (its `training.json`).
        config (`QatConfig`): what to palettize and how to train.
        out (`str` or `Path`, *optional*): the fine-tuned pipeline folder to write; None writes nothing.
        stage1 (`VaeStage`, *optional*): the dataset's latents, if already encoded (`encoded_stage`).
        log (`Callable[[str], None]`, defaults to `print`): progress lines.

    Returns:
        `QatResult`.
    """
    started = time.perf_counter()
    recipe, stage1, tuning = training_setup(pipe, train_config, config, stage1)
    trained = attach_palettes(pipe.unet, recipe, config.luts, config.assignment)
    for palette in trained.values():
        palette.temperature = soft_temperature(0, config) if config.assignment == "soft" else 0.0
    log(f"palettized {len(trained)} layers ({recipe.name}, {config.luts} LUTs); training {config.steps} steps")
    t0 = time.perf_counter()
    after = _ours_after_step(pipe.unet, trained, config) if config.luts == "centroid" else lambda step: None
    losses = fine_tune(pipe.unet, tuning, config, after, log)
    seconds = {"encode": stage1.seconds.get("encode", 0.0), "train": time.perf_counter() - t0}
    palettes = detach_palettes(pipe.unet, trained)
    exact = check_exact(pipe.unet, palettes)
    seconds["total"] = time.perf_counter() - started
    result = QatResult(Path(out) if out is not None else None, recipe, palettes, losses, seconds, exact)
    if out is not None:
        _write(pipe, result, config, train_config)
    log(f"palettized training done: exact={exact}, seconds { ({k: round(v, 1) for k, v in seconds.items()}) }")
    return result


def _write(pipe, result: QatResult, config: QatConfig, train_config: TrainConfig) -> None:
    """The pipeline folder, its recipe, its palettes (`GivenPalettes`, what `workbench export --palettes` stores as
    given) and the run's record."""
    out = result.out
    pipe.save_pretrained(out, safe_serialization=True)
    result.recipe.save(out / "recipe.json")
    GivenPalettes(result.palettes).save(out / PALETTES_FILE)
    record = {"qat": config.to_dict(), "train_config": train_config.to_dict(), **result.to_dict()}
    (out / "qat.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
