"""A learned-LUT run's settings (`TuneConfig`), checked when built. No torch here: the command line checks a config
before it imports the tuning code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from workbench.errors import InvalidValueError

LOSSES = ("guided", "x0", "output")


@dataclass(frozen=True)
class TuneConfig:
    """How LUTs are learned by distillation (`workbench.tune.learn.tune_luts`). Frozen; `to_dict`/`from_dict`
    round-trip through JSON.

    Args:
        steps (`int`, defaults to 300): Adam steps on the LUT entries.
        lr (`float`, defaults to 0.01): Adam's step size, relative to each layer's weight RMS (a LUT entry moves
            by about `lr * rms` a step whatever the layer's scale).
        prompts (`int`, defaults to 16): calibration prompts (the demo model: captions of its shapes world, another
            draw than the evaluation's; another model: the analysis' prompts, cycled).
        timesteps (`int`, defaults to 12): calibration timesteps per prompt, spread over the sampler's schedule:
            the float model's own trajectory is recorded and every `sampling_steps / timesteps`-th UNet call kept.
        sampling_steps (`int`, *optional*): the calibration trajectories' steps; None = the pipeline's default.
        resolution (`int`, *optional*): the calibration images' side in pixels; None = the pipeline's default.
        batch (`int`, defaults to 16): calibration samples (one prompt at one timestep, its CFG pair) per step.
        chunk (`int`, *optional*): samples per forward/backward pass (gradients accumulated): memory follows it;
            None = the whole batch at once.
        loss (`str`, defaults to `"guided"`): what is compared with the float UNet's: `"guided"` the CFG-guided
            prediction the sampler steps with, `"x0"` the clean latent that prediction implies (the guided error
            weighted by the noise level), `"output"` the raw conditional and unconditional outputs.
        eval_every (`int`, defaults to 25): steps between evaluations of the whole calibration set's loss; the best
            LUTs seen (the starting ones included) are the result, so the loss never ends above the start.
        seed (`int`, defaults to 0): the calibration trajectories' seeds (prompt `i` from `seed + 1000 + i`) and the
            batch draws (a seeded `torch.Generator`): the same seed, the same LUTs.
        checkpointing (`bool`, defaults to False): the UNet's gradient checkpointing (diffusers'), for large UNets.
    """

    steps: int = 300
    lr: float = 0.01
    prompts: int = 16
    timesteps: int = 12
    sampling_steps: int | None = None
    resolution: int | None = None
    batch: int = 16
    chunk: int | None = None
    loss: str = "guided"
    eval_every: int = 25
    seed: int = 0
    checkpointing: bool = False

    def __post_init__(self):
        for name in ("steps", "prompts", "timesteps", "batch", "eval_every"):
            _check_int(name, getattr(self, name), 0 if name == "steps" else 1)
        for name in ("sampling_steps", "resolution", "chunk"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise InvalidValueError(f"lr={self.lr!r} must be a number in (0, 1)")
        if self.loss not in LOSSES:
            raise InvalidValueError(f"loss={self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.sampling_steps is not None and self.timesteps > self.sampling_steps:
            raise InvalidValueError(f"timesteps={self.timesteps} is more than sampling_steps={self.sampling_steps}")
        if not isinstance(self.checkpointing, bool):
            raise InvalidValueError(f"checkpointing={self.checkpointing!r} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TuneConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidValueError(f"unknown tune settings {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return cls(**d)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidValueError(f"{name}={value!r} must be an integer >= {low}")
