"""The results of an export or an apply: one `ExportedPackage` per package, gathered in an `ExportReport`
(`<out>/verification.json`), with sizes, bits/param, timings and the read-back `Verification`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.coreml.verify import Verification
from workbench.io import environment, write_json_atomic


@dataclass(frozen=True)
class ExportedPackage:
    """One exported component.

    Attributes:
        component, path: what and where (`<out>/Unet.mlpackage`, ...: `workbench.coreml.layout.package_name`).
        nbytes: package size on disk; float16_nbytes: the same component converted without palettization.
        bits_per_param: sum(bits * numel) / sum(numel) over the component's Linear/Conv2d layers with more than
            `min_numel` weights (16 for float16 layers), the reference's measure
            (`workbench.palettes.size.bits_per_param`).
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

    def to_row(self) -> dict:
        """One row of `ExportReport.to_frame`: sizes, bits/param, timings, verification counts."""
        v = self.verification
        return {
            "component": self.component,
            "path": self.path,
            "nbytes": self.nbytes,
            "float16_nbytes": self.float16_nbytes,
            "pct_of_float16": self.pct_of_float16,
            "bits_per_param": self.bits_per_param,
            "n_palettized": self.n_palettized,
            "bit_exact": None if v is None else sum(c.bit_exact for c in v.layers),
            "float16_exact": None if v is None else f"{v.float16_exact}/{v.float16_layers}",
            "deployment_target": self.deployment_target,
            "export_s": self.export_s,
            "compress_s": self.compress_s,
            "verify_s": self.verify_s,
        }

    def summary(self) -> str:
        """One line: path, size against float16, bits/param, target and the verification result."""
        v = self.verification
        check = "not verified"
        if v is not None:
            n_exact = sum(c.bit_exact for c in v.layers)
            check = (
                f"{n_exact}/{len(v.layers)} palettized weights bit-exact with the simulation, "
                f"{v.float16_exact}/{v.float16_layers} float16 weights exact"
            )
            if v.unexpected_palettized:
                check += f", {len(v.unexpected_palettized)} palettized unexpectedly"
        return (
            f"{self.component}: {self.path}  {self.nbytes / 1e6:.2f} MB ({self.pct_of_float16:.1f}% of float16 "
            f"{self.float16_nbytes / 1e6:.2f} MB), {self.bits_per_param:.2f} bits/param, {self.deployment_target}; "
            f"{check}"
        )


@dataclass(frozen=True)
class ExportReport:
    """The packages written by `export_pipeline` (or `apply_recipe`), and what was checked. Saved as
    `<out>/verification.json`. `applied_to`: the input package of `apply_recipe` ("" for an export); `notes`: what
    else a user should know (e.g. package weights that matched no layer and were left as they are); `settings`: the
    export's `ExportConfig.to_dict()` (empty for an apply)."""

    out_dir: str
    source: str
    recipe_name: str
    packages: tuple[ExportedPackage, ...]
    applied_to: str = ""
    notes: tuple[str, ...] = ()
    settings: Mapping = field(default_factory=dict)

    @property
    def all_bit_exact(self) -> bool:
        return all(p.verification is None or p.verification.all_bit_exact for p in self.packages)

    def package(self, component: str) -> ExportedPackage:
        """The first package of `component` (a chunked UNet has two: see `packages`)."""
        for p in self.packages:
            if p.component == component:
                return p
        raise KeyError(f"no {component!r} package; exported: {', '.join(p.component for p in self.packages)}")

    def paths(self) -> dict[str, Path | tuple[Path, ...]]:
        """`{component: package path}`, what `coreml_pipeline` takes; a chunked UNet's is a tuple of its chunks."""
        grouped: dict[str, list[Path]] = {}
        for p in self.packages:
            grouped.setdefault(p.component, []).append(Path(p.path))
        return {c: paths[0] if len(paths) == 1 else tuple(paths) for c, paths in grouped.items()}

    def to_frame(self):
        """One row per package (sizes, bits/param, timings, verification counts)."""
        import pandas as pd

        return pd.DataFrame([p.to_row() for p in self.packages])

    def layers_frame(self):
        """Every verified layer of every package (`LayerCheck` rows)."""
        import pandas as pd

        frames = [p.verification.to_frame() for p in self.packages if p.verification is not None]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def to_dict(self) -> dict:

        d = asdict(self)
        for p, row in zip(self.packages, d["packages"]):
            row["verification"] = None if p.verification is None else p.verification.to_dict()
        d["all_bit_exact"] = self.all_bit_exact
        d["environment"] = environment()
        return d

    def save(self, path: str | os.PathLike | None = None) -> Path:

        return write_json_atomic(path or Path(self.out_dir) / "verification.json", self.to_dict())

    def summary(self) -> str:
        """A few lines for a terminal: per package its path, size, bits/param and the verification result."""
        what = f"recipe applied to {self.applied_to}, a package" if self.applied_to else "export"
        lines = [f"{what} of {self.source or 'pipeline'} (recipe: {self.recipe_name or 'none'})"]
        lines += [f"  {p.summary()}" for p in self.packages]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(
            "verification: " + ("ALL BIT-EXACT" if self.all_bit_exact else "MISMATCH (see verification.json)")
        )
        return "\n".join(lines)
