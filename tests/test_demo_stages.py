"""The demo model's training stages: checkpoints written atomically, and a run resumed from them exactly."""

import pytest

from workbench.demo.config import TrainConfig
from workbench.demo.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = TrainConfig(
    n_images=32, vae_steps=2, vae_batch=2, unet_steps=3, unet_batch=2, vae_channels=(8, 8, 8), text_layers=1,
    checkpoint_every=2,
)  # fmt: skip


class Stop(Exception):
    """Raised by the log to interrupt a run."""


def _weights(folder) -> dict[str, bytes]:
    return {part: next((folder / part).glob("*.safetensors")).read_bytes() for part in ("unet", "text_encoder", "vae")}


def test_an_interrupted_run_resumes_from_its_checkpoints_to_the_same_model(tmp_path):
    whole = train(CONFIG, tmp_path / "whole", card=False, log=lambda line: None)
    ckpt, lines = tmp_path / "ckpt", []

    def log(line):
        lines.append(line)
        if line.startswith("unet step     2/3"):  # the last step's line comes before its checkpoint: step 2's is kept
            raise Stop(line)

    with pytest.raises(Stop):
        train(CONFIG, tmp_path / "resumed", checkpoint_dir=ckpt, card=False, log=log)
    assert sorted(p.name for p in ckpt.iterdir()) == ["stage1_vae.pt", "stage2_unet.pt"]  # no temporary files left
    resumed = train(CONFIG, tmp_path / "resumed", checkpoint_dir=ckpt, card=False, log=lines.append)
    assert any(line.startswith("loaded the trained VAE") for line in lines)
    assert any(line.startswith("resumed the unet stage at step 2") for line in lines)
    assert resumed.unet_losses == whole.unet_losses and resumed.scaling_factor == whole.scaling_factor
    assert _weights(tmp_path / "resumed") == _weights(tmp_path / "whole")
