"""Explanation penalties, one interface: `penalty(model, x, y, annotation) -> (logits, value)`."""
from cdep_exp.penalties.base import Penalty, Vanilla
from cdep_exp.penalties.cdep import CDEP
from cdep_exp.penalties.counterfactual import CounterfactualAugmentation, CounterfactualLogitPairing
from cdep_exp.penalties.eg import ExpectedGradients
from cdep_exp.penalties.group import GroupDRO, ReweightedLoss
from cdep_exp.penalties.rrr import RRR

__all__ = ["CDEP", "RRR", "CounterfactualAugmentation", "CounterfactualLogitPairing", "ExpectedGradients",
           "GroupDRO", "Penalty", "ReweightedLoss", "Vanilla"]
