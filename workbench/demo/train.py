"""Train the tiny-shapes demo model: a small Stable Diffusion 1.x-style pipeline on the procedural shapes world.

The components are the ones of SD 1.x at toy scale: a `CLIPTokenizer` (one token per caption word), a
`CLIPTextModel`, an `AutoencoderKL` with 4 latent channels and 4x downsampling (64x64 images, 16x16 latents),
a `UNet2DConditionModel` with cross-attention, SD 1.x's scaled-linear noise schedule (rescaled to zero terminal
SNR) and DDIM for inference, with SD 2.x's v-prediction. Training runs in two stages on `workbench.demo.world` images:

1. the VAE alone: L1 + L2 reconstruction (shape pixels weighted up) + a small KL term; then it is frozen, the
   whole dataset is encoded once, and the scaling factor is set to 1 / std of the latents (SD's 0.18215 is the
   same idea);
2. the UNet and the text encoder jointly: v-prediction MSE under SD's scaled-linear DDPM schedule with capped
   loss weights, captions replaced by "" 10% of the time (for classifier-free guidance), and an EMA of the
   weights, which is what gets saved.

Where SD 1.x's recipe was changed, and why: where a shape goes is decided in the first, noisiest sampling
steps, and a first run with SD 1.x's recipe (epsilon-prediction, min-SNR weights, PNDM, 3-level UNet) drew the
asked-for colour and shape at a position set by the noise alone, no better than chance (docs/benchmarks.md): the
same seed put the shape in the same place whatever position the prompt named. Three things push the other
way: v-prediction (the image error keeps weight >= 1 at high noise, where epsilon weights it by SNR ~0.01),
a zero-terminal-SNR schedule (the noisiest training input is pure noise, so position can only come from the
prompt, not from finding the faint shape in the noise), and a UNet that can tell where it is (see
`workbench.demo.components.build_unet`).

Every random draw comes from a generator seeded by (seed, stage, step), so a run is reproducible on one
device and a resumed run continues exactly where a checkpoint left off.

Modules: the components are built in `workbench.demo.components`, the two stages run in `workbench.demo.stages`,
and the model card (`document`) is measured and written by `workbench.demo.card`; this module holds the
settings (`TrainConfig`), the run (`train`) and its command line.

Usage:
    python -m workbench.demo.train --out data/tiny-shapes --checkpoint-dir /tmp/tiny-shapes-ckpt
    workbench train --out data/tiny-shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from workbench.demo.card import document
from workbench.demo.components import assemble_pipeline, build_components
from workbench.demo.config import TRAINING_FILE, TrainConfig, TrainResult, _count, add_arguments
from workbench.demo.stages import Log, train_unet, vae_stage
from workbench.demo.world import make_dataset
from workbench.errors import InvalidValueError
from workbench.threads import torch_threads


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
            (`workbench.demo.card.document`).
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
        document(out, log=log)
    return result


def _train(config: TrainConfig, out: Path, ckpt: Path | None, device: str, log: Log) -> TrainResult:
    """`train` without the card, under the thread count already set."""

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
    unet, text_encoder, unet_losses = train_unet(models, stage1, data.captions, config, log, device, stage2_ckpt)
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
    (out / TRAINING_FILE).write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out}: {parameters}, seconds { ({k: round(v, 1) for k, v in seconds.items()}) }")
    return result


# ------------------------------------------------------------------------------------------- command line


def run(args: argparse.Namespace, config: TrainConfig | None = None) -> TrainResult | None:
    """Train with the parsed `add_arguments` options (or, with --card-only, document `args.out`).

    `config`: the run's settings, if already built; by default `TrainConfig.load(args.config, args.set)`.
    """

    def log(line: str) -> None:
        print(line, flush=True)

    if args.card_only:
        document(args.out, log=log)
        return None
    config = TrainConfig.load(args.config, args.set) if config is None else config
    log(f"config: {json.dumps(config.to_dict())}")
    return train(
        config, args.out, checkpoint_dir=args.checkpoint_dir, card=not args.no_card, device=args.device, log=log
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.demo.train", description=__doc__.split("\n")[0])
    add_arguments(parser, out_default="data/tiny-shapes")
    args = parser.parse_args(argv)
    try:
        config = None if args.card_only else TrainConfig.load(args.config, args.set)
    except InvalidValueError as err:
        parser.error(str(err))  # one line, exit status 2, as `workbench train`
    run(args, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
