"""Measuring palettized UNets: the one-step probe, the resumable store, the executors (this process or Ray
workers), the sweep phases and the fast sweep's predictions."""

from workbench.sweep.executor import EvalTask, LocalExecutor
from workbench.sweep.phases import candidate_layers
from workbench.sweep.prediction import FastSettings
from workbench.sweep.probe import OneStepProbe
from workbench.sweep.store import Evaluation, EvaluationStore

__all__ = [
    "candidate_layers",
    "EvalTask",
    "Evaluation",
    "EvaluationStore",
    "FastSettings",
    "LocalExecutor",
    "OneStepProbe",
]
