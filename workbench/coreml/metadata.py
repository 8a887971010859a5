"""What a palettized package says about itself: description, author and `user_defined_metadata`."""

from __future__ import annotations

from workbench import __version__


def set_package_metadata(
    model, *, component: str, source: str, recipe_name: str, bits_per_param: float, n: int
) -> None:
    """Describe a palettized model: short description, author, and `user_defined_metadata` (source model,
    component, recipe, bits/param, number of palettized layers)."""

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
