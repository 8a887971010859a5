"""Calibration inputs for learned LUTs: the float UNet's own inputs and outputs along its sampling trajectories.

`record_calibration` runs the float pipeline (the workbench's seeding rule, negative prompt "", the pipeline's
guidance) on calibration prompts and keeps the UNet's calls at timesteps spread over the sampler's schedule: the
noisy latents the sampler actually visits, with their timestep, the prompt embeddings and the float UNet's output,
one sample per (prompt, timestep), its classifier-free-guidance pair together.

Example:
    >>> calibration = record_calibration(pipe, prompts, timesteps=12, seed=1000)
    >>> calibration.size   # len(prompts) * 12 samples
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from workbench.models.generation import seed_generators


@dataclass(frozen=True)
class Calibration:
    """Samples of the float UNet's calls; sample `i` is one prompt at one timestep, its CFG pair stacked on axis 1
    (unconditional first, as the pipeline batches them; a pair of 1 without guidance).

    Attributes:
        sample (`torch.Tensor`): (N, G, C, h, w) the UNet's input latents (after `scale_model_input`).
        timestep (`torch.Tensor`): (N,) the timestep of each sample.
        encoder_hidden_states (`torch.Tensor`): (N, G, L, D) the prompt embeddings.
        added_cond (`dict[str, torch.Tensor]`): SDXL's `added_cond_kwargs`, each (N, G, ...); empty for SD.
        target (`torch.Tensor`): (N, G, C, h, w) the float UNet's output.
        alphas_cumprod (`torch.Tensor`): (N,) the scheduler's cumulative alpha at each sample's timestep.
        guidance_scale (`float`): the pipeline's guidance (1.0: no CFG pair).
        prediction_type (`str`): the scheduler's (`"epsilon"` or `"v_prediction"`).
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond: dict
    target: torch.Tensor
    alphas_cumprod: torch.Tensor
    guidance_scale: float
    prediction_type: str

    @property
    def size(self) -> int:
        return int(self.sample.shape[0])

    def unet_inputs(self, items: torch.Tensor) -> tuple[tuple, dict]:
        """The UNet's positional and keyword inputs for samples `items`, their CFG pairs flattened into the batch."""
        pairs = self.sample.shape[1]
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states[items].flatten(0, 1), "return_dict": False}
        if self.added_cond:
            kwargs["added_cond_kwargs"] = {k: v[items].flatten(0, 1) for k, v in self.added_cond.items()}
        return (self.sample[items].flatten(0, 1), self.timestep[items].repeat_interleave(pairs)), kwargs


def _kept_calls(n_calls: int, timesteps: int) -> list[int]:
    """`timesteps` call indices spread evenly over a trajectory of `n_calls` calls, first and last included."""
    return sorted({int(i) for i in np.linspace(0, n_calls - 1, min(timesteps, n_calls)).round()})


@torch.no_grad()
def _record_batch(pipe, prompts: Sequence[str], seed: int, options: dict) -> list[tuple]:
    """Run the float pipeline on `prompts` (seeds `seed + i`) and return every UNet call's (args, kwargs, output)."""
    calls = []

    def hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output.sample
        calls.append((args, dict(kwargs), out.detach().clone()))

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(
            list(prompts),
            negative_prompt=[""] * len(prompts),
            generator=seed_generators(seed, len(prompts)),
            output_type="latent",
            **options,
        )
    finally:
        handle.remove()
    return calls


def _pairs(x: torch.Tensor, n: int) -> torch.Tensor:
    """A CFG batch (G*n, ...) as (n, G, ...): row g*n + p is pair member g of prompt p."""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).transpose(0, 1)


def _field(kwargs: dict, args: tuple, name: str, position: int):
    return args[position] if len(args) > position else kwargs[name]


@torch.no_grad()
def record_calibration(
    pipe,
    prompts: Sequence[str],
    *,
    timesteps: int,
    seed: int,
    steps: int | None = None,
    resolution: int | None = None,
    batch_size: int = 8,
) -> Calibration:
    """The float UNet's calls along its own sampling trajectories for `prompts`, `timesteps` calls per prompt.

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline with its float UNet.
        prompts (`Sequence[str]`): the calibration prompts; prompt `i` starts from seed `seed + i`
            (`workbench.models.generation.seed_generators`).
        timesteps (`int`): UNet calls kept per trajectory, spread evenly over it (first and last included).
        seed (`int`): the first prompt's seed.
        steps (`int`, *optional*): sampling steps; None = the pipeline's default.
        resolution (`int`, *optional*): square images of this side (pixels); None = the pipeline's default.
        batch_size (`int`, defaults to 8): prompts per pipeline run.

    Returns:
        `Calibration` of `len(prompts) * timesteps` samples (prompt-major).
    """
    parts: dict[str, list] = {k: [] for k in ("sample", "timestep", "states", "target", "added")}
    keys = []  # (prompt, kept call) of every row, in the order the rows are concatenated
    options = {} if steps is None else {"num_inference_steps": steps}
    options.update({} if resolution is None else {"height": resolution, "width": resolution})
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        calls = _record_batch(pipe, batch, seed + start, options)
        n = len(batch)
        for k, (args, kwargs, out) in enumerate(calls[i] for i in _kept_calls(len(calls), timesteps)):
            parts["sample"].append(_pairs(_field(kwargs, args, "sample", 0), n))
            t = torch.as_tensor(_field(kwargs, args, "timestep", 1)).reshape(-1)[:1].expand(n)
            parts["timestep"].append(t.clone())
            parts["states"].append(_pairs(kwargs["encoder_hidden_states"], n))
            parts["target"].append(_pairs(out, n))
            added = kwargs.get("added_cond_kwargs") or {}
            parts["added"].append({name: _pairs(v, n) for name, v in added.items()})
            keys.extend((start + p, k) for p in range(n))
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)  # prompt-major
    cat = {k: torch.cat(parts[k])[order] for k in ("sample", "timestep", "states", "target")}
    added = {k: torch.cat([a[k] for a in parts["added"]])[order] for k in parts["added"][0]}
    cumprod = pipe.scheduler.alphas_cumprod.to(torch.float32)
    return Calibration(
        sample=cat["sample"].float(),
        timestep=cat["timestep"],
        encoder_hidden_states=cat["states"],
        added_cond=added,
        target=cat["target"].float(),
        alphas_cumprod=cumprod[cat["timestep"].long().cpu()],
        guidance_scale=float(getattr(pipe, "guidance_scale", 1.0)) if cat["sample"].shape[1] == 2 else 1.0,
        prediction_type=pipe.scheduler.config.prediction_type,
    )
