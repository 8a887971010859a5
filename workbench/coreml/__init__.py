"""Core ML packages: export in Apple's layout, apply recipes to existing packages, prove the weights, run them.

- `components`: the exportable pipeline components (`COMPONENTS`), their trace-friendly wrappers
  (`UNetExport`, `TextEncoderExport`, `VAEDecoderExport`), example inputs, and the Core ML name of each layer's
  weight (`coreml_weight_name`: UNet layer `L` is `unet_<L with . as _>_weight_to_fp16`).
- `layout`: the packages' inputs, outputs and names: Apple's (`"apple"`, the default: what Apple's Swift pipeline and
  apps load, `apple_contract`) or ours (`"workbench"`); the tokenizer files and `compile_for_swift.sh` beside them.
- `config`: `ExportConfig`, the settings of an export (recipe or width, components, layout, ...), checked when made.
- `plan`: what each component will palettize (`palette_plan`, `plan_export` -> `ComponentPlan`), checked against the
  torch modules before any conversion (a recipe naming unknown layers: `RecipeError` with the closest names).
- `memory`: the memory an export needs, checked first (`check_export_memory`, `ExportMemoryError`).
- `metadata`: what a package says about itself (`set_package_metadata`).
- `compress`: palettization of a converted model's weights by name (`compress_model`).
- `export`: conversion (`convert_component`), `export_pipeline` /
  `export_component`, and `export_model` (the `workbench export` command).
- `apply`: a recipe applied to a package converted elsewhere (`apply_recipe`, `workbench apply`), its weights
  matched to torch layers by exact float16 content (`match_weights`).
- `results`: `ExportedPackage`, `ExportReport` (`verification.json`), for export and apply alike.
- `verify`: reading packages back on any OS (`package_weights`, `palettized_weight_names`, `load_program`) and
  the bit-exactness check against the simulation (`verify_package` -> `Verification` of `LayerCheck`s).
- `runtime`: running a pipeline on packages (`coreml_pipeline(backend="emulate" | "coreml")` ->
  `CoreMLPipeline`; `attach_predictors`).

Images come from `workbench.models.generation.generate_images`, for torch and Core ML pipelines alike.

Example:
    >>> recipe = load_recipe("recipes.json", "recipe_4.50_bit_mixedpalette")
    >>> config = ExportConfig(recipe=recipe, components=("unet", "text_encoder", "vae_decoder"))
    >>> report = export_pipeline(pipe, "out/", config)
    >>> print(report.summary())          # sizes, bits/param, bit-exact per package; out/verification.json
    >>> with coreml_pipeline(pipe, report, backend="emulate") as emulated:   # any OS
    ...     images = generate_images(emulated, "a red circle", seed=0)
    >>> emulated.label
    'weight-exact emulation (not the Core ML runtime)'

`backend="coreml"` runs `MLModel.predict` and exists on macOS only.
"""

from workbench.coreml.apply import (
    DeploymentTargetError,
    PackageMismatchError,
    WeightMatch,
    apply_model,
    apply_recipe,
    match_weights,
)
from workbench.coreml.components import (
    COMPONENTS,
    WRAPPERS,
    TextEncoderExport,
    UNetExport,
    VAEDecoderExport,
    check_component,
    component_module,
    coreml_weight_name,
    coreml_weight_names,
    example_inputs,
    export_wrapper,
    layer_weight_names,
    weight_layers,
)
from workbench.coreml.compress import compress_model
from workbench.coreml.config import DEFAULT_MIN_NUMEL, ExportConfig, RecipeLike
from workbench.coreml.export import (
    convert_component,
    export_component,
    export_model,
    export_pipeline,
)
from workbench.coreml.layout import (
    APPLE_RESOURCE_NAMES,
    DEFAULT_LAYOUT,
    LAYOUTS,
)
from workbench.coreml.memory import ExportMemoryError, check_export_memory
from workbench.coreml.metadata import set_package_metadata
from workbench.coreml.plan import ComponentPlan, check_recipe_layers, palette_plan, plan_export
from workbench.coreml.results import ExportedPackage, ExportReport
from workbench.coreml.runtime import (
    BACKENDS,
    COREML_LABEL,
    EMULATION_LABEL,
    CoreMLPipeline,
    CoreMLUnavailableError,
    attach_predictors,
    coreml_pipeline,
)
from workbench.coreml.verify import (
    LayerCheck,
    Verification,
    load_program,
    package_nbytes,
    package_weights,
    palettized_weight_names,
    program_weight_names,
    verify_package,
    weight_psnr,
)

__all__ = [
    "APPLE_RESOURCE_NAMES",
    "DEFAULT_LAYOUT",
    "LAYOUTS",
    "DeploymentTargetError",
    "PackageMismatchError",
    "WeightMatch",
    "apply_model",
    "apply_recipe",
    "match_weights",
    "BACKENDS",
    "COMPONENTS",
    "COREML_LABEL",
    "DEFAULT_MIN_NUMEL",
    "EMULATION_LABEL",
    "WRAPPERS",
    "ComponentPlan",
    "ExportConfig",
    "ExportMemoryError",
    "CoreMLPipeline",
    "CoreMLUnavailableError",
    "ExportReport",
    "ExportedPackage",
    "LayerCheck",
    "RecipeLike",
    "TextEncoderExport",
    "UNetExport",
    "VAEDecoderExport",
    "Verification",
    "attach_predictors",
    "check_component",
    "component_module",
    "check_export_memory",
    "check_recipe_layers",
    "compress_model",
    "convert_component",
    "coreml_pipeline",
    "coreml_weight_name",
    "coreml_weight_names",
    "example_inputs",
    "export_component",
    "export_model",
    "export_pipeline",
    "export_wrapper",
    "layer_weight_names",
    "load_program",
    "package_nbytes",
    "package_weights",
    "palette_plan",
    "palettized_weight_names",
    "plan_export",
    "program_weight_names",
    "set_package_metadata",
    "verify_package",
    "weight_layers",
    "weight_psnr",
]
