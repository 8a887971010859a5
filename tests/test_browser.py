"""The notebooks as people use them: JupyterLab in a real browser, all cells run, the explorers' sliders moved.

A JupyterLab server (`tests/lab_browser.py`: free port, token, every Jupyter folder and the kernel spec in a
temporary folder) serves notebooks 01 and 03 with the smoke parameters injected exactly as `workbench report`
injects them (`workbench.report.runner.parameterize_notebook`). Headless Chromium, driven by Playwright, opens
both, runs all cells from the Run menu (the two kernels work at the same time), saves each notebook with Ctrl+S
and checks it has no error output; then it moves the palette explorer's bit-width slider with the keyboard and
the recipe explorer's size slider with the mouse, and checks that each explorer's figure and text changed.

Needs Playwright (the `dev` extra) and a Chromium on PATH (`apt-get install chromium`: Playwright cannot download
its own browser offline); skipped without them. On a failure a screenshot of the page is written to the test's
temporary folder and its path is in the message.
"""

import re
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from lab_browser import (
    KERNEL_DISPLAY_NAME,
    chromium_executable,
    error_outputs,
    explorer_view,
    jupyterlab_server,
    open_notebook,
    rendered_errors,
    run_all_cells,
    save_notebook,
    wait_for_kernel,
    wait_for_new_view,
    wait_until_ran,
)

from workbench.report.runner import parameterize_notebook

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
if chromium_executable() is None:
    pytest.skip("no chromium on PATH (apt-get install chromium; Playwright cannot fetch one)", allow_module_level=True)

BASICS, ANALYSIS = "01_palettization_basics", "03_mixed_bit_analysis"
# smoke=True as CI's report; one torch thread each (the two kernels run side by side); notebook 03 on the demo
# model's 4 largest layers only (min_numel 100000 instead of smoke's 20000: a 9 s analysis instead of 67 s, still
# with recipes of every strategy at two sizes for the explorer to choose between)
PARAMETERS = {BASICS: {"smoke": True, "threads": 1}, ANALYSIS: {"smoke": True, "threads": 1, "min_numel": 100000}}
RUN_TIMEOUT_S = 300  # per notebook, both at once (76-83 s on a 2-core machine at load 20: docs/benchmarks.md)
SLIDER_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """The notebooks' `out_dir` parameter: the report folder they write their figures to."""
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, out_dir):
    root = tmp_path_factory.mktemp("notebooks")
    for name, params in PARAMETERS.items():
        injected = parameterize_notebook(name, root / f"{name}.ipynb", params | {"out_dir": str(out_dir)})
        assert injected == params | {"out_dir": str(out_dir)}, f"{name} does not declare {set(params) - set(injected)}"
    with jupyterlab_server(root, tmp_path_factory.mktemp("jupyter")) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_executable(), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


@contextmanager
def screenshot_on_failure(page, shots: Path, name: str, lab=None):
    """Re-raise any failure in the block as an AssertionError naming a screenshot of `page` (and the server log)."""
    try:
        yield
    except Exception as err:
        path = shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        where = f"screenshot: {path}" + (f"; JupyterLab log: {lab.log}" if lab is not None else "")
        raise AssertionError(f"{name}: {type(err).__name__}: {err}\n{where}") from err


@pytest.fixture(scope="module")
def ran(lab, browser, shots):
    """Both notebooks opened in their own tab, Run All Cells in each, waited for; name -> (page, saved notebook)."""
    pages = {name: browser.new_page(viewport={"width": 1400, "height": 1000}) for name in PARAMETERS}
    for name, page in pages.items():  # both load and start their kernels at once
        open_notebook(page, lab, f"{name}.ipynb")
    for name, page in pages.items():
        with screenshot_on_failure(page, shots, f"{name}-open", lab):
            assert wait_for_kernel(page) == KERNEL_DISPLAY_NAME, "the notebook did not get the test's kernel spec"
            run_all_cells(page)
    start, result = time.perf_counter(), {}
    for name, page in pages.items():
        with screenshot_on_failure(page, shots, f"{name}-run", lab):
            prompts = wait_until_ran(page, timeout_s=RUN_TIMEOUT_S)
            book = save_notebook(page, lab.root / f"{name}.ipynb")
        print(f"{name}: ran in {time.perf_counter() - start:.0f} s (both kernels at once)")
        result[name] = (page, prompts, book)
    yield result
    for page in pages.values():
        page.close()


def _check_ran_without_error(ran, name, figure: Path):
    """No error output, every cell run once in order, and `figure` written (the injected `out_dir` was used)."""
    page, prompts, book = ran[name]
    errors, shown = error_outputs(book), rendered_errors(page)
    assert not errors, f"{name}: error outputs: {errors}"
    assert not shown, f"{name}: the page shows errors: {shown}"
    code = [c for c in book.cells if c.cell_type == "code"]
    assert prompts == [f"[{i}]:" for i in range(1, len(code) + 1)], f"{name}: not every cell ran once: {prompts}"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "the saved notebook differs"
    assert figure.is_file() and figure.stat().st_size > 10_000, f"{name} did not write {figure}"
    return page


def test_basics_notebook_and_palette_explorer(ran, shots, out_dir):
    page = _check_ran_without_error(ran, BASICS, out_dir / "figures" / "01_weight_histogram.png")
    with screenshot_on_failure(page, shots, f"{BASICS}-explorer"):
        explorer = page.locator(".jp-CodeCell").last.locator(".widget-vbox").first
        explorer.scroll_into_view_if_needed()
        before = explorer_view(explorer)
        assert re.search(r": 3-bit per_tensor \(1 LUT of 8\)", before.text), before.text
        handle = explorer.locator(".widget-slider .noUi-handle").first
        handle.click()  # focus the bit-width slider's handle; a click on the handle itself leaves the value
        page.keyboard.press("ArrowRight")  # 3 -> 4 bits, the next of SUPPORTED_NBITS
        after = wait_for_new_view(explorer, before, what="ArrowRight on its bits slider", timeout_s=SLIDER_TIMEOUT_S)
        assert re.search(r": 4-bit per_tensor \(1 LUT of 16\)", after.text), f"text after ArrowRight: {after.text!r}"
        assert after.image_src.startswith("data:image/png;base64,"), after.image_src[:60]
        assert after.image_src != before.image_src, "the palette explorer's figure did not change with its slider"
        assert explorer.locator(".widget-readout").first.inner_text() == "4"


def _bits_per_param(text: str) -> float:
    match = re.search(r"^(\S+)[^:\n]*: ([0-9.]+) bits/param", text)  # "NAME (strategy): X bits/param · ..."
    assert match, f"no 'NAME (strategy): X bits/param' in the recipe explorer's text: {text!r}"
    return float(match.group(2))


def test_analysis_notebook_and_recipe_explorer(ran, shots, out_dir):
    page = _check_ran_without_error(ran, ANALYSIS, out_dir / "figures" / "03_psnr_vs_size.png")
    with screenshot_on_failure(page, shots, f"{ANALYSIS}-explorer"):
        explorer = page.locator(".jp-CodeCell").last.locator(".widget-vbox").first
        explorer.scroll_into_view_if_needed()
        before = explorer_view(explorer)
        handle = explorer.locator(".widget-slider .noUi-handle").first
        track = explorer.locator(".widget-slider .noUi-base").first.bounding_box()
        box = handle.bounding_box()
        # drag the size slider's handle from the largest recipe to the track's left end (the smallest)
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(track["x"] - 20, box["y"] + box["height"] / 2, steps=10)
        page.mouse.up()
        after = wait_for_new_view(explorer, before, what="a drag of its size slider", timeout_s=SLIDER_TIMEOUT_S)
        name_before, name_after = before.text.split(":")[0], after.text.split(":")[0]
        assert name_after != name_before, f"the recipe explorer still shows {name_before} after the drag"
        assert _bits_per_param(after.text) < _bits_per_param(before.text), (before.text, after.text)
        assert after.image_src != before.image_src, "the recipe explorer's preview did not change with its slider"
