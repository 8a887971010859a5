"""Core ML packages: export, palettize by exact name, prove the weights, run inference.

The torch frontend of coremltools names the float16 constant of a module's weight after the module's
path: `down_blocks.0.attentions.0.proj_in.weight` becomes `down_blocks_0_attentions_0_proj_in_weight_to_fp16`.
Since we convert the model ourselves, that mapping is known by construction (no weight hashing, unlike
the reference), and `coreml_weight_names` checks it is one-to-one before anything relies on it. The export
wrappers hold the pipeline's module under an attribute (`UNetExport.unet`, `TextEncoderExport.text_encoder`,
`VAEDecoderExport.vae`), so in an exported package the UNet layer `L` is `coreml_weight_name("unet." + L)`,
e.g. `unet_down_blocks_0_attentions_0_proj_in_weight_to_fp16`, for Conv2d and Linear layers alike.

Flow:
    >>> report = export_pipeline(pipe, "out/", recipe=load_recipe("recipes.json", "recipe_4.50_bit_mixedpalette"),
    ...                          components=["unet", "text_encoder", "vae_decoder"])
    >>> print(report.summary())          # sizes, bits/param, bit-exact per package; out/verification.json
    >>> with coreml_pipeline(pipe, report, backend="emulate") as emulated:   # any OS
    ...     images = generate(emulated, "a red circle", seed=0)
    >>> emulated.label
    'weight-exact emulation (not the Core ML runtime)'

`backend="coreml"` runs `MLModel.predict` and exists on macOS only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from torch import nn

from workbench.palettize import PaletteConfig, sklearn_single_thread

if TYPE_CHECKING:
    from workbench.recipes import Recipe


def coreml_weight_name(layer: str) -> str:
    """The name coremltools gives the float16 weight constant of torch module `layer`."""
    return layer.replace(".", "_") + "_weight_to_fp16"


def coreml_weight_names(layers: Iterable[str]) -> dict[str, str]:
    """`{torch layer name: Core ML weight name}`, refusing mappings that would be ambiguous."""
    mapping = {layer: coreml_weight_name(layer) for layer in layers}
    if len(set(mapping.values())) != len(mapping):
        seen: dict[str, str] = {}
        for layer, name in mapping.items():
            if name in seen:
                raise ValueError(f"layers {seen[name]!r} and {layer!r} both map to Core ML weight {name!r}")
            seen[name] = layer
    return mapping


def load_program(package):
    """The MIL program of a saved `.mlpackage` (or an in-memory `MLModel`), with its weights, on any OS."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    if not isinstance(package, (str, os.PathLike)):  # an MLModel: its spec and weights folder
        spec = package.get_spec()
        return load(spec, specification_version=spec.specificationVersion, file_weights_dir=package.weights_dir)
    package = Path(package)
    if not (package / "Manifest.json").exists():
        raise FileNotFoundError(f"not an .mlpackage (no Manifest.json): {package}")
    spec = ct.utils.load_spec(str(package))
    weights_dir = package / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=str(weights_dir))


def _weight_ops(program):
    """(weight name, op, palettized?) for palettized weights and float16 constants of >= 2 dimensions."""
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "constexpr_lut_to_dense":
                yield op.name.removesuffix("_palettized"), op, True
            elif op.op_type == "const" and op.outputs[0].val is not None:
                value = op.outputs[0].val
                if getattr(value, "dtype", None) == np.float16 and np.ndim(value) >= 2:
                    yield op.name, op, False


def package_weights(package: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every weight of a saved package, decompressed, keyed by its uncompressed constant's name.

    Palettized weights (`constexpr_lut_to_dense` ops, named `<const>_palettized`) are expanded from
    their LUT and indices exactly as Core ML does; float constants are returned as stored.
    """
    return {
        name: np.asarray(op.materialized_val_inference() if palettized else op.outputs[0].val)
        for name, op, palettized in _weight_ops(load_program(package))
    }


def palettized_weight_names(package: str | os.PathLike) -> set[str]:
    """Names of the weights a package stores palettized."""
    return {name for name, _, palettized in _weight_ops(load_program(package)) if palettized}


# --------------------------------------------------------------------------------------------------------------
# Export: trace-friendly wrappers, conversion, compression by name, verification, inference backends.
# --------------------------------------------------------------------------------------------------------------

EMULATION_LABEL = "weight-exact emulation (not the Core ML runtime)"
COREML_LABEL = "Core ML runtime (coremltools MLModel.predict)"
BACKENDS = ("emulate", "coreml")
# component -> the pipeline attribute holding its torch module
COMPONENTS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "vae_decoder": "vae"}
DEFAULT_MIN_NUMEL = 2048  # coremltools' own weight_threshold


class UNetExport(nn.Module):
    """The UNet with plain tensor inputs and one output, for `torch.jit.trace`.

    SD-1.x/2.x signature: `(sample, timestep, encoder_hidden_states) -> noise_pred`; SDXL ("text_time" added
    conditioning) adds `text_embeds` and `time_ids`. `sample` is NCHW float32 latents, `timestep` one float per
    batch item.
    """

    prefix = "unet"  # the attribute the module sits under; Core ML weight names start with it

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"

    @property
    def input_names(self) -> tuple[str, ...]:
        base = ("sample", "timestep", "encoder_hidden_states")
        return base + (("text_embeds", "time_ids") if self.sdxl else ())

    output_names = ("noise_pred",)

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class TextEncoderExport(nn.Module):
    """A CLIP text encoder: `input_ids` (int32, padded to the context length) -> the tensors SD pipelines read.

    Outputs `last_hidden_state`, `pooled_output` (the pooler output, or `text_embeds` of a
    `CLIPTextModelWithProjection`) and `penultimate_hidden_state` (SDXL's prompt embedding).
    """

    prefix = "text_encoder"
    input_names = ("input_ids",)
    output_names = ("last_hidden_state", "pooled_output", "penultimate_hidden_state")

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        return out.last_hidden_state, pooled, out.hidden_states[-2]


class VAEDecoderExport(nn.Module):
    """The VAE decoder: `z` (NCHW latents already divided by the scaling factor) -> `image` (NCHW, about [-1, 1])."""

    prefix = "vae"
    input_names = ("z",)
    output_names = ("image",)

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


def _check_component(component: str) -> str:
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; valid: {', '.join(COMPONENTS)}")
    return component


def component_module(pipe, component: str) -> nn.Module:
    """The torch module behind `component` (`"vae_decoder"` -> `pipe.vae`)."""
    module = getattr(pipe, COMPONENTS[_check_component(component)], None)
    if module is None:
        have = [c for c, attr in COMPONENTS.items() if getattr(pipe, attr, None) is not None]
        raise ValueError(f"{type(pipe).__name__} has no {component!r}; it has: {', '.join(have)}")
    return module


def export_wrapper(pipe, component: str) -> nn.Module:
    """The trace-friendly wrapper of one pipeline component (no copy: it holds the pipeline's own module)."""
    module = component_module(pipe, component)
    if component == "unet":
        return UNetExport(module).eval()
    if component == "vae_decoder":
        return VAEDecoderExport(module).eval()
    return TextEncoderExport(module).eval()


def example_inputs(pipe, component: str, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Zero-valued example inputs fixing the package's shapes (float32; `input_ids` int32).

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline.
        component (`str`): one of `COMPONENTS`.
        batch_size (`int`, *optional*): defaults to 2 for the UNet (classifier-free guidance), 1 otherwise.

    Returns:
        `dict[str, torch.Tensor]`: input name -> tensor, in the wrapper's argument order.
    """
    module = component_module(pipe, component)
    batch = batch_size or (2 if component == "unet" else 1)
    if component == "unet":
        cfg = module.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        inputs = {
            "sample": torch.zeros(batch, cfg.in_channels, size, size),
            "timestep": torch.ones(batch),
            "encoder_hidden_states": torch.zeros(batch, 77, cfg.cross_attention_dim),
        }
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            n_ids = 6  # original size, crop top-left, target size
            pooled_dim = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
            inputs |= {"text_embeds": torch.zeros(batch, pooled_dim), "time_ids": torch.zeros(batch, n_ids)}
        return inputs
    if component == "vae_decoder":
        cfg = module.config
        size = cfg.sample_size // 2 ** (len(cfg.block_out_channels) - 1)
        return {"z": torch.zeros(batch, cfg.latent_channels, size, size)}
    return {"input_ids": torch.zeros(batch, module.config.max_position_embeddings, dtype=torch.int32)}


def _target(name: str):
    import coremltools as ct

    return getattr(ct.target, name)


@torch.no_grad()
def convert_component(
    pipe,
    component: str,
    *,
    batch_size: int | None = None,
    deployment_target: str = "iOS17",
):
    """Trace one pipeline component and convert it to a float16 Core ML ML Program.

    `torch.jit.trace` of the wrapper, then `ct.convert(convert_to="mlprogram", compute_precision=FLOAT16)`.
    Inputs and outputs are named (see the wrappers) and float32 on the host side. The module is traced in
    float32 on the CPU where it sits; nothing is copied.

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline on the CPU.
        component (`str`): `"unet"`, `"text_encoder"`, `"text_encoder_2"` or `"vae_decoder"`.
        batch_size (`int`, *optional*): see `example_inputs`.
        deployment_target (`str`, defaults to `"iOS17"`): a `coremltools.target` name; `"iOS18"` for grouped or
            3-bit palettes.

    Returns:
        `coremltools.models.MLModel`.
    """
    import warnings

    import coremltools as ct

    wrapper = export_wrapper(pipe, component)
    inputs = example_inputs(pipe, component, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coremltools: "torch 2.13 has not been tested"; trace warnings
        traced = torch.jit.trace(wrapper, tuple(inputs.values()), check_trace=False)
        return ct.convert(
            traced,
            inputs=[
                ct.TensorType(name=name, shape=x.shape, dtype=np.int32 if x.dtype == torch.int32 else np.float32)
                for name, x in inputs.items()
            ],
            outputs=[ct.TensorType(name=name, dtype=np.float32) for name in wrapper.output_names],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=_target(deployment_target),
        )


def program_weight_names(model_or_package) -> set[str]:
    """Names of the weights (float16 constants of >= 2 dimensions, or palettized) of an MLModel or a package."""
    return {name for name, _, _ in _weight_ops(load_program(model_or_package))}


RecipeLike = Union["Recipe", Mapping[str, "int | PaletteConfig | None"], None]


def palette_plan(
    module: nn.Module,
    recipe: RecipeLike = None,
    *,
    nbits: int | None = None,
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> dict[str, PaletteConfig]:
    """Layer name -> `PaletteConfig` for the layers to palettize; layers left out stay float16.

    Args:
        module (`nn.Module`): the component's torch module (e.g. `pipe.unet`).
        recipe (`Recipe` or `Mapping[str, int | PaletteConfig]`, *optional*): bit widths by layer (16 = float).
        nbits (`int`, *optional*): instead of a recipe, this width for every Linear/Conv2d layer with more than
            `min_numel` weights (the reference's `--quantize-nbits`).
        min_numel (`int`, defaults to 2048): see `nbits`.

    Returns:
        `dict[str, PaletteConfig]`.

    Raises:
        ValueError: both a recipe and nbits, or a recipe naming layers the module lacks (all listed).
    """
    from workbench.layers import compressible_layers
    from workbench.palettize import as_config

    if recipe is not None and nbits is not None:
        raise ValueError("pass a recipe or nbits, not both")
    if nbits is not None:
        config = as_config(int(nbits))
        layers = compressible_layers(module, min_numel=min_numel)
        return {} if config is None else dict.fromkeys(layers, config)
    if recipe is None:
        return {}
    bits = getattr(recipe, "bits", recipe)
    with_weight = {n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    missing = [name for name in bits if name not in with_weight]
    if missing:
        raise ValueError(
            f"the recipe names {len(missing)} layers that {type(module).__name__} lacks: {', '.join(missing)}"
        )
    plan = {name: as_config(spec) for name, spec in bits.items()}
    return {name: cfg for name, cfg in plan.items() if cfg is not None}


def compress_model(model, plan: Mapping[str, PaletteConfig], *, prefix: str):
    """Palettize the weights of a converted model named by `plan`, one `OpPalettizerConfig` per weight.

    Torch layer `L` of a wrapper whose module sits under `prefix` is the Core ML constant
    `coreml_weight_name(prefix + "." + L)`; every planned weight must exist (else a `ValueError` lists the
    missing ones), and no other weight is touched.

    Returns:
        `coremltools.models.MLModel` (a new one; `model` is unchanged).
    """
    import warnings

    import coremltools as ct

    if not plan:
        return model
    names = coreml_weight_names(f"{prefix}.{layer}" for layer in plan)
    available = program_weight_names(model)
    missing = [layer for layer in plan if names[f"{prefix}.{layer}"] not in available]
    if missing:
        raise ValueError(f"the package has no weight for {len(missing)} recipe layers: {', '.join(missing)}")
    config = ct.optimize.coreml.OptimizationConfig(
        op_name_configs={names[f"{prefix}.{layer}"]: cfg.to_coreml() for layer, cfg in plan.items()}
    )
    with warnings.catch_warnings(), sklearn_single_thread():  # as `fit_palette` runs it: the same LUTs
        warnings.simplefilter("ignore")
        return ct.optimize.coreml.palettize_weights(model, config)


def weight_psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of a weight against its float original: `20*log10(max|reference| / rmse)` in float64 (inf if equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    rmse = float(np.sqrt(np.mean((ref - np.asarray(test, dtype=np.float64)) ** 2)))
    peak = float(np.abs(ref).max())
    return math.inf if rmse == 0 else 20.0 * math.log10(peak / rmse) if peak > 0 else -math.inf


@dataclass(frozen=True)
class LayerCheck:
    """One palettized weight read back from a package and compared with the simulation.

    Attributes:
        layer: torch module path in the component; weight: its Core ML constant; config: e.g. `kmeans4`;
        bit_exact: decompressed package weight == `fit_palette(torch weight).dense()` bit for bit;
        psnr_db: weight PSNR of the package weight vs the float32 torch weight (`weight_psnr`).
    """

    component: str
    layer: str
    weight: str
    nbits: int
    config: str
    numel: int
    bit_exact: bool
    psnr_db: float


@dataclass(frozen=True)
class Verification:
    """What a saved package holds, compared weight by weight with the torch model and the simulation.

    Attributes:
        component, package: what was checked.
        layers: one `LayerCheck` per palettized weight.
        float16_layers: Linear/Conv2d layers left float16 in the package; float16_exact: how many of them equal
            `torch weight.half()` bit for bit.
        unexpected_palettized: weights stored palettized that the plan did not ask for (should be empty).
    """

    component: str
    package: str
    layers: tuple[LayerCheck, ...]
    float16_layers: int
    float16_exact: int
    unexpected_palettized: tuple[str, ...] = ()

    @property
    def all_bit_exact(self) -> bool:
        return (
            all(c.bit_exact for c in self.layers)
            and self.float16_exact == self.float16_layers
            and not self.unexpected_palettized
        )

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([asdict(c) for c in self.layers], columns=[f.name for f in fields(LayerCheck)])

    def to_dict(self) -> dict:
        d = asdict(self)
        for row in d["layers"]:  # JSON has no inf: a lossless weight gets null
            row["psnr_db"] = None if not math.isfinite(row["psnr_db"]) else round(row["psnr_db"], 3)
        d["all_bit_exact"] = self.all_bit_exact
        return d


def verify_package(
    package: str | os.PathLike, module: nn.Module, plan: Mapping[str, PaletteConfig], *, component: str, prefix: str
) -> Verification:
    """Read a saved package back, decompress every palettized weight, compare with the simulation.

    Each planned layer's stored weight must equal `fit_palette(torch weight, config).dense()` bit for bit
    (uint16 views, never float16 sorting); every other Linear/Conv2d layer in the package must equal the torch
    weight cast to float16.
    """
    from workbench.palettize import fit_palette

    stored = package_weights(package)
    palettized = palettized_weight_names(package)
    linear_like = {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    names = coreml_weight_names(f"{prefix}.{layer}" for layer in linear_like)
    checks = []
    for layer, cfg in plan.items():
        weight_name = names[f"{prefix}.{layer}"]
        torch_weight = linear_like[layer].weight.detach().cpu()
        expected = fit_palette(torch_weight, cfg).dense()
        got = stored[weight_name].reshape(expected.shape) if weight_name in stored else None
        exact = (
            got is not None
            and weight_name in palettized
            and np.array_equal(expected.view(np.uint16), got.view(np.uint16))
        )
        psnr = weight_psnr(torch_weight.float().numpy(), got) if got is not None else -math.inf
        checks.append(LayerCheck(component, layer, weight_name, cfg.nbits, cfg.key, expected.size, bool(exact), psnr))
    n_float = n_float_exact = 0
    for layer, m in linear_like.items():
        weight_name = names[f"{prefix}.{layer}"]
        if layer in plan or weight_name not in stored:
            continue
        n_float += 1
        expected = m.weight.detach().cpu().half().numpy()
        got = stored[weight_name]
        n_float_exact += bool(
            got.size == expected.size
            and np.array_equal(expected.view(np.uint16), got.view(np.uint16).reshape(expected.shape))
        )
    planned = {names[f"{prefix}.{layer}"] for layer in plan}
    return Verification(
        component=component,
        package=str(package),
        layers=tuple(checks),
        float16_layers=n_float,
        float16_exact=n_float_exact,
        unexpected_palettized=tuple(sorted(palettized - planned)),
    )


def package_nbytes(package: str | os.PathLike) -> int:
    """Bytes on disk of a package (all files)."""
    return sum(f.stat().st_size for f in Path(package).rglob("*") if f.is_file())


@dataclass(frozen=True)
class ExportedPackage:
    """One exported component.

    Attributes:
        component, path: what and where (`<out>/<component>.mlpackage`).
        nbytes: package size on disk; float16_nbytes: the same component converted without palettization.
        bits_per_param: sum(bits * numel) / sum(numel) over the component's Linear/Conv2d layers with more than
            `min_numel` weights (16 for float16 layers), the reference's measure.
        deployment_target: e.g. `"iOS17"`; export_s / compress_s / verify_s: wall time of trace + convert /
            palettize + save / read back + compare.
        verification: the read-back check (None when not verified).
    """

    component: str
    path: str
    nbytes: int
    float16_nbytes: int
    bits_per_param: float
    n_palettized: int
    deployment_target: str
    export_s: float
    compress_s: float
    verify_s: float = 0.0
    verification: Verification | None = None

    @property
    def pct_of_float16(self) -> float:
        return 100.0 * self.nbytes / self.float16_nbytes


@dataclass(frozen=True)
class ExportReport:
    """The packages written by `export_pipeline`, and what was checked. Saved as `<out>/verification.json`."""

    out_dir: str
    source: str
    recipe_name: str
    packages: tuple[ExportedPackage, ...]

    @property
    def all_bit_exact(self) -> bool:
        return all(p.verification is None or p.verification.all_bit_exact for p in self.packages)

    def package(self, component: str) -> ExportedPackage:
        for p in self.packages:
            if p.component == component:
                return p
        raise KeyError(f"no {component!r} package; exported: {', '.join(p.component for p in self.packages)}")

    def paths(self) -> dict[str, Path]:
        """`{component: package path}`, what `coreml_pipeline` takes."""
        return {p.component: Path(p.path) for p in self.packages}

    def to_frame(self):
        """One row per package (sizes, bits/param, timings, verification counts)."""
        import pandas as pd

        rows = []
        for p in self.packages:
            v = p.verification
            rows.append(
                {
                    "component": p.component,
                    "path": p.path,
                    "nbytes": p.nbytes,
                    "float16_nbytes": p.float16_nbytes,
                    "pct_of_float16": p.pct_of_float16,
                    "bits_per_param": p.bits_per_param,
                    "n_palettized": p.n_palettized,
                    "bit_exact": None if v is None else sum(c.bit_exact for c in v.layers),
                    "float16_exact": None if v is None else f"{v.float16_exact}/{v.float16_layers}",
                    "deployment_target": p.deployment_target,
                    "export_s": p.export_s,
                    "compress_s": p.compress_s,
                    "verify_s": p.verify_s,
                }
            )
        return pd.DataFrame(rows)

    def layers_frame(self):
        """Every verified layer of every package (`LayerCheck` rows)."""
        import pandas as pd

        frames = [p.verification.to_frame() for p in self.packages if p.verification is not None]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def to_dict(self) -> dict:
        from workbench.io import environment

        d = asdict(self)
        for p, row in zip(self.packages, d["packages"]):
            row["verification"] = None if p.verification is None else p.verification.to_dict()
        d["all_bit_exact"] = self.all_bit_exact
        d["environment"] = environment()
        return d

    def save(self, path: str | os.PathLike | None = None) -> Path:
        from workbench.io import write_json_atomic

        return write_json_atomic(path or Path(self.out_dir) / "verification.json", self.to_dict())

    def summary(self) -> str:
        """A few lines for a terminal: per package its path, size, bits/param and the verification result."""
        lines = [f"export of {self.source or 'pipeline'} (recipe: {self.recipe_name or 'none'})"]
        for p in self.packages:
            v = p.verification
            check = "not verified"
            if v is not None:
                n_exact = sum(c.bit_exact for c in v.layers)
                check = (
                    f"{n_exact}/{len(v.layers)} palettized weights bit-exact with the simulation, "
                    f"{v.float16_exact}/{v.float16_layers} float16 weights exact"
                )
                if v.unexpected_palettized:
                    check += f", {len(v.unexpected_palettized)} palettized unexpectedly"
            lines.append(
                f"  {p.component}: {p.path}  {p.nbytes / 1e6:.2f} MB ({p.pct_of_float16:.1f}% of float16 "
                f"{p.float16_nbytes / 1e6:.2f} MB), {p.bits_per_param:.2f} bits/param, {p.deployment_target}; {check}"
            )
        lines.append(
            "verification: " + ("ALL BIT-EXACT" if self.all_bit_exact else "MISMATCH (see verification.json)")
        )
        return "\n".join(lines)


def _set_metadata(model, *, component: str, source: str, recipe_name: str, bits_per_param: float, n: int) -> None:
    from workbench import __version__

    model.short_description = (
        f"{component} of {source or 'a diffusers pipeline'}, palettized by workbench "
        f"({recipe_name or 'float16'}, {bits_per_param:.2f} bits/param)"
    )
    model.author = f"workbench {__version__}"
    model.user_defined_metadata.update(
        {
            "source_model": source,
            "component": component,
            "recipe": recipe_name,
            "bits_per_param": f"{bits_per_param:.4f}",
            "palettized_layers": str(n),
        }
    )


@torch.no_grad()
def export_pipeline(
    pipe,
    out_dir: str | os.PathLike,
    *,
    recipe: RecipeLike = None,
    nbits: int | None = None,
    components: Iterable[str] = ("unet",),
    min_numel: int = DEFAULT_MIN_NUMEL,
    batch_size: int | None = None,
    source: str = "",
    verify: bool = True,
) -> ExportReport:
    """Export pipeline components to Core ML packages, palettized by a recipe or a uniform width, and verify them.

    For each component: trace + convert to float16 (iOS17, or iOS18 when the plan has grouped or 3-bit palettes),
    save once unpalettized to measure its size, palettize the planned weights by name (`compress_model`), write
    metadata, save `<out_dir>/<component>.mlpackage`, read it back and compare every weight (`verify_package`).
    Writes `<out_dir>/verification.json`.

    Args:
        pipe: a diffusers SD-1.x/2.x or SDXL pipeline (CPU, float32).
        out_dir (`str | os.PathLike`): where packages and `verification.json` go (created).
        recipe (`Recipe` or mapping, *optional*): UNet layer -> bits or `PaletteConfig`; applies to the UNet only.
        nbits (`int`, *optional*): uniform width for every layer over `min_numel` weights of every component.
        components (`Iterable[str]`, defaults to `("unet",)`): from `COMPONENTS`.
        min_numel (`int`, defaults to 2048): candidate threshold for `nbits` and for bits/param (strict `>`).
        batch_size (`int`, *optional*): see `example_inputs`.
        source (`str`): the source model's name, written into the metadata.
        verify (`bool`, defaults to True): read the packages back and compare.

    Returns:
        `ExportReport`.
    """
    import shutil
    import tempfile
    import time

    from workbench.layers import compressible_layers

    components = [_check_component(c) for c in components]
    if not components:
        raise ValueError(f"no components to export; valid: {', '.join(COMPONENTS)}")
    if recipe is not None and "unet" not in components:
        raise ValueError("a recipe applies to the UNet; add 'unet' to the components or use nbits")
    recipe_label = getattr(recipe, "name", "custom recipe" if recipe is not None else "")
    if nbits is not None:
        recipe_label = f"uniform_{nbits}bit"
    modules = {c: component_module(pipe, c) for c in components}
    plans = {  # validated against the torch modules before any (slow) conversion
        c: palette_plan(modules[c], recipe if c == "unet" else None, nbits=nbits, min_numel=min_numel)
        for c in components
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packages = []
    for component in components:
        module, plan = modules[component], plans[component]
        prefix = export_wrapper(pipe, component).prefix
        target = "iOS18" if any(cfg.needs_ios18 for cfg in plan.values()) else "iOS17"
        start = time.perf_counter()
        model = convert_component(pipe, component, batch_size=batch_size, deployment_target=target)
        export_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory(dir=out, prefix=".float16-") as tmp:
            model.save(str(Path(tmp) / "float16.mlpackage"))
            float16_nbytes = package_nbytes(Path(tmp) / "float16.mlpackage")
        start = time.perf_counter()
        in_package = program_weight_names(model)
        candidates = {
            name: layer.weight.numel()
            for name, layer in compressible_layers(module, min_numel=min_numel).items()
            if coreml_weight_name(f"{prefix}.{name}") in in_package
        }
        if nbits is not None:  # a uniform width covers the layers this package has (a VAE decoder, not its encoder)
            plan = {name: cfg for name, cfg in plan.items() if name in candidates}
        compressed = compress_model(model, plan, prefix=prefix)
        bits = {name: plan[name].nbits if name in plan else 16 for name in candidates}
        numel = sum(candidates.values())
        bpp = sum(bits[n] * k for n, k in candidates.items()) / numel if numel else 16.0
        _set_metadata(
            compressed, component=component, source=source, recipe_name=recipe_label, bits_per_param=bpp, n=len(plan)
        )
        path = out / f"{component}.mlpackage"
        if path.exists():
            shutil.rmtree(path)
        compressed.save(str(path))
        compress_s = time.perf_counter() - start
        start = time.perf_counter()
        verification = verify_package(path, module, plan, component=component, prefix=prefix) if verify else None
        verify_s = time.perf_counter() - start
        packages.append(
            ExportedPackage(
                component=component,
                path=str(path),
                nbytes=package_nbytes(path),
                float16_nbytes=float16_nbytes,
                bits_per_param=bpp,
                n_palettized=len(plan),
                deployment_target=target,
                export_s=export_s,
                compress_s=compress_s,
                verify_s=verify_s,
                verification=verification,
            )
        )
    report = ExportReport(out_dir=str(out), source=source, recipe_name=recipe_label, packages=tuple(packages))
    report.save()
    return report


# --------------------------------------------------------------------------------------------------------------
# Inference: a diffusers pipeline whose components come from Core ML packages.
# --------------------------------------------------------------------------------------------------------------

PREFIXES = {"unet": UNetExport.prefix, "text_encoder": TextEncoderExport.prefix}
PREFIXES |= {"text_encoder_2": TextEncoderExport.prefix, "vae_decoder": VAEDecoderExport.prefix}


class CoreMLUnavailableError(RuntimeError):
    """Core ML prediction asked for where there is no Core ML runtime (coremltools predicts on macOS only)."""


def _as_package_paths(packages) -> dict[str, Path]:
    if isinstance(packages, ExportReport):
        return packages.paths()
    if isinstance(packages, (str, os.PathLike)):  # a folder written by export_pipeline
        folder = Path(packages)
        found = {c: folder / f"{c}.mlpackage" for c in COMPONENTS if (folder / f"{c}.mlpackage").exists()}
        if not found:
            raise FileNotFoundError(f"no <component>.mlpackage in {folder}; components: {', '.join(COMPONENTS)}")
        return found
    paths = {_check_component(c): Path(p) for c, p in dict(packages).items()}
    for path in paths.values():
        if not (path / "Manifest.json").exists():
            raise FileNotFoundError(f"not an .mlpackage (no Manifest.json): {path}")
    return paths


@dataclass(eq=False)
class CoreMLPipeline:
    """A diffusers pipeline running some components from Core ML packages; call it like the pipeline.

    Attributes:
        pipe: the wrapped pipeline (modified in place until `restore()`; nothing is copied).
        backend: `"emulate"` or `"coreml"`.
        label: what produced the images; for `"emulate"`, `EMULATION_LABEL`. Show it next to every result.
        packages: component -> package path.
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
        parts = ", ".join(f"{c}: {Path(p).name}" for c, p in self.packages.items())
        return f"{type(self.pipe).__name__} [{self.label}] ({parts})"


@torch.no_grad()
def _load_weights_(result: CoreMLPipeline, component: str, package: Path, include_float16: bool) -> None:
    module = component_module(result.pipe, component)
    stored = package_weights(package)
    palettized = palettized_weight_names(package)
    layers = {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    names = coreml_weight_names(f"{PREFIXES[component]}.{layer}" for layer in layers)
    by_weight = {names[f"{PREFIXES[component]}.{layer}"]: layer for layer in layers}
    unmapped = sorted(palettized - set(by_weight))
    if unmapped:
        raise ValueError(
            f"{package}: {len(unmapped)} palettized weights match no layer of {type(module).__name__}, "
            f"e.g. {unmapped[:3]}; was it exported from this pipeline's {component}?"
        )
    loaded = []
    for weight_name, layer in by_weight.items():
        if weight_name not in stored or not (weight_name in palettized or include_float16):
            continue
        weight = layers[layer].weight
        value = stored[weight_name]
        if value.size != weight.numel():
            raise ValueError(
                f"{package}: weight {weight_name} has {value.size} values, layer {layer} {weight.numel()}"
            )
        original = weight.data
        weight.data = torch.from_numpy(value.reshape(tuple(weight.shape))).to(device=weight.device, dtype=weight.dtype)
        result._undo.append(lambda w=weight, d=original: setattr(w, "data", d))
        loaded.append(layer)
    result.loaded[component] = loaded


def _batched_predict(predictor, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """`predictor.predict` over chunks of the package's fixed batch size, concatenated along axis 0."""
    n = len(next(iter(inputs.values())))
    if n % batch:
        raise ValueError(f"batch of {n} does not split into the package's fixed batch size {batch}")
    outs = [predictor.predict({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
    return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}


def _unet_forward(predictor, batch: int, sdxl: bool):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, return_dict=True, **kwargs):
        unsupported = [k for k, v in kwargs.items() if v is not None] + (["positional extras"] if args else [])
        if unsupported:
            raise NotImplementedError(f"the Core ML UNet takes no {', '.join(unsupported)}")
        n = sample.shape[0]
        inputs = {
            "sample": sample.detach().float().cpu().numpy(),
            "timestep": torch.as_tensor(timestep).float().reshape(-1).expand(n).cpu().numpy().copy(),
            "encoder_hidden_states": encoder_hidden_states.detach().float().cpu().numpy(),
        }
        if sdxl:
            inputs["text_embeds"] = added_cond_kwargs["text_embeds"].detach().float().cpu().numpy()
            inputs["time_ids"] = added_cond_kwargs["time_ids"].detach().float().cpu().numpy()
        out = torch.from_numpy(_batched_predict(predictor, inputs, batch)["noise_pred"]).to(
            sample.device, sample.dtype
        )
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    return forward


class _PenultimateOnly(tuple):
    """`hidden_states` of a Core ML text encoder: only `[-2]` (the penultimate layer, SDXL's embedding) exists."""

    def __getitem__(self, index):
        if index != -2:
            raise IndexError("a Core ML text encoder package outputs only hidden_states[-2] (no clip_skip)")
        return tuple.__getitem__(self, 0)


def _text_encoder_forward(predictor, batch: int, with_projection: bool, dtype: torch.dtype):
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPTextModelOutput

    def forward(input_ids, attention_mask=None, *args, return_dict=True, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("the Core ML text encoder takes no attention_mask (SD's CLIP uses none)")
        out = _batched_predict(predictor, {"input_ids": input_ids.cpu().numpy().astype(np.int32)}, batch)
        t = {k: torch.from_numpy(v).to(input_ids.device, dtype) for k, v in out.items()}
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
        image = _batched_predict(predictor, {"z": z.detach().float().cpu().numpy()}, batch)["image"]
        image = torch.from_numpy(image).to(z.device, z.dtype)
        return DecoderOutput(sample=image) if return_dict else (image,)

    return decode


def attach_predictors(pipe, predictors: Mapping[str, tuple], *, label: str = COREML_LABEL) -> CoreMLPipeline:
    """Route pipeline components through predictors: `{component: (predictor, batch_size)}`.

    A predictor is anything with `predict(dict[str, np.ndarray]) -> dict[str, np.ndarray]` under the package's
    input/output names (a `coremltools.models.MLModel`). The component's `forward` (`decode` for the VAE) is
    replaced by an instance attribute that calls it; `restore()` removes it. Used by `coreml_pipeline`.
    """
    result = CoreMLPipeline(pipe, "coreml", label, {})
    for component, (predictor, batch) in predictors.items():
        module = component_module(pipe, component)
        if component == "unet":
            sdxl = getattr(module.config, "addition_embed_type", None) == "text_time"
            method, fn = "forward", _unet_forward(predictor, batch, sdxl)
        elif component == "vae_decoder":
            method, fn = "decode", _vae_decode(predictor, batch)
        else:
            with_projection = hasattr(module, "text_projection")
            method, fn = "forward", _text_encoder_forward(predictor, batch, with_projection, module.dtype)
        setattr(module, method, fn)
        result._undo.append(lambda m=module, a=method: delattr(m, a))
    return result


class _ShapeCheckedModel:
    """An `MLModel` whose `predict` names the package's fixed input shapes when given others."""

    def __init__(self, model, path: Path):
        self.model, self.path = model, path
        inputs = model.get_spec().description.input
        self.shapes = {i.name: tuple(int(d) for d in i.type.multiArrayType.shape) for i in inputs}
        self.batch = next(iter(self.shapes.values()))[0]

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict:
        for name, value in inputs.items():
            if tuple(value.shape) != self.shapes[name]:
                raise ValueError(
                    f"{self.path.name} takes {name} of shape {self.shapes[name]}, got {tuple(value.shape)}: packages "
                    "have the fixed shapes they were exported with (generate at the pipeline's default size)"
                )
        return self.model.predict(dict(inputs))


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
        packages: an `ExportReport`, the folder `export_pipeline` wrote, or `{component: package path}`.
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
        `CoreMLPipeline`: call it like the pipeline; `restore()` (or a `with` block) undoes the change.
    """
    import sys

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    paths = _as_package_paths(packages)
    if backend == "emulate":
        result = CoreMLPipeline(pipe, "emulate", EMULATION_LABEL, dict(paths))
        try:
            for component, path in paths.items():
                _load_weights_(result, component, path, include_float16)
        except BaseException:
            result.restore()
            raise
        return result
    if sys.platform != "darwin":
        raise CoreMLUnavailableError(
            f"backend='coreml' needs the Core ML runtime, which coremltools provides on macOS only (this is "
            f"{sys.platform}); use backend='emulate' for {EMULATION_LABEL}"
        )
    import coremltools as ct

    units = getattr(ct.ComputeUnit, compute_units)
    models = {c: _ShapeCheckedModel(ct.models.MLModel(str(p), compute_units=units), p) for c, p in paths.items()}
    result = attach_predictors(pipe, {c: (m, m.batch) for c, m in models.items()})
    result.packages.update(paths)
    return result


@torch.no_grad()
def generate(
    pipe,
    prompt: str | list[str],
    *,
    seed: int = 0,
    num_inference_steps: int = 20,
    **kwargs,
) -> np.ndarray:
    """Seed-matched images: the same seed gives the same initial latents on any backend and device.

    The latents are drawn from a CPU `torch.Generator` seeded with `seed` (diffusers moves them to the
    pipeline's device), so a torch pipeline, an emulated one and a Core ML one start from the same noise.

    Args:
        pipe: a diffusers pipeline or a `CoreMLPipeline`.
        prompt (`str | list[str]`): the prompt(s).
        seed (`int`, defaults to 0), num_inference_steps (`int`, defaults to 20): as in diffusers.
        **kwargs: passed to the pipeline (guidance_scale, height, width, negative_prompt, ...).

    Returns:
        `np.ndarray`: NHWC float32 images in [0, 1].
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt, num_inference_steps=num_inference_steps, generator=generator, output_type="np", **kwargs)
    return np.asarray(out.images, dtype=np.float32)


def export_model(
    model: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    recipe_file: str | os.PathLike | None = None,
    recipe_name: str | None = None,
    nbits: int | None = None,
    components: Iterable[str] = ("unet",),
    min_numel: int = DEFAULT_MIN_NUMEL,
) -> ExportReport:
    """`workbench export`: load a pipeline (CPU, float32), export and verify it (see `export_pipeline`).

    Args:
        model: hub id or pipeline folder; None for the demo model (`workbench.pipelines.DEMO_MODEL`).
        recipe_file / recipe_name: a recipe JSON (ours or the reference's pre-analysis) and the recipe in it
            (optional when the file holds one).
        nbits, components, min_numel: see `export_pipeline`.
    """
    from workbench.pipelines import DEMO_MODEL, load_pipeline
    from workbench.recipes import load_recipe

    if recipe_name is not None and recipe_file is None:
        raise ValueError("--recipe-name needs --recipe FILE")
    if recipe_file is not None and nbits is not None:
        raise ValueError("pass a recipe or nbits, not both")
    if nbits is not None:
        from workbench.palettize import as_config

        as_config(int(nbits))  # an unsupported width fails before the pipeline loads
    recipe = load_recipe(recipe_file, recipe_name) if recipe_file is not None else None
    components = [_check_component(c) for c in components]  # fail before the pipeline loads
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    source = str(model) if model is not None else str(DEMO_MODEL)
    return export_pipeline(
        pipe, out_dir, recipe=recipe, nbits=nbits, components=components, min_numel=min_numel, source=source
    )
