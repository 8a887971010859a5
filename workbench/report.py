"""`workbench report`: execute the notebooks with papermill into `reports/<run>/`, and what notebooks use to
write their figures, tables and recipes there.

A report folder holds::

    reports/<run>/
      index.html               links to everything below, with the figures inline
      parameters.json          the run's settings, each notebook's parameters, and `workbench.io.environment()`
      notebooks/NN_name.ipynb  the executed notebooks (outputs included)
      html/NN_name.html        nbconvert renderings of them
      figures/NN_*.png         every figure and image grid, as PNG
      tables/NN_*.csv          every table
      recipes/NN_*.json        recipes (reference JSON format) and other JSON records
      artifacts/NN_name.json   what each notebook wrote, with captions (index.html is built from these)

A notebook gets `out_dir` (the run folder), `model` and `smoke` as parameters and saves through `Artifacts`.
The notebooks are package data (`workbench/notebooks/`, `NOTEBOOK_DIR`), so an installed workbench runs them too.
While they run, the console shows each cell and the workbench's progress bars (`workbench.report_progress`).

Example:
    >>> run_report(ReportConfig(run="demo"))          # what `make report` does
    >>> art = Artifacts("reports/demo", notebook="02_uniform_palettization")   # inside a notebook
    >>> art.figure(fig, "psnr_vs_bits", "Latent and image PSNR against bits per parameter.")
"""

from __future__ import annotations

import html
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from workbench.errors import InvalidValueError
from workbench.io import environment, write_json_atomic, write_text_atomic

NOTEBOOK_DIR = Path(__file__).resolve().parent / "notebooks"
"""The source notebooks. Package data like the demo model: inside the package, found relative to this file, in
the wheel through pyproject.toml's `[tool.setuptools.package-data]`; `make lab` opens this folder."""
NOTEBOOKS: tuple[str, ...] = (
    "01_palettization_basics",
    "02_uniform_palettization",
    "03_mixed_bit_analysis",
    "04_seed_matched_comparison",
    "05_coreml_export",
)
KERNEL_NAME = "python3"  # ipykernel's own spec; resolved to this interpreter (see `_this_interpreters_kernel`)


# ---------------------------------------------------------------------------------------------- in notebooks


def open_model(model: str = "", *, device: str | None = None, dtype: str = "auto", threads: int | None = None):
    """The pipeline a notebook's `model` parameter names, on `device`, without per-step progress bars.

    A notebook convenience over `workbench.pipelines.load_pipeline`: the parameter is text, so `""` stands for the
    demo model (`workbench.pipelines.model_from_text`); anything else is a model spec as the loader takes it
    ("tiny-sd", "tiny-sdxl", a pipeline folder, a cached hub id).

    Args:
        model (`str`, defaults to `""`): the notebook's `model` parameter.
        device (`str`, *optional*): where to run; None picks the best available (cuda > mps > cpu).
        dtype (`str`, defaults to "auto"): float16 on cuda/mps, float32 on cpu (`workbench.pipelines.model_dtype`).
        threads (`int`, *optional*): cap torch's CPU threads (the process-wide setting; notebooks set it once).

    Returns:
        the diffusers pipeline.
    """
    import torch

    from workbench.pipelines import load_pipeline, model_dtype, model_from_text, pick_device

    if threads is not None:
        torch.set_num_threads(threads)
    target = pick_device(device)
    return load_pipeline(model_from_text(model), device=target, dtype=model_dtype(target, dtype), progress=False)


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
    from workbench.pipelines import model_from_text

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
        """Save a DataFrame as `tables/NN_name.csv` and show it under its caption."""
        path = None
        if self.enabled:
            path = self._path("tables", name, ".csv")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, frame.to_csv(index=False))
        _caption("Table", caption)
        if show:
            _display(frame)
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


# ---------------------------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class ReportConfig:
    """What `workbench report` runs.

    Args:
        run (`str`, defaults to `"demo"`): the folder name under `out_root`.
        model (`str`, defaults to `""`): the notebooks' `model` parameter (`""` = demo model).
        smoke (`bool`, defaults to False): shrink every notebook (CI): few prompts, few steps.
        notebooks (`tuple[str, ...]`): which notebooks, in order (default: all five).
        out_root (`str`, defaults to `"reports"`): parent folder of the run folder.
        timeout_s (`int`, *optional*): per-cell execution timeout in seconds; None (default) = none: the analysis
            cell of a full-size model runs for hours, and an interrupted analysis resumes where it stopped.
        threads (`int`, defaults to 2): torch CPU threads inside the notebooks.
    """

    run: str = "demo"
    model: str = ""
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

    @property
    def out_dir(self) -> Path:
        return Path(self.out_root) / self.run

    def to_dict(self) -> dict:
        return asdict(self) | {"notebooks": list(self.notebooks)}

    @classmethod
    def from_dict(cls, d) -> ReportConfig:
        return cls(**{**d, "notebooks": tuple(d.get("notebooks", NOTEBOOKS))})


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


@contextmanager
def _this_interpreters_kernel() -> Iterator[None]:
    """Make kernel `python3` resolve to this venv's ipykernel spec, ahead of any user-installed `python3` spec.

    Jupyter searches `JUPYTER_PATH` first; ipykernel's spec runs `python`, which jupyter_client replaces with
    `sys.executable`, i.e. this interpreter. Restored on exit.
    """
    old = os.environ.get("JUPYTER_PATH")
    own = str(Path(sys.prefix) / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([own, *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def notebook_parameters(path: str | os.PathLike) -> dict[str, dict]:
    """The parameters a notebook declares in its `parameters` cell (papermill's inspection)."""
    import papermill as pm

    return pm.inspect_notebook(str(path))


def execute_notebook(
    name: str,
    out_dir: Path,
    parameters: dict,
    *,
    timeout_s: int | None = None,
    log: Callable[[str], None] | None = None,
) -> NotebookRun:
    """Run `NOTEBOOK_DIR/<name>.ipynb` with papermill into `out_dir/notebooks/`, render it to `out_dir/html/`.

    Only parameters the notebook declares are passed (papermill would warn about the others). The kernel runs in
    `out_dir` (the source folder may be a read-only installed package).

    Args:
        log (`Callable[[str], None]`, *optional*): gets a line as each code cell starts and, while a workbench
            progress bar runs, its counts and ETA (`workbench.report_progress.ProgressLog`); None: silent.
    """
    import papermill as pm

    from workbench.report_progress import ProgressLog, execution_kwargs

    source = NOTEBOOK_DIR / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"notebook not found: {source}")
    declared = notebook_parameters(source)
    params = {k: v for k, v in parameters.items() if k in declared}
    executed = out_dir / "notebooks" / f"{name}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    start, error = time.perf_counter(), ""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    with _this_interpreters_kernel():
        try:
            pm.execute_notebook(
                str(source),
                str(executed),
                parameters=params,
                kernel_name=KERNEL_NAME,
                cwd=str(out_dir.resolve()),
                progress_bar=False,  # one line per cell instead (`log`)
                execution_timeout=timeout_s,
                **execution_kwargs(ProgressLog(name, log) if log is not None else None),
            )
        except pm.PapermillExecutionError as err:
            error = f"{err.ename}: {err.evalue}"
        except (CellTimeoutError, DeadKernelError) as err:  # the notebook failed, not the report: go on
            error = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    seconds = time.perf_counter() - start
    render_html(executed, out_dir / "html" / f"{name}.html")
    return NotebookRun(name, params, seconds, ok=not error, error=error)


def render_html(notebook: str | os.PathLike, out: str | os.PathLike) -> Path:
    """nbconvert's HTML rendering of an executed notebook (images embedded; nothing is fetched)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(str(notebook), as_version=4))
    return write_text_atomic(out, body)


def _console(line: str) -> None:
    print(line, flush=True)  # flushed: `make report | tee log` must not sit on minutes of buffered progress


def run_report(config: ReportConfig, log: Callable[[str], None] = _console, progress: bool = True) -> ReportResult:
    """Execute the notebooks of `config` into `config.out_dir`, write `parameters.json` and `index.html`.

    Artifacts a previous report left in the same folder are removed first, so the folder holds one run.

    Args:
        config (`ReportConfig`): what to run.
        log (`Callable[[str], None]`, defaults to printing): gets a line per notebook started and finished.
        progress (`bool`, defaults to True): also log each cell and the progress bars inside it (with ETA).

    Returns:
        `ReportResult`; `.ok` is False if any notebook stopped on an error (its executed copy and HTML show where).
    """
    import shutil

    from workbench.pipelines import check_model, model_from_text

    check_model(model_from_text(config.model))
    out_dir = config.out_dir
    for sub in ("notebooks", "html", "figures", "tables", "recipes", "artifacts"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {
        "model": config.model,
        "smoke": config.smoke,
        "out_dir": str(out_dir.resolve()),
        "explorer": False,  # widgets need a live kernel; the HTML would show their text repr
        "threads": config.threads,
    }
    record = {"report": config.to_dict(), "notebooks": {}, "environment": environment()}
    write_json_atomic(out_dir / "parameters.json", record)
    runs, start = [], time.perf_counter()
    for i, name in enumerate(config.notebooks, 1):
        log(f"[{i}/{len(config.notebooks)}] {name} ...")
        run = execute_notebook(name, out_dir, base, timeout_s=config.timeout_s, log=log if progress else None)
        runs.append(run)
        record["notebooks"][name] = {"parameters": run.parameters, "seconds": round(run.seconds, 1), "ok": run.ok}
        write_json_atomic(out_dir / "parameters.json", record)
        status = "ok" if run.ok else f"FAILED ({run.error})"
        log(f"[{i}/{len(config.notebooks)}] {name}: {status} in {run.seconds:.0f} s")
    result = ReportResult(out_dir, tuple(runs), time.perf_counter() - start)
    write_index(out_dir, config, result)
    log(f"report: {out_dir / 'index.html'} ({result.seconds:.0f} s)")
    return result


def _artifacts(out_dir: Path, notebook: str) -> list[dict]:
    path = out_dir / "artifacts" / f"{notebook}.json"
    return json.loads(path.read_text()) if path.is_file() else []


INDEX_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table.meta td, table.meta th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.95em; } .failed { color: #b00; font-weight: bold; } .ok { color: #070; }
ul.files li { margin: 0.2em 0; }
"""


def _inline_code(text: str) -> str:
    """Markdown `code` spans in a caption as HTML <code>."""
    import re

    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def write_index(out_dir: Path, config: ReportConfig, result: ReportResult) -> Path:
    """`index.html`: run settings and versions, then per notebook its links, figures (inline) and files."""
    esc = html.escape
    env = environment()
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Report {esc(config.run)}</title>",
        f"<style>{INDEX_CSS}</style></head><body>",
        f"<h1>Palettization report: {esc(config.run)}</h1>",
        "<table class='meta'>",
        f"<tr><th>model</th><td>{esc(model_label(config.model))}</td></tr>",
        f"<tr><th>smoke</th><td>{config.smoke}</td></tr>",
        f"<tr><th>wall time</th><td>{result.seconds:.0f} s</td></tr>",
        f"<tr><th>python</th><td>{esc(env['python'])} on {esc(env['platform'])}</td></tr>",
        f"<tr><th>packages</th><td>{esc(packages)}</td></tr>",
        "<tr><th>settings</th><td><a href='parameters.json'>parameters.json</a></td></tr></table>",
        "<p>Core ML images in notebook 05 are <b>emulated</b> on Linux (the package's decompressed weights run in "
        "torch); they come from the Core ML runtime only when the report runs on macOS.</p>",
        "<h2>Contents</h2><ul>",
    ]
    for run in result.runs:
        mark = "<span class='ok'>ok</span>" if run.ok else "<span class='failed'>FAILED</span>"
        parts.append(f"<li><a href='#{run.notebook}'>{esc(run.notebook)}</a> ({run.seconds:.0f} s, {mark})</li>")
    parts.append("</ul>")
    for run in result.runs:
        nb = esc(run.notebook)
        parts.append(f"<h2 id='{nb}'>{nb}</h2>")
        parts.append(
            f"<p><a href='html/{nb}.html'>executed notebook (HTML)</a> · <a href='notebooks/{nb}.ipynb'>.ipynb</a>"
            f" · {run.seconds:.0f} s · parameters <code>{esc(json.dumps(run.parameters))}</code></p>"
        )
        if not run.ok:
            parts.append(f"<p class='failed'>Stopped on an error: {esc(run.error)}</p>")
        files = []
        for art in _artifacts(out_dir, run.notebook):
            path, caption = esc(art["path"]), _inline_code(esc(art["caption"]))
            if art["kind"] == "figure":
                parts.append(f"<figure><img src='{path}' alt='{caption}'><figcaption>{caption}</figcaption></figure>")
            else:
                files.append(f"<li><a href='{path}'>{path}</a>: {caption}</li>")
        if files:
            parts.append("<p>Files:</p><ul class='files'>" + "".join(files) + "</ul>")
    parts.append("</body></html>")
    return write_text_atomic(out_dir / "index.html", "\n".join(parts))


README_FIGURES = {"03_psnr_vs_size.png": "psnr_vs_size.png", "04_seed_matched_grid.png": "seed_matched_grid.png"}


def readme_figures(run_dir: str | os.PathLike, docs_dir: str | os.PathLike, max_width: int = 900) -> list[Path]:
    """Copy the README's figures out of a finished report, shrunk to `max_width` pixels and palette-quantised
    (small enough to commit): `figures/03_psnr_vs_size.png` and `figures/04_seed_matched_grid.png`.

    Returns:
        the written paths under `docs_dir`.
    """
    from PIL import Image

    written = []
    for source, target in README_FIGURES.items():
        path = Path(run_dir) / "figures" / source
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `workbench report` (notebooks 03 and 04) first")
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.width > max_width:
                image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
            out = Path(docs_dir) / target
            out.parent.mkdir(parents=True, exist_ok=True)
            image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
        written.append(out)
    return written
