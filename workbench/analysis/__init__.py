"""The mixed-bit pre-analysis: `AnalysisConfig` -> `run_analysis` -> `AnalysisResult`, and the baselines it is
compared with (coremltools' SKM palettizer, full trajectories)."""

from workbench.analysis.config import DEFAULT_PROMPTS, AnalysisConfig, config_for_model
from workbench.analysis.result import AnalysisResult, RecipeResult
from workbench.analysis.run import run_analysis

__all__ = ["AnalysisConfig", "AnalysisResult", "config_for_model", "DEFAULT_PROMPTS", "RecipeResult", "run_analysis"]
