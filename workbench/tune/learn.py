"""Learned LUTs: a recipe's cluster assignments kept, its LUT values fitted to the float UNet's output.

`tune_luts` starts from the post-training palettes of a recipe (`GivenPalettes.fit`, or palettes given), keeps every
layer's indices and learns its LUT entries (`workbench.tune.luts`) with Adam, minimising the error between the
palettized UNet's prediction and the float UNet's on calibration samples of the float model's own trajectories
(`workbench.tune.calibration`). The LUTs of the lowest whole-calibration loss seen, the starting ones included, are
the result: the loss never ends above where it started. The result's `palettes` export as given
(`workbench export --palettes`) and read back bit-exact.

Example:
    >>> result = tune_luts(pipe, recipe.bits, TuneConfig(steps=300), prompts=calibration_prompts(None, 16))
    >>> result.save("tuned/", recipe_name="recipe_2.50_bit_tuned")  # palettes.npz, recipe.json, tune.json
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.analysis.config import DEFAULT_PROMPTS
from workbench.demo.world import make_dataset
from workbench.io import environment, write_json_atomic
from workbench.models.layers import gradient_checkpointing
from workbench.models.loader import is_demo_model
from workbench.palettes.given import GivenPalettes
from workbench.recipes.recipe import Recipe
from workbench.threads import release_free_heap
from workbench.tune.calibration import Calibration, record_calibration
from workbench.tune.config import TuneConfig
from workbench.tune.luts import LutWeight, learnable_luts, learned_palettes

CALIBRATION_DATA_SEED = 2  # the demo's calibration captions: not the analysis' evaluation draw (seed 1)
CALIBRATION_SEED_OFFSET = 1000  # calibration trajectories start from seeds seed + 1000 + i: not the evaluation's
PALETTES_FILE, RECIPE_FILE, RESULT_FILE = "palettes.npz", "recipe.json", "tune.json"


def calibration_prompts(model, n: int) -> list[str]:
    """`n` calibration prompts for `model` (a model spec): the demo model's, captions of its shapes world (another
    draw than the analysis' evaluation captions); another model's, the analysis' prompts, cycled."""
    if is_demo_model(model):
        return list(make_dataset(n, seed=CALIBRATION_DATA_SEED).captions)
    return [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(n)]


def _error_scale(cal: Calibration, items: torch.Tensor, loss: str) -> torch.Tensor:
    """Per sample, the factor from the prediction's error to the clean latent's (`"x0"`), else 1."""
    if loss != "x0":
        return torch.ones(len(items))
    alpha = cal.alphas_cumprod[items].clamp(1e-4, 1.0)
    if cal.prediction_type == "v_prediction":  # x0 = sqrt(a) x_t - sqrt(1 - a) v
        return (1 - alpha).sqrt()
    return ((1 - alpha) / alpha).sqrt()  # epsilon: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)


def _compared(cal: Calibration, items: torch.Tensor, output: torch.Tensor, loss: str) -> torch.Tensor:
    """What the loss compares of a (n, G, C, h, w) prediction: the guided one (scaled for `"x0"`), or both raw."""
    if loss == "output" or output.shape[1] == 1:
        compared = output if loss == "output" else output[:, 0]
    else:
        compared = output[:, 0] + cal.guidance_scale * (output[:, 1] - output[:, 0])
    scale = _error_scale(cal, items, loss).to(output.device)
    return compared * scale.view(-1, *([1] * (compared.dim() - 1)))


def sample_losses(unet, cal: Calibration, items: torch.Tensor, loss: str) -> torch.Tensor:
    """Per calibration sample of `items`, the mean squared difference between what the loss compares of the UNet's
    prediction now and of the float UNet's (`TuneConfig.loss`)."""
    args, kwargs = cal.unet_inputs(items)
    device = next(unet.parameters()).device
    args = tuple(a.to(device) for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    output = unet(*args, **kwargs)[0]
    output = output.reshape(len(items), -1, *output.shape[1:]).float()
    target = cal.target[items].to(device)
    return (_compared(cal, items, output, loss) - _compared(cal, items, target, loss)).pow(2).flatten(1).mean(1)


@torch.no_grad()
def calibration_loss(unet, cal: Calibration, loss: str, chunk: int = 16) -> float:
    """The loss over the whole calibration set (mean over samples), `chunk` samples per UNet call."""
    total = 0.0
    for items in torch.arange(cal.size).split(chunk):
        total += float(sample_losses(unet, cal, items, loss).sum())
    return total / cal.size


@dataclass(frozen=True)
class TuneResult:
    """A learned-LUT run.

    Attributes:
        palettes: the learned palettes (the start's indices, learned float16 LUTs).
        config: the settings.
        start_loss, loss: the whole calibration set's loss with the starting LUTs and with the result's.
        best_step: the step whose LUTs are the result (0: the starting ones).
        history: (step, calibration loss) at every evaluation.
        calibration_size: calibration samples; seconds: wall time (calibration recording included).
    """

    palettes: GivenPalettes
    config: TuneConfig
    start_loss: float
    loss: float
    best_step: int
    history: tuple[tuple[int, float], ...]
    calibration_size: int
    seconds: float

    @property
    def gain_db(self) -> float:
        """`10 * log10(start_loss / loss)`: how much lower the calibration loss ended, in dB."""
        return 10 * math.log10(self.start_loss / self.loss) if self.loss > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "start_loss": self.start_loss,
            "loss": self.loss,
            "gain_db": self.gain_db,
            "best_step": self.best_step,
            "history": [list(h) for h in self.history],
            "calibration_size": self.calibration_size,
            "seconds": self.seconds,
            "palettes_digest": self.palettes.digest,
        }

    def save(self, out_dir: str | os.PathLike, recipe_name: str, **record) -> Path:
        """Write `palettes.npz` (`GivenPalettes.save`), `recipe.json` (their recipe, named `recipe_name`) and
        `tune.json` (this result, `record` and the environment) into `out_dir`; returns the palettes' path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        Recipe(recipe_name, {n: c.key for n, c in self.palettes.configs.items()}).save(out / RECIPE_FILE)
        write_json_atomic(out / RESULT_FILE, {**self.to_dict(), **record, "environment": environment()})
        return self.palettes.save(out / PALETTES_FILE)


def _adam(luts: Mapping[str, LutWeight], lr: float) -> torch.optim.Adam:
    """Adam with one group per layer, its step size `lr` times the layer's weight RMS (from its palette)."""
    groups = []
    for lut in luts.values():
        groups.append({"params": [lut.lut], "lr": lr * max(lut.rms(), 1e-8)})
    return torch.optim.Adam(groups)


def _draws(size: int, batch: int, generator: torch.Generator):
    """Endless batches of calibration samples: epochs of seeded permutations, cut into `batch`es."""
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - batch + 1 if size >= batch else 1, batch):
            yield order[start : start + batch]


def _step(unet, cal: Calibration, items: torch.Tensor, config: TuneConfig, optimizer) -> float:
    """One Adam step on the batch `items`, its gradient accumulated over chunks of `config.chunk` samples."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for chunk in items.split(config.chunk or len(items)):
        loss = sample_losses(unet, cal, chunk, config.loss).sum() / len(items)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def tune_luts(
    pipe,
    recipe: Mapping | None = None,
    config: TuneConfig = TuneConfig(),
    *,
    prompts: Sequence[str] | None = None,
    start: GivenPalettes | None = None,
    calibration: Calibration | None = None,
    progress: bool = True,
) -> TuneResult:
    """Learn the LUTs of `recipe` (or of `start`) by distillation from the float UNet (module docstring).

    Args:
        pipe: a diffusers SD pipeline with its float UNet (restored exactly on return).
        recipe (`Mapping`, *optional*): layer -> width, key or `PaletteConfig`: the palettes to start from are
            fitted post-training (`GivenPalettes.fit`; data-aware keys need `start` instead).
        config (`TuneConfig`): steps, learning rate, calibration size, loss, seed.
        prompts (`Sequence[str]`, *optional*): calibration prompts (`calibration_prompts`); None = the analysis'
            prompts. Only `config.prompts` of them are used (cycled if fewer).
        start (`GivenPalettes`, *optional*): instead of `recipe`, the palettes to start from (their indices stay).
        calibration (`Calibration`, *optional*): recorded already (`record_calibration`); None = recorded here.
        progress (`bool`, defaults to True): a progress bar.

    Returns:
        `TuneResult`.
    """
    began = time.perf_counter()
    if (recipe is None) == (start is None):
        raise ValueError("pass a recipe or the palettes to start from, not both")
    unet = pipe.unet
    start = GivenPalettes.fit(unet, recipe) if start is None else start
    if calibration is None:
        prompts = list(prompts or DEFAULT_PROMPTS)
        prompts = [prompts[i % len(prompts)] for i in range(config.prompts)]
        seed = config.seed + CALIBRATION_SEED_OFFSET
        steps, resolution = config.sampling_steps, config.resolution
        calibration = record_calibration(
            pipe, prompts, timesteps=config.timesteps, seed=seed, steps=steps, resolution=resolution
        )
    generator = torch.Generator().manual_seed(config.seed)
    with gradient_checkpointing(unet, config.checkpointing), learnable_luts(unet, start) as luts:
        best, history = _optimise(unet, luts, calibration, config, generator, progress)
    (_, start_loss), (best_step, best_loss, palettes) = history[0], best
    return TuneResult(
        palettes=palettes,
        config=config,
        start_loss=start_loss,
        loss=best_loss,
        best_step=best_step,
        history=tuple(history),
        calibration_size=calibration.size,
        seconds=time.perf_counter() - began,
    )


def _optimise(unet, luts, cal: Calibration, config: TuneConfig, generator, progress: bool):
    """The Adam loop: ((best step, its loss, its palettes), [(step, calibration loss)...])."""
    from tqdm.auto import tqdm

    chunk = config.chunk or config.batch
    optimizer = _adam(luts, config.lr)
    draws = _draws(cal.size, config.batch, generator)
    loss = calibration_loss(unet, cal, config.loss, chunk)
    history, best = [(0, loss)], (0, loss, learned_palettes(luts))
    bar = tqdm(range(1, config.steps + 1), desc="tune", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        train = _step(unet, cal, next(draws), config, optimizer)
        release_free_heap()  # the step's dense weights and activations, before the next step's stack on them
        if step % config.eval_every == 0 or step == config.steps:
            loss = calibration_loss(unet, cal, config.loss, chunk)
            history.append((step, loss))
            if loss < best[1]:
                best = (step, loss, learned_palettes(luts))
            bar.set_postfix(batch=f"{train:.3g}", calibration=f"{loss:.3g}", best=f"{best[1]:.3g}")
    bar.close()
    return best, history
