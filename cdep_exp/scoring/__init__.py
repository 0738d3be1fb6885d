"""Scoring a trained model: the dataset's metrics on every split (accuracy, AUC, F1, group rates)
and the shortcut metric under each counterfactual test set."""
from cdep_exp.scoring.evaluation import Evaluation, evaluate, evaluate_splits
from cdep_exp.scoring.metrics import METRICS, compute_metrics
from cdep_exp.scoring.shortcut import shortcut_reliance

__all__ = ["METRICS", "Evaluation", "compute_metrics", "evaluate", "evaluate_splits", "shortcut_reliance"]
