"""Normalisation: BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm (modules and functions).

Normalisation divides by a statistic of its input, which is not linear. Every rule here holds
the divisor fixed at its value for the full input (rel + irrel), so each rule is the affine
map the plain forward applies to this input, and rel + irrel is exactly its output. Ali et al.
(2022, "XAI for Transformers: Better Explanations through Conservative Propagation", ICML)
make the same choice for LayerNorm. Subtracting a mean is linear, so:

* per-sample statistics (LayerNorm, GroupNorm, InstanceNorm): each part is centred on its own
  mean (rel − mean(rel), and irrel − mean(irrel)), so a part that is zero stays zero;
* BatchNorm: the mean (running, or the batch's in train mode) is part of the shift
  β − mean·γ/σ, split like a Linear bias. That is the rule CDEP always used (kept so existing
  models' decompositions do not change).

The learned bias β goes through the bias split (`add_bias`). Statistics of 16-bit inputs are
computed in float32, as PyTorch's own kernels do.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdep_exp.cd.rules.bias import add_bias, channel_view, unsupported
from cdep_exp.cd.rules.core import Decomposed, register_rule

_LOW = (torch.float16, torch.bfloat16)


def _rstd(total: Tensor, dims: list[int], eps: float) -> Tensor:
    """1 / sqrt(var + eps) of the full input over `dims` (kept), in float32 for 16-bit inputs."""
    t = total.float() if total.dtype in _LOW else total
    return torch.rsqrt(t.var(dim=dims, correction=0, keepdim=True) + eps).to(total.dtype)


def _centred(rel_total: Tensor, dims: list[int]) -> Tensor:
    """Each part minus its own mean over `dims` (dims of the stacked tensor)."""
    t = rel_total.float() if rel_total.dtype in _LOW else rel_total
    return (t - t.mean(dim=dims, keepdim=True)).to(rel_total.dtype)


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, view) -> Decomposed:
    if weight is not None:
        out = out * view(weight)
    d = Decomposed(out)
    return d if bias is None else add_bias(d, view(bias))


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(m: nn.modules.batchnorm._BatchNorm, x: Decomposed) -> Decomposed:
    """An affine map per channel whose bias (β − mean·scale) is split like Linear's.

    Eval mode uses the running statistics. Train mode (or no running stats) normalises with the
    batch statistics of rel + irrel, exactly as the plain forward, and updates the running
    statistics once, as one plain forward would: decompose stands in for that forward. Like
    the plain forward, train mode refuses a batch with one value per channel (ValueError).
    """
    batch_stats = m.training or m.running_mean is None
    update = (lambda mean, var, n: _update_running_stats(m, mean, var, n)) if m.training and m.track_running_stats else None
    return _batch_norm(x, None if batch_stats else m.running_mean, None if batch_stats else m.running_var,
                       m.weight, m.bias, m.eps, m.training, update)


@register_rule(F.batch_norm)
def batch_norm_function(fn: Callable, x: Decomposed, running_mean: Tensor | None, running_var: Tensor | None,
                        weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                        momentum: float = 0.1, eps: float = 1e-5) -> Decomposed:
    """`F.batch_norm` (timm's fused BatchNormAct layers call it): as `nn.BatchNorm2d`, the
    running statistics updated once with `momentum` in training."""
    def update(mean: Tensor, var: Tensor, n: int) -> None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / max(n - 1, 1))).to(running_var.dtype), momentum)

    batch_stats = training or running_mean is None
    return _batch_norm(x, None if batch_stats else running_mean, None if batch_stats else running_var,
                       weight, bias, eps, training, update if training and running_mean is not None else None)


def _batch_norm(x: Decomposed, mean: Tensor | None, var: Tensor | None, weight: Tensor | None,
                bias: Tensor | None, eps: float, training: bool, update: Callable | None) -> Decomposed:
    """Batch norm with the given statistics, or (None) those of the batch's total, then `update`d."""
    part_ndim = x.ndim
    if mean is None:
        total = x.total
        if training:
            F._verify_batch_size(total.size())
        dims = [0, *range(2, part_ndim)]
        var, mean = torch.var_mean(total.float() if total.dtype in _LOW else total, dim=dims, correction=0)
        if update is not None:
            update(mean, var, total.numel() // total.shape[1])
        var, mean = var.to(total.dtype), mean.to(total.dtype)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    lin = Decomposed(x.rel_total * channel_view(scale, part_ndim).to(x.rel_total.dtype))
    return add_bias(lin, channel_view(shift, part_ndim).to(x.rel_total.dtype))


@torch.no_grad()
def _update_running_stats(m: nn.Module, mean: Tensor, var: Tensor, n: int) -> None:
    m.num_batches_tracked.add_(1)
    momentum = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    m.running_mean.lerp_(mean.to(m.running_mean.dtype), momentum)
    m.running_var.lerp_((var * (n / max(n - 1, 1))).to(m.running_var.dtype), momentum)


@register_rule(F.normalize)
def normalize(fn: Callable, x: Decomposed, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out=None) -> Decomposed:
    """x / max(‖x‖_p, ε) along `dim`: the norm of the full input held fixed, as the other
    normalisations hold their statistics; linear in each part."""
    norm = x.total.norm(p, dim, keepdim=True).clamp_min(eps)
    return Decomposed(x.rel_total / norm)


def _check_trailing(x: Decomposed, shape, what: str) -> None:
    """Refuse, as the plain kernel does, an input whose trailing axes are not `shape`."""
    shape = tuple(shape)
    if tuple(x.shape[x.ndim - len(shape):]) != shape or x.ndim < len(shape):
        raise RuntimeError(f"{what}: given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size {list(x.shape)}")


def _layer_norm(x: Decomposed, shape, weight, bias, eps: float) -> Decomposed:
    _check_trailing(x, shape, "layer_norm")
    dims = list(range(-len(shape), 0))
    out = _centred(x.rel_total, dims) * _rstd(x.total, dims, eps)
    return _affine(out, weight, bias, lambda v: v)


@register_rule(nn.LayerNorm)
def layer_norm(m: nn.LayerNorm, x: Decomposed) -> Decomposed:
    """Each part centred on its own mean over the normalised axes, divided by the full input's
    standard deviation (held fixed), times γ; β split like a bias."""
    return _layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


@register_rule(F.layer_norm)
def layer_norm_function(fn: Callable, x: Decomposed, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Decomposed:
    """`F.layer_norm`: as `nn.LayerNorm`."""
    return _layer_norm(x, tuple(normalized_shape), weight, bias, eps)


def _rms_norm(x: Decomposed, shape, weight, eps: float | None) -> Decomposed:
    _check_trailing(x, shape, "rms_norm")
    dims = list(range(-len(shape), 0))
    total = x.total.float() if x.total.dtype in _LOW else x.total
    eps = torch.finfo(total.dtype).eps if eps is None else eps
    inv = torch.rsqrt(total.pow(2).mean(dims, keepdim=True) + eps).to(x.rel_total.dtype)
    return _affine(x.rel_total * inv, weight, None, lambda v: v)


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm)
    def rms_norm(m: nn.Module, x: Decomposed) -> Decomposed:
        """Both parts divided by the full input's root mean square (held fixed), times γ: linear."""
        return _rms_norm(x, m.normalized_shape, m.weight, m.eps)

    @register_rule(F.rms_norm)
    def rms_norm_function(fn: Callable, x: Decomposed, normalized_shape, weight=None, eps=None) -> Decomposed:
        """`F.rms_norm`: as `nn.RMSNorm`."""
        return _rms_norm(x, tuple(normalized_shape), weight, eps)


def _group_norm(x: Decomposed, groups: int, weight, bias, eps: float) -> Decomposed:
    t = x.rel_total  # (2, B, C, *)
    if t.ndim < 3 or t.shape[2] % groups:
        raise RuntimeError(f"group_norm: expected the number of channels in input of size {list(x.shape)} "
                           f"to be divisible by num_groups={groups}")
    grouped = t.reshape(len(t), t.shape[1], groups, -1)
    out = (_centred(grouped, [-1]) * _rstd(grouped[-1], [-1], eps)).view_as(t)
    return _affine(out, weight, bias, lambda v: channel_view(v, x.ndim))


@register_rule(nn.GroupNorm)
def group_norm(m: nn.GroupNorm, x: Decomposed) -> Decomposed:
    """Per sample and group of channels: each part centred on its own mean, divided by the
    full input's standard deviation (held fixed); γ, then β split like a bias."""
    return _group_norm(x, m.num_groups, m.weight, m.bias, m.eps)


@register_rule(F.group_norm)
def group_norm_function(fn: Callable, x: Decomposed, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Decomposed:
    """`F.group_norm`: as `nn.GroupNorm`."""
    return _group_norm(x, num_groups, weight, bias, eps)


def _instance_norm(x: Decomposed, running_mean, running_var, weight, bias, use_input_stats: bool,
                   momentum: float, eps: float) -> Decomposed:
    if x.ndim < 3:
        raise unsupported("instance_norm of an unbatched value", "give the input a batch axis")
    view = lambda v: channel_view(v, x.ndim)
    if not use_input_stats:
        scale = torch.rsqrt(running_var + eps)
        out = Decomposed(x.rel_total * view(scale if weight is None else scale * weight))
        shift = -running_mean * scale * (1 if weight is None else weight)
        return add_bias(out, view(shift if bias is None else shift + bias))
    total = x.total
    F._verify_spatial_size(total.size())
    dims = list(range(-(x.ndim - 2), 0))
    if running_mean is not None:
        with torch.no_grad():  # the plain forward's update: batch-averaged instance statistics
            t = total.float() if total.dtype in _LOW else total
            n = t[0, 0].numel()
            var, mean = torch.var_mean(t, dim=dims, correction=0)
            running_mean.lerp_(mean.mean(0).to(running_mean.dtype), momentum)
            running_var.lerp_((var.mean(0) * n / max(n - 1, 1)).to(running_var.dtype), momentum)
    out = _centred(x.rel_total, dims) * _rstd(total, dims, eps)
    return _affine(out, weight, bias, view)


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm(m: nn.modules.instancenorm._InstanceNorm, x: Decomposed) -> Decomposed:
    """Per sample and channel, as `group_norm` with one channel per group. With running
    statistics in eval mode: an affine map per channel like eval-mode BatchNorm. Train mode
    with `track_running_stats` updates them once, as the plain forward does."""
    m._check_input_dim(x.total)
    use_input_stats = m.training or not m.track_running_stats
    return _instance_norm(x, m.running_mean, m.running_var, m.weight, m.bias, use_input_stats,
                          m.momentum if m.momentum is not None else 0.0, m.eps)


@register_rule(F.instance_norm)
def instance_norm_function(fn: Callable, x: Decomposed, running_mean=None, running_var=None, weight=None, bias=None,
                           use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> Decomposed:
    """`F.instance_norm`: as the modules."""
    return _instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
