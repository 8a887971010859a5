"""Models: the one loader (`load_pipeline`), the layers an analysis can palettize, generation, and the builders of
tiny and full-size pipelines from published configs (random weights)."""

from workbench.models.architectures import build_pipeline, build_unet, save_pipeline
from workbench.models.generation import generate_images
from workbench.models.layers import compressible_layers, get_layer, select_layers
from workbench.models.loader import DEMO_MODEL, load_pipeline, pick_device
from workbench.models.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

__all__ = [
    "build_pipeline",
    "build_unet",
    "compressible_layers",
    "DEMO_MODEL",
    "generate_images",
    "get_layer",
    "load_pipeline",
    "pick_device",
    "save_pipeline",
    "select_layers",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
]
