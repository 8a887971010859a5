"""Recipes: the one recipe type (`Recipe`, and `PlannedRecipe`: how a strategy chose it), Apple's pre-analysis
JSON, the allocation strategies, and the refinement where layers interact."""

from workbench.recipes.allocation import Measurements, size_aware_recipes, threshold_recipes
from workbench.recipes.recipe import PlannedRecipe, PreAnalysis, Recipe, load_recipe
from workbench.recipes.refine import refine_recipe

__all__ = [
    "load_recipe",
    "Measurements",
    "PlannedRecipe",
    "PreAnalysis",
    "Recipe",
    "refine_recipe",
    "size_aware_recipes",
    "threshold_recipes",
]
