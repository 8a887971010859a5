"""The Ray executor on one local runtime with 2 CPUs (the session's `ray_runtime`) and 2 tiny-sd workers: the same
preanalysis.json as one process, a killed worker's work re-run, resume across worker counts.

Marked slow: starting the runtime and the workers takes 30-60 s on a busy 2-core machine (`make test-slow`)."""

import json
import os
import signal

import pytest

from workbench.analysis.config import AnalysisConfig
from workbench.analysis.run import run_analysis
from workbench.threads import torch_threads

pytestmark = pytest.mark.slow

# 10 candidate layers, one width, 16x16 latents: 3 baselines, 10 isolated, 10 cumulative, the recipes
CONFIG = AnalysisConfig(nbits=(2,), min_numel=30_000, prompts=("a red circle",), height=32, width=32, num_recipes=3,
                        layers=("down_blocks.*", "mid_block.*"))  # fmt: skip


class Stop(Exception):
    """Raised by a callback to interrupt an analysis."""


@pytest.fixture(scope="module")
def single(pipe, tmp_path_factory):
    """The analysis in this process (1 torch thread, as each worker): the JSON every other run must write."""
    out = tmp_path_factory.mktemp("single")
    with torch_threads(1):
        result = run_analysis(pipe, CONFIG, out_dir=out, progress=False)
    return result, (out / "preanalysis.json").read_bytes()


@pytest.fixture
def executor(ray_runtime):
    """Two workers for one test: they hold both CPUs of the runtime, so they must be gone before the CLI starts its
    own (a module-scoped pair left the CLI's workers unschedulable: the test hung)."""
    from workbench.sweep.ray_executor import RayExecutor

    with RayExecutor("tiny-sd", workers=2) as ex:
        yield ex


def _stop_after(n: int):
    seen = []

    def callback(evaluation):
        seen.append(evaluation.id)
        if len(seen) == n:
            raise Stop(evaluation.id)

    return callback


def _aliases(result) -> int:
    """Evaluations recorded from another's measurement (`EvaluationRunner.alias`): the refined recipes."""
    return sum(r.strategy == "refined" for r in result.recipes)


def _stored(out) -> int:
    (store,) = (out / "store").glob("*.jsonl")
    return sum("id" in json.loads(line) for line in store.read_text().splitlines())


def test_a_killed_worker_is_replaced_and_the_json_is_the_single_process_one(pipe, single, executor, tmp_path):
    killed = []

    def kill_one(evaluation):  # mid-sweep: SIGKILL the first live worker's process
        if not killed and evaluation.kind == "isolated":
            killed.append(executor.worker_pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    with torch_threads(1):
        result = run_analysis(pipe, CONFIG, out_dir=tmp_path, progress=False, executor=executor, callback=kill_one)
    total = single[0].timing.evaluations
    assert (tmp_path / "preanalysis.json").read_bytes() == single[1]
    assert result.timing.evaluations == total == _stored(tmp_path)  # each once; refined recipes are recorded from
    assert result.timing.new_evaluations == total - _aliases(single[0])  # their measured candidates, not measured
    run = json.loads((tmp_path / "run.json").read_text())["execution"]
    assert run["executor"] == "ray" and run["replacements"] >= 1
    dead = [w for w in run["workers"] if not w["alive"]]
    assert [w["pid"] for w in dead] == killed
    assert sum(w["evaluations"] for w in run["workers"]) == total - _aliases(single[0])
    assert all(w["device"] == "cpu" and w["busy_s"] > 0 for w in run["workers"] if w["evaluations"])
    assert len({w["reference"] for w in run["workers"] if "reference" in w}) == 1  # one float reference everywhere


def test_resume_across_worker_counts_gives_the_same_json(pipe, single, executor, tmp_path):
    with torch_threads(1):
        with pytest.raises(Stop):  # 2 workers, stopped in the isolated sweep; then this process finishes it
            run_analysis(pipe, CONFIG, tmp_path / "a", progress=False, executor=executor, callback=_stop_after(8))
        assert _stored(tmp_path / "a") == 8
        resumed = run_analysis(pipe, CONFIG, tmp_path / "a", progress=False)
        assert resumed.timing.new_evaluations == single[0].timing.evaluations - 8 - _aliases(single[0])
        with pytest.raises(Stop):  # this process, stopped in the cumulative curve; then 2 workers finish it
            run_analysis(pipe, CONFIG, tmp_path / "b", progress=False, callback=_stop_after(18))
        resumed = run_analysis(pipe, CONFIG, tmp_path / "b", progress=False, executor=executor)
    assert resumed.timing.new_evaluations == single[0].timing.evaluations - 18 - _aliases(single[0])
    assert (tmp_path / "a" / "preanalysis.json").read_bytes() == single[1]
    assert (tmp_path / "b" / "preanalysis.json").read_bytes() == single[1]


def test_cli_workers_write_the_single_process_json(pipe, ray_runtime, tmp_path, capsys):
    from workbench.cli.main import main

    config = AnalysisConfig(nbits=(2,), min_numel=30_000, prompts=CONFIG.prompts, num_recipes=3, layers=CONFIG.layers)
    with torch_threads(1):
        run_analysis(pipe, config, out_dir=tmp_path / "single", progress=False)
    (tmp_path / "prompts.txt").write_text("\n".join(CONFIG.prompts) + "\n")
    argv = ["analyze", "tiny-sd", "--out", str(tmp_path / "cli"), "--nbits", "2", "--min-numel", "30000",
            "--prompts", str(tmp_path / "prompts.txt"), "--num-recipes", "3", "--layers", *CONFIG.layers,
            "--workers", "2", "--device", "cpu", "--quiet"]  # fmt: skip
    with torch_threads(1):
        assert main(argv) == 0, capsys.readouterr().err[-2000:]
    cli, single = (tmp_path / d / "preanalysis.json" for d in ("cli", "single"))
    assert cli.read_bytes() == single.read_bytes()
    workers = json.loads((tmp_path / "cli" / "run.json").read_text())["execution"]["workers"]
    assert len(workers) == 2 and {w["device"] for w in workers} == {"cpu"}
