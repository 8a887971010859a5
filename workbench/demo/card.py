"""The model card of a trained demo model: measure the folder as a user would load it, then write README.md.

`document(out)` loads the pipeline folder, runs the prompt-adherence benchmark, saves the benchmark images as
`sample_grid.png` (`adherence_grid`), scores the VAE round trip and the scorer itself on held-out clean images
(`measure`), and renders the card from these numbers and the folder's training.json (`render_card`, one function
per section). `workbench train --card-only` (or `python -m workbench.demo.train --card-only`) rewrites the card of
an existing folder.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.demo.adherence import AdherenceReport, benchmark_attributes, generate_and_score, score_adherence
from workbench.demo.config import TrainConfig, TrainResult
from workbench.demo.stages import Log, to_model_input
from workbench.demo.world import make_dataset
from workbench.models.loader import load_pipeline
from workbench.threads import torch_threads
from workbench.viz.grids import image_grid

PIPELINE_DEFAULT_STEPS = 50  # StableDiffusionPipeline.__call__'s default num_inference_steps
PIPELINE_DEFAULT_GUIDANCE = 7.5
ADHERENCE_TARGETS = {"color": 0.90, "shape": 0.70, "position": 0.80}  # what the demo model was trained for
HELD_OUT_SEED = 12345  # dataset seed of the held-out images (training uses TrainConfig.seed, 0)

_POSITION_ABBREVIATIONS = {"top left": "TL", "top": "T", "top right": "TR", "left": "L", "center": "C"}
_POSITION_ABBREVIATIONS.update({"right": "R", "bottom left": "BL", "bottom": "B", "bottom right": "BR"})


def adherence_grid(report: AdherenceReport, columns: int = 8, cell_size: int = 112):
    """The images of an `AdherenceReport` as a PIL grid, each captioned with its prompt (short form) and a
    `!` where the scorer found the wrong colour, shape or position."""
    if report.images is None:
        raise ValueError(
            "this AdherenceReport has no images; make it with workbench.demo.adherence.generate_and_score"
        )
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


# ----------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class CardMeasurements:
    """What the card reports about a trained pipeline.

    Args:
        report (`AdherenceReport`): the benchmark, with its images.
        seconds (`float`): the benchmark's wall time.
        round_trip (`AdherenceReport`): VAE reconstructions of 256 held-out images (the latent model's ceiling).
        scorer (`AdherenceReport`): the scorer on 1000 held-out clean images.
    """

    report: AdherenceReport
    seconds: float
    round_trip: AdherenceReport
    scorer: AdherenceReport


@torch.no_grad()
def _vae_round_trip(pipe, n: int = 256, seed: int = HELD_OUT_SEED) -> AdherenceReport:
    """Score VAE reconstructions of held-out images: the best adherence the latent model could reach."""
    data = make_dataset(n, seed=seed)
    x = to_model_input(torch.from_numpy(data.images), pipe.device)
    recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return score_adherence(images, data.attributes)


def _scorer_on_clean_images(n: int = 1000, seed: int = HELD_OUT_SEED) -> AdherenceReport:
    """The scorer on rendered (not generated) held-out images: how often the scorer itself is wrong."""
    held_out = make_dataset(n, seed=seed)
    return score_adherence(held_out.images, held_out.attributes)


def measure(pipe, n_images: int = 64, log: Log = print) -> CardMeasurements:
    """Run the card's measurements on a loaded pipeline (pipeline defaults, image i from seed i).

    Args:
        pipe: the trained `StableDiffusionPipeline`.
        n_images (`int`, defaults to 64): benchmark prompts (`benchmark_attributes(n_images)`).
        log (`Callable[[str], None]`, defaults to `print`): progress lines.

    Returns:
        `CardMeasurements`.
    """
    t0 = time.perf_counter()
    report = generate_and_score(pipe, benchmark_attributes(n_images), seed=0)
    seconds = time.perf_counter() - t0
    log(f"benchmark: {report.summary()} ({seconds:.0f}s)")
    return CardMeasurements(report, seconds, _vae_round_trip(pipe), _scorer_on_clean_images())


def _folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


# ------------------------------------------------------------------------------------- card sections


def _intro_section(pipe) -> str:
    """Title, what the model is, how to load it, and the pipeline's defaults."""
    return f"""# tiny-shapes: a small trained text-to-image latent diffusion model

A Stable Diffusion-style pipeline (CLIP tokenizer and text encoder, `AutoencoderKL`, `UNet2DConditionModel`
with cross-attention, a diffusers scheduler) trained in-house, on a CPU, on the procedural shapes world of
`workbench/demo/world.py`: one flat-coloured circle, square or triangle on a dark grey background, in one of 6
colours, 9 grid positions and 2 sizes. It draws what a caption such as "a small red circle at the top left"
asks for, so a compressed copy can be checked for *prompt adherence*, not only PSNR. Not an image model for
any other use.

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("data/tiny-shapes")  # float32, offline
image = pipe("a large blue triangle at the bottom right", generator=torch.Generator().manual_seed(0)).images[0]
# or: workbench.models.load_pipeline("data/tiny-shapes")
```

Defaults are the pipeline's: {PIPELINE_DEFAULT_STEPS} {type(pipe.scheduler).__name__} steps, \
guidance {PIPELINE_DEFAULT_GUIDANCE}, 64x64 images
(`unet.config.sample_size` {pipe.unet.config.sample_size} x VAE factor {pipe.vae_scale_factor})."""


def _targets_text(report: AdherenceReport) -> str:
    """'color 0.969 meets >= 0.90, shape ...' for each of `ADHERENCE_TARGETS`."""
    parts = []
    for name, floor in ADHERENCE_TARGETS.items():
        value = getattr(report, f"{name}_adherence")
        parts.append(f"{name} {value:.3f} {'meets' if value >= floor else '**misses**'} >= {floor:.2f}")
    return ", ".join(parts)


def _confusion_text(wrong_shape) -> str:
    """Wrong shapes by kind, most frequent first: 'square read as circle: 22; ...', or 'none'."""
    confusions = (wrong_shape["shape"] + " read as " + wrong_shape["read_shape"].fillna("nothing")).value_counts()
    return "; ".join(f"{pair}: {count}" for pair, count in confusions.items()) or "none"


def _adherence_row(label: str, attribute: str, reports: tuple[AdherenceReport, ...]) -> str:
    return f"| {label} | " + " | ".join(f"{getattr(r, attribute + '_adherence'):.3f}" for r in reports) + " |"


def _quality_section(measured: CardMeasurements, threads: int) -> str:
    """The adherence table (benchmark, VAE ceiling, scorer), the benchmark's time and the targets."""
    report, n_images = measured.report, len(measured.report.expected)
    reports = (report, measured.round_trip, measured.scorer)
    labels = {"color": "colour", "shape": "shape", "position": "position", "size": "size (not a target)"}
    table = "\n".join(_adherence_row(label, attribute, reports) for attribute, label in labels.items())
    frame = report.to_frame()
    wrong_shape = frame[~frame.shape_ok]
    return f"""## Measured quality (float32, CPU)

`.venv/bin/python benchmarks/demo_quality.py`: {n_images} fixed prompts (a seeded shuffle of the 324 attribute
combinations), image i from `torch.Generator("cpu").manual_seed(i)`, the pipeline's defaults; images read by
the transparent scorer `workbench.demo.adherence.read_shape`:

| attribute | adherence | VAE round trip of 256 held-out images (ceiling) | scorer on 1000 held-out clean images |
|---|---|---|---|
{table}

Benchmark wall time: {measured.seconds:.0f} s for {n_images} images x {PIPELINE_DEFAULT_STEPS} steps with \
guidance (UNet batch 32),
{threads} torch thread(s). Last line: `{report.summary()}`

Against the targets this model was trained for: {_targets_text(report)}. Shape errors by kind
({len(wrong_shape)} of {n_images}): {_confusion_text(wrong_shape)}."""


def _sample_grid_section(report: AdherenceReport) -> str:
    """The grid image and a table of the prompts where the scorer read a wrong colour, shape or position."""
    frame = report.to_frame()
    misses = frame[~(frame.color_ok & frame.shape_ok & frame.position_ok)]
    miss_rows = "\n".join(
        f"| {i} | {r.prompt} | {r.read_color} | {r.read_shape} | {r.read_position} |" for i, r in misses.iterrows()
    )
    return f"""## Sample grid

![sample grid](sample_grid.png)

The {len(frame)} benchmark images in order (row-major), captioned with the prompt in short form. Prompts where
the scorer read a wrong colour, shape or position (`!` in the grid):

| # | prompt | read colour | read shape | read position |
|---|---|---|---|---|
{miss_rows}"""


def _scheduler_text(scheduler_config) -> str:
    sc = scheduler_config
    return (
        f"SD 1.x's scaled-linear betas {sc.beta_start}-{sc.beta_end} over {sc.num_train_timesteps} steps"
        + (", rescaled to zero terminal SNR" if sc.get("rescale_betas_zero_snr") else "")
        + f', "{sc.timestep_spacing}" spacing, steps_offset {sc.steps_offset}, {sc.prediction_type}'
    )


def _architecture_section(pipe, result: TrainResult, folder: Path) -> str:
    """One table row per component, parameter counts, the folder's size and the UNet's layer sizes."""
    config, params, unet_cfg = result.config, result.parameters, pipe.unet.config
    layers = [m.weight.numel() for m in pipe.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    over_2048, over_1e5 = sum(n > 2048 for n in layers), sum(n > 100_000 for n in layers)
    return f"""## Architecture

| component | class | configuration | parameters |
|---|---|---|---|
| tokenizer | `CLIPTokenizer` | byte-level BPE, every caption word one token, \
`model_max_length` {config.max_length} | - |
| text encoder | `CLIPTextModel` | hidden {config.text_hidden}, {config.text_layers} layers, \
{config.text_heads} heads, MLP {4 * config.text_hidden}, quick-GELU, {config.max_length} positions \
| {params["text_encoder"]:,} |
| VAE | `AutoencoderKL` | `block_out_channels` {tuple(config.vae_channels)}, 1 layer per block, 4 latent channels, \
64x64 -> {config.latent_size}x{config.latent_size}, `scaling_factor` {result.scaling_factor:.4f} | {params["vae"]:,} |
| UNet | `UNet2DConditionModel` | `block_out_channels` {tuple(unet_cfg.block_out_channels)}, \
{list(unet_cfg.down_block_types)}, 1 layer per block, cross-attention dim {unet_cfg.cross_attention_dim}, \
8 heads, `conv_in` {unet_cfg.conv_in_kernel}x{unet_cfg.conv_in_kernel} | {params["unet"]:,} |
| scheduler | `{type(pipe.scheduler).__name__}` | {_scheduler_text(pipe.scheduler.config)} | - |

Total {sum(params.values()):,} parameters; the folder is {_folder_megabytes(folder):.1f} MB (float32 safetensors).
The UNet has {len(layers)} Linear/Conv2d layers, {over_2048} of them with more than 2048 weights
(coremltools' default palettization threshold) and {over_1e5} with more than 100,000 (the reference's
threshold for SD-size models: use `compressible_layers(unet, min_numel=2048)` here)."""


def _dataset_section(config: TrainConfig) -> str:
    return f"""## Dataset

`workbench.demo.world.make_dataset({config.n_images}, seed={config.seed})`: sample i drawn from
`np.random.default_rng([{config.seed}, i])`; shape, colour, position and size uniform; position jittered +-2 px
around the cell centre (12, 32 or 52 px), side 12 px (small) or 20 px (large) +-1 px; 4x4 supersampled
anti-aliasing. Captions "a <size> <colour> <shape> at the <position>". No downloads."""


def _training_section(result: TrainResult) -> str:
    """How to retrain, the settings, the two stages, wall time and final losses."""
    config, seconds = result.config, result.seconds
    total = seconds.get("total", sum(seconds.values()))
    return f"""## Training

```
.venv/bin/python -m workbench.demo.train --out data/tiny-shapes --checkpoint-dir /tmp/tiny-shapes-ckpt
# or: workbench train --out data/tiny-shapes
```

Seed {config.seed}; all settings are `workbench.demo.config.TrainConfig` defaults, written to `training.json` with the
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
Final losses: VAE {np.mean(result.vae_losses[-50:]):.4f}, UNet {np.mean(result.unet_losses[-50:]):.4f}
(mean of the last 50 steps)."""


def render_card(pipe, result: TrainResult, measured: CardMeasurements, folder: Path) -> str:
    """The README.md text of a trained folder, from its pipeline, training.json and the measurements.

    Args:
        pipe: the folder's pipeline, as loaded by `document`.
        result (`TrainResult`): the folder's training.json (`TrainResult.from_dict`).
        measured (`CardMeasurements`): from `measure(pipe)`.
        folder (`Path`): the pipeline folder (its size on disk is reported).

    Returns:
        `str`: markdown, ending with a newline.
    """
    sections = [
        _intro_section(pipe),
        _quality_section(measured, result.config.threads),
        _sample_grid_section(measured.report),
        _architecture_section(pipe, result, folder),
        _dataset_section(result.config),
        _training_section(result),
    ]
    return "\n\n".join(sections) + "\n"


def document(out: str | Path, *, n_images: int = 64, log: Log = print) -> AdherenceReport:
    """Measure a trained folder as a user would load it, save `sample_grid.png` and write its README.md card.

    Loads `out` with `workbench.models.loader.load_pipeline` (float32, CPU), runs the quality benchmark
    (`generate_and_score(pipe, benchmark_attributes(n_images))`, pipeline defaults), scores the VAE round trip
    and the scorer itself on held-out clean images, and writes the model card from these numbers and
    `training.json`.

    Args:
        out (`str` or `Path`): a folder written by `workbench.demo.train.train`.
        n_images (`int`, defaults to 64): benchmark prompts.
        log (`Callable[[str], None]`, defaults to `print`): progress lines.

    Returns:
        `AdherenceReport` of the benchmark.
    """
    out = Path(out)
    result = TrainResult.load(out)
    with torch_threads(result.config.threads):
        pipe = load_pipeline(out, device="cpu", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        measured = measure(pipe, n_images, log)
    adherence_grid(measured.report).save(out / "sample_grid.png")
    (out / "README.md").write_text(render_card(pipe, result, measured, out), encoding="utf-8")
    log(f"wrote {out / 'README.md'} and {out / 'sample_grid.png'}")
    return measured.report
