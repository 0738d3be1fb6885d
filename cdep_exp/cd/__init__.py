"""Contextual decomposition (CD) of any fx-traceable model, plus rules for whole models."""
from cdep_exp.cd.check import DecompositionDriftError, NodeDrift, drift_report
from cdep_exp.cd.engine import batch_coupled, decompose, decompose_many, propagate
from cdep_exp.cd.rules import (
    Decomposed,
    RuleOverrideWarning,
    UnsupportedOperationError,
    multi_stream,
    register_model_rule,
    register_rule,
    unregister_rule,
)
from cdep_exp.cd import lstm, text  # noqa: F401  (register the text classifiers' rules)

__all__ = [
    "Decomposed", "DecompositionDriftError", "NodeDrift", "RuleOverrideWarning", "UnsupportedOperationError", "batch_coupled",
    "decompose", "decompose_many", "drift_report", "multi_stream", "propagate", "register_model_rule", "register_rule", "unregister_rule",
]
