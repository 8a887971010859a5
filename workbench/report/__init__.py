"""Reports: the notebooks' helpers, the papermill runner and its progress, recipe tables and ipywidgets explorers."""

from workbench.report.config import ReportConfig
from workbench.report.runner import run_report
from workbench.report.tables import recipe_table

__all__ = ["recipe_table", "ReportConfig", "run_report"]
