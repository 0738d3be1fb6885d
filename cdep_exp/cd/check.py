"""Where does rel + irrel leave the plain forward? A per-node check for people writing rules.

`drift_report` runs the decomposition and the plain forward node by node from the same random
state and compares each node's rel + irrel with the plain value there; `decompose(...,
check=True)` raises DecompositionDriftError at the first node beyond the tolerance.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from cdep_exp.cd.engine import initial_streams, plan_of
from cdep_exp.cd.rules import model_rule


class DecompositionDriftError(RuntimeError):
    """rel + irrel left the plain forward's value at some node (decompose(..., check=True))."""


@dataclasses.dataclass(frozen=True)
class NodeDrift:
    """How far one graph node's rel + irrel is from the plain forward's value there.

    `rel_error` is max |rel + irrel − plain| / max |plain| over the node's output(s).
    """

    node: str
    op: str
    max_abs_error: float
    rel_error: float


def _drift(ours: Any, plain: Any) -> tuple[float, float] | None:
    """(max abs error, relative error) between matching tensors of two results, or None."""
    if isinstance(ours, Tensor) and isinstance(plain, Tensor):
        if ours.shape != plain.shape or not plain.dtype.is_floating_point:
            return None
        err = (ours.double() - plain.double()).abs()
        if err.numel() == 0:
            return 0.0, 0.0
        scale = plain.double().abs().max().clamp_min(torch.finfo(plain.dtype).tiny)
        err = torch.nan_to_num(err, nan=float("inf"))
        return float(err.max()), float(err.max() / scale)
    if isinstance(ours, (tuple, list)) and isinstance(plain, (tuple, list)):
        found = [d for d in (_drift(a, b) for a, b in zip(ours, plain)) if d is not None]
        return (max(d[0] for d in found), max(d[1] for d in found)) if found else None
    return None


def _buffers_state(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.detach().clone()) for b in model.buffers()]


def drift_report(
    model: nn.Module, x: Tensor, mask: Tensor | None = None, *, rel: Tensor | None = None
) -> list[NodeDrift]:
    """Per graph node, how far rel + irrel is from the plain forward's value (in graph order).

    The decomposition and a plain node-by-node forward run from the same random state; the
    model's buffers (batch-norm statistics) and the random state are left as they were. A node whose
    rule is wrong shows the first jump in `rel_error`; later nodes inherit it. A whole-model
    rule (the LSTM) gets a single 'output' entry.
    """
    rel_total = initial_streams(x, mask, rel)
    devices = [x.device] if x.device.type == "cuda" else []
    whole = model_rule(type(model))
    with torch.random.fork_rng(devices=devices):
        state = torch.random.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(x.device) if devices else None
        saved = _buffers_state(model)
        if whole is not None:
            r, i = whole(model, x, mask)
            ours = [("output", "model rule", (r + i).detach())]
        else:
            plan = plan_of(model)
            record: list = []
            plan.run(model, rel_total, (), record)
            ours = [(plan.names[i], plan.ops[i], v) for i, v in record]
        for b, old in saved:
            b.data.copy_(old)
        torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, x.device)
        if whole is not None:
            plain = [model(x).detach()]
        else:
            plain = [v for _, v in plan.run_plain(model, x.clone())]
        for b, old in saved:
            b.data.copy_(old)
    report = []
    for (name, op, a), b in zip(ours, plain):
        d = _drift(a, b)
        if d is not None:
            report.append(NodeDrift(name, op, *d))
    return report


def raise_on_drift(model: nn.Module, x: Tensor, mask: Tensor | None, rel: Tensor | None, tol: float) -> None:
    """Raise DecompositionDriftError at the first node whose relative drift exceeds `tol`."""
    for d in drift_report(model, x, mask, rel=rel):
        if not d.rel_error <= tol:
            raise DecompositionDriftError(
                f"rel + irrel leaves the plain forward at graph node '{d.node}' ({d.op}) of "
                f"{type(model).__name__}: relative error {d.rel_error:.3g} > {tol:g} (max abs "
                f"{d.max_abs_error:.3g}). That node's rule (or an in-place or state effect it misses) "
                f"is wrong; drift_report() lists every node."
            )
