"""What a notebook executed by `workbench report` is doing: the cell that runs (with its section heading) and,
while a workbench progress bar runs in it, the items done, the total and the ETA.

In a papermill kernel the workbench's `tqdm.auto` bars are ipywidgets: their text never reaches a stream, it
reaches the driver as widget updates (comm messages). `ProgressClient`, papermill's notebook client plus one
hook, hands those updates and each cell start to a `ProgressLog`, which turns them into console lines, one bar
line at most every `interval_s` seconds:

    03_mixed_bit_analysis: cell 4/9 (03 · Mixed-bit analysis): result = run_analysis(pipe, config, out_dir=folder)
    03_mixed_bit_analysis: analysis 412/1817 eval (23%), 00:51 elapsed, ETA 02:53

Example:
    >>> log = ProgressLog("03_mixed_bit_analysis", print)
    >>> pm.execute_notebook(src, out, **execution_kwargs(log))
"""

from __future__ import annotations

import functools
import html
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ENGINE_NAME = "workbench-progress"
# "412/1817 [00:51<02:53, 8.06eval/s]" or "... 1.20s/eval]": tqdm's right-hand text (spaces are U+2007 in the widget)
_BAR_COUNTS = re.compile(r"(\d+)/(\d+)\s*\[([^<\]]*)<([^,\]]*)(?:,\s*[\d.?]+\s*(?:s/([^\]\s]+)|([^/\]\s]+)/s))?")
_BAR_LABEL = re.compile(r"^(.*?):?\s*\d+%$")  # "analysis:  23%": tqdm's left-hand text


@dataclass(frozen=True)
class BarProgress:
    """One tqdm progress bar's state, as its text shows it."""

    done: int
    total: int
    elapsed: str
    eta: str  # "?" before the first rate is known
    unit: str = "it"

    def line(self, label: str) -> str:
        pct = 100 * self.done // self.total if self.total else 0
        name = f"{label} " if label else ""
        return f"{name}{self.done}/{self.total} {self.unit} ({pct}%), {self.elapsed} elapsed, ETA {self.eta}"


def widget_text(value: str) -> str:
    """A tqdm widget's HTML text as plain text: entities unescaped, figure spaces as spaces, runs collapsed."""
    return " ".join(html.unescape(value).replace("\u2007", " ").split())


def parse_bar(text: str) -> BarProgress | None:
    """The counts of tqdm's right-hand text ("412/1817 [00:51<02:53, 8.06eval/s]"), or None for other text
    (a bar without a total yet, any other widget)."""
    match = _BAR_COUNTS.search(widget_text(text))
    if match is None:
        return None
    done, total, elapsed, eta, slow_unit, unit = match.groups()
    if int(total) == 0:  # a bar whose total is not planned yet
        return None
    return BarProgress(int(done), int(total), elapsed.strip(), eta.strip(), unit or slow_unit or "it")


def cell_phase(cells, index: int, width: int = 70) -> str:
    """Where cell `index` stands: "(<the nearest markdown heading above it>): <its first line of code>"."""

    def cut(text: str) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    heading = ""
    for cell in reversed(cells[:index]):
        if cell.cell_type == "markdown":
            lines = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            if lines:
                heading = lines[0]
                break
    code = next((line.strip() for line in cells[index].source.splitlines() if line.strip()), "")
    return (f"({cut(heading)}): " if heading else "") + cut(code)


class ProgressLog:
    """Turns cell starts and progress-bar updates of one executing notebook into console lines.

    Args:
        notebook (`str`): its name, the prefix of every line.
        log (`Callable[[str], None]`): where lines go.
        interval_s (`float`, defaults to 15.0): at most one line per bar this often (its first and last
            states always show).
        clock (`Callable[[], float]`, defaults to `time.monotonic`).
    """

    def __init__(self, notebook: str, log: Callable[[str], None], interval_s: float = 15.0, clock=time.monotonic):
        self.notebook, self.log, self.interval_s, self.clock = notebook, log, interval_s, clock
        self.label = ""
        self._last: dict[str, float] = {}  # label -> when its last line was written

    def cell_started(self, cells: Sequence, cell_index: int) -> None:
        """Cell `cell_index` of the executing notebook's `cells` starts: a line for each code cell, numbered
        among them; papermill's parameter cells are neither shown nor counted."""

        def counted(cell) -> bool:
            tags = set(cell.metadata.get("tags", []))
            return cell.cell_type == "code" and not {"parameters", "injected-parameters"} & tags

        if not counted(cells[cell_index]):
            return
        codes = [i for i, c in enumerate(cells) if counted(c)]
        self.log(f"{self.notebook}: cell {codes.index(cell_index) + 1}/{len(codes)} {cell_phase(cells, cell_index)}")

    def widget_update(self, state: dict) -> None:
        """A widget's new state (a comm message's `data.state`); tqdm's label and counts are string `value`s."""
        value = state.get("value")
        if not isinstance(value, str):
            return
        bar = parse_bar(value)
        if bar is None:
            label = _BAR_LABEL.match(widget_text(value))
            if label is not None:
                self.label = label.group(1).strip()
            return
        now, last = self.clock(), self._last.get(self.label)
        if last is None or now - last >= self.interval_s or bar.done == bar.total:
            self._last[self.label] = now
            self.log(f"{self.notebook}: {bar.line(self.label)}")


def kernel_transport() -> str:
    """ "ipc" (Unix sockets in Jupyter's private runtime folder) where it works, else "tcp". Over TCP ipykernel
    warns, once per notebook, that the kernel "is running over TCP without encryption"; over IPC there is
    nothing to warn about. Unix sockets need POSIX and a short path (about 100 characters)."""
    from jupyter_core.paths import jupyter_runtime_dir

    return "ipc" if os.name == "posix" and len(jupyter_runtime_dir()) <= 50 else "tcp"


def execution_kwargs(progress: ProgressLog | None) -> dict:
    """Keyword arguments for `papermill.execute_notebook`: the kernel transport and, with `progress`, the
    engine that reports to it (registered with papermill on first use)."""
    from traitlets.config import Config

    kwargs = {"config": Config({"KernelManager": {"transport": kernel_transport()}})}
    if progress is not None:
        kwargs |= {"engine_name": _register_engine(), "progress_log": progress}
    return kwargs


@functools.cache
def _register_engine() -> str:
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines
    from traitlets import Any

    class ProgressClient(PapermillNotebookClient):
        """papermill's client, also handing cell starts and widget updates to a `ProgressLog`."""

        progress_log = Any(None)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.progress_log is not None:
                self.on_cell_start = lambda cell, cell_index: self.progress_log.cell_started(self.nb.cells, cell_index)

        def process_message(self, msg, cell, cell_index):
            if msg["msg_type"] == "comm_msg" and self.progress_log is not None:
                self.progress_log.widget_update(msg["content"].get("data", {}).get("state") or {})
            return super().process_message(msg, cell, cell_index)

    class ProgressEngine(NBClientEngine):
        """papermill's nbclient engine with `ProgressClient` (papermill's own argument handling, abridged)."""

        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, start_timeout=60, execution_timeout=None, **kwargs):
            from papermill.engines import logger

            kwargs.pop("input_path", None)
            return ProgressClient(
                nb_man,
                kernel_name=kernel_name,
                timeout=execution_timeout,
                startup_timeout=start_timeout,
                log=logger,
                **kwargs,
            ).execute()

    papermill_engines.register(ENGINE_NAME, ProgressEngine)
    return ENGINE_NAME
