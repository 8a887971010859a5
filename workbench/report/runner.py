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
The notebooks are found by `workbench.resources` (the checkout's `notebooks/`, or the copy an installed wheel carries).
While they run, the console shows each cell and the workbench's progress bars (`workbench.report.progress`).

Example:
    >>> run_report(ReportConfig(run="demo"))          # what `make report` does
    >>> art = Artifacts("reports/demo", notebook="02_uniform_palettization")   # inside a notebook
    >>> art.figure(fig, "psnr_vs_bits", "Latent and image PSNR against bits per parameter.")
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from workbench.io import environment, write_json_atomic, write_text_atomic
from workbench.models.loader import check_model
from workbench.report.config import NotebookRun, ReportConfig, ReportResult
from workbench.report.index import write_index
from workbench.report.progress import ProgressLog, execution_kwargs
from workbench.resources import notebook_dir

NOTEBOOK_DIR = notebook_dir()
"""The source notebooks: the checkout's `notebooks/` (which `make lab` opens), or the copy a wheel carries."""
KERNEL_NAME = "python3"  # ipykernel's own spec; resolved to this interpreter (see `_this_interpreters_kernel`)


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


def _source(name: str) -> Path:
    source = NOTEBOOK_DIR / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"notebook not found: {source}")
    return source


def declared_parameters(source: str | os.PathLike, parameters: dict) -> dict:
    """Those of `parameters` that the notebook at `source` declares (papermill would warn about the others)."""
    declared = notebook_parameters(source)
    return {k: v for k, v in parameters.items() if k in declared}


def parameterize_notebook(name: str, dest: str | os.PathLike, parameters: dict) -> dict:
    """Write `NOTEBOOK_DIR/<name>.ipynb` to `dest` with `parameters` injected as a report injects them (papermill's
    `injected-parameters` cell after the `parameters` cell), without running it: a report's notebook to open in
    JupyterLab. Returns the parameters injected (those the notebook declares)."""
    import papermill as pm

    source = _source(name)
    params = declared_parameters(source, parameters)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(source), str(dest), parameters=params, kernel_name=KERNEL_NAME, prepare_only=True)
    return params


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
            progress bar runs, its counts and ETA (`workbench.report.progress.ProgressLog`); None: silent.
    """
    import papermill as pm

    source = _source(name)
    params = declared_parameters(source, parameters)
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

    check_model(config.model_spec)
    out_dir = config.out_dir
    for sub in ("notebooks", "html", "figures", "tables", "recipes", "artifacts"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {
        **config.notebook_parameters(),
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
