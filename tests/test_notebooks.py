"""Every notebook, executed through papermill with smoke=True by `workbench report`, writes what it must.

One report run (module fixture) executes notebooks 01-05 in order into a temporary reports folder, as
`make report` does; 04 and 05 read the analysis 03 wrote. The model is the tiny random-weight SD pipeline
(`model="tiny-sd"`): the notebooks' code paths are the same as on the demo model, at a size CI can afford. The
report's tests are slow-marked (`make test-slow`, which CI runs); the progress and timeout tests are quick.
"""

import json

import nbformat
import pandas as pd
import pytest
from PIL import Image

from workbench.report.config import NOTEBOOKS, ReportConfig
from workbench.report.progress import BarProgress, ProgressLog, cell_phase, parse_bar
from workbench.report.runner import NOTEBOOK_DIR, execute_notebook, notebook_parameters, run_report

MODEL = "tiny-sd"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    result = run_report(
        ReportConfig(run="smoke", model=MODEL, smoke=True, out_root=str(root), threads=1), log=print, progress=False
    )
    return result


def _figure(out, name):
    path = out / "figures" / name
    assert path.is_file(), f"missing figure {name}"
    with Image.open(path) as image:
        assert image.width >= 300 and image.height >= 150, f"{name} is {image.size}"
    return path


def _table(out, name):
    path = out / "tables" / name
    assert path.is_file(), f"missing table {name}"
    return pd.read_csv(path)


def test_source_notebooks_follow_the_rules():
    for name in NOTEBOOKS:
        book = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell is not tagged parameters"
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} is committed with outputs"
        params = notebook_parameters(NOTEBOOK_DIR / f"{name}.ipynb")
        assert {"model", "smoke", "out_dir"} <= set(params), f"{name}: {sorted(params)}"
        assert all(p["help"] and p["inferred_type_name"] != "None" for p in params.values()), name


@pytest.mark.slow  # the whole smoke report (~2.5 min): `make test-slow`, and CI
def test_every_notebook_ran_without_error(report):
    assert [r.notebook for r in report.runs] == list(NOTEBOOKS)
    failed = {r.notebook: r.error for r in report.runs if not r.ok}
    assert not failed, failed
    for run in report.runs:
        book = nbformat.read(report.out_dir / "notebooks" / f"{run.notebook}.ipynb", as_version=4)
        errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors
        assert (report.out_dir / "html" / f"{run.notebook}.html").stat().st_size > 10_000
        assert run.parameters["smoke"] is True and run.parameters["model"] == MODEL


@pytest.mark.slow
def test_index_and_parameters(report):
    index = (report.out_dir / "index.html").read_text()
    for name in NOTEBOOKS:
        assert f"html/{name}.html" in index and f"notebooks/{name}.ipynb" in index
    assert "figures/03_psnr_vs_size.png" in index and "emulated" in index
    record = json.loads((report.out_dir / "parameters.json").read_text())
    assert record["report"]["smoke"] is True
    assert record["environment"]["packages"]["torch"]
    assert set(record["notebooks"]) == set(NOTEBOOKS)


@pytest.mark.slow
def test_01_basics(report):
    out = report.out_dir
    for name in ("01_weight_histogram.png", "01_error_vs_bits.png", "01_bytes_vs_bits.png"):
        _figure(out, name)
    table = _table(out, "01_error_vs_bits.csv")
    tensor = table[table.granularity == "per_tensor"].set_index("nbits")
    assert list(tensor.index) == [1, 2, 4]
    assert tensor["weight_snr_db"].is_monotonic_increasing
    assert len(_table(out, "01_lut_2bit.csv")) == 4
    _figure(out, "01_data_aware_palettes.png")
    aware = _table(out, "01_data_aware.csv").set_index("palette")
    assert list(aware.index) == ["kmeans4", "wkmeans4"]
    # the data-aware palette is the optimum of the importance-weighted error (over the float16 weights)
    assert aware.loc["wkmeans4", "weighted_error"] <= aware.loc["kmeans4", "weighted_error"] * (1 + 1e-6)


@pytest.mark.slow
def test_02_uniform(report):
    out = report.out_dir
    _figure(out, "02_psnr_vs_bits.png")
    _figure(out, "02_uniform_grid.png")
    summary = _table(out, "02_uniform_summary.csv")
    assert list(summary["name"]) == ["float16", "4-bit", "2-bit"]
    assert (
        summary.set_index("name").loc["4-bit", "image_psnr_db"]
        > summary.set_index("name").loc["2-bit", "image_psnr_db"]
    )
    assert summary["latent_psnr_db"].iloc[1:].notna().all()


@pytest.mark.slow
def test_03_analysis(report):
    out = report.out_dir
    _figure(out, "03_psnr_vs_size.png")
    recipes = _table(out, "03_recipes.csv")
    assert {"name", "bits_per_param", "size_mb", "pct_of_float16", "psnr_one_step_db", "image_psnr_db", "ssim"} <= set(
        recipes.columns
    )
    assert set(recipes["strategy"]) >= {"apple", "size-aware", "refined"} and set(recipes["target"]) == {"iOS17"}
    refinement = _table(out, "03_refinement.csv")
    assert len(refinement) and (refinement["refined_psnr"] >= refinement["start_psnr"]).all()
    saved = json.loads((out / "recipes" / "03_preanalysis.json").read_text())
    assert set(saved) >= {"model_version", "single_layer", "cumulative", "baselines", "recipes"}
    assert saved["recipes"] and (out / "analysis" / "preanalysis.json").is_file()


@pytest.mark.slow
def test_04_seed_matched(report):
    out = report.out_dir
    _figure(out, "04_seed_matched_grid.png")
    summary = _table(out, "04_recipe_summary.csv")
    assert summary["name"].iloc[0] == "float16" and len(summary) >= 2
    # the workbench's recipes beside Apple's rule: every strategy the analysis ran is in the grid
    assert {"apple", "size-aware", "refined"} <= set(summary["strategy"])
    cells = _table(out, "04_cells.csv")
    assert len(cells) == 2 * len(summary)  # 2 prompts in smoke
    assert (cells.groupby("prompt")["seed"].nunique() == 1).all(), "a row must use one seed in every column"


@pytest.mark.slow
def test_05_coreml(report):
    out = report.out_dir
    _figure(out, "05_torch_vs_coreml.png")
    packages = _table(out, "05_packages.csv")
    assert packages["nbytes"].iloc[0] < packages["float16_nbytes"].iloc[0]
    assert packages["bit_exact"].iloc[0] == packages["n_palettized"].iloc[0] > 0
    verification = json.loads((out / "coreml" / "verification.json").read_text())
    assert verification["all_bit_exact"] is True
    images = _table(out, "05_torch_vs_coreml.csv").set_index("name")
    simulated, packaged = images["image_psnr_db"].iloc[1], images["image_psnr_db"].iloc[2]
    assert packaged == simulated, "emulated package images must equal the torch simulation's"
    # path 2: the recipe applied to the float16 UNet package gives the exported package, bit-exact
    applied = _table(out, "05_applied.csv")
    assert applied["bit_exact"].iloc[0] == applied["n_palettized"].iloc[0] == packages["n_palettized"].iloc[0]
    assert abs(applied["nbytes"].iloc[0] - packages["nbytes"].iloc[0]) <= 0.01 * packages["nbytes"].iloc[0]
    assert (out / "coreml" / "compile_for_swift.sh").exists() and (out / "coreml" / "vocab.json").exists()


def test_06_learned_on_tiny_sd_skips_training_it_has_no_data_for(report):
    out = report.out_dir
    _figure(out, "06_learned_lut_histogram.png")
    assert not (out / "figures" / "06_trained_lut_histogram.png").exists()
    assert list(_table(out, "06_learned_recipes.csv")["name"]) == ["float16", "2-bit k-means", "2-bit learned"]


@pytest.mark.slow  # the demo model in smoke mode: learned LUTs, then training with the palettes (~1 min)
def test_06_on_the_demo_model_trains_with_the_palettes_and_shows_the_trained_column(tmp_path):
    run = execute_notebook("06_learned_palettes", tmp_path, {"model": "", "smoke": True, "out_dir": str(tmp_path)})
    assert run.ok, run.error
    _figure(tmp_path, "06_trained_lut_histogram.png")
    losses = _table(tmp_path, "06_qat_loss.csv")
    assert len(losses) == 2 and losses["loss"].notna().all()  # smoke: two steps, one row each
    table = _table(tmp_path, "06_learned_recipes.csv").set_index("name")
    assert (table["bits_per_param"].iloc[1:] == 2.0).all() and table["color_adherence"].notna().all()
    psnr = table["image_psnr_db"]
    assert list(psnr.index) == ["float16", "2-bit k-means", "2-bit learned", "2-bit trained"]
    assert (psnr.iloc[1:] > 10).all()  # the palettized columns are images of the same scenes, not noise


# ------------------------------------------------------------------------------- console progress of a report


def test_progress_bar_text_of_a_kernel_widget_is_parsed():
    # tqdm.notebook's right-hand text as the driver receives it: U+2007 spaces, HTML-escaped "<"
    assert parse_bar("\u20074/5\u2007[00:01&lt;00:00,\u2007\u20073.29eval/s]") == BarProgress(
        4, 5, "00:01", "00:00", "eval"
    )
    assert parse_bar("412/1817 [00:51<02:53, 8.06eval/s]").line("analysis") == (
        "analysis 412/1817 eval (22%), 00:51 elapsed, ETA 02:53"
    )
    assert parse_bar("0/5 [00:00<?, ?it/s]") == BarProgress(0, 5, "00:00", "?", "it")
    assert parse_bar("60/179 [00:45<02:10, 1.10s/eval]") == BarProgress(60, 179, "00:45", "02:10", "eval")
    assert parse_bar("0/0 [00:00<?, ?eval/s]") is None  # no total planned yet
    assert parse_bar("analysis:\u2007\u200720%") is None and parse_bar("0eval [00:00, ?eval/s]") is None


def test_progress_log_throttles_bar_lines_but_shows_first_and_last():
    lines, now = [], [0.0]
    log = ProgressLog("03_x", lines.append, interval_s=10.0, clock=lambda: now[0])
    log.widget_update({"value": "analysis:\u2007 0%"})
    for done, t in [(0, 0.0), (1, 5.0), (2, 10.5), (3, 12.0), (4, 13.0)]:
        now[0] = t
        log.widget_update({"value": f"{done}/4 [00:0{done}<00:10, 1.00eval/s]"})
    log.widget_update({"value": 4.0})  # the progress widget's number: ignored
    assert lines == [
        "03_x: analysis 0/4 eval (0%), 00:00 elapsed, ETA 00:10",
        "03_x: analysis 2/4 eval (50%), 00:02 elapsed, ETA 00:10",
        "03_x: analysis 4/4 eval (100%), 00:04 elapsed, ETA 00:10",
    ]


def test_cell_phase_names_the_section_and_the_first_line_of_code():
    cells = [
        nbformat.v4.new_markdown_cell("# 03 · Title\ntext"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_markdown_cell("## Sweep\nwhat it does"),
        nbformat.v4.new_code_cell("\nresult = run_analysis(pipe, config)\nprint(result)"),
    ]
    assert cell_phase(cells, 1) == "(03 · Title): x = 1"
    assert cell_phase(cells, 3) == "(Sweep): result = run_analysis(pipe, config)"


def test_a_report_notebook_shows_its_cells_and_progress_without_the_tcp_warning(tmp_path, monkeypatch, capfd):
    import workbench.report.runner

    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [
        nbformat.v4.new_code_cell("n: int = 3  # items", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_markdown_cell("## Sweep"),
        nbformat.v4.new_code_cell(
            "from tqdm.auto import tqdm\nfor _ in tqdm(range(n), desc='analysis', unit='eval'):\n    pass"
        ),
    ]
    (tmp_path / "src").mkdir()
    nbformat.write(book, tmp_path / "src" / "99_progress.ipynb")
    monkeypatch.setattr(workbench.report.runner, "NOTEBOOK_DIR", tmp_path / "src")
    lines = []
    run = execute_notebook("99_progress", tmp_path / "out", {"n": 4}, timeout_s=120, log=lines.append)
    assert run.ok, run.error
    assert lines[0] == "99_progress: cell 1/1 (Sweep): from tqdm.auto import tqdm"
    assert lines[-1].startswith("99_progress: analysis 4/4 eval (100%), ") and "ETA" in lines[-1]
    assert "without encryption" not in capfd.readouterr().err


def test_a_cell_over_the_timeout_fails_its_notebook_not_the_report(tmp_path, monkeypatch):
    import workbench.report.runner

    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [nbformat.v4.new_code_cell("import time\ntime.sleep(30)")]
    (tmp_path / "src").mkdir()
    nbformat.write(book, tmp_path / "src" / "98_slow.ipynb")
    monkeypatch.setattr(workbench.report.runner, "NOTEBOOK_DIR", tmp_path / "src")
    run = execute_notebook("98_slow", tmp_path / "out", {}, timeout_s=2)
    assert not run.ok and run.error.startswith("CellTimeoutError")
    assert (tmp_path / "out" / "html" / "98_slow.html").is_file()
