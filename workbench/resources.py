"""Where the workbench finds what ships beside its code: the notebooks and the demo model.

In a checkout they are the repository's top-level `notebooks/` and `data/tiny-shapes/`; an installed wheel carries
copies inside the package (`workbench/_resources/`, see `pyproject.toml`). One resolver looks in the installed
copy first, then in the checkout, so code, tests and the CLI never spell either path themselves.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_path(*parts: str) -> Path:
    """The path of a shipped resource, e.g. `resource_path("notebooks")` or `resource_path("data", "tiny-shapes")`:
    the installed copy (`workbench/_resources/...`) where there is one, else the checkout's (`<repository>/...`),
    which may not exist yet (the demo model's folder before `workbench train` writes it)."""
    installed = _PACKAGE.joinpath("_resources", *parts)
    return installed if installed.exists() else _PACKAGE.parent.joinpath(*parts)


def notebook_dir() -> Path:
    """The folder of the report's notebooks (`notebooks/` in a checkout)."""
    return resource_path("notebooks")


def demo_model_dir() -> Path:
    """The demo model's pipeline folder (`data/tiny-shapes/` in a checkout)."""
    return resource_path("data", "tiny-shapes")
