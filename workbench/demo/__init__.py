"""The demo model: its procedural shapes world, the adherence scorer that reads it, its components, its training
and its model card."""

from workbench.demo.adherence import read_shape, score_adherence
from workbench.demo.config import TrainConfig, TrainResult
from workbench.demo.world import make_dataset

__all__ = ["make_dataset", "read_shape", "score_adherence", "TrainConfig", "TrainResult"]
