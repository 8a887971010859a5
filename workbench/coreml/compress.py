"""Palettize the weights of a converted Core ML model by name, with the workbench's own palettes.

`compress_model` maps torch layer names to the model's weight constants (by construction for a package we
converted, by content for one converted elsewhere) and hands coremltools one `OpPalettizerConfig` per weight
(`workbench.coreml.explicit_lut.op_config`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from torch import nn

from workbench.coreml.components import layer_weight_names
from workbench.coreml.explicit_lut import ExplicitLut, op_config
from workbench.coreml.verify import program_weight_names, weight_names
from workbench.palettes.config import PaletteConfig
from workbench.threads import sklearn_single_thread


def _optimization_config(
    plan: Mapping[str, PaletteConfig], names: Mapping[str, str], available: set[str], module, importance, given
):
    """One `OpPalettizerConfig` per planned weight (`op_config`), checked: every weight exists, and layers sharing
    one constant share a config."""
    import coremltools as ct

    missing = [layer for layer in plan if names[layer] not in available]
    if missing:
        raise ValueError(f"the package has no weight for {len(missing)} recipe layers: {', '.join(missing)}")
    by_weight: dict[str, tuple[str, PaletteConfig]] = {}
    for layer, cfg in plan.items():
        if by_weight.setdefault(names[layer], (layer, cfg))[1] != cfg:
            raise ValueError(f"layers sharing weight {names[layer]!r} have different palettes ({cfg.key} for {layer})")
    configs = {weight: op_config(layer, cfg, module, importance, given) for weight, (layer, cfg) in by_weight.items()}
    _prefit(configs.values())
    return ct.optimize.coreml.OptimizationConfig(op_name_configs=configs)


def _prefit(configs) -> None:
    """Fit our palettes on every core before coremltools asks for them one by one (the k-means kernels release
    the GIL; each fit is the same with or without threads)."""
    luts = [c.lut_function for c in configs if isinstance(getattr(c, "lut_function", None), ExplicitLut)]
    if len(luts) > 1:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(_fit_one_thread, luts))


def _fit_one_thread(lut: ExplicitLut) -> None:
    with sklearn_single_thread():  # per calling thread: set in the worker itself
        lut.fit()


def compress_model(
    model,
    plan: Mapping[str, PaletteConfig],
    *,
    prefix: str | None = None,
    names: Mapping[str, str] | None = None,
    module: nn.Module | None = None,
    importance=None,
    given=None,
):
    """Palettize the weights of a converted model named by `plan`, one `OpPalettizerConfig` per weight.

    Torch layer `L` is the Core ML constant `names[L]`: by default (a package we converted, whose wrapper holds the
    module under `prefix`) `coreml_weight_name(prefix + "." + L)`; for a package converted elsewhere, the mapping
    `workbench.coreml.apply.match_weights` found by content. Every planned weight must exist (else a `ValueError`
    lists the missing ones), and no other weight is touched. Layers sharing one constant (a converter merged
    identical weights) must share a config. With `module`, every palette is fitted from its weights (data-aware
    ones with `importance`, a `workbench.palettes.importance.Importance`) and stored as fitted
    (`workbench.coreml.explicit_lut.op_config`); without it, Core ML fits k-means and uniform palettes itself.
    The layers of `given` (`workbench.palettes.given.GivenPalettes`, with `module`) store their given palettes.

    Returns:
        `coremltools.models.MLModel` (a new one; `model` is unchanged).
    """
    import warnings

    import coremltools as ct

    if not plan:
        return model
    names = layer_weight_names(plan, prefix) if names is None else names
    config = _optimization_config(plan, names, program_weight_names(model), module, importance, given)
    with warnings.catch_warnings(), sklearn_single_thread():  # as `fit_palette` runs it: the same LUTs
        warnings.simplefilter("ignore")
        return ct.optimize.coreml.palettize_weights(model, config)


def compress_program(
    program, plan: Mapping[str, PaletteConfig], *, prefix: str, module: nn.Module, importance=None, given=None
):
    """`compress_model` on a MIL program (`ct.convert(..., convert_to="milinternal")`), in place: coremltools'
    palettization pass with the same configs, without serializing the float16 program and reading it back."""
    import warnings

    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    if not plan:
        return program
    names = layer_weight_names(plan, prefix)
    config = _optimization_config(plan, names, weight_names(program), module, importance, given)
    palettizer = PASS_REGISTRY["compression::palettize_weights"]
    palettizer.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    with warnings.catch_warnings(), sklearn_single_thread():
        warnings.simplefilter("ignore")
        palettizer.apply(program)
    return program
