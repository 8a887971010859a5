import pytest
import torch

from workbench.models.tiny import tiny_sd_pipeline
from workbench.palettes.cache import PaletteCache
from workbench.palettes.config import PaletteConfig
from workbench.sweep.executor import EvalTask, LayerPrefix, LocalExecutor, UNetState, extends
from workbench.sweep.phases import candidate_layers, curve_tasks, isolated_tasks
from workbench.sweep.probe import OneStepProbe
from workbench.sweep.store import EvaluationRunner
from workbench.threads import torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")
C2, C4 = PaletteConfig(nbits=2), PaletteConfig(nbits=4)


def test_layer_prefix_is_the_first_k_layers_and_extends_its_shorter_prefixes():
    points = LayerPrefix.points(("a", "b", "c"), C2)
    assert [dict(p) for p in points] == [{"a": C2}, {"a": C2, "b": C2}, {"a": C2, "b": C2, "c": C2}]
    assert "c" not in points[1] and points[1].get("c") is None and points[2]["c"] == C2
    assert all(p.positions is points[0].positions for p in points)  # one index per curve, not one per point
    assert extends(points[2], points[0]) and extends(points[1], {}) and not extends(points[0], points[1])
    assert not extends(LayerPrefix(("a", "b"), C4, 2), points[0])  # another palette
    assert extends({"a": C2, "b": C2}, points[0]) and not extends({"b": C2, "a": C2}, points[0])  # order counts


def test_unet_state_palettizes_only_what_a_recipe_adds_and_restores_bitwise():
    with torch_threads(1):
        unet = tiny_sd_pipeline().unet
    names = list(candidate_layers(unet, 30_000).layers)[:3]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    cache = PaletteCache()
    state = UNetState(unet, cache)
    points = LayerPrefix.points(names, C2)
    state.reach(points[0])
    state.reach(points[2])  # extends: only the 2 new layers are fitted
    assert cache.fits == 3
    palettized = {n: unet.get_submodule(n).weight.clone() for n in names}
    state.reach({names[1]: C4})  # not an extension: restored first
    assert torch.equal(unet.get_submodule(names[0]).weight, before[f"{names[0]}.weight"])
    state.reach(points[2])  # back again: from the cache, the same values
    assert all(torch.equal(unet.get_submodule(n).weight, palettized[n]) for n in names) and cache.fits == 4
    state.reset()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def _tiny_probe():
    """A tiny SD pipeline, its one-prompt probe and its candidate layers (call with one torch thread)."""
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, OneStepProbe(pipe, ["a red circle"], height=32, width=32), candidate_layers(pipe.unet, 30_000)


def test_local_executor_skips_stored_tasks_without_palettizing(tmp_path):
    from workbench.sweep.store import EvaluationStore

    with torch_threads(1):
        pipe, probe, candidates = _tiny_probe()
        tasks = isolated_tasks(candidates, (2,))[:2] + curve_tasks(candidates, C2, list(candidates.layers)[:3])
        store = EvaluationStore(tmp_path / "s.jsonl", {"test": 1})
        first = LocalExecutor(pipe.unet, PaletteCache()).measure_all(tasks, EvaluationRunner(probe, store, False))
        assert [e.id for e in first] == [t.id for t in tasks] and set(store.records) == {t.id for t in tasks}
        cache = PaletteCache()
        again = LocalExecutor(pipe.unet, cache).measure_all(tasks, EvaluationRunner(probe, store, False))
    assert [e.psnr for e in again] == [e.psnr for e in first] and cache.fits == 0


def test_cli_ray_address_needs_workers(tmp_path, capsys):
    from workbench.cli.main import main
    from workbench.sweep.ray_executor import RayExecutor

    assert main(["analyze", "tiny-sd", "--out", str(tmp_path), "--ray-address", "auto", "--quiet"]) == 2
    assert "--ray-address=auto needs --workers N" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        RayExecutor("tiny-sd", workers=0)


def test_ray_scheduling_names_bad_values_and_replaces_twice_the_workers_by_default():
    from workbench.sweep.ray_executor import RayExecutor, Scheduling

    with pytest.raises(ValueError, match="max_chunk must be >= 1, got 0"):
        Scheduling(max_chunk=0)
    with pytest.raises(ValueError, match="max_replacements must be >= 0 or None, got -1"):
        Scheduling(max_replacements=-1)
    executor = RayExecutor("tiny-sd", workers=3, scheduling=Scheduling(max_chunk=4, share_palettes=False))
    assert (executor.max_chunk, executor.max_replacements, executor.share_palettes) == (4, 6, False)
    assert RayExecutor("tiny-sd", workers=3, scheduling=Scheduling(max_replacements=0)).max_replacements == 0


def test_prefetching_executor_fits_each_palette_once_ahead_and_measures_the_same(tmp_path):
    from workbench.sweep.store import EvaluationStore

    with torch_threads(1):
        pipe, probe, candidates = _tiny_probe()
        names = list(candidates.layers)
        tasks = [EvalTask(f"r{i}", "recipe", dict.fromkeys(names[i : i + 3], b)) for i, b in enumerate((2, 4, 2, 8))]
        plain = LocalExecutor(pipe.unet, PaletteCache()).measure_all(tasks, EvaluationRunner(probe, None, False))
        store = EvaluationStore(tmp_path / "s.jsonl", {"test": 1})
        store.append({**plain[0].to_record()})  # the first task is stored: its palettes are not prefetched
        with PaletteCache() as cache:
            queued = []
            prefetch = cache.prefetch
            cache.prefetch = lambda jobs, workers, urgent: (
                queued.extend(jobs),
                prefetch(queued, workers, urgent=urgent),
            )
            ahead = LocalExecutor(pipe.unet, cache, prefetch=1)
            got = ahead.measure_all(tasks, EvaluationRunner(probe, store, False))
            needed, seen = [], set()
            for t in tasks[1:]:  # in task order, each once, none of the stored task; a task's own last layer first
                mine = [(n, PaletteConfig(nbits=b)) for n, b in t.recipe.items() if (n, b) not in seen]
                seen.update(t.recipe.items())
                needed += reversed(mine)
            assert [(n, c) for n, _, c in queued] == needed
            assert cache.fits == len(needed) and len(cache) == len(needed)
    assert [e.psnr for e in got] == [e.psnr for e in plain]
