"""A JupyterLab server for the browser test, isolated from the user's Jupyter setup, and helpers to drive its page.

`jupyterlab_server(root, home)` starts `jupyter lab` on a free loopback port with token auth, serving `root`. Every
Jupyter folder (config, data, runtime, lab settings and workspaces) is under `home`, a temporary folder, and so is
the kernel spec `python3`: ipykernel's own, written there, which runs this interpreter. So the notebooks run in the
project's Python whatever kernels the user has, and nothing is left behind. The kernel imports the `workbench` the
tests import (its folder goes first on `PYTHONPATH`). The page helpers take a Playwright `Page`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import workbench

KERNEL_DISPLAY_NAME = "Python (workbench browser test)"


def chromium_executable() -> str | None:
    """Debian's `chromium` (Playwright cannot download its own browser offline), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter_env(home: Path) -> dict[str, str]:
    """The server's environment: Jupyter's folders in `home`, our kernel spec first, this checkout's workbench."""
    from ipykernel.kernelspec import write_kernel_spec

    kernels = home / "share" / "jupyter" / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    write_kernel_spec(kernels / "python3", overrides={"display_name": KERNEL_DISPLAY_NAME})  # runs sys.executable
    config = home / "config"
    config.mkdir(parents=True, exist_ok=True)
    # no announcements, update checks or extension manager (they would reach the internet), no language servers;
    # otherwise a default lab
    never = {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}
    server_config = {
        "LabApp": never | {"extension_manager": "readonly"},
        "ServerApp": {"jpserver_extensions": {"jupyter_lsp": False}},  # it runs `npm`, which logs to ~/.npm
    }
    (config / "jupyter_server_config.json").write_text(json.dumps(server_config))
    notification = home / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no news toast
    package_root = str(Path(workbench.__file__).resolve().parents[1])
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_PATH=str(home / "share" / "jupyter"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "lab-workspaces"),
        IPYTHONDIR=str(home / "ipython"),
        PYTHONPATH=os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


@dataclass(frozen=True)
class Lab:
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path
    log: Path  # the server's stdout and stderr

    def notebook_url(self, name: str) -> str:
        """The URL that opens `root/name` in JupyterLab (a fresh workspace)."""
        return f"{self.url}/lab/tree/{name}?reset&token={self.token}"

    def api(self, path: str):
        with urllib.request.urlopen(f"{self.url}/api/{path}?token={self.token}", timeout=5) as response:
            return json.load(response)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _wait_until_up(lab: Lab, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{lab.log_tail()}")
        try:
            lab.api("status")
            return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"jupyter lab did not answer within {timeout_s:.0f} s:\n{lab.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server (it shuts its kernels down), then SIGKILL its process group if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group this helper started: the server and its kernels
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def jupyterlab_server(root: Path, home: Path, *, timeout_s: float = 60) -> Iterator[Lab]:
    """Run `jupyter lab` serving `root`, with every Jupyter folder under `home`; stopped (kernels too) on exit."""
    env = _jupyter_env(home)
    port, token = _free_port(), secrets.token_hex(16)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, home / "jupyterlab.log")
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
        f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root
    with open(lab.log, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(lab, process, timeout_s)
        yield lab
    finally:
        _stop(process)


# ------------------------------------------------------------------------------------------------ in the browser

_PROMPTS_JS = """() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
    .map(e => e.textContent.trim())"""
_RAN_JS = """() => {
    const prompts = Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')).map(e => e.textContent);
    const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
    return prompts.length > 0 && !prompts.some(p => p.includes('*')) && prompts.some(p => /\\d/.test(p))
        && status !== null && status.dataset.status === 'idle';
}"""


def open_notebook(page, lab: Lab, name: str) -> None:
    """Point `page` at `name` in JupyterLab (returns once the page has loaded; see `wait_for_kernel`)."""
    page.goto(lab.notebook_url(name))


def wait_for_kernel(page, *, timeout_s: float = 90) -> str:
    """Wait until the open notebook's cells are shown and its kernel is idle; the kernel's name in the toolbar."""
    page.wait_for_selector(".jp-CodeCell", timeout=timeout_s * 1000)
    idle = page.locator(".jp-StatusBar-Widget", has_text=" | Idle").first
    idle.wait_for(timeout=timeout_s * 1000)
    return page.locator(".jp-KernelName").first.inner_text()


def run_all_cells(page) -> None:
    """Run > Run All Cells, with the mouse, as a user would."""
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()


def wait_until_ran(page, *, timeout_s: float) -> list[str]:
    """Wait until no cell is queued or running and the kernel is idle; the code cells' prompts (`[1]:`, ...)."""
    page.wait_for_function(_RAN_JS, timeout=timeout_s * 1000, polling=500)
    return page.evaluate(_PROMPTS_JS)


def save_notebook(page, path: Path, *, timeout_s: float = 30):
    """Save with the keyboard (Ctrl+S), wait until the tab is no longer marked modified, read the file back."""
    import nbformat

    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})  # focus the notebook, not an output
    page.keyboard.press("Control+s")
    modified = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-current.jp-mod-dirty")
    modified.wait_for(state="detached", timeout=timeout_s * 1000)
    return nbformat.read(path, as_version=4)


def error_outputs(book) -> list[str]:
    """`ename: evalue` of every error output of an nbformat notebook (warnings on stderr are stream outputs)."""
    return [
        f"cell {i}: {o.ename}: {o.evalue}"
        for i, c in enumerate(book.cells)
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]


def rendered_errors(page) -> list[str]:
    """Tracebacks and widget errors as the page shows them (first line of each)."""
    texts = page.evaluate(
        """() => Array.from(document.querySelectorAll(
            '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"], .jp-OutputArea-output'
        )).map(e => e.textContent)"""
    )
    markers = ("Traceback (most recent call last)", "Error displaying widget", "Failed to load model class")
    return sorted({t.strip().splitlines()[0][:200] for t in texts if any(m in t for m in markers)})


@dataclass(frozen=True)
class ExplorerView:
    """What an explorer widget shows: its bold text line and its figure's `src` (a PNG as a data URL)."""

    text: str
    image_src: str = field(repr=False)  # tens of kB of base64: kept out of assertion messages


def explorer_view(widget) -> ExplorerView:
    """The text (first `.widget-html`) and figure (`img` in its Output) of an explorer's VBox `widget`."""
    image = widget.locator(".jp-OutputArea-output img").first
    image.wait_for()
    return ExplorerView(widget.locator(".widget-html").first.inner_text(), image.get_attribute("src") or "")


def wait_for_new_view(widget, before: ExplorerView, *, what: str, timeout_s: float) -> ExplorerView:
    """Poll until the explorer shows another text and another figure than `before`; AssertionError, saying what did
    not change, if it does not within `timeout_s`. `what` names the input, for the message."""
    deadline, view = time.monotonic() + timeout_s, before
    while time.monotonic() < deadline:
        view = explorer_view(widget)
        if view.text != before.text and view.image_src != before.image_src:
            return view
        time.sleep(0.25)
    stale = [f"text still {view.text!r}"] if view.text == before.text else []
    stale += ["figure unchanged"] if view.image_src == before.image_src else []
    raise AssertionError(f"the explorer did not follow {what} within {timeout_s:.0f} s: {'; '.join(stale)}")
