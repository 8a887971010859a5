import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from workbench.analysis.config import DEFAULT_PROMPTS, AnalysisConfig
from workbench.analysis.run import fit_workers, run_analysis
from workbench.cli.main import main
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from workbench.palettes.config import PaletteConfig
from workbench.sweep.phases import Candidates, sweep_bits_per_param
from workbench.sweep.probe import OneStepProbe
from workbench.sweep.store import EvaluationStore, StoreMismatchError, identity_key, scheduler_settings
from workbench.threads import torch_threads

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle",)
# 20 candidate layers, two widths, 16x16 latents: ~90 UNet calls at CFG batch 2
CONFIG = AnalysisConfig(nbits=(2, 4), min_numel=30_000, prompts=PROMPTS, height=32, width=32, num_recipes=3)


@pytest.mark.parametrize("factory", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_probe_replay_is_bitwise_equal_to_the_pipeline_call(factory):
    with torch_threads(1):
        p = factory()
        p.set_progress_bar_config(disable=True)
        prompts = ["a red circle", "a blue square"]
        probe = OneStepProbe(p, prompts, seed=3, height=32, width=32)
        expected = p(
            prompts, negative_prompt=[""] * 2, num_inference_steps=1, output_type="latent", height=32, width=32,
            generator=torch.Generator().manual_seed(3),
        ).images  # fmt: skip
        replay = probe()
        assert torch.equal(replay, expected)  # bitwise, not just close
        assert probe.unet_batch == 4 and probe.forward_calls == 1 and probe.forward_seconds > 0
        # palettizing a layer changes the replay, and the weights come back exactly
        name = "down_blocks.1.attentions.0.proj_in"
        before = p.unet.get_submodule(name).weight.clone()
        from workbench.palettes.apply import palettized

        with palettized(p.unet, {name: 2}):
            assert not torch.equal(probe(), expected)
        assert torch.equal(p.unet.get_submodule(name).weight, before)
        assert torch.equal(probe(), expected)


# what `python -m workbench.cli analyze tiny-sd --nbits 2 --min-numel 30000 --num-recipes 3` with one prompt runs:
# 20 candidate layers, one width, 32x32 latents, ~47 evaluations
KILL_CONFIG = AnalysisConfig(nbits=(2,), min_numel=30_000, prompts=PROMPTS, num_recipes=3)


def _analyze(out: Path, prompts_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "workbench.cli", "analyze", "tiny-sd", "--out", str(out), "--nbits", "2",
        "--min-numel", "30000", "--prompts", str(prompts_file), "--num-recipes", "3", "--threads", "1", "--quiet",
    ]  # fmt: skip


def _evaluation_counts(stdout: str) -> tuple[int, int]:
    """(evaluations, new) from the CLI's last line `... ; N evaluations (M new), wall ...`."""
    words = stdout.strip().splitlines()[-1].split("; ", 1)[1].split()
    return int(words[0]), int(words[2].lstrip("("))


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def _kill_when_stored(proc: subprocess.Popen, store_dir: Path, lines: int, timeout: float = 240) -> int:
    """SIGKILL `proc` once its store file holds `lines` complete lines; returns the evaluations it had stored."""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            stores = list(store_dir.glob("*.jsonl")) if store_dir.is_dir() else []
            if stores and _complete_lines(stores[0]) >= lines:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the analysis ended (status {proc.returncode}) before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (store,) = store_dir.glob("*.jsonl")
    return _complete_lines(store) - 1  # the header is not an evaluation


@pytest.mark.slow
def test_killed_cli_analysis_resumes_to_the_same_json(pipe, tmp_path):
    with torch_threads(1):  # the uninterrupted run, in this process
        full = run_analysis(pipe, KILL_CONFIG, out_dir=tmp_path / "full", progress=False)
    total = full.timing.evaluations
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    # kill -9 in the middle of the cumulative curve (store lines 25-44; before: header, 3 baselines, 20 isolated)
    proc = subprocess.Popen(_analyze(tmp_path / "cut", prompts), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    stored = _kill_when_stored(proc, tmp_path / "cut" / "store", lines=35)
    assert 34 <= stored < total - 3
    assert not (tmp_path / "cut" / "preanalysis.json").exists()  # nothing presented as complete
    # the CLI, in another process, keyed its store as this process did
    assert [p.stem for p in (tmp_path / "cut" / "store").iterdir()] == [identity_key(full.identity)[:16]]

    resumed = subprocess.run(_analyze(tmp_path / "cut", prompts), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    refined = sum(r.strategy == "refined" for r in full.recipes)  # recorded from their candidates, not measured
    assert _evaluation_counts(resumed.stdout) == (total, total - stored - refined)  # only the missing ones measured
    a, b = (tmp_path / "full" / "preanalysis.json").read_bytes(), (tmp_path / "cut" / "preanalysis.json").read_bytes()
    assert json.loads(a) == json.loads(b)
    assert a == b


def test_analysis_measures_sensible_baselines_recipes_and_timing(pipe, tmp_path):
    with torch_threads(1):
        result = run_analysis(pipe, CONFIG, out_dir=tmp_path, progress=False)
    base = result.preanalysis.baselines
    assert base["original"] > 190  # identical outputs on CPU: the epsilon cap
    assert 20 < base["linear_8bit"] < base["original"]
    assert set(result.preanalysis.single_layer) == {"2", "4"} and len(result.preanalysis.single_layer["2"]) == 20
    assert result.preanalysis.cumulative["4"]["metadata"]["sorted_layers"][0] in result.layers
    assert {r.strategy for r in result.recipes} == {"apple", "size-aware", "refined"}
    assert len({r.name for r in result.recipes}) == len(result.recipes) == len(result.preanalysis.recipes)
    frame = result.to_frame()
    assert len(frame) == len(result.evaluations) and frame["psnr_mean"].notna().all()
    for name in ("evaluations.csv", "recipes.csv", "psnr_vs_size.png"):
        assert (tmp_path / name).stat().st_size > 0

    t = result.timing
    refined = sum(r.strategy == "refined" for r in result.recipes)  # recorded from their measured candidates
    assert t.new_evaluations == t.evaluations - refined and t.evaluations == len(result.evaluations)
    # a gradient is one forward with backward; the refinement's importance one more probe run
    gradients = sum(a.rounds for r in result.refinement for a in r.attempts)
    assert gradients > 0 and t.unet_evaluations == t.new_evaluations + gradients + 1
    assert t.unet_batch == 2 and t.overhead == pytest.approx(t.wall_s / t.forward_s) and t.overhead > 1
    # run.json against the other files the run wrote: the store and the CSV tables
    run = json.loads((tmp_path / "run.json").read_text())
    (store,) = (tmp_path / "store").glob("*.jsonl")
    stored = [json.loads(line) for line in store.read_text().splitlines()[1:]]  # after the header
    assert run["timing"]["evaluations"] == len(pd.read_csv(tmp_path / "evaluations.csv"))
    assert run["timing"]["new_evaluations"] == sum("id" in r for r in stored) - refined
    assert 0 < run["timing"]["forward_s"] < run["timing"]["wall_s"]

    matched = result.matched_comparison()
    recipes = pd.read_csv(tmp_path / "recipes.csv").set_index("name")
    ours = recipes[recipes.strategy.isin(["size-aware", "refined"])]
    assert len(matched) >= 1 and len(run["matched_comparison"]) == len(matched)
    for pair in run["matched_comparison"]:  # each reference recipe against the best of ours no larger than it
        reference = recipes.loc[pair["reference"]]
        assert reference.strategy == "apple" and pair["reference_bpp"] == pytest.approx(reference.bits_per_param)
        fits = ours[ours.bits_per_param <= reference.bits_per_param + 1e-6]
        assert pair["ours"] in fits.index and pair["ours_psnr"] == pytest.approx(fits.psnr_mean.max(), abs=1e-9)
        assert pair["gain_db"] == pytest.approx(fits.psnr_mean.max() - reference.psnr_mean, abs=1e-9)
    frame = matched.to_frame()
    assert frame["gain_db"].tolist() == pytest.approx((frame.ours_psnr - frame.reference_psnr).tolist())
    assert (frame.ours_bpp <= frame.reference_bpp + 1e-6).all()
    assert matched.mean_gain_db() == pytest.approx(frame.gain_db.mean())


# the cheapest analysis that stores something: 3 candidate layers, one width, one recipe
SMALL = AnalysisConfig(nbits=(2,), min_numel=60_000, prompts=PROMPTS, height=32, width=32, num_recipes=1,
                       strategies=("apple",))  # fmt: skip


def _measured(pipe, out: Path, config: AnalysisConfig = SMALL, resume: bool = True) -> str:
    """Run the analysis into `out`: "all" if it measured every evaluation afresh, "none" if it read them all back
    from the store (anything else: how many of how many)."""
    timing = run_analysis(pipe, config, out_dir=out, resume=resume, progress=False).timing
    assert timing.evaluations >= 5  # 2 baselines, 3 layers, a recipe
    new = timing.new_evaluations
    return "all" if new == timing.evaluations else "none" if new == 0 else f"{new} of {timing.evaluations}"


def _nudge(tensor: torch.Tensor) -> None:
    """Move one value of a weight to the next float32 up: the smallest change a weight can have."""
    with torch.no_grad():
        flat = tensor.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))


def test_the_store_is_reused_only_for_the_same_inputs(tmp_path):
    with torch_threads(1):
        pipe = tiny_sd_pipeline(seed=0)
        pipe.set_progress_bar_config(disable=True)
        assert _measured(pipe, tmp_path) == "all"  # a fresh folder
        assert _measured(pipe, tmp_path) == "none"  # the same inputs: everything read back
        assert _measured(pipe, tmp_path, resume=False) == "all"  # `--no-resume`: measured again
        assert _measured(pipe, tmp_path, AnalysisConfig(**{**SMALL.to_dict(), "prompts": ["a blue square"]})) == "all"
        for weight in (pipe.unet.conv_in.weight, next(pipe.text_encoder.parameters())):
            original = weight.detach().clone()
            _nudge(weight)  # one ulp, in a layer that is no candidate of the sweep
            assert _measured(pipe, tmp_path) == "all"
            with torch.no_grad():
                weight.copy_(original)
        scheduler = pipe.scheduler
        pipe.scheduler = type(scheduler).from_config(scheduler.config, steps_offset=0)  # one setting changed
        assert _measured(pipe, tmp_path) == "all"
        pipe.scheduler = scheduler
        assert _measured(pipe, tmp_path) == "none"  # all restored: the first store again
    assert len(list((tmp_path / "store").glob("*.jsonl"))) == 5  # one store each: first, prompt, 2 weights, scheduler


def test_cli_no_resume_measures_everything_again(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["analyze", "tiny-sd", "--out", str(tmp_path / "out"), "--nbits", "2", "--min-numel", "60000",
            "--prompts", str(tmp_path / "prompts.txt"), "--num-recipes", "1", "--strategies", "apple", "--threads",
            "1", "--quiet"]  # fmt: skip
    counts = []
    for extra in ([], [], ["--no-resume"]):
        assert main([*argv, *extra]) == 0
        counts.append(_evaluation_counts(capsys.readouterr().out))
    n = counts[0][0]
    assert n >= 5 and counts == [(n, n), (n, 0), (n, n)]  # fresh, resumed, measured again


def test_sweep_bits_per_param_counts_luts_only_for_grouped_palettes():
    candidates = Candidates(layers={}, numels={"a": 1000, "b": 3000}, out_channels={"a": 10, "b": 30})
    assert sweep_bits_per_param({"a": PaletteConfig(nbits=4)}, candidates) == (4 * 1000 + 16 * 3000) / 4000
    grouped = PaletteConfig(nbits=4, granularity="per_grouped_channel", group_size=5)
    # 2 LUTs of 16 float16 values: 512 bits on top of 4 bits a weight
    assert sweep_bits_per_param({"a": grouped}, candidates) == (4 * 1000 + 512 + 16 * 3000) / 4000


def test_scheduler_settings_do_not_depend_on_diffusers_bookkeeping(pipe):
    """`_use_default_values` is built from a set: its order changes between processes, and the store key must not."""
    config = dict(pipe.scheduler.config)
    first, second = (SimpleNamespace(config={**config, "_use_default_values": v}) for v in (["a", "b"], ["b", "a"]))
    assert scheduler_settings(first) == scheduler_settings(second)
    assert scheduler_settings(first)["beta_end"] == config["beta_end"] and len(scheduler_settings(first)) > 5


def test_changed_configuration_never_reuses_stale_results(tmp_path):
    identity = {"config": CONFIG.to_dict(), "weights": "x"}
    store = EvaluationStore(tmp_path / "s.jsonl", identity)
    store.append({"id": "baseline/original", "kind": "baseline", "psnr": [1.0]})
    with open(tmp_path / "s.jsonl", "a") as f:
        f.write('{"id": "torn')  # a kill mid-write leaves half a line
    reopened = EvaluationStore(tmp_path / "s.jsonl", identity)
    assert list(reopened.records) == ["baseline/original"]
    assert (tmp_path / "s.jsonl").read_text().endswith('"psnr": [1.0]}\n')  # the torn line is cut off
    with pytest.raises(StoreMismatchError, match="another configuration"):
        EvaluationStore(tmp_path / "s.jsonl", {**identity, "weights": "y"})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tiny-sd", "--nbits", "5"], "unsupported bit width"),
        (["tiny-sd", "--min-numel", "10000000"], "no Linear/Conv2d layer"),
        (["tiny-sd", "--prompts", "/nonexistent/prompts.txt"], "cannot read prompts file"),
        (["/nonexistent/model"], "no such file or folder"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_no_results(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["analyze", *argv, "--out", str(out), "--quiet", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (out / "preanalysis.json").exists()


def test_grouped_palette_sweep_is_reported_with_its_lut_bits(pipe):
    config = AnalysisConfig(
        nbits=(4,), min_numel=60_000, prompts=PROMPTS, height=32, width=32, num_recipes=1, strategies=("apple",),
        group_size=16,
    )  # fmt: skip
    with torch_threads(1):
        result = run_analysis(pipe, config, progress=False)
    curves = result.curves()
    assert set(curves) == {"kmeans4", "kmeans4_g16"}
    # same layers in the same order: the grouped curve is a bit larger (its LUTs) and at least as accurate here
    (x, y), (gx, gy) = curves["kmeans4"][-1], curves["kmeans4_g16"][-1]
    assert gx < x and gy >= y - 0.5


def test_trajectory_compares_decoded_images_with_the_float_model(pipe):
    from workbench.analysis.trajectory import evaluate_trajectories
    from workbench.models.generation import Sampling

    bits = dict.fromkeys(["down_blocks.1.attentions.0.proj_in", "up_blocks.0.attentions.0.proj_out"], 1)
    with torch_threads(1):
        results = evaluate_trajectories(
            pipe, {"r": bits}, ["a small red circle at the top left"], Sampling(steps=2, height=32, width=32)
        )
    float_result, recipe = results
    assert float_result.recipe == "float" and float_result.image_psnr == (float("inf"),)
    assert float_result.ssim[0] == pytest.approx(1.0)
    assert 0 < recipe.image_psnr[0] < 200 and recipe.ssim[0] < 1.0
    assert set(float_result.adherence) == {"color", "shape", "position", "size"}  # a shapes caption: scored
    assert len(recipe.to_frame()) == 1


@pytest.mark.slow
def test_background_fits_give_the_same_analysis_on_the_demo_model():
    from workbench.models.loader import load_pipeline

    pipe = load_pipeline(None, device="cpu", progress=False)
    config = AnalysisConfig(nbits=(2, 8), min_numel=2048, prompts=DEFAULT_PROMPTS[:2], num_recipes=3)
    from workbench.palettes.cache import PaletteCache
    from workbench.sweep.executor import LocalExecutor

    with torch_threads(1):  # a free core: the default executor fits palettes in the background
        assert fit_workers(pipe.unet.device) > 0
        background = run_analysis(pipe, config, progress=False)
        cache = PaletteCache()
        foreground = run_analysis(pipe, config, progress=False, cache=cache,
                                  executor=LocalExecutor(pipe.unet, cache, prefetch=0))  # fmt: skip
    runs = [foreground, background]
    assert runs[0].preanalysis.to_dict() == runs[1].preanalysis.to_dict()
    assert [e.psnr for e in runs[0].evaluations] == [e.psnr for e in runs[1].evaluations]


@pytest.mark.slow
def test_a_tight_palette_budget_gives_the_same_analysis_and_holds_the_budget(pipe, tmp_path):
    from workbench.palettes.cache import PaletteCache

    unbounded = run_analysis(pipe, CONFIG, progress=False, cache=PaletteCache(max_bytes=None))
    budget = 200_000  # a few layers' palettes: most of the sweep's palettes wait on disk
    cache = PaletteCache(max_bytes=budget, spill_dir=tmp_path / "spill")
    bounded = run_analysis(pipe, CONFIG, progress=False, cache=cache)
    assert bounded.preanalysis.to_dict() == unbounded.preanalysis.to_dict()
    assert cache.spills > 0 and cache.reloads > 0 and cache.peak_nbytes <= budget
    assert cache.fits == unbounded.timing.kmeans_fits  # read back from disk, never refitted


def test_layer_patterns_limit_the_candidates(pipe):
    config = AnalysisConfig(**{**CONFIG.to_dict(), "layers": ["mid_block.*"], "exclude": ["*.conv2"]})
    result = run_analysis(pipe, config, progress=False)
    measured = set(result.preanalysis.single_layer["2"])
    assert measured == {
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "mid_block.resnets.0.conv1",
        "mid_block.resnets.1.conv1",
    }
    assert set(result.layers) == measured
    with pytest.raises(KeyError, match="'nope.*' matches none"):
        run_analysis(pipe, AnalysisConfig(**{**CONFIG.to_dict(), "layers": ["nope.*"]}), progress=False)


def test_fit_workers_leave_the_unet_its_cores():
    import os

    from workbench.analysis.run import fit_workers

    cores = os.cpu_count() or 1
    assert fit_workers(torch.device("cuda")) == cores - 1  # the UNet runs on the GPU: every core but one
    with torch_threads(1):
        assert fit_workers(torch.device("cpu")) == cores - 1
    with torch_threads(cores):
        assert fit_workers(torch.device("cpu")) == 0
