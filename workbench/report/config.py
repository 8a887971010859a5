"""What a report run is asked for and what it did: `ReportConfig`, the notebooks it runs, their outcomes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from workbench.errors import InvalidValueError
from workbench.models.loader import checkpoint_spec, model_from_text

NOTEBOOKS: tuple[str, ...] = (
    "01_palettization_basics",
    "02_uniform_palettization",
    "03_mixed_bit_analysis",
    "04_seed_matched_comparison",
    "05_coreml_export",
    "06_learned_palettes",
)


# ---------------------------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class ReportConfig:
    """What `workbench report` runs.

    Args:
        run (`str`, defaults to `"demo"`): the folder name under `out_root`.
        model (`str`, defaults to `""`): the notebooks' `model` parameter (`""` = demo model; a single-file
            `.safetensors` / `.ckpt` checkpoint too).
        model_config (`str`, defaults to `""`): a single-file checkpoint's architecture, a pipeline folder or cached
            hub id (`workbench.models.single_file.SingleFile.config`); `""`: inferred from the checkpoint's keys.
        allow_pickle (`bool`, defaults to False): unpickle a `.ckpt` that holds more than tensors.
        smoke (`bool`, defaults to False): shrink every notebook (CI): few prompts, few steps.
        notebooks (`tuple[str, ...]`): which notebooks, in order (default: all five).
        out_root (`str`, defaults to `"reports"`): parent folder of the run folder.
        timeout_s (`int`, *optional*): per-cell execution timeout in seconds; None (default) = none: the analysis
            cell of a full-size model runs for hours, and an interrupted analysis resumes where it stopped.
        threads (`int`, defaults to 2): torch CPU threads inside the notebooks.
    """

    run: str = "demo"
    model: str = ""
    model_config: str = ""
    allow_pickle: bool = False
    smoke: bool = False
    notebooks: tuple[str, ...] = NOTEBOOKS
    out_root: str = "reports"
    timeout_s: int | None = None
    threads: int = 2

    def __post_init__(self):
        if not self.run or "/" in self.run or self.run.startswith("."):
            raise InvalidValueError(f"run name {self.run!r} must be a plain folder name, e.g. 'demo'")
        unknown = [n for n in self.notebooks if n not in NOTEBOOKS]
        if unknown:
            raise InvalidValueError(f"unknown notebooks {unknown}; valid: {', '.join(NOTEBOOKS)}")
        object.__setattr__(self, "notebooks", tuple(self.notebooks))
        if self.threads < 1:
            raise InvalidValueError(f"threads must be >= 1, got {self.threads}")
        checkpoint_spec(model_from_text(self.model), self.model_config, self.allow_pickle)  # options need a file

    @property
    def model_spec(self):
        """The model as the loader takes it: a `SingleFile` with `model_config` and `allow_pickle` for a checkpoint
        file, else the `model` text's spec (`workbench.models.loader.checkpoint_spec`)."""
        return checkpoint_spec(model_from_text(self.model), self.model_config, self.allow_pickle)

    def notebook_parameters(self) -> dict:
        """The model parameters every notebook gets: `model` (a local path made absolute: the notebooks run in the
        report folder), `model_config` (likewise) and `allow_pickle`."""
        return {
            "model": _absolute_if_local(self.model),
            "model_config": _absolute_if_local(self.model_config),
            "allow_pickle": self.allow_pickle,
        }

    @property
    def out_dir(self) -> Path:
        return Path(self.out_root) / self.run

    def to_dict(self) -> dict:
        return asdict(self) | {"notebooks": list(self.notebooks)}

    @classmethod
    def from_dict(cls, d) -> ReportConfig:
        return cls(**{**d, "notebooks": tuple(d.get("notebooks", NOTEBOOKS))})


def _absolute_if_local(text: str) -> str:
    """`text` as an absolute path if it names an existing file or folder, else as it is (a hub id, "tiny-sd")."""
    return str(Path(text).expanduser().resolve()) if text and Path(text).expanduser().exists() else text


def select_notebooks(spec: str) -> tuple[str, ...]:
    """`"01,3,04_seed_matched_comparison"` -> those notebooks' full names, in report order; `""` -> all."""
    if not spec.strip():
        return NOTEBOOKS
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        matches = [n for n in NOTEBOOKS if n == item or n.split("_", 1)[0] == item.zfill(2)]
        if not matches:
            raise InvalidValueError(
                f"unknown notebook {item!r}; valid: numbers 1-{len(NOTEBOOKS)} or {', '.join(NOTEBOOKS)}"
            )
        chosen += matches
    return tuple(n for n in NOTEBOOKS if n in chosen)


@dataclass(frozen=True)
class NotebookRun:
    """One executed notebook: its parameters, wall time and whether it finished without an error cell."""

    notebook: str
    parameters: dict
    seconds: float
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class ReportResult:
    out_dir: Path
    runs: tuple[NotebookRun, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in asdict(r).items() if k != "parameters"} for r in self.runs])


def notebook_artifacts(out_dir: Path, notebook: str) -> list[dict]:
    path = out_dir / "artifacts" / f"{notebook}.json"
    return json.loads(path.read_text()) if path.is_file() else []
