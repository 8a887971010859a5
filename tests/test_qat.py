"""Training-time palettization (`workbench.tune.qat`): the trained weights are exactly their palettes, a run is
deterministic for a seed, bad input is one line, and the demo's own training is unchanged by the shared loop."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.cli.main import main as cli_main
from workbench.demo.config import TrainConfig
from workbench.errors import InvalidValueError
from workbench.models.tiny import tiny_sd_pipeline
from workbench.palettes.given import GivenPalettes
from workbench.recipes.recipe import load_recipe
from workbench.tune.qat import check_exact, train_palettized
from workbench.tune.qat_config import QatConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# the demo's data and loss at a size the tiny pipeline's VAE (2 levels) and UNet (2 levels) take
DATA = TrainConfig(n_images=8, image_size=32, vae_channels=(32, 64), unet_channels=(32, 64))


# layers over 10,000 weights: every palette by the exact 1-D k-means (the small-tensor path is the demo's, measured)
CONFIG = QatConfig("2", steps=3, batch=2, assignment="fixed", recluster_every=2, min_numel=10_000, seed=5)


def _run(config: QatConfig, out=None):
    pipe = tiny_sd_pipeline()
    return pipe, train_palettized(pipe, DATA, config, out, log=lambda line: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("qat") / "qat"
    pipe, result = _run(CONFIG, out)
    return pipe, result, out


def test_trained_weights_are_exactly_their_palettes(trained):
    pipe, result, out = trained
    assert result.exact and check_exact(pipe.unet, result.palettes)
    assert len(result.palettes) >= 20
    for name, palette in result.palettes.items():
        weight = pipe.unet.get_submodule(name).weight.detach()
        assert torch.equal(weight, torch.from_numpy(palette.dense().astype(np.float32)))
        assert torch.unique(weight).numel() <= 4
    assert all(np.isfinite(result.losses)) and len(result.losses) == 3
    written = json.loads((out / "qat.json").read_text())
    assert written["exact"] is True and written["qat"]["palettize"] == "2"
    given = GivenPalettes.load(out / "palettes.npz")
    assert sorted(given) == sorted(result.palettes)
    reloaded = load_recipe(out / "recipe.json")
    assert {n: c.key for n, c in given.configs.items()} == {n: c.key for n, c in reloaded.configs.items()}
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    for name in given:
        assert np.array_equal(saved[f"{name}.weight"].numpy(), given.dense(name).astype(np.float32)), name


def test_training_moves_the_palettes_away_from_the_post_training_ones(trained):
    from workbench.palettes.fit import fit_palette

    _, result, _ = trained
    fresh = tiny_sd_pipeline()
    changed = 0
    for name, palette in result.palettes.items():
        plain = fit_palette(fresh.unet.get_submodule(name).weight, palette.config)
        changed += not np.array_equal(plain.lut, palette.lut)
    assert changed >= len(result.palettes) // 2


def test_a_run_is_deterministic_for_a_seed(trained):
    pipe_a, a, _ = trained
    pipe_b, b = _run(CONFIG)
    assert a.losses == b.losses
    for (name, pa), pb in zip(pipe_a.unet.state_dict().items(), pipe_b.unet.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"palettize": "5"}, "unsupported palette width"),
        ({"palettize": "no/such/recipe.json"}, "is neither a palette width"),
        ({"palettize": "2", "steps": 0}, "steps must be >= 1"),
        ({"palettize": "2", "lr": 0.0}, "lr must be > 0"),
        ({"palettize": "2", "distill": -1.0}, "distill must be >= 0"),
        ({"palettize": "2", "assignment": "hard"}, "assignment='hard'; valid: fixed, nearest, soft"),
        ({"palettize": "2", "temperature": -1.0}, "temperature must be >= 0"),
        ({"palettize": "2", "recluster_every": 4}, "with assignment='soft' give assignment='fixed'"),
    ],
)
def test_bad_settings_are_one_line_errors(fields, message):
    with pytest.raises(InvalidValueError, match=message):
        QatConfig(**fields)


def test_a_data_aware_recipe_is_refused(tmp_path):
    from workbench.recipes.recipe import Recipe

    path = Recipe("r", {"down_blocks.0.resnets.0.conv1": "wkmeans2"}).save(tmp_path / "r.json")
    with pytest.raises(InvalidValueError, match="plain k-means palettes only"):
        _run(QatConfig(str(path), steps=1, batch=1))


def test_the_command_line_rejects_bad_input_in_one_line(capsys, tmp_path):
    assert cli_main(["train", "--palettize", "7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "palette width" in err
    assert cli_main(["train", "--steps", "10", "--out", str(tmp_path / "x")]) == 2
    assert "--palettize" in capsys.readouterr().err


@pytest.mark.slow
def test_dkm_trains_the_same_recipe_to_at_most_2_to_the_nbits_values():
    from workbench.tune.dkm import train_dkm

    pipe = tiny_sd_pipeline()
    record = train_dkm(pipe, DATA, QatConfig("2", steps=2, batch=2, min_numel=10_000), log=lambda line: None)
    assert record["max_distinct"] <= 4 and len(record["losses"]) == 2 and all(np.isfinite(record["losses"]))


def test_learned_luts_train_only_the_luts_of_palettized_layers_and_end_exact(tmp_path):
    """`luts="learned"`: the LUTs are the trained parameters (their indices stay the post-training k-means'), the
    other parameters train as before, and the model ends holding exactly `LUT[indices]`, deterministically."""
    from workbench.palettes.fit import fit_palette

    config = QatConfig("2", steps=3, batch=2, luts="learned", lut_lr=0.05, min_numel=10_000, seed=5)
    fresh = tiny_sd_pipeline()
    pipe, result = _run(config, tmp_path / "learned")
    assert result.exact and len(result.palettes) >= 20
    moved = 0
    for name, palette in result.palettes.items():
        start = fit_palette(fresh.unet.get_submodule(name).weight, palette.config)
        assert np.array_equal(start.indices, palette.indices), name  # the assignment stays
        moved += not np.array_equal(start.lut, palette.lut)
    assert moved >= len(result.palettes) // 2
    biases = [n for n, _ in fresh.unet.named_parameters() if n.endswith("bias")]
    trained, before = pipe.unet.state_dict(), fresh.unet.state_dict()
    assert any(not torch.equal(trained[n], before[n]) for n in biases)  # the unpalettized parameters train too
    _, again = _run(config)
    assert again.losses == result.losses


def test_learned_luts_keep_their_assignment_so_refits_are_refused():
    with pytest.raises(InvalidValueError, match="recluster_every needs luts='centroid'"):
        QatConfig("2", luts="learned", recluster_every=2)
    with pytest.raises(InvalidValueError, match="valid: centroid, learned"):
        QatConfig("2", luts="soft")


def test_the_assignment_step_moves_each_weight_to_its_nearest_entry():
    from workbench.palettes.config import PaletteConfig
    from workbench.tune.qat import TrainedPalette

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 6, 3, 3, generator=generator)
    trained = TrainedPalette(weight, PaletteConfig(2, granularity="per_grouped_channel", group_size=4))
    moved = weight + 0.3 * torch.randn(weight.shape, generator=generator)
    trained.reassign(moved)
    luts = trained.lut.reshape(2, 1, 4)  # two groups of four output channels
    distances = (moved.reshape(2, -1, 1) - luts).abs()
    expected = distances.argmin(-1).reshape(weight.shape)
    assert torch.equal(trained.indices, expected)
    chosen = distances.gather(-1, trained.indices.reshape(2, -1, 1))
    assert torch.equal(chosen, distances.min(-1, keepdim=True).values)  # no weight has a nearer entry
    assert (trained.indices != TrainedPalette(weight, trained.config).indices).any()  # some weights changed entry


def test_the_soft_weight_is_a_differentiable_kmeans_iteration_and_hard_at_temperature_0():
    from workbench.palettes.config import PaletteConfig
    from workbench.tune.qat import TrainedPalette

    weight = torch.randn(16, 40, generator=torch.Generator().manual_seed(4))
    trained = TrainedPalette(weight, PaletteConfig(2), soft=True)
    master = weight.clone().requires_grad_(True)
    hard = trained.soft_weight(master)
    nearest = (weight.reshape(-1, 1) - trained.lut.reshape(1, -1)).abs().argmin(-1)
    means = torch.stack([weight.reshape(-1)[nearest == k].mean() for k in range(4)])
    assert torch.allclose(hard.reshape(-1), means[nearest], atol=1e-6)  # one Lloyd iteration from the LUT
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(5))
    hard.backward(upstream)  # every master of a cluster gets the mean of its cluster's weights' gradients
    cluster_mean = torch.stack([upstream.reshape(-1)[nearest == k].mean() for k in range(4)])
    assert torch.allclose(master.grad.reshape(-1), cluster_mean[nearest], atol=1e-6)
    trained.temperature = 0.1
    soft = trained.soft_weight(weight)
    assert 0 < (soft - hard).abs().max() and torch.unique(soft).numel() > 4  # weights near midpoints are mixed
    assert (soft - hard).abs().mean() < 0.1 * weight.std()  # ... and the rest stay near their cluster's centroid


@pytest.mark.parametrize("assignment", ["nearest", "soft"])
def test_a_moving_assignment_trains_deterministically_and_ends_exact(assignment):
    config = QatConfig("2", steps=3, batch=2, assignment=assignment, min_numel=10_000, seed=5)
    pipe_a, a = _run(config)
    pipe_b, b = _run(config)
    assert a.exact and b.exact and a.losses == b.losses
    for name, palette in a.palettes.items():
        assert np.array_equal(palette.indices, b.palettes[name].indices), name
        assert np.array_equal(palette.lut, b.palettes[name].lut), name


def test_the_temperature_anneals_to_hard_at_three_quarters_or_stays_constant():
    from workbench.tune.qat import soft_temperature

    annealed = QatConfig("2", steps=8, temperature=0.02, anneal=True)
    schedule = [soft_temperature(step, annealed) for step in range(8)]
    assert schedule[0] == 0.02 and all(a > b for a, b in zip(schedule[:6], schedule[1:6]))
    assert schedule[6:] == [0.0, 0.0]  # the last quarter trains the hard palettes
    constant = QatConfig("2", steps=8, temperature=0.02)  # the default: constant
    assert [soft_temperature(step, constant) for step in range(8)] == [0.02] * 8
