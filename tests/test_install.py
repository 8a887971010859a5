"""A non-editable install works: the wheel carries the demo model and the notebooks (package data), and the
installed `workbench` command finds them from any folder.

The wheel is built offline from a copy of the source tree and installed into a fresh venv that reuses this
environment's dependencies (a .pth line pointing at its site-packages; nothing is downloaded).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
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
    (site / "_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, diffusers, pip...
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheels[0]], tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin", elsewhere


def test_the_wheel_carries_the_demo_model_and_the_notebooks(installed):
    bin_dir, elsewhere = installed
    code = (
        "import json, workbench, workbench.models.loader as p, workbench.report.runner as r; "
        "notebooks = sorted(x.name for x in r.NOTEBOOK_DIR.glob('*.ipynb')); "
        "print(json.dumps([workbench.__file__, str(p.DEMO_MODEL), notebooks]))"
    )
    module, demo, notebooks = json.loads(_run([bin_dir / "python", "-c", code], elsewhere))
    assert Path(module).is_relative_to(bin_dir.parent) and Path(demo).is_relative_to(bin_dir.parent)
    assert (Path(demo) / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert notebooks == [f"{name}.ipynb" for name in ("01_palettization_basics", "02_uniform_palettization",
                                                       "03_mixed_bit_analysis", "04_seed_matched_comparison",
                                                       "05_coreml_export")]  # fmt: skip


def test_installed_command_lists_the_demo_models_layers_from_another_folder(installed):
    bin_dir, elsewhere = installed
    lines = _run([bin_dir / "workbench", "layers"], elsewhere).strip().splitlines()
    assert len(lines) == 1 + 180  # header + the demo model's layers over 2048 weights


def test_installed_command_analyzes_the_demo_model_from_another_folder(installed):
    bin_dir, elsewhere = installed
    (elsewhere / "prompts.txt").write_text("a small red circle at the top left\n")
    args = ["analyze", "--out", "analysis", "--nbits", "8", "--min-numel", "60000", "--prompts", "prompts.txt"]
    args += ["--num-recipes", "1", "--strategies", "apple", "--quiet"]
    _run([bin_dir / "workbench", *args], elsewhere)
    saved = json.loads((elsewhere / "analysis" / "preanalysis.json").read_text())
    assert set(saved["single_layer"]) == {"8"} and len(saved["recipes"]) == 1


def test_installed_command_runs_a_notebook_of_the_report_from_another_folder(installed):
    bin_dir, elsewhere = installed
    out = _run([bin_dir / "workbench", "report", "--smoke", "--notebooks", "1", "--threads", "1"], elsewhere)
    assert (
        "01_palettization_basics: cell 1/5 (01 · Palettization basics): import numpy as np" in out
        and "01_palettization_basics: ok" in out
    )
    record = json.loads((elsewhere / "reports" / "demo" / "parameters.json").read_text())
    assert record["notebooks"]["01_palettization_basics"]["ok"] is True
    assert (elsewhere / "reports" / "demo" / "html" / "01_palettization_basics.html").stat().st_size > 10_000
