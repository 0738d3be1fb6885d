"""Contextual decomposition (CD) of a PyTorch model, plus rules for whole models.

The engine (`engine`) walks a model's forward graph, traced by torch.fx, with one rule per
operation (`rules/`); where fx cannot trace the forward (Hugging Face models, control flow on
values, hooks) `eager` runs the forward itself on a tensor that carries the decomposition;
`check` compares the decomposition with the plain forward node by node. Models with a
whole-model rule register it themselves (`register_model_rule`; this package's text
classifiers in `cdep_exp.models.cd_rules`), so the engine imports no model zoo.
"""
from torch import Tensor, nn

from cdep_exp.cd import engine
from cdep_exp.cd.check import DecompositionDriftError, NodeDrift, drift_report, raise_on_drift
from cdep_exp.cd.engine import CAPTURES, DecompositionNotFiniteError, batch_coupled, decompose_many, propagate, split_input, unwrap
from cdep_exp.cd.rules import (
    Decomposed,
    RuleOverrideWarning,
    UnsupportedOperationError,
    multi_stream,
    register_model_rule,
    register_rule,
    split_bias,
    unregister_rule,
)

__all__ = [
    "CAPTURES", "Decomposed", "DecompositionDriftError", "DecompositionNotFiniteError", "NodeDrift", "RuleOverrideWarning", "UnsupportedOperationError", "batch_coupled",
    "decompose", "decompose_many", "drift_report", "multi_stream", "propagate", "register_model_rule", "register_rule",
    "split_bias", "split_input", "unregister_rule", "unwrap",
]


def decompose(
    model: nn.Module, x: Tensor, mask: Tensor | None = None, *, rel: Tensor | None = None,
    check: bool | float = False, capture: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Contextual decomposition of `model(x)` into (rel, irrel), the part due to the `mask`ed
    features (or the given relevant part `rel` of x) and the rest; see `engine.decompose`.

    `check=True` (or a relative tolerance, default 1e-4 for True) also runs the plain forward
    node by node and raises DecompositionDriftError at the first node where rel + irrel differs
    from it by more than the tolerance, relative to the node's largest value: for debugging a
    rule, at about twice the cost (the check follows the fx capture). `capture` ("auto", "fx",
    "eager") chooses how the forward is followed; see `engine.decompose`. Raises DecompositionNotFiniteError where the relevant part
    turns NaN or infinite while model(x) is finite, naming the node.
    """
    model = unwrap(model)
    if check:
        raise_on_drift(model, x, mask, rel, 1e-4 if check is True else float(check))
    return engine.decompose(model, x, mask, rel=rel, capture=capture)
