"""Whether this machine has the memory an export needs, checked before the (slow) conversion starts."""

from __future__ import annotations

from collections.abc import Sequence

from workbench.coreml.plan import ComponentPlan
from workbench.errors import UserError

# Peak memory of converting, palettizing, saving and verifying one component, beyond the loaded pipeline, per
# byte of the component's float32 weights: SD-1.5's UNet (3.44 GB) peaked at 12.4 GB RSS, 8.9 GB over the
# loaded pipeline (`workbench export` of a full-size build, 2 cores, 9 min 18 s).
EXPORT_MEMORY_PER_WEIGHT_BYTE = 2.6


class ExportMemoryError(UserError, MemoryError):
    """Exporting would need more memory than this machine has free; the message names the need and the way out."""


def export_memory_need(plans: Sequence[ComponentPlan]) -> int:
    """Bytes of memory the export of `plans` needs beyond the loaded pipeline (its largest component's)."""
    weights = max(sum(p.numel() * 4 for p in plan.module.parameters()) for plan in plans)
    return int(EXPORT_MEMORY_PER_WEIGHT_BYTE * weights)


def check_export_memory(
    plans: Sequence[ComponentPlan], available: int | None = None, *, action: str = "exporting"
) -> None:
    """Fail early, with the measured need and the way out, where the export (or `workbench apply`, `action`
    "applying the recipe to") would run out of memory: both hold the component's Core ML program, its palettized
    copy and the verification's read-back beside the loaded pipeline.

    Raises:
        ExportMemoryError: `export_memory_need(plans)` exceeds the memory available (`psutil`), or `available`.
    """
    import psutil

    need = export_memory_need(plans)
    if available is None:
        # weights loaded by mmap (safetensors) are not resident yet but will be: they count against what is free
        weights = sum(p.numel() * p.element_size() for plan in plans for p in plan.module.parameters())
        unread = max(0, weights - psutil.Process().memory_info().rss)
        available = psutil.virtual_memory().available - unread
    if need > available:
        largest = max(plans, key=lambda plan: sum(p.numel() for p in plan.module.parameters()))
        raise ExportMemoryError(
            f"{action} the {largest.component} needs about {need / 1e9:.1f} GB of free memory beyond the loaded "
            f"model ({EXPORT_MEMORY_PER_WEIGHT_BYTE:g} bytes per byte of its float32 weights, measured on SD-1.5); "
            f"this machine has {available / 1e9:.1f} GB free. Run it on a machine with more memory (the "
            "recipe file carries over), or close what else is using memory."
        )
