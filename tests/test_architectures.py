"""Full-size UNets from the published configs: exact parameter counts and candidate layers, without memory."""

import json

import pytest
import torch

from workbench.models.architectures import ARCHITECTURES, PUBLISHED_PARAMETERS, build_unet, save_pipeline, unet_config
from workbench.models.layers import compressible_layers

# The reference's candidate counts at weight.numel() > 1e5 (REFERENCE.md) and the largest layer, 29.5M weights.
REFERENCE_CANDIDATES = {"sd15": 280, "sd21-base": 280, "sdxl-base": 792}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_full_size_unets_have_the_published_sizes(arch):
    unet = build_unet(arch, device="meta")  # shapes only: instant, no memory
    assert sum(p.numel() for p in unet.parameters()) == PUBLISHED_PARAMETERS[arch]
    layers = compressible_layers(unet, 100_000)
    assert len(layers) == REFERENCE_CANDIDATES[arch]
    assert max(m.weight.numel() for m in layers.values()) == 29_491_200


def test_sd15_is_exactly_the_published_unet():
    unet = build_unet("sd15", device="meta")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert len(compressible_layers(unet, 100_000)) == 280
    assert tuple(unet.get_submodule("up_blocks.0.resnets.0.conv1").weight.shape) == (1280, 2560, 3, 3)


def test_bad_architecture_and_sample_size_are_named():
    with pytest.raises(ValueError, match="unknown architecture 'sd3'; valid: sd15, sd21-base, sdxl-base"):
        build_unet("sd3", device="meta")
    with pytest.raises(ValueError, match=r"multiple of 8 .*got 12"):
        unet_config("sd15", sample_size=12)


def test_weights_are_a_function_of_the_seed_alone():
    state = torch.random.get_rng_state()
    first = build_unet("sd15", sample_size=8, seed=3).conv_in.weight
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG was touched"
    assert torch.equal(first, build_unet("sd15", sample_size=8, seed=3).conv_in.weight)


@pytest.mark.slow
def test_saved_sd15_pipeline_loads_and_is_labelled_random(tmp_path):
    from workbench.models.loader import load_pipeline

    folder = save_pipeline("sd15", tmp_path / "sd15", sample_size=8)
    assert "RANDOM WEIGHTS" in (folder / "README.md").read_text()
    assert json.loads((folder / "random_weights.json").read_text())["architecture"] == "sd15"
    pipe = load_pipeline(folder, device="cpu")
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    latents = pipe(["a red circle"], num_inference_steps=1, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_layer_patterns_pick_a_block_of_the_full_size_unet():
    from workbench.models.layers import LayerNotFoundError, select_layers

    layers = compressible_layers(build_unet("sd15", device="meta"), 100_000)
    mid = select_layers(layers, ["mid_block.*"])
    assert list(mid) == [n for n in layers if n.startswith("mid_block.")] and len(mid) == 18
    cross = select_layers(layers, ["*.attn2.*"], exclude=["up_blocks.*"])
    assert cross and all(".attn2." in n and not n.startswith("up_blocks.") for n in cross)
    with pytest.raises(LayerNotFoundError, match="'mid_blok.*' matches none of the 280 layers"):
        select_layers(layers, ["mid_blok.*"])
