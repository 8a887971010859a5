"""Whether this machine has the memory an export needs, checked before the (slow) conversion starts."""

from __future__ import annotations

from collections.abc import Sequence

from workbench.coreml.plan import ComponentPlan
from workbench.coreml.unet_split import pieces_by_size, unet_units
from workbench.errors import UserError
from workbench.models.layers import get_layer
from workbench.palettes.size import layer_nbytes

# Converting a component whole (text encoders, VAE decoder; `workbench apply` reading a package): peak memory
# beyond the loaded pipeline per byte of the component's float32 weights. SD-1.5's UNet (3.44 GB) converted whole
# peaked at 12.4 GB RSS, 8.9 GB over the loaded float32 pipeline (see docs/full-size.md).
EXPORT_MEMORY_PER_WEIGHT_BYTE = 2.6
# The UNet, converted a piece at a time (`workbench.coreml.unet_export`): per byte of the largest piece's float32
# weights (its float32 copy, the traced graph, the MIL constants and their float16 casts), plus per byte of the
# palettized package (the pieces' palettized programs, the stitched one, its serialization and the read-back).
# Measured on full-size SD-1.5 and SDXL exports (docs/full-size.md).
PIECE_MEMORY_PER_WEIGHT_BYTE = 2.2
PACKAGE_MEMORY_PER_BYTE = 3.0


class ExportMemoryError(UserError, MemoryError):
    """Exporting would need more memory than this machine has free; the message names the need and the way out."""


def _palettized_nbytes(plan: ComponentPlan) -> int:
    """Bytes of the component's package: its palettized layers as stored, every other parameter in float16."""
    total = sum(p.numel() * 2 for p in plan.module.parameters())
    for layer, cfg in plan.palette.items():
        weight = get_layer(plan.module, layer).weight
        total += layer_nbytes(weight.numel(), weight.shape[0], cfg) - 2 * weight.numel()
    return total


def component_memory_need(plan: ComponentPlan, piece_bytes: int | None = None) -> int:
    """Bytes of memory exporting one component needs beyond the loaded pipeline: for a UNet exported in pieces of
    at most `piece_bytes` float32 bytes, its largest piece's conversion and its palettized package; else the whole
    component's conversion."""
    if piece_bytes is None or plan.component != "unet":
        return int(EXPORT_MEMORY_PER_WEIGHT_BYTE * sum(p.numel() * 4 for p in plan.module.parameters()))
    units = unet_units(plan.module)
    sizes = [unit.nbytes(plan.module) for unit in units]
    largest = max(sum(sizes[a:b]) for a, b in pieces_by_size(units, plan.module, piece_bytes))
    return int(PIECE_MEMORY_PER_WEIGHT_BYTE * largest + PACKAGE_MEMORY_PER_BYTE * _palettized_nbytes(plan))


def export_memory_need(plans: Sequence[ComponentPlan], piece_bytes: int | None = None) -> int:
    """Bytes of memory the export of `plans` needs beyond the loaded pipeline (its most demanding component's)."""
    return max(component_memory_need(plan, piece_bytes) for plan in plans)


def check_export_memory(
    plans: Sequence[ComponentPlan],
    available: int | None = None,
    *,
    action: str = "exporting",
    piece_bytes: int | None = None,
) -> None:
    """Fail early, with the measured need and the way out, where the export (or `workbench apply`, `action`
    "applying the recipe to") would run out of memory: both hold the component's Core ML program, its palettized
    copy and the verification's read-back beside the loaded pipeline.

    Raises:
        ExportMemoryError: `export_memory_need(plans)` exceeds the memory available (`psutil`), or `available`.
    """
    import psutil

    need = export_memory_need(plans, piece_bytes)
    if available is None:
        # weights loaded by mmap (safetensors) are not resident yet but will be: they count against what is free
        weights = sum(p.numel() * p.element_size() for plan in plans for p in plan.module.parameters())
        unread = max(0, weights - psutil.Process().memory_info().rss)
        available = psutil.virtual_memory().available - unread
    if need > available:
        largest = max(plans, key=lambda plan: component_memory_need(plan, piece_bytes))
        pieces = largest.component == "unet" and piece_bytes is not None
        way_out = " or smaller pieces (--piece-gb)," if pieces else ""
        raise ExportMemoryError(
            f"{action} the {largest.component} needs about {need / 1e9:.1f} GB of free memory beyond the loaded "
            f"model (measured on full-size SD-1.5 and SDXL); this machine has {available / 1e9:.1f} GB free. Run "
            f"it on a machine with more memory (the recipe file carries over),{way_out} or close what else is using "
            "memory."
        )
