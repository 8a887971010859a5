"""A non-editable install works: the wheel carries the demo model and the notebooks (package data), and the
installed `workbench` command finds them from any folder.

The wheel is built offline from a copy of the source tree and installed into a fresh venv that reuses this
environment's dependencies (a .pth line pointing at its site-packages; nothing is downloaded).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(args, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # the reused dependencies' data files (nbconvert's HTML templates) are in this environment's share/jupyter
    env["JUPYTER_PATH"] = str(Path(sys.prefix) / "share" / "jupyter")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh venv with the workbench wheel installed, a folder outside the source tree)."""
    assert importlib.util.find_spec("hatchling"), (
        "the wheel is built offline with the project's build backend, hatchling (in the dev extra: "
        "pip install -e '.[dev]')"
    )
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "reports", "build", "dist", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=ignore)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            tmp / "dist",
            source,
        ],
        tmp,
    )
    wheels = list((tmp / "dist").glob("workbench-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    reused = [p for p in sys.path if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    (site / "_reuse_dependencies.pth").write_text("".join(f"{p}\n" for p in reused))  # torch, diffusers, pip...
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheels[0]], tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin", elsewhere, wheels[0]


def _shipped(folder: str) -> dict[str, int]:
    """{path under the repository's `folder`: bytes} of the files a wheel must carry."""
    root = ROOT / folder
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_wheel_carries_the_demo_model_and_the_notebooks(installed):
    bin_dir, elsewhere, wheel = installed
    with zipfile.ZipFile(wheel) as archive:
        packed = {info.filename: info.file_size for info in archive.infolist()}
    for folder, inside in [("notebooks", "notebooks"), ("data/tiny-shapes", "data/tiny-shapes")]:
        for name, size in _shipped(folder).items():  # every file, at its size
            assert packed.get(f"workbench/_resources/{inside}/{name}") == size, f"{folder}/{name}"
    code = (
        "import json, workbench, workbench.models.loader as p, workbench.report.runner as r; "
        "notebooks = sorted(x.name for x in r.NOTEBOOK_DIR.glob('*.ipynb')); "
        "print(json.dumps([workbench.__file__, str(p.DEMO_MODEL), str(r.NOTEBOOK_DIR), notebooks]))"
    )
    module, demo, notebook_dir, notebooks = json.loads(_run([bin_dir / "python", "-c", code], elsewhere))
    package = Path(module).parent
    assert package.is_relative_to(bin_dir.parent)  # the installed copy, not the checkout
    assert Path(demo) == package / "_resources" / "data" / "tiny-shapes"
    assert Path(notebook_dir) == package / "_resources" / "notebooks"
    assert notebooks == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) and len(notebooks) >= 5


def test_installed_command_lists_the_demo_models_layers_from_another_folder(installed):
    bin_dir, elsewhere, _ = installed
    lines = _run([bin_dir / "workbench", "layers"], elsewhere).strip().splitlines()
    assert len(lines) == 1 + 180  # header + the demo model's layers over 2048 weights


def test_installed_command_analyzes_the_demo_model_from_another_folder(installed):
    bin_dir, elsewhere, _ = installed
    (elsewhere / "prompts.txt").write_text("a small red circle at the top left\n")
    args = ["analyze", "--out", "analysis", "--nbits", "8", "--min-numel", "60000", "--prompts", "prompts.txt"]
    args += ["--num-recipes", "1", "--strategies", "apple", "--quiet"]
    _run([bin_dir / "workbench", *args], elsewhere)
    saved = json.loads((elsewhere / "analysis" / "preanalysis.json").read_text())
    assert set(saved["single_layer"]) == {"8"} and len(saved["recipes"]) == 1


def test_installed_command_runs_a_notebook_of_the_report_from_another_folder(installed):
    bin_dir, elsewhere, _ = installed
    _run([bin_dir / "workbench", "report", "--smoke", "--notebooks", "1", "--threads", "1"], elsewhere)
    run = elsewhere / "reports" / "demo"
    record = json.loads((run / "parameters.json").read_text())
    assert record["notebooks"]["01_palettization_basics"]["ok"] is True
    # the executed copy: every code cell of the source notebook ran, in order, and none stopped on an error
    name = "01_palettization_basics.ipynb"
    source = [c for c in json.loads((ROOT / "notebooks" / name).read_text())["cells"] if c["cell_type"] == "code"]
    executed = [c for c in json.loads((run / "notebooks" / name).read_text())["cells"] if c["cell_type"] == "code"]
    injected = [c for c in executed if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(executed) == len(source) + len(injected) and len(source) >= 5
    counts = [c["execution_count"] for c in executed]
    assert counts == sorted(counts) and None not in counts, counts
    assert not [o for c in executed for o in c["outputs"] if o["output_type"] == "error"]
    assert (run / "html" / "01_palettization_basics.html").stat().st_size > 10_000
