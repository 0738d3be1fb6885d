"""Contextual decomposition (CD) of any fx-traceable model, plus rules for whole models."""
from cdep_exp.cd.engine import decompose
from cdep_exp.cd.rules import Decomposed, UnsupportedOperationError, register_model_rule, register_rule
from cdep_exp.cd import lstm  # noqa: F401  (registers the LSTMClassifier rule)

__all__ = ["Decomposed", "UnsupportedOperationError", "decompose", "register_model_rule", "register_rule"]
