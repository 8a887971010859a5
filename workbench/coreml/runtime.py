"""Run a diffusers pipeline with components from Core ML packages: emulated in torch, or in the Core ML runtime.

`coreml_pipeline(pipe, packages, backend=...)` returns a `CoreMLPipeline`, called like the pipeline:

- `backend="emulate"` (any OS) copies each package's decompressed palettized weights into the torch modules, by
  name, and runs torch: the weights are Core ML's, bit for bit; the arithmetic is torch's (`EMULATION_LABEL`).
- `backend="coreml"` (macOS only) routes the UNet / text encoder / VAE decoder calls through
  `coremltools.models.MLModel.predict` (`attach_predictors` and the predictor adapters below).

Example:
    >>> with coreml_pipeline(pipe, report, backend="emulate") as emulated:   # report: an ExportReport
    ...     images = generate_images(emulated, "a red circle", seed=0)
    >>> emulated.label
    'weight-exact emulation (not the Core ML runtime)'
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench.coreml.chunks import ChunkedPredictor
from workbench.coreml.components import (
    COMPONENTS,
    WRAPPERS,
    check_component,
    component_module,
    layer_weight_names,
    weight_layers,
)
from workbench.coreml.export import ExportReport
from workbench.coreml.layout import LAYOUTS, package_name, package_stems
from workbench.coreml.verify import StoredWeights

EMULATION_LABEL = "weight-exact emulation (not the Core ML runtime)"
COREML_LABEL = "Core ML runtime (coremltools MLModel.predict)"
BACKENDS = ("emulate", "coreml")


class CoreMLUnavailableError(RuntimeError):
    """Core ML prediction asked for where there is no Core ML runtime (coremltools predicts on macOS only)."""


@dataclass(eq=False)
class CoreMLPipeline:
    """A diffusers pipeline running some components from Core ML packages; call it like the pipeline.

    Attributes:
        pipe: the wrapped pipeline (modified in place until `restore()`; nothing is copied).
        backend: `"emulate"` or `"coreml"`.
        label: what produced the images; for `"emulate"`, `EMULATION_LABEL`. Show it next to every result.
        packages: component -> package path (a chunked UNet: the tuple of its chunks).
        loaded: component -> torch layers whose weights were replaced by the package's (emulate).
    """

    pipe: object
    backend: str
    label: str
    packages: dict
    loaded: dict = field(default_factory=dict)
    _undo: list = field(default_factory=list, repr=False)

    def __call__(self, *args, **kwargs):
        return self.pipe(*args, **kwargs)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the pipeline's own weights and methods back, exactly (the original tensors, not copies)."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> CoreMLPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __str__(self) -> str:
        parts = ", ".join(
            f"{c}: {' + '.join(p.name for p in _each(Path(x) if isinstance(x, str) else x))}"
            for c, x in self.packages.items()
        )
        return f"{type(self.pipe).__name__} [{self.label}] ({parts})"


def _in_folder(folder: Path) -> dict[str, Path | tuple[Path, ...]]:
    """The packages `export_pipeline` wrote into `folder`, in either layout; a chunked UNet as its two chunks."""
    found: dict[str, Path | tuple[Path, ...]] = {}
    for component in COMPONENTS:
        for layout in LAYOUTS:
            chunks = [folder / f"{stem}.mlpackage" for stem in package_stems("unet", layout, chunk=True)]
            if component == "unet" and all(chunk.exists() for chunk in chunks):
                found[component] = tuple(chunks)  # as the Swift pipeline: chunks before a whole package
            elif (folder / package_name(component, layout)).exists():
                found.setdefault(component, folder / package_name(component, layout))
    if not found:
        expected = ", ".join(package_name(c, layout) for c in COMPONENTS for layout in LAYOUTS)
        raise FileNotFoundError(f"no package in {folder}; looked for: {expected} (or UnetChunk1/2)")
    return found


def _as_package_paths(packages) -> dict[str, Path | tuple[Path, ...]]:
    """`{component: package path, or a chunked UNet's chunk paths}` from an `ExportReport`, a folder written by
    `export_pipeline`, or a mapping."""
    if isinstance(packages, ExportReport):
        return packages.paths()
    if isinstance(packages, (str, os.PathLike)):
        return _in_folder(Path(packages))
    paths = {
        check_component(c): Path(p) if isinstance(p, (str, os.PathLike)) else tuple(Path(x) for x in p)
        for c, p in dict(packages).items()
    }
    for path in paths.values():
        for package in _each(path):
            if not (package / "Manifest.json").exists():
                raise FileNotFoundError(f"not an .mlpackage (no Manifest.json): {package}")
    return paths


def _each(paths: Path | tuple[Path, ...]) -> tuple[Path, ...]:
    return paths if isinstance(paths, tuple) else (paths,)


# --------------------------------------------------------------------------------------------------------------
# backend="emulate": the package's weights in the torch modules.
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _load_weights_(result: CoreMLPipeline, component: str, package: Path, include_float16: bool) -> None:
    """Replace the component's layer weights by the package's (palettized ones; float16 ones too if asked)."""
    module = component_module(result.pipe, component)
    stored = StoredWeights(package)
    palettized = stored.palettized
    layers = weight_layers(module)
    by_weight = {name: layer for layer, name in layer_weight_names(layers, WRAPPERS[component].prefix).items()}
    unmapped = sorted(palettized - set(by_weight))
    if unmapped:
        raise ValueError(
            f"{package}: {len(unmapped)} palettized weights match no layer of {type(module).__name__}, "
            f"e.g. {unmapped[:3]}; was it exported from this pipeline's {component}?"
        )
    wanted = [(name, layer) for name, layer in by_weight.items() if name in palettized or include_float16]
    loaded = []
    for weight_name, layer in wanted:
        if weight_name not in stored:
            continue
        weight, value = layers[layer].weight, stored.get(weight_name)
        if value.size != weight.numel():
            raise ValueError(
                f"{package}: weight {weight_name} has {value.size} values, layer {layer} {weight.numel()}"
            )
        original = weight.data
        weight.data = torch.from_numpy(value.reshape(tuple(weight.shape))).to(device=weight.device, dtype=weight.dtype)
        result._undo.append(lambda w=weight, d=original: setattr(w, "data", d))
        loaded.append(layer)
    result.loaded[component] = result.loaded.get(component, []) + loaded


def _emulated_pipeline(pipe, paths: Mapping[str, Path], include_float16: bool) -> CoreMLPipeline:
    result = CoreMLPipeline(pipe, "emulate", EMULATION_LABEL, dict(paths))
    try:
        for component, path in paths.items():
            for package in _each(path):  # a chunked UNet: each chunk's weights
                _load_weights_(result, component, package, include_float16)
    except BaseException:
        result.restore()  # a failure halfway leaves the pipeline as it was
        raise
    return result


# --------------------------------------------------------------------------------------------------------------
# backend="coreml": predictors (MLModel.predict) in place of the components' forward / decode.
# --------------------------------------------------------------------------------------------------------------


def _batched_predict(predictor, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """`predictor.predict` over chunks of the package's fixed batch size, concatenated along axis 0."""
    n = len(next(iter(inputs.values())))
    if n % batch:
        raise ValueError(f"batch of {n} does not split into the package's fixed batch size {batch}")
    outs = [predictor.predict({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
    return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _unet_forward(predictor, batch: int, sdxl: bool, apple: bool):
    """`apple`: the package takes Apple's `encoder_hidden_states` (B, C, 1, 77) (`workbench.coreml.layout`)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True, **kwargs):
        unsupported = [k for k, v in kwargs.items() if v is not None] + (["positional extras"] if args else [])
        if unsupported:
            raise NotImplementedError(f"the Core ML UNet takes no {', '.join(unsupported)}")
        n = sample.shape[0]
        hidden = encoder_hidden_states.transpose(1, 2).unsqueeze(2) if apple else encoder_hidden_states
        inputs = {
            "sample": _numpy(sample),
            "timestep": torch.as_tensor(timestep).float().reshape(-1).expand(n).cpu().numpy().copy(),
            "encoder_hidden_states": _numpy(hidden),
        }
        if sdxl:
            inputs["text_embeds"] = _numpy(added_cond_kwargs["text_embeds"])
            inputs["time_ids"] = _numpy(added_cond_kwargs["time_ids"])
        out = _batched_predict(predictor, inputs, batch)["noise_pred"]
        out = torch.from_numpy(out).to(sample.device, sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    return forward


class _PenultimateOnly(tuple):
    """`hidden_states` of a Core ML text encoder: only `[-2]` (the penultimate layer, SDXL's embedding) exists."""

    def __getitem__(self, index):
        if index != -2:
            raise IndexError("a Core ML text encoder package outputs only hidden_states[-2] (no clip_skip)")
        if tuple.__getitem__(self, 0) is None:
            raise IndexError(
                "this text encoder package (Apple's SD-1.x/2.x layout) has no penultimate layer (no clip_skip)"
            )
        return tuple.__getitem__(self, 0)


def _text_outputs(out: Mapping[str, np.ndarray], device, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """A text encoder package's outputs under the workbench layout's names, from either layout.

    Apple's SD-1.x/2.x encoder outputs `last_hidden_state` and `pooled_outputs` (no penultimate layer: None);
    SDXL's output `hidden_embeds` (the penultimate layer) and `pooled_outputs`, and no `last_hidden_state`: diffusers'
    SDXL pipeline reads only its rank, so it is a NaN tensor of the hidden states' shape (any use shows as NaN).
    """
    t = {k: torch.from_numpy(np.asarray(v)).to(device, dtype) for k, v in out.items()}
    if "pooled_outputs" not in t:  # the workbench layout
        return t
    penultimate = t.get("hidden_embeds")
    last = t.get("last_hidden_state", None if penultimate is None else torch.full_like(penultimate, float("nan")))
    return {"last_hidden_state": last, "pooled_output": t["pooled_outputs"], "penultimate_hidden_state": penultimate}


def _text_encoder_forward(predictor, batch: int, with_projection: bool, dtype: torch.dtype, ids_dtype=np.int32):
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPTextModelOutput

    def forward(input_ids, attention_mask=None, *args, return_dict=True, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("the Core ML text encoder takes no attention_mask (SD's CLIP uses none)")
        ids = input_ids.cpu().numpy().astype(ids_dtype)
        t = _text_outputs(_batched_predict(predictor, {"input_ids": ids}, batch), input_ids.device, dtype)
        hidden = _PenultimateOnly((t["penultimate_hidden_state"],))
        if with_projection:
            result = CLIPTextModelOutput(
                text_embeds=t["pooled_output"], last_hidden_state=t["last_hidden_state"], hidden_states=hidden
            )
        else:
            result = BaseModelOutputWithPooling(
                last_hidden_state=t["last_hidden_state"], pooler_output=t["pooled_output"], hidden_states=hidden
            )
        return result if return_dict is not False else result.to_tuple()

    return forward


def _vae_decode(predictor, batch: int):
    from diffusers.models.autoencoders.vae import DecoderOutput

    def decode(z, return_dict=True, **kwargs):
        image = _batched_predict(predictor, {"z": _numpy(z)}, batch)["image"]
        image = torch.from_numpy(image).to(z.device, z.dtype)
        return DecoderOutput(sample=image) if return_dict else (image,)

    return decode


def _routed_method(module, component: str, predictor, batch: int) -> tuple[str, object]:
    """(name of the method to replace, the function calling `predictor` in its place) for one component."""
    shapes = getattr(predictor, "shapes", {})  # a `_ShapeCheckedModel`'s input shapes tell the layout
    if component == "unet":
        sdxl = getattr(module.config, "addition_embed_type", None) == "text_time"
        apple = len(shapes.get("encoder_hidden_states", ())) == 4
        return "forward", _unet_forward(predictor, batch, sdxl, apple)
    if component == "vae_decoder":
        return "decode", _vae_decode(predictor, batch)
    with_projection = hasattr(module, "text_projection")
    ids_dtype = getattr(predictor, "dtypes", {}).get("input_ids", np.int32)
    return "forward", _text_encoder_forward(predictor, batch, with_projection, module.dtype, ids_dtype)


def attach_predictors(pipe, predictors: Mapping[str, tuple], *, label: str = COREML_LABEL) -> CoreMLPipeline:
    """Route pipeline components through predictors: `{component: (predictor, batch_size)}`.

    A predictor is anything with `predict(dict[str, np.ndarray]) -> dict[str, np.ndarray]` under the package's
    input/output names (a `coremltools.models.MLModel`). The component's `forward` (`decode` for the VAE) is
    replaced by an instance attribute that calls it; `restore()` removes it. Used by `coreml_pipeline`. A predictor's
    optional `shapes` / `dtypes` (input name -> shape / numpy dtype, as `_ShapeCheckedModel` reads them from the
    package) select Apple's layout: a rank-4 `encoder_hidden_states`, float32 `input_ids`; the outputs are read
    under either layout's names.
    """
    result = CoreMLPipeline(pipe, "coreml", label, {})
    for component, (predictor, batch) in predictors.items():
        module = component_module(pipe, component)
        method, fn = _routed_method(module, component, predictor, batch)
        setattr(module, method, fn)
        result._undo.append(lambda m=module, a=method: delattr(m, a))
    return result


class _ShapeCheckedModel:
    """An `MLModel` whose `predict` names the package's fixed input shapes when given others."""

    def __init__(self, model, path: Path):
        self.model, self.path = model, path
        inputs = model.get_spec().description.input
        self.shapes = {i.name: tuple(int(d) for d in i.type.multiArrayType.shape) for i in inputs}
        from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

        int32 = ArrayFeatureType.INT32  # Apple's layout declares float32 ids, ours int32
        self.dtypes = {i.name: np.int32 if i.type.multiArrayType.dataType == int32 else np.float32 for i in inputs}
        self.batch = next(iter(self.shapes.values()))[0]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict:
        for name, value in inputs.items():
            if tuple(value.shape) != self.shapes[name]:
                raise ValueError(
                    f"{self.path.name} takes {name} of shape {self.shapes[name]}, got {tuple(value.shape)}: packages "
                    "have the fixed shapes they were exported with (generate at the pipeline's default size)"
                )
        return self.model.predict(dict(inputs))


def _coreml_runtime_pipeline(pipe, paths: Mapping[str, Path], compute_units: str) -> CoreMLPipeline:
    if sys.platform != "darwin":
        raise CoreMLUnavailableError(
            f"backend='coreml' needs the Core ML runtime, which coremltools provides on macOS only (this is "
            f"{sys.platform}); use backend='emulate' for {EMULATION_LABEL}"
        )
    import coremltools as ct

    units = getattr(ct.ComputeUnit, compute_units)
    predictors = {}
    for component, path in paths.items():
        models = [_ShapeCheckedModel(ct.models.MLModel(str(p), compute_units=units), p) for p in _each(path)]
        chained = ChunkedPredictor(models, [m.shapes for m in models]) if len(models) > 1 else models[0]
        predictors[component] = (chained, models[0].batch)
    result = attach_predictors(pipe, predictors)
    result.packages.update(paths)
    return result


def coreml_pipeline(
    pipe,
    packages,
    *,
    backend: str = "emulate",
    include_float16: bool = False,
    compute_units: str = "ALL",
) -> CoreMLPipeline:
    """Run a diffusers pipeline with components from Core ML packages.

    Args:
        pipe: the diffusers pipeline the packages were exported from (same architecture and weights).
        packages: an `ExportReport`, the folder `export_pipeline` wrote, or `{component: package path}` (a
            chunked UNet: the tuple of its chunks, run in sequence as Apple's Swift pipeline runs them).
        backend (`str`, defaults to `"emulate"`):
            - `"emulate"`: copy the package's decompressed palettized weights into the torch modules, by name, and
              run in torch. Labelled `EMULATION_LABEL`: the weights are Core ML's, bit for bit; the arithmetic is
              torch's, not the Core ML runtime's float16. Works on any OS.
            - `"coreml"`: real prediction through `coremltools.models.MLModel` (macOS only; elsewhere raises
              `CoreMLUnavailableError` naming `backend="emulate"`).
        include_float16 (`bool`, defaults to False): emulate only; also load the float16 (unpalettized) weights,
            rounding those layers to float16 as the package stores them. Off, they keep the torch values, so the
            result equals `palettized(pipe.unet, recipe)` exactly.
        compute_units (`str`, defaults to `"ALL"`): coreml only; a `coremltools.ComputeUnit` name.

    Returns:
        `CoreMLPipeline`: call it like the pipeline (or pass it to `workbench.models.generation.generate_images`);
        `restore()` (or a `with` block) undoes the change.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    paths = _as_package_paths(packages)
    if backend == "emulate":
        return _emulated_pipeline(pipe, paths, include_float16)
    return _coreml_runtime_pipeline(pipe, paths, compute_units)
