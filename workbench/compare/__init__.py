"""Seed-matched comparisons: the same prompts and seeds through the float model and each recipe, scored per image."""

from workbench.compare.seed_matched import backend_comparison, seed_matched_images

__all__ = ["backend_comparison", "seed_matched_images"]
