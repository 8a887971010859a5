import json

import pytest
import torch

from workbench.analysis import (
    DEFAULT_PROMPTS,
    AnalysisConfig,
    EvaluationStore,
    OneStepProbe,
    StoreMismatchError,
    run_analysis,
    torch_threads,
)
from workbench.cli import main
from workbench.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ("a red circle",)
# 20 candidate layers, two widths, 16x16 latents: ~90 UNet calls at CFG batch 2
CONFIG = AnalysisConfig(nbits=(2, 4), min_numel=30_000, prompts=PROMPTS, height=32, width=32, num_recipes=3)


@pytest.fixture(scope="module")
def pipe():
    with torch_threads(1):
        p = tiny_sd_pipeline()
        p.set_progress_bar_config(disable=True)
        yield p


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
        from workbench.palettize import palettized

        with palettized(p.unet, {name: 2}):
            assert not torch.equal(probe(), expected)
        assert torch.equal(p.unet.get_submodule(name).weight, before)
        assert torch.equal(probe(), expected)


class Stop(Exception):
    pass


def test_interrupted_analysis_resumes_to_the_same_json(pipe, tmp_path):
    with torch_threads(1):
        full = run_analysis(pipe, CONFIG, out_dir=tmp_path / "full", progress=False)
        seen = []

        def crash_after_30(evaluation):
            seen.append(evaluation.id)
            if len(seen) == 30:
                raise Stop

        with pytest.raises(Stop):
            run_analysis(pipe, CONFIG, out_dir=tmp_path / "cut", progress=False, callback=crash_after_30)
        assert not (tmp_path / "cut" / "preanalysis.json").exists()  # nothing presented as complete
        store = next((tmp_path / "cut" / "store").glob("*.jsonl"))
        with open(store, "a") as f:
            f.write('{"id": "torn')  # a kill mid-write leaves half a line
        resumed = run_analysis(pipe, CONFIG, out_dir=tmp_path / "cut", progress=False)
    assert resumed.timing["new_evaluations"] == full.timing["new_evaluations"] - 30
    a = json.loads((tmp_path / "full" / "preanalysis.json").read_text())
    b = json.loads((tmp_path / "cut" / "preanalysis.json").read_text())
    assert a == b
    assert (tmp_path / "full" / "preanalysis.json").read_text() == (tmp_path / "cut" / "preanalysis.json").read_text()
    for name in ("evaluations.csv", "recipes.csv", "run.json", "psnr_vs_size.png"):
        assert (tmp_path / "full" / name).stat().st_size > 0

    # what the analysis measured makes sense
    base = full.preanalysis.baselines
    assert base["original"] > 190  # identical outputs on CPU: the epsilon cap
    assert 20 < base["linear_8bit"] < base["original"]
    assert set(full.preanalysis.single_layer) == {"2", "4"} and len(full.preanalysis.single_layer["2"]) == 20
    assert full.preanalysis.cumulative["4"]["metadata"]["sorted_layers"][0] in full.layers
    assert {r.strategy for r in full.recipes} == {"apple", "size-aware"}
    assert len({r.name for r in full.recipes}) == len(full.recipes) == len(full.preanalysis.recipes)
    frame = full.to_frame()
    assert len(frame) == len(full.evaluations) and frame["psnr_mean"].notna().all()
    assert full.timing["unet_evaluations"] == full.timing["new_evaluations"]


def test_changed_configuration_never_reuses_stale_results(pipe, tmp_path):
    identity = {"config": CONFIG.to_dict(), "weights": "x"}
    store = EvaluationStore(tmp_path / "s.jsonl", identity)
    store.append({"id": "baseline/original", "kind": "baseline", "psnr": [1.0]})
    assert "baseline/original" in EvaluationStore(tmp_path / "s.jsonl", identity)
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
    from workbench.trajectory import evaluate_trajectories

    bits = dict.fromkeys(["down_blocks.1.attentions.0.proj_in", "up_blocks.0.attentions.0.proj_out"], 1)
    with torch_threads(1):
        results = evaluate_trajectories(
            pipe, {"r": bits}, ["a small red circle at the top left"], num_inference_steps=2, height=32, width=32
        )
    float_result, recipe = results
    assert float_result.recipe == "float" and float_result.image_psnr == (float("inf"),)
    assert float_result.ssim[0] == pytest.approx(1.0)
    assert 0 < recipe.image_psnr[0] < 200 and recipe.ssim[0] < 1.0
    assert set(float_result.adherence) == {"color", "shape", "position", "size"}  # a shapes caption: scored
    assert len(recipe.to_frame()) == 1


def test_default_threshold_keeps_the_reference_for_real_models_and_the_small_layers_of_ours():
    from workbench.analysis import default_min_numel

    assert default_min_numel("runwayml/stable-diffusion-v1-5") == 100_000
    assert default_min_numel(None) == default_min_numel("data/models/tiny-shapes") == 2048
    assert default_min_numel("tiny-sd") == default_min_numel("tiny-sdxl") == 2048


@pytest.mark.slow
def test_background_fits_give_the_same_analysis_on_the_demo_model():
    from workbench.analysis import load_analysis_pipeline

    pipe = load_analysis_pipeline(None)
    config = AnalysisConfig(nbits=(2, 8), min_numel=2048, prompts=DEFAULT_PROMPTS[:2], num_recipes=3)
    runs = [run_analysis(pipe, config, progress=False, background_fits=bg) for bg in (False, True)]
    assert runs[0].preanalysis.to_dict() == runs[1].preanalysis.to_dict()
    assert [e.psnr for e in runs[0].evaluations] == [e.psnr for e in runs[1].evaluations]
