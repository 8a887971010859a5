"""The mixed-bit pre-analysis: per-layer PSNR sweeps, cumulative curves, baselines and re-measured recipes.

The reference (apple/ml-stable-diffusion `mixed_bit_compression_pre_analysis.py`) runs the whole pipeline
for every measurement. Here the pipeline runs once (`OneStepProbe`): its single denoising step is recorded
(the UNet's exact inputs, the initial latents, the scheduler's state and the generator's state at the step),
and every later evaluation replays exactly that math with the UNet called directly:
`noise = unet(*inputs)`, `noise = uncond + g * (text - uncond)`, `latents = scheduler.step(noise, t, latents)`.
A test proves the replay is bitwise equal to `pipe(prompts, negative_prompt=[""]*n, num_inference_steps=1,
output_type="latent", generator=...)`.

Measurements go to an append-only JSONL store (`EvaluationStore`) keyed by a hash of everything that
determines them, so an interrupted analysis resumes where it stopped and a changed one starts afresh.

Example:
    >>> result = run_analysis(pipe, AnalysisConfig(nbits=(2, 4, 6, 8), min_numel=2048), out_dir="out")
    >>> result.to_frame().head()
    >>> result.recipes_frame()
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench.layers import compressible_layers
from workbench.metrics import psnr_per_item
from workbench.palettize import SUPPORTED_NBITS, PaletteCache, PaletteConfig, palettized
from workbench.recipes import PreAnalysis
from workbench.size import bits_per_param, size_reduction_pct

SCHEMA_VERSION = 1
STRATEGIES = ("apple", "size-aware")
THRESHOLD_RULES = ("curves", "reference")

# COCO-caption-style prompts, as the reference uses (8 prompts, CFG batch 16).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a wooden table next to a window",
    "a red double decker bus driving down a city street",
    "a plate of food with broccoli, rice and a piece of chicken",
    "a man riding a wave on top of a surfboard in the ocean",
    "a living room with a couch, a lamp and a flat screen television",
    "two giraffes standing in a grassy field under a blue sky",
    "a kitchen with white cabinets, a stove and a large window",
    "a small boat floating on a lake with mountains in the background",
)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with `torch.set_num_threads(n)`, then put the previous value back (None: leave it)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything that decides an analysis' measurements (and so its store key).

    Args:
        nbits (`tuple[int, ...]`, defaults to (1, 2, 4, 6, 8)): palette widths swept, as the reference.
        min_numel (`int`, defaults to 100,000): candidate layers have `weight.numel() > min_numel`; tiny models
            need ~2048 (coremltools' default `weight_threshold`).
        prompts (`tuple[str, ...]`, defaults to `DEFAULT_PROMPTS`): the evaluation prompts (negative prompt "").
        seed (`int`, defaults to 0): the one generator state restored before every run.
        height, width (`int`, *optional*): image size; None = the pipeline's default.
        num_recipes (`int`, defaults to 7): K, recipes per strategy (the reference's thresholds count).
        strategies (`tuple[str, ...]`, defaults to ("apple", "size-aware")): recipe strategies to run.
        threshold_rule (`str`, defaults to "curves"): "reference" = `linspace(original - 1, linear_8bit + 5, K)`
            exactly; "curves" = K thresholds read off the measured cumulative curves so that the recipes'
            bits/param spread evenly (the reference rule breaks where "original" is the ~200 dB cap of a
            deterministic device).
        group_size (`int`, defaults to 0): > 0 adds cumulative sweeps with `per_grouped_channel` palettes of
            this many output channels per LUT (ordered by the per-tensor isolated sensitivity).
        size_aware_targets (`tuple[float, ...]`, defaults to ()): extra bits/param targets for the size-aware
            strategy; it always also targets every apple recipe's bits/param.
        trajectory (`bool`, defaults to False): also generate full trajectories for every recipe and compare
            decoded images with the float model's (see `workbench.trajectory`).
        trajectory_steps (`int`, *optional*): steps of the full trajectories; None = the pipeline's default.
        trajectory_prompts (`tuple[str, ...]`, *optional*): None = `prompts`.
    """

    nbits: tuple[int, ...] = (1, 2, 4, 6, 8)
    min_numel: int = 100_000
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_recipes: int = 7
    strategies: tuple[str, ...] = STRATEGIES
    threshold_rule: str = "curves"
    group_size: int = 0
    size_aware_targets: tuple[float, ...] = ()
    trajectory: bool = False
    trajectory_steps: int | None = None
    trajectory_prompts: tuple[str, ...] | None = None

    def __post_init__(self):
        nbits = tuple(sorted({int(b) for b in self.nbits}))
        bad = [b for b in nbits if b not in SUPPORTED_NBITS]
        if bad or not nbits:
            raise ValueError(f"unsupported bit width(s) {bad or list(self.nbits)}; valid: {list(SUPPORTED_NBITS)}")
        object.__setattr__(self, "nbits", nbits)
        if self.min_numel < 0:
            raise ValueError(f"min_numel must be >= 0, got {self.min_numel}")
        prompts = tuple(str(p) for p in self.prompts)
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        object.__setattr__(self, "prompts", prompts)
        if self.num_recipes < 1:
            raise ValueError(f"num_recipes must be >= 1, got {self.num_recipes}")
        strategies = tuple(self.strategies)
        unknown = [s for s in strategies if s not in STRATEGIES]
        if unknown or not strategies:
            raise ValueError(f"unknown strategy {unknown or strategies}; valid: {', '.join(STRATEGIES)}")
        object.__setattr__(self, "strategies", strategies)
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"unknown threshold_rule {self.threshold_rule!r}; valid: {', '.join(THRESHOLD_RULES)}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per-tensor only), got {self.group_size}")
        object.__setattr__(self, "size_aware_targets", tuple(float(t) for t in self.size_aware_targets))
        if any(not 1 <= t <= 16 for t in self.size_aware_targets):
            raise ValueError(f"size_aware_targets must lie in [1, 16] bits/param, got {self.size_aware_targets}")
        if self.trajectory_prompts is not None:
            object.__setattr__(self, "trajectory_prompts", tuple(str(p) for p in self.trajectory_prompts))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> AnalysisConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown AnalysisConfig keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def read_prompts(path: str | os.PathLike) -> tuple[str, ...]:
    """Prompts from a text file, one per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(f"cannot read prompts file {str(path)!r}: {err.strerror or err}") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts (one per line)")
    return prompts


# --------------------------------------------------------------------------------------------------------------
# The one-step probe: the pipeline's single denoising step, replayed with the UNet called directly.


class OneStepProbe:
    """Record `pipe(prompts, negative_prompt=[""]*n, num_inference_steps=1, output_type="latent",
    generator=Generator().manual_seed(seed))` once, then replay its denoising step for any UNet weights.

    The recording run captures the UNet's call (positional and keyword inputs: the CFG batch after
    `scale_model_input`, the timestep, the prompt embeddings and, for SDXL, `added_cond_kwargs`), the latents
    and keyword arguments handed to `scheduler.step`, a copy of the scheduler's state and the generator's state
    just before that step. A replay calls the UNet on the same inputs, applies the pipeline's guidance
    (`uncond + guidance_scale * (text - uncond)`, and `rescale_noise_cfg` if `guidance_rescale > 0`), and
    steps a fresh copy of the recorded scheduler: the same operations on the same tensors as the pipeline.

    Attributes:
        reference (`torch.Tensor`): the recording run's output latents, (n_prompts, C, h, w).
        forward_seconds (`float`): wall time spent inside UNet calls made by `__call__` (perf_counter).
        forward_calls (`int`): number of such calls.
    """

    @torch.no_grad()
    def __init__(
        self, pipe, prompts: Sequence[str], seed: int = 0, height: int | None = None, width: int | None = None
    ):
        self.pipe = pipe
        self.prompts = list(prompts)
        self.seed = seed
        self.device = pipe.unet.device
        captured: dict = {}

        def unet_hook(module, args, kwargs):
            captured.setdefault("unet", (args, dict(kwargs)))

        scheduler = pipe.scheduler
        original_step = scheduler.step

        @functools.wraps(original_step)  # keeps the signature the pipeline inspects for eta/generator
        def step(model_output, timestep, sample, *args, **kwargs):
            if "step" not in captured:
                generator = kwargs.get("generator")
                state = copy.deepcopy(scheduler)
                state.__dict__.pop("step", None)  # the copy must not carry this wrapper (bound to the original)
                captured["step"] = {
                    "scheduler": state,
                    "timestep": timestep,
                    "sample": sample.clone(),
                    "args": args,
                    "kwargs": {k: v for k, v in kwargs.items() if k != "generator"},
                    "generator_state": None if generator is None else generator.get_state(),
                }
            return original_step(model_output, timestep, sample, *args, **kwargs)

        handle = pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)
        scheduler.step = step
        try:
            self.reference = self.run_pipeline(height=height, width=width)
        finally:
            handle.remove()
            del scheduler.step  # drop the instance attribute: the class method is back
        if "unet" not in captured or "step" not in captured:
            raise RuntimeError(f"{type(pipe).__name__} did not call its UNet and scheduler.step once; cannot probe it")
        self._unet_args, self._unet_kwargs = captured["unet"]
        self._step = captured["step"]
        self.guidance_scale = float(getattr(pipe, "guidance_scale", 1.0))
        self.guidance_rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
        self.do_cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        self.height, self.width = height, width
        self.forward_seconds = 0.0
        self.forward_calls = 0

    def run_pipeline(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The reference's run: the full pipeline call, one step, latent output, fixed generator state."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        kwargs = {} if height is None else {"height": height}
        if width is not None:
            kwargs["width"] = width
        out = self.pipe(
            self.prompts,
            negative_prompt=[""] * len(self.prompts),
            num_inference_steps=1,
            output_type="latent",
            generator=generator,
            **kwargs,
        )
        return out.images

    @property
    def unet_batch(self) -> int:
        return int(self._unet_args[0].shape[0]) if self._unet_args else int(self._unet_kwargs["sample"].shape[0])

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        """The step's output latents with the UNet's current weights; only the UNet call is timed."""
        unet = self.pipe.unet
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        noise = unet(*self._unet_args, **self._unet_kwargs)[0]
        synchronize()
        self.forward_seconds += time.perf_counter() - start
        self.forward_calls += 1
        if self.do_cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + self.guidance_scale * (text - uncond)
            if self.guidance_rescale > 0.0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                noise = rescale_noise_cfg(noise, text, guidance_rescale=self.guidance_rescale)
        step = self._step
        scheduler = copy.deepcopy(step["scheduler"])
        kwargs = {**step["kwargs"], "return_dict": False}
        if step["generator_state"] is not None:
            kwargs["generator"] = torch.Generator(device=self.device)
            kwargs["generator"].set_state(step["generator_state"])
        return scheduler.step(noise, step["timestep"], step["sample"], *step["args"], **kwargs)[0]

    def psnr(self, latents: torch.Tensor | None = None) -> list[float]:
        """Reference PSNR (rounded to 0.1 dB) of each prompt's latent against the float model's."""
        test = self() if latents is None else latents
        return psnr_per_item(self.reference, test)


# --------------------------------------------------------------------------------------------------------------
# Identity and the resumable store.


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 over the modules' parameter and buffer names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_version(pipe) -> str:
    """The pipeline's hub id or path (`name_or_path`), or its class name for an in-memory pipeline."""
    name = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return str(name) if name else type(pipe).__name__


def analysis_identity(pipe, config: AnalysisConfig, probe: OneStepProbe | None = None) -> dict:
    """Everything a measurement depends on: config, model (incl. a weights fingerprint), scheduler, device."""
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
    return {
        "schema": SCHEMA_VERSION,
        "config": config.to_dict(),
        "model_version": model_version(pipe),
        "pipeline_class": type(pipe).__name__,
        "weights": weights_fingerprint(pipe.unet, *encoders),
        "scheduler": {"class": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)},
        "dtype": str(pipe.unet.dtype),
        "device": pipe.unet.device.type,
        "latent_shape": None if probe is None else list(probe.reference.shape),
    }


def identity_key(identity: Mapping) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


class StoreMismatchError(ValueError):
    """A store file that belongs to another configuration."""


class EvaluationStore:
    """Append-only JSONL of finished evaluations for one analysis identity.

    Line 1 is a header `{"store": key, "identity": {...}}`; each later line one evaluation record, written
    with flush + fsync as soon as it is measured. A truncated last line (a kill mid-write) is dropped on open.
    A file whose header key differs raises `StoreMismatchError`: stale results are never reused.
    """

    def __init__(self, path: str | os.PathLike, identity: Mapping, resume: bool = True):
        self.path = Path(path)
        self.key = identity_key(identity)
        self.records: dict[str, dict] = {}
        self.complete = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and resume:
            self._load()
        else:
            self._write_lines([{"store": self.key, "identity": identity}], mode="w")

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
        lines = raw[:good_end].decode("utf-8").splitlines()
        if not lines:
            raise StoreMismatchError(f"{self.path} has no header line; delete it or pass resume=False")
        header = json.loads(lines[0])
        if header.get("store") != self.key:
            raise StoreMismatchError(
                f"{self.path} was written for another configuration (key {str(header.get('store'))[:12]}, "
                f"this run {self.key[:12]}); use another output folder or run without resume"
            )
        for line in lines[1:]:
            record = json.loads(line)
            if record.get("event") == "complete":
                self.complete = True
            elif "id" in record:
                self.records[record["id"]] = record
        if good_end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def _write_lines(self, records: list[dict], mode: str = "a") -> None:
        with open(self.path, mode, encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __contains__(self, eval_id: str) -> bool:
        return eval_id in self.records

    def get(self, eval_id: str) -> dict | None:
        return self.records.get(eval_id)

    def append(self, record: dict) -> None:
        self._write_lines([record])
        self.records[record["id"]] = record

    def mark_complete(self) -> None:
        if not self.complete:
            self._write_lines([{"event": "complete"}])
            self.complete = True


# --------------------------------------------------------------------------------------------------------------
# Results.


@dataclass(frozen=True)
class Evaluation:
    """One measured state of the UNet.

    Attributes:
        id: unique within an analysis, e.g. `isolated/kmeans4/<layer>` or `recipe/<name>`.
        kind: "baseline", "isolated", "cumulative", "recipe" or "trajectory".
        psnr: the reference's latent PSNR per prompt (rounded to 0.1 dB); for "trajectory", image PSNR.
        config: palette key (`kmeans4`, `kmeans4_g16`) for sweeps, the baseline's name, or the strategy.
        nbits, layer, position: what a sweep point palettized (position = index in the cumulative order).
        recipe, bits_per_param: for recipes and baselines.
        extra: other measured values (SSIM, adherence, thresholds, targets).
        forward_s: seconds inside UNet forward for this evaluation (0 when read back from a store by a later run).
    """

    id: str
    kind: str
    psnr: tuple[float, ...]
    config: str = ""
    nbits: int | None = None
    layer: str | None = None
    position: int | None = None
    recipe: str | None = None
    bits_per_param: float | None = None
    extra: dict = field(default_factory=dict)
    forward_s: float = 0.0

    @property
    def psnr_mean(self) -> float:
        return float(np.mean(self.psnr))

    def to_record(self) -> dict:
        d = asdict(self)
        d["psnr"] = list(self.psnr)
        return d

    @classmethod
    def from_record(cls, d: Mapping) -> Evaluation:
        return cls(**{**d, "psnr": tuple(d["psnr"])})


@dataclass(frozen=True)
class RecipeResult:
    """A recipe a strategy produced, with its end-to-end measurement."""

    name: str
    strategy: str
    bits: dict
    bits_per_param: float
    psnr: tuple[float, ...]
    selector: float  # the threshold (apple) or the bits/param target (size-aware)
    predicted_psnr: float | None = None

    @property
    def psnr_mean(self) -> float:
        return float(np.mean(self.psnr))

    @property
    def size_reduction_pct(self) -> float:
        return size_reduction_pct(self.bits_per_param)


@dataclass
class AnalysisResult:
    """What `run_analysis` measured and decided.

    Attributes:
        config, identity: the inputs (identity holds the store key's ingredients).
        layers: candidate layer -> numel, in module order.
        evaluations: every evaluation, in the order they were planned.
        recipes: the strategies' recipes with their end-to-end PSNR.
        preanalysis: the reference-format JSON content (`PreAnalysis`).
        timing: {"wall_s", "forward_s", "unet_evaluations", "new_evaluations", "kmeans_fits", "overhead"}.
        trajectory: `workbench.trajectory.TrajectoryResult` list (empty unless `config.trajectory`).
    """

    config: AnalysisConfig
    identity: dict
    layers: dict
    evaluations: list[Evaluation]
    recipes: list[RecipeResult]
    preanalysis: PreAnalysis
    timing: dict
    trajectory: list = field(default_factory=list)

    def baseline(self, name: str) -> float:
        return self.preanalysis.baselines[name]

    def to_frame(self):
        """Tidy table, one row per evaluation: kind, config, nbits, layer, position, recipe, bits_per_param,
        size_reduction_pct, psnr_mean, psnr_min, psnr (per prompt, ';'-joined), forward_s, extras."""
        import pandas as pd

        rows = []
        for e in self.evaluations:
            row = {
                "id": e.id,
                "kind": e.kind,
                "config": e.config,
                "nbits": e.nbits,
                "layer": e.layer,
                "position": e.position,
                "recipe": e.recipe,
                "bits_per_param": e.bits_per_param,
                "size_reduction_pct": None if e.bits_per_param is None else size_reduction_pct(e.bits_per_param),
                "psnr_mean": e.psnr_mean,
                "psnr_min": min(e.psnr),
                "psnr": ";".join(f"{p:g}" for p in e.psnr),
                "forward_s": e.forward_s,
            }
            row.update({k: v for k, v in e.extra.items() if not isinstance(v, (list, dict))})
            rows.append(row)
        return pd.DataFrame(rows)

    def recipes_frame(self):
        """One row per recipe: name, strategy, bits_per_param, size_reduction_pct, psnr_mean, selector."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "name": r.name,
                    "strategy": r.strategy,
                    "bits_per_param": r.bits_per_param,
                    "size_reduction_pct": r.size_reduction_pct,
                    "psnr_mean": r.psnr_mean,
                    "predicted_psnr": r.predicted_psnr,
                    "selector": r.selector,
                }
                for r in self.recipes
            ]
        )

    def curves(self) -> dict[str, list[tuple[float, float]]]:
        """Cumulative curves for the plot: palette key -> [(size_reduction_pct, psnr_mean)] per addition.

        x is the candidates' bits/param with the first k layers palettized (the rest float16): per-tensor LUT
        cost is ignored as the reference does; grouped curves include their LUTs' bits.
        """
        total = sum(self.layers.values())
        out: dict[str, list[tuple[float, float]]] = {}
        for e in self.evaluations:
            if e.kind == "cumulative":
                out.setdefault(e.config, []).append((size_reduction_pct(e.bits_per_param), e.psnr_mean))
        return out if total else {}

    def matched_comparison(self) -> list[dict]:
        """For every apple recipe, the best size-aware recipe at equal or smaller bits/param (+1e-9)."""
        apple = [r for r in self.recipes if r.strategy == "apple" and r.bits_per_param < 16]
        ours = [r for r in self.recipes if r.strategy == "size-aware"]
        rows = []
        for ref in apple:
            fits = [r for r in ours if r.bits_per_param <= ref.bits_per_param + 1e-9]
            if not fits:
                continue
            best = max(fits, key=lambda r: (r.psnr_mean, r.bits_per_param))
            rows.append(
                {
                    "reference": ref.name,
                    "reference_bpp": ref.bits_per_param,
                    "reference_psnr": ref.psnr_mean,
                    "ours": best.name,
                    "ours_bpp": best.bits_per_param,
                    "ours_psnr": best.psnr_mean,
                    "gain_db": best.psnr_mean - ref.psnr_mean,
                }
            )
        return rows

    def save(self, out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
        """Write `preanalysis.json` (reference format), `evaluations.csv`, `recipes.csv`, `run.json` (config,
        identity, environment, timing, matched comparison) and `psnr_vs_size.png`, each atomically."""
        from workbench.io import environment, write_json_atomic, write_text_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": self.preanalysis.save(out / "preanalysis.json"),
            "csv": write_text_atomic(out / "evaluations.csv", self.to_frame().to_csv(index=False)),
            "recipes_csv": write_text_atomic(out / "recipes.csv", self.recipes_frame().to_csv(index=False)),
        }
        if self.trajectory:
            import pandas as pd

            frame = pd.concat([t.to_frame() for t in self.trajectory], ignore_index=True)
            paths["trajectory_csv"] = write_text_atomic(out / "trajectory.csv", frame.to_csv(index=False))
        run = {
            "config": self.config.to_dict(),
            "identity": self.identity,
            "store_key": identity_key(self.identity),
            "environment": environment(),
            "timing": self.timing,
            "matched_comparison": self.matched_comparison(),
        }
        paths["run"] = write_json_atomic(out / "run.json", run)
        if plot:
            paths["png"] = _save_figure(out / "psnr_vs_size.png", self)
        return paths


def _save_figure(path: Path, result: AnalysisResult) -> Path:
    import matplotlib.pyplot as plt  # the backend is the caller's (headless: matplotlib falls back to Agg)

    from workbench.plots import plot_psnr_vs_size

    fig = plot_psnr_vs_size(result)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------------------
# The analysis.


def _linear8_recipe(unet: torch.nn.Module) -> dict[str, str]:
    """Per-tensor int8 on every module that has a weight tensor (norms included), as the reference."""
    return {
        name: "linear8"
        for name, module in unet.named_modules()
        if name and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.numel() > 0
    }


def _linear8_per_channel_recipe(unet: torch.nn.Module) -> dict[str, str]:
    """Per-channel int8 on every Linear and Conv2d layer (the stronger baseline)."""
    return {
        name: "linear8_per_channel"
        for name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def _bits_hash(bits: Mapping[str, int]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(bits.items()))).encode()).hexdigest()[:10]


class _Runner:
    """Looks an evaluation up in the store or measures it, and keeps the progress bar and counters."""

    def __init__(self, probe, store, progress, callback):
        self.probe, self.store, self.callback = probe, store, callback
        self.evaluations: list[Evaluation] = []
        self.new = 0
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc="analysis", unit="eval", dynamic_ncols=True)

    def plan(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def measure(self, eval_id: str, kind: str, measure: Callable[[], list[float]] | None = None, **fields):
        record = None if self.store is None else self.store.get(eval_id)
        if record is None:
            before = self.probe.forward_seconds
            measured = measure() if measure is not None else self.probe.psnr()
            if isinstance(measured, dict):  # {"psnr": [...], "extra": {...}} from richer measurements
                fields = {**fields, "extra": {**fields.get("extra", {}), **measured["extra"]}}
                measured = measured["psnr"]
            record = Evaluation(
                id=eval_id, kind=kind, psnr=tuple(measured), forward_s=self.probe.forward_seconds - before, **fields
            ).to_record()
            if self.store is not None:
                self.store.append(record)
            self.new += 1
            evaluation = Evaluation.from_record(record)
            if self.callback is not None:
                self.callback(evaluation)
        else:
            evaluation = Evaluation.from_record({**record, "forward_s": 0.0})
        self.evaluations.append(evaluation)
        if self.bar is not None:
            self.bar.update(1)
        return evaluation

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _mean(values) -> float:
    return float(np.mean(values))


@torch.no_grad()
def run_analysis(
    pipe,
    config: AnalysisConfig = AnalysisConfig(),
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[Evaluation], None] | None = None,
    cache: PaletteCache | None = None,
    background_fits: bool | None = None,
) -> AnalysisResult:
    """Run the pre-analysis on `pipe` (any diffusers text-to-image pipeline with a UNet, SD-1.x/2.x or SDXL).

    Steps: probe the one-step pipeline; baselines (original, linear 8-bit per tensor on every weight,
    per-channel int8); isolated sweep (each candidate alone, per bit width); cumulative sweep per bit width
    (least sensitive first, no restore between additions); optional grouped-palette cumulative sweeps;
    recipes per strategy, each re-measured end to end; optional full-trajectory comparison. With `out_dir`,
    every finished evaluation is appended to `out_dir/store/<key>.jsonl` first (resumable), and the final
    files are written only at the end (`AnalysisResult.save`).

    Args:
        pipe: the pipeline; its UNet is palettized in place during evaluations and restored exactly.
        config (`AnalysisConfig`): what to measure.
        out_dir (`str` or `os.PathLike`, *optional*): where the store and the results go; None keeps it in memory.
        resume (`bool`, defaults to True): reuse a store with the same key; False starts it afresh.
        progress (`bool`, defaults to True): a tqdm bar (notebook-aware) with done/left and ETA.
        callback (`Callable[[Evaluation], None]`, *optional*): called after each newly measured evaluation.
        cache (`PaletteCache`, *optional*): palettes to reuse (k-means runs once per layer and config).
        background_fits (`bool`, *optional*): fit the sweep's palettes in a background thread while the UNet
            runs (`PaletteCache.prefetch`); same results. Default: when torch leaves a CPU core free.

    Returns:
        `AnalysisResult`.

    Raises:
        ValueError: no candidate layers at `config.min_numel`, or a group size that does not divide a layer.
    """
    from workbench import allocation

    start = time.perf_counter()
    unet = pipe.unet
    layers = compressible_layers(unet, config.min_numel)
    if not layers:
        raise ValueError(
            f"no Linear/Conv2d layer of the UNet has more than min_numel={config.min_numel} weights; lower it "
            f"(the largest layer has {max(m.weight.numel() for m in compressible_layers(unet, 0).values())})"
        )
    if config.group_size:
        bad = [n for n, m in layers.items() if m.weight.shape[0] % config.group_size]
        if bad:
            raise ValueError(f"group_size={config.group_size} does not divide the output channels of {bad[:3]}")
    numels = {name: layer.weight.numel() for name, layer in layers.items()}
    total = sum(numels.values())
    cache = cache if cache is not None else PaletteCache()

    probe = OneStepProbe(pipe, config.prompts, config.seed, config.height, config.width)
    identity = analysis_identity(pipe, config, probe)
    store = None
    if out_dir is not None:
        store_path = Path(out_dir) / "store" / f"{identity_key(identity)[:16]}.jsonl"
        store = EvaluationStore(store_path, identity, resume=resume)
    runner = _Runner(probe, store, progress, callback)
    widths = config.nbits
    runner.plan(3 + 2 * len(widths) * len(layers) + (len(widths) * len(layers) if config.group_size else 0))

    try:
        # Baselines.
        original = runner.measure("baseline/original", "baseline", config="original", bits_per_param=16.0)
        with palettized(unet, _linear8_recipe(unet)):
            lin8 = runner.measure("baseline/linear_8bit", "baseline", config="linear_8bit", bits_per_param=8.0)
        with palettized(unet, _linear8_per_channel_recipe(unet)):
            lin8c = runner.measure(
                "baseline/linear_8bit_per_channel", "baseline", config="linear_8bit_per_channel", bits_per_param=8.0
            )

        if background_fits is None:
            background_fits = torch.get_num_threads() < (os.cpu_count() or 1)
        if background_fits:  # widest (slowest k-means) first, while the sweep below starts at the narrowest
            descending = sorted(widths, reverse=True)
            jobs = [(name, layers[name].weight, PaletteConfig(nbits=b)) for b in descending for name in layers]
            if config.group_size:
                grouped = {"granularity": "per_grouped_channel", "group_size": config.group_size}
                jobs += [(n, layers[n].weight, PaletteConfig(nbits=b, **grouped)) for b in descending for n in layers]
            cache.prefetch(jobs)

        # Isolated sweep: one layer at a time, restored after each.
        isolated: dict[int, dict[str, tuple[float, ...]]] = {}
        for b in widths:
            cfg = PaletteConfig(nbits=b)
            isolated[b] = {}
            for name in layers:
                bpp = (16 * total - (16 - b) * numels[name]) / total
                with palettized(unet, {name: cfg}, cache):
                    e = runner.measure(
                        f"isolated/{cfg.key}/{name}", "isolated", config=cfg.key, nbits=b, layer=name,
                        bits_per_param=bpp,
                    )  # fmt: skip
                isolated[b][name] = e.psnr

        # Cumulative sweeps: least sensitive first (highest isolated PSNR; module order breaks ties).
        order = {b: sorted(layers, key=lambda n, b=b: -_mean(isolated[b][n])) for b in widths}
        cumulative: dict[int, dict[str, tuple[float, ...]]] = {}
        sweeps = [(b, PaletteConfig(nbits=b)) for b in widths]
        if config.group_size:
            sweeps += [
                (b, PaletteConfig(nbits=b, granularity="per_grouped_channel", group_size=config.group_size))
                for b in widths
            ]
        for b, cfg in sweeps:
            curve = {}
            bits_sum = 16 * total
            with contextlib.ExitStack() as stack:
                for position, name in enumerate(order[b]):
                    stack.enter_context(palettized(unet, {name: cfg}, cache))  # no restore until the curve ends
                    lut_bits = 0
                    if cfg.granularity == "per_grouped_channel":
                        lut_bits = (layers[name].weight.shape[0] // cfg.group_size) * (1 << b) * 16
                    bits_sum -= (16 - b) * numels[name] - lut_bits
                    e = runner.measure(
                        f"cumulative/{cfg.key}/{position}/{name}", "cumulative", config=cfg.key, nbits=b,
                        layer=name, position=position, bits_per_param=bits_sum / total,
                    )  # fmt: skip
                    curve[name] = e.psnr
            if cfg.granularity == "per_tensor":
                cumulative[b] = curve

        # Recipes.
        measurements = allocation.Measurements(
            numels=numels,
            isolated={b: {n: list(v) for n, v in d.items()} for b, d in isolated.items()},
            cumulative={b: {n: list(v) for n, v in d.items()} for b, d in cumulative.items()},
            original=original.psnr_mean,
            linear_8bit=lin8.psnr_mean,
        )
        planned: list[tuple[str, str, dict, float, float | None]] = []
        if "apple" in config.strategies:
            for r in allocation.threshold_recipes(measurements, config.num_recipes, rule=config.threshold_rule):
                planned.append((r.name, "apple", r.bits, r.threshold, None))
        if "size-aware" in config.strategies:
            targets = sorted({round(bits_per_param(p[2], numels), 6) for p in planned})
            targets = [t for t in targets if t < 16] + list(config.size_aware_targets)
            if not targets:
                targets = list(np.linspace(3.0, 6.0, config.num_recipes))
            for r in allocation.size_aware_recipes(measurements, targets):
                planned.append((r.name, "size-aware", r.bits, r.target, r.predicted_psnr))
        runner.plan(len(planned))
        recipes: list[RecipeResult] = []
        for name, strategy, bits, selector, predicted in planned:
            bpp = bits_per_param(bits, numels)
            with palettized(unet, bits, cache):
                e = runner.measure(
                    f"recipe/{name}/{_bits_hash(bits)}", "recipe", config=strategy, recipe=name, bits_per_param=bpp,
                    extra={"selector": selector},
                )  # fmt: skip
            recipes.append(RecipeResult(name, strategy, bits, bpp, e.psnr, selector, predicted))

        # Full trajectories (optional).
        trajectory = []
        if config.trajectory:
            from workbench.trajectory import evaluate_trajectories

            prompts = config.trajectory_prompts or config.prompts
            runner.plan(1 + len(recipes))
            trajectory = evaluate_trajectories(
                pipe,
                {r.name: r.bits for r in recipes},
                prompts,
                seed=config.seed,
                num_inference_steps=config.trajectory_steps,
                height=config.height,
                width=config.width,
                cache=cache,
                runner=runner,
            )
    finally:
        runner.close()
        cache.close()  # stops background fits; the fitted palettes stay cached

    preanalysis = PreAnalysis(
        model_version=model_version(pipe),
        single_layer={str(b): {n: list(v) for n, v in d.items()} for b, d in isolated.items()},
        cumulative={
            str(b): {"metadata": {"sorted_layers": list(order[b])}, **{n: list(v) for n, v in d.items()}}
            for b, d in cumulative.items()
        },
        baselines={
            "original": original.psnr_mean,
            "linear_8bit": lin8.psnr_mean,
            "linear_8bit_per_channel": lin8c.psnr_mean,
            **{r.name: r.psnr_mean for r in recipes},
        },
        recipes={r.name: dict(r.bits) for r in recipes},
        _order=("model_version", "single_layer", "cumulative", "baselines", "recipes"),
    )
    wall = time.perf_counter() - start
    timing = {
        "wall_s": wall,
        "forward_s": probe.forward_seconds,
        "unet_evaluations": probe.forward_calls,
        "new_evaluations": runner.new,
        "evaluations": len(runner.evaluations),
        "kmeans_fits": cache.fits,
        "overhead": wall / probe.forward_seconds if probe.forward_seconds else math.nan,
        "unet_batch": probe.unet_batch,
    }
    result = AnalysisResult(
        config, identity, dict(numels), runner.evaluations, recipes, preanalysis, timing, trajectory
    )
    if out_dir is not None:
        result.save(out_dir)
        store.mark_complete()
    return result

