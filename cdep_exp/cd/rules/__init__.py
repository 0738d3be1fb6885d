"""Contextual-decomposition rules: one short function per operation, kept in a registry.

A decomposed value is a `Decomposed`: its relevant part and its total (rel + irrel, the value
of the plain forward) stacked on a new leading axis, `rel_total` of shape (2, *plain shape);
with several masks at once (`decompose_many`), k relevant parts and one total, (k + 1, ...).
Carrying the total rather than irrel makes most rules one call on the stacked tensor: any
linear map without bias applies to both rows, and an elementwise f applied to both rows is
exactly the CD rule rel' = f(rel), irrel' = f(rel + irrel) − f(rel) (REFERENCE §1.3).

Each rule takes the target (the module instance, the function, or the method name) followed
by the call's own arguments, where every decomposed argument arrives as a `Decomposed`, and
returns what the call returns, with decomposed results as `Decomposed`. A rule may return a
plain tensor for a value it holds fixed (softmax probabilities, attention.py). A user's own
layer:

    @cdep_exp.cd.register_rule(MyScale)
    def _my_scale(layer, x):
        return Decomposed(x.rel_total * layer.scale)

Helpers for the common shapes of a rule (bias.py): `per_part` (a bias-free linear map, one
call for both rows), `linear_with_bias` (that plus the bias split of REFERENCE §1.2),
`add_bias` and `elementwise`. The rules live in one module per family; docs/cd_rules.md
lists them with the choice each makes.
"""
from cdep_exp.cd.rules.core import (
    PLAIN_ATTRS,
    PLAIN_METHODS,
    Decomposed,
    DecompositionNotFiniteError,
    Rule,
    RuleOverrideWarning,
    UnsupportedOperationError,
    importable_name,
    lookup,
    model_rule,
    module_rule,
    multi_stream,
    plain_result,
    register_model_rule,
    register_rule,
    registered_keys,
    registry_version,
    total_of,
    unregister_rule,
)
from cdep_exp.cd.rules.bias import (
    EPS,
    add_bias,
    channel_view,
    constant_share,
    elementwise,
    eps_for,
    input_share,
    linear_with_bias,
    per_part,
    shift_dim,
    split_bias,
    unsupported,
)
from cdep_exp.cd.rules import (  # noqa: F401  (each module registers its family's rules)
    activations,
    arithmetic,
    attention,
    comparison,
    linear,
    normalization,
    pooling,
    recurrent,
    regularization,
    shape,
)

# Every built-in rule keeps the stream axis in front (`Decomposed.streams`), so several masks
# decompose in one pass; a user's rule is run once per stream unless it says the same.
for _key in registered_keys():
    multi_stream(lookup(_key))

__all__ = [
    "EPS", "PLAIN_ATTRS", "PLAIN_METHODS", "Decomposed", "DecompositionNotFiniteError", "Rule", "RuleOverrideWarning", "UnsupportedOperationError",
    "add_bias", "channel_view", "constant_share", "elementwise", "eps_for", "importable_name", "input_share",
    "linear_with_bias",
    "lookup", "model_rule", "module_rule", "multi_stream", "per_part", "plain_result", "register_model_rule", "register_rule", "registered_keys",
    "registry_version", "shift_dim", "split_bias", "total_of", "unregister_rule", "unsupported",
]
