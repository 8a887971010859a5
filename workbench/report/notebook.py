"""Helpers the notebooks call: open a model from a text parameter, quiet logs, name a model, and `Artifacts`, which
writes each figure and table of a notebook into its report folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from workbench.io import write_json_atomic, write_text_atomic
from workbench.models.loader import checkpoint_spec, load_pipeline, model_dtype, model_from_text, pick_device
from workbench.report.tables import labelled

# ---------------------------------------------------------------------------------------------- in notebooks


def open_model(
    model: str = "",
    *,
    device: str | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    config: str = "",
    allow_pickle: bool = False,
):
    """The pipeline a notebook's `model` parameter names, on `device`, without per-step progress bars.

    A notebook convenience over `workbench.models.loader.load_pipeline`: the parameter is text, so `""` stands for the
    demo model (`workbench.models.loader.model_from_text`); anything else is a model spec as the loader takes it
    ("tiny-sd", "tiny-sdxl", a pipeline folder, a cached hub id, a single-file `.safetensors` / `.ckpt` checkpoint).

    Args:
        model (`str`, defaults to `""`): the notebook's `model` parameter.
        config (`str`, defaults to `""`): a single-file checkpoint's architecture (the notebook's `model_config`):
            a pipeline folder or cached hub id; `""`: inferred from the checkpoint's keys.
        allow_pickle (`bool`, defaults to False): unpickle a `.ckpt` that holds more than tensors.
        device (`str`, *optional*): where to run; None picks the best available (cuda > mps > cpu).
        dtype (`str`, defaults to "auto"): float16 on cuda/mps, float32 on cpu (`workbench.models.loader.model_dtype`).
        threads (`int`, *optional*): cap torch's CPU threads (the process-wide setting; notebooks set it once).

    Returns:
        the diffusers pipeline.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    target = pick_device(device)
    spec = checkpoint_spec(model_from_text(model), config, allow_pickle, options=("model_config", "allow_pickle"))
    return load_pipeline(spec, device=target, dtype=model_dtype(target, dtype), progress=False)


def quiet_logs() -> None:
    """Silence library chatter in a notebook's output: coremltools' import-time warnings (untested torch/sklearn
    versions, no Core ML runtime on Linux), transformers' and diffusers' loading bars and notices. Our own
    warnings and every error still show. Call it once at the top of a notebook; it sets those libraries' log
    levels for the process.
    """
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Drop what a noisy library writes to stderr in the block (coremltools' conversion progress bars would
    fill a notebook's HTML with hundreds of lines). Exceptions still propagate with their tracebacks."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        yield


def resolve_analysis_dir(analysis_dir: str, out_dir: str) -> Path:
    """Where notebooks 03-05 keep the mixed-bit analysis: `analysis_dir` if given, else `<out_dir>/analysis`,
    else `reports/lab/analysis` under the kernel's working folder (a notebook opened by hand)."""
    if analysis_dir:
        return Path(analysis_dir)
    return Path(out_dir) / "analysis" if out_dir else Path.cwd() / "reports" / "lab" / "analysis"


def model_label(model: str) -> str:
    """A short name for captions of a notebook's `model` parameter: `"demo model (tiny-shapes)"`, `"tiny
    random-weight SD"` / `"... SDXL"`, or the path or hub id."""

    spec = model_from_text(model)
    labels = {
        None: "demo model (tiny-shapes)",
        "tiny-sd": "tiny random-weight SD",
        "tiny-sdxl": "tiny random-weight SDXL",
    }
    return labels.get(spec, spec)


@dataclass
class Artifacts:
    """Saves a notebook's figures, tables and JSON into a report folder, and shows them with their captions.

    With `out_dir=""` (a notebook opened by hand) nothing is written; everything is still displayed.

    Args:
        out_dir (`str` or `os.PathLike`): the run folder (`reports/<run>`), or `""`.
        notebook (`str`): the notebook's name, e.g. `"02_uniform_palettization"`; its number prefixes every file.
    """

    out_dir: str | os.PathLike
    notebook: str
    records: list[dict] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(str(self.out_dir))

    def _path(self, kind: str, name: str, suffix: str) -> Path:
        prefix = self.notebook.split("_", 1)[0]
        return Path(self.out_dir) / kind / f"{prefix}_{name}{suffix}"

    def _record(self, kind: str, path: Path | None, caption: str) -> None:
        if path is not None:
            self.records.append({"kind": kind, "path": str(path.relative_to(self.out_dir)), "caption": caption})
            write_json_atomic(Path(self.out_dir) / "artifacts" / f"{self.notebook}.json", self.records)

    def paths(self, kind: str | None = None) -> list[Path]:
        """The files written so far (of `kind`: "figure", "table", "json", "file")."""
        return [Path(self.out_dir) / r["path"] for r in self.records if kind is None or r["kind"] == kind]

    def figure(self, fig, name: str, caption: str, *, dpi: int = 110) -> None:
        """Save a matplotlib figure as `figures/NN_name.png`, show that PNG, then its caption; close the figure.

        The PNG itself is displayed (not the figure object), so the notebook shows exactly the saved file
        whatever matplotlib backend is active.
        """
        import io

        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        png = buffer.getvalue()
        path = None
        if self.enabled:
            path = self._path("figures", name, ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
        try:
            from IPython.display import Image
        except ImportError:
            pass
        else:
            _display(Image(data=png, format="png"))
        _caption("Figure", caption)
        self._record("figure", path, caption)

    def image(self, image, name: str, caption: str) -> None:
        """Save a PIL image (e.g. an image grid) as `figures/NN_name.png`, show it, then its caption."""
        path = None
        if self.enabled:
            path = self._path("figures", name, ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        _display(image)
        _caption("Figure", caption)
        self._record("figure", path, caption)

    def table(self, frame, name: str, caption: str, *, show: bool = True) -> None:
        """Save a DataFrame as `tables/NN_name.csv` and show it under its caption, its columns labelled
        (`workbench.report.tables.labelled`: "bits/param", "size (MB)", ...; the CSV keeps the keys)."""
        path = None
        if self.enabled:
            path = self._path("tables", name, ".csv")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, frame.to_csv(index=False))
        _caption("Table", caption)
        if show:
            _display(labelled(frame))
        self._record("table", path, caption)

    def json(self, data, name: str, caption: str) -> None:
        """Save JSON-serialisable `data` as `recipes/NN_name.json`."""
        path = None
        if self.enabled:
            path = write_json_atomic(self._path("recipes", name, ".json"), data)
        _caption("File", f"{caption}" + (f" Written to `{path.relative_to(self.out_dir)}`." if path else ""))
        self._record("json", path, caption)

    def file(self, path: str | os.PathLike, caption: str) -> None:
        """Record a file some other code wrote inside the run folder (e.g. a Core ML verification report)."""
        path = Path(path)
        if self.enabled and path.is_relative_to(self.out_dir):
            self._record("file", path, caption)


def _display(obj) -> None:
    try:
        from IPython.display import display
    except ImportError:
        return
    display(obj)


def _caption(kind: str, text: str) -> None:
    try:
        from IPython.display import Markdown, display
    except ImportError:
        return
    display(Markdown(f"**{kind}.** {text}"))
