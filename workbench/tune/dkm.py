"""coremltools' `DKMPalettizer` as the measured baseline of training-time palettization: the same UNet, data, loss,
steps, optimizer and recipe as `workbench.tune.qat`, only the palettizer differs.

DKM (Cho et al., "DKM: Differentiable K-Means Clustering Layer for Neural Network Compression", 2021) makes every
palettized weight a soft assignment: each forward pass runs `kmeans_max_iter` (3) differentiable k-means iterations
whose attention matrix is weights x clusters per layer, and back-propagates through them. That matrix is what runs
the SD-1.5 UNet out of memory (coremltools #2172); the demo's UNet is small enough to train with it.

Settings: coremltools' defaults except the recipe's `n_bits` (and group size) per layer and `weight_threshold=0` (the
recipe names the layers). `finalize` turns the trained model's weights into its palettes' values; they are cast to
float16 here, as Core ML stores a LUT, so the model evaluated is the one a package would hold.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import nn

from workbench.demo.config import TrainConfig
from workbench.demo.stages import Log, VaeStage
from workbench.palettes.config import PaletteConfig
from workbench.recipes.recipe import Recipe
from workbench.tune.qat import fine_tune, training_setup
from workbench.tune.qat_config import QatConfig


def dkm_config(recipe: Recipe):
    """The `DKMPalettizerConfig` of a recipe: per layer its width (and group size), coremltools' defaults else."""
    from coremltools.optimize.torch.palettization import DKMPalettizerConfig, ModuleDKMPalettizerConfig

    def module_config(config: PaletteConfig):
        options = {"n_bits": config.nbits, "weight_threshold": 0}
        if config.granularity == "per_grouped_channel":
            options.update(granularity="per_grouped_channel", group_size=config.group_size)
        return ModuleDKMPalettizerConfig(**options)

    return DKMPalettizerConfig(module_name_configs={name: module_config(c) for name, c in recipe.configs.items()})


def train_dkm(
    pipe, train_config: TrainConfig, config: QatConfig, *, stage1: VaeStage | None = None, log: Log = print
) -> dict:
    """Fine-tune `pipe.unet` with `DKMPalettizer` on the recipe `config.palettize` names, exactly as
    `workbench.tune.qat.train_palettized` trains (`fine_tune`: data, loss, teacher, steps, AdamW, seed), and put the
    finalized weights, as float16 values, into `pipe.unet` (in place).

    Returns:
        `{"recipe": name, "losses": [...], "seconds": {...}, "max_distinct": n}`: the most distinct values of any
        palettized weight (at most 2**nbits when DKM's palettes are what the weights hold).
    """
    from coremltools.optimize.torch.palettization import DKMPalettizer

    started = time.perf_counter()
    recipe, stage1, tuning = training_setup(pipe, train_config, config, stage1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        palettizer = DKMPalettizer(pipe.unet, dkm_config(recipe))
        prepared = palettizer.prepare(inplace=False)  # pipe.unet stays the float model
        log(f"DKM: {len(recipe.configs)} layers ({recipe.name}); training {config.steps} steps")
        t0 = time.perf_counter()
        losses = fine_tune(prepared, tuning, config, lambda step: palettizer.step(), log)
        train_seconds = time.perf_counter() - t0
        final = palettizer.finalize(prepared, inplace=True)
    weights = {name: _final_weight(final, name) for name in recipe.configs}
    with torch.no_grad():
        for name, weight in weights.items():
            pipe.unet.get_submodule(name).weight.copy_(weight)
        _copy_other_parameters(final, pipe.unet, set(weights))
    distinct = max(torch.unique(w).numel() for w in weights.values())
    seconds = {"encode": stage1.seconds.get("encode", 0.0), "train": train_seconds}
    seconds["total"] = time.perf_counter() - started
    return {"recipe": recipe.name, "losses": losses, "seconds": seconds, "max_distinct": distinct}


def _final_weight(model: nn.Module, name: str) -> torch.Tensor:
    """A finalized layer's weight as float16 values (float32 tensor), as Core ML stores DKM's LUT."""
    return model.get_submodule(name).weight.detach().half().float()


@torch.no_grad()
def _copy_other_parameters(source: nn.Module, target: nn.Module, skip: set[str]) -> None:
    """The trained biases, norms and unpalettized weights of `source` into `target`, by name."""
    params = dict(source.named_parameters())
    for name, param in target.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and layer in skip:
            continue
        param.copy_(params[name])
