"""Every registered CD rule, table-driven: each key has a case (a test fails when one is missing),
and each case is complete (rel + irrel == model(x)) in float32, finite and within the plain
forward's own precision in float16 and bfloat16, and complete in train mode where the layer
has one."""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cdep_exp.cd  # noqa: F401  (registers every rule)
from cdep_exp.cd import Decomposed, decompose, decompose_many, register_rule, unregister_rule
from cdep_exp.cd.rules import registered_keys

# Small models run faster on one thread than on two contended ones (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


V, I, S, L1, V3 = (4, 6), (2, 4, 8, 8), (2, 5, 8), (2, 4, 16), (2, 2, 4, 6, 6)


class Fn(nn.Module):
    """A linear layer (so rel and irrel mix and carry biases), then `fn`, traced through."""

    def __init__(self, fn: Callable, width: int, **modules: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(width, width)
        self.fn = fn
        for name, m in modules.items():
            self.add_module(name, m)
        self.w = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, self.pre(x))


@dataclasses.dataclass
class Case:
    keys: tuple
    build: Callable[[], nn.Module]
    shape: tuple
    train: bool = False


def fn_case(keys, fn, shape, train=False, **modules) -> Case:
    return Case(tuple(keys), lambda: Fn(fn, shape[-1], **{k: v() for k, v in modules.items()}), shape, train)


def module_case(cls, make, shape, train=False) -> Case:
    return fn_case([cls], lambda s, t: s.m(t), shape, train, m=make)


CASES: dict[str, Case] = {}


def add(name: str, case: Case) -> None:
    assert name not in CASES
    CASES[name] = case


# ---------------------------------------------------------------- activations
for cls, make in {
    nn.ReLU: lambda: nn.ReLU(inplace=True), nn.ReLU6: nn.ReLU6, nn.LeakyReLU: lambda: nn.LeakyReLU(0.2),
    nn.ELU: nn.ELU, nn.CELU: nn.CELU, nn.SELU: nn.SELU, nn.SiLU: lambda: nn.SiLU(inplace=True), nn.Mish: nn.Mish,
    nn.Hardswish: nn.Hardswish, nn.Hardsigmoid: nn.Hardsigmoid, nn.Hardtanh: nn.Hardtanh,
    nn.Threshold: lambda: nn.Threshold(0.1, -1.0), nn.Tanh: nn.Tanh, nn.Sigmoid: nn.Sigmoid, nn.GELU: nn.GELU,
    nn.Softplus: nn.Softplus, nn.Softsign: nn.Softsign, nn.Tanhshrink: nn.Tanhshrink, nn.LogSigmoid: nn.LogSigmoid,
}.items():
    add(cls.__name__, module_case(cls, make, V))
add("PReLU", module_case(nn.PReLU, lambda: nn.PReLU(4), I))
for fn in (F.relu, torch.relu, F.relu6, F.elu, F.celu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
           F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.tanh, torch.tanh, F.sigmoid,
           torch.sigmoid):
    add(f"{fn.__module__}.{fn.__name__}", fn_case([fn], lambda s, t, fn=fn: fn(t), V))
add("F.leaky_relu", fn_case([F.leaky_relu], lambda s, t: F.leaky_relu(t, 0.1, True) + t, V))
add("F.threshold", fn_case([F.threshold], lambda s, t: F.threshold(t, 0.1, 2.0), V))
add("relu_", fn_case([F.relu_, torch.relu_], lambda s, t: F.relu_(t) + torch.relu_(t * 2), V))
add("methods", fn_case(["relu", "sigmoid", "tanh"], lambda s, t: t.relu() + t.sigmoid() + t.tanh(), V))
add("methods_", fn_case(["relu_", "sigmoid_", "tanh_"], lambda s, t: t.relu_() + (t * 2).sigmoid_() + (t * 3).tanh_(), V))

# ---------------------------------------------------------------- arithmetic
add("add", fn_case([operator.add, torch.add, "add", "add_"],
                   lambda s, t: (t + 1.5) + torch.add(t, t, alpha=2) + t.add(s.w[0]) + (t * 2).add_(t), V))
add("sub", fn_case([operator.sub, torch.sub, "sub", "sub_"],
                   lambda s, t: (1.0 - t) - torch.sub(t, s.w[0], alpha=3) + t.sub(t * 3) + (t * 2).sub_(0.5), V))
add("neg", fn_case([operator.neg, torch.neg, "neg"], lambda s, t: -t + torch.neg(t * 2) + t.neg(), V))
add("mul", fn_case([operator.mul, torch.mul, "mul", "mul_"],
                   lambda s, t: t * torch.sigmoid(t) + torch.mul(t, 3) + t.mul(s.w[0]) + (t + 1).mul_(t), V))
add("div", fn_case([operator.truediv, torch.div, "div", "div_"],
                   lambda s, t: t / 2 + torch.div(t, t.abs() + 1) + t.div(s.w[0].abs() + 1) + (t * 2).div_(3.0), V))
add("pow", fn_case([operator.pow, torch.pow, "pow"], lambda s, t: t ** 2 + torch.pow(t, 3) + t.pow(2), V))
add("unary", fn_case(["exp", "sqrt", "abs", "square", torch.exp, torch.sqrt, torch.abs, torch.square],
                     lambda s, t: (t.exp() + t.abs().sqrt() + t.abs() + t.square()
                                   + torch.exp(t) + torch.sqrt(t.abs()) + torch.abs(t) + torch.square(t)), V))
add("divisor", fn_case(["rsqrt", "reciprocal", torch.rsqrt, torch.reciprocal],
                       lambda s, t: t * ((t.abs() + 1).rsqrt() + torch.rsqrt(t.abs() + 1) + (t.abs() + 1).reciprocal()
                                         + torch.reciprocal(t.abs() + 2) + (t.abs() + 1) ** -0.5), V))

# ---------------------------------------------------------------- attention


def _mha(s, t):
    return s.m(t, t, t, key_padding_mask=torch.tensor([[False] * 4 + [True], [False] * 5]))[0]


def _encoder_layer(norm_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, 0.1, batch_first=True, norm_first=norm_first)
    layer.self_attn.dropout = 0.0
    return layer


add("softmax", fn_case([F.softmax, torch.softmax, "softmax", nn.Softmax],
                       lambda s, t: F.softmax(t, -1) * t + torch.softmax(t, 0) @ s.w + t.softmax(-1) * s.sm(t),
                       V, sm=lambda: nn.Softmax(-1)))
add("sdpa", fn_case([F.scaled_dot_product_attention],
                    lambda s, t: F.scaled_dot_product_attention(t.unsqueeze(1), t.unsqueeze(1), t.unsqueeze(1), is_causal=True), S))
add("mha", fn_case([nn.MultiheadAttention], _mha, S, True, m=lambda: nn.MultiheadAttention(8, 2, batch_first=True)))
add("mha_seq_first", fn_case([nn.MultiheadAttention], lambda s, t: s.m(t, t, t, need_weights=True)[0], S, True,
                             m=lambda: nn.MultiheadAttention(8, 2)))
add("encoder_layer", fn_case([nn.TransformerEncoderLayer], lambda s, t: s.m(t), S, True, m=lambda: _encoder_layer(False)))
add("encoder_layer_pre_norm", fn_case([nn.TransformerEncoderLayer], lambda s, t: s.m(t), S, True, m=lambda: _encoder_layer(True)))
add("encoder", fn_case([nn.TransformerEncoder], lambda s, t: s.m(t), S, True,
                       m=lambda: nn.TransformerEncoder(_encoder_layer(False), 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)))

# ---------------------------------------------------------------- linear
add("Linear", module_case(nn.Linear, lambda: nn.Linear(6, 3), V))
add("F.linear", fn_case([F.linear], lambda s, t: F.linear(t, s.w, s.w[0]), V))
for n, shape in ((1, L1), (2, I), (3, V3)):
    c = shape[1]
    conv, tconv = getattr(nn, f"Conv{n}d"), getattr(nn, f"ConvTranspose{n}d")
    add(conv.__name__, module_case(conv, lambda conv=conv, c=c: conv(c, 3, 3, padding=1), shape))
    add(tconv.__name__, module_case(tconv, lambda tconv=tconv, c=c: tconv(c, 3, 3, stride=2), shape))
    f, ft = getattr(F, f"conv{n}d"), getattr(F, f"conv_transpose{n}d")
    add(f"F.conv{n}d", fn_case([f, ft], lambda s, t, f=f, ft=ft: (
        f(t, s.k.weight, s.k.bias, padding=1).sum(1) + ft(t, s.k.weight.transpose(0, 1), s.k.bias, padding=1).sum(1)),
        shape, k=lambda conv=conv, c=c: conv(c, c, 3)))
add("matmul", fn_case([operator.matmul, torch.matmul, "matmul"],
                      lambda s, t: (t @ s.w) @ (s.w @ t.T) + torch.matmul(t, t.T) + t.matmul(s.w[0]).unsqueeze(-1), V))
add("mm", fn_case([torch.mm, "mm", torch.bmm, "bmm"],
                  lambda s, t: torch.mm(t, s.w) + t.mm(s.w.T) + torch.bmm(t.unsqueeze(0), s.w.unsqueeze(0))[0]
                  + t.unsqueeze(0).bmm(t.T.unsqueeze(0))[0] @ t, V))
add("einsum", fn_case([torch.einsum], lambda s, t: torch.einsum("bij,bkj->bik", t, t) @ t
                      + torch.einsum("bij,jk", t, s.w) + torch.einsum("...j,jk->...k", [t, s.w]), S))

# ---------------------------------------------------------------- normalisation
add("BatchNorm1d", module_case(nn.BatchNorm1d, lambda: nn.BatchNorm1d(4), L1, True))
add("BatchNorm2d", module_case(nn.BatchNorm2d, lambda: nn.BatchNorm2d(4), I, True))
add("BatchNorm3d", module_case(nn.BatchNorm3d, lambda: nn.BatchNorm3d(2), V3, True))
add("LayerNorm", module_case(nn.LayerNorm, lambda: nn.LayerNorm((5, 8)), S))
add("F.layer_norm", fn_case([F.layer_norm], lambda s, t: F.layer_norm(t, (8,), s.w[0], s.w[1]), S))
add("RMSNorm", module_case(nn.RMSNorm, lambda: nn.RMSNorm(8), S))
add("F.rms_norm", fn_case([F.rms_norm], lambda s, t: F.rms_norm(t, (8,), s.w[0], 1e-6), S))
add("GroupNorm", module_case(nn.GroupNorm, lambda: nn.GroupNorm(2, 4), I))
add("F.group_norm", fn_case([F.group_norm], lambda s, t: F.group_norm(t, 2, s.w[0, :4], s.w[1, :4]), I))
add("InstanceNorm1d", module_case(nn.InstanceNorm1d, lambda: nn.InstanceNorm1d(4, affine=True, track_running_stats=True), L1, True))
add("InstanceNorm2d", module_case(nn.InstanceNorm2d, lambda: nn.InstanceNorm2d(4, affine=True), I, True))
add("InstanceNorm3d", module_case(nn.InstanceNorm3d, lambda: nn.InstanceNorm3d(2, track_running_stats=True), V3, True))
add("F.instance_norm", fn_case([F.instance_norm], lambda s, t: F.instance_norm(t, weight=s.w[0, :4], bias=s.w[1, :4]), I))

# ---------------------------------------------------------------- pooling
for n, shape in ((1, L1), (2, I), (3, V3)):
    for name, make in ((f"MaxPool{n}d", lambda n=n: getattr(nn, f"MaxPool{n}d")(3, 2, 1)),
                       (f"AdaptiveMaxPool{n}d", lambda n=n: getattr(nn, f"AdaptiveMaxPool{n}d")(2)),
                       (f"AvgPool{n}d", lambda n=n: getattr(nn, f"AvgPool{n}d")(2)),
                       (f"AdaptiveAvgPool{n}d", lambda n=n: getattr(nn, f"AdaptiveAvgPool{n}d")(3))):
        add(name, module_case(getattr(nn, name), make, shape))
    fs = [getattr(F, f"{p}{n}d") for p in ("max_pool", "adaptive_max_pool", "avg_pool", "adaptive_avg_pool")]
    fs += [getattr(F, f"{p}{n}d_with_indices") for p in ("max_pool", "adaptive_max_pool")]
    add(f"F.pool{n}d", fn_case(fs, lambda s, t, fs=fs: (
        fs[0](t, 2).flatten(2).sum(-1) + fs[1](t, 2, return_indices=True)[0].flatten(2).sum(-1)
        + fs[0](t, 2, return_indices=True)[0].flatten(2).sum(-1) + fs[1](t, 2).flatten(2).sum(-1)
        + fs[2](t, 2).flatten(2).sum(-1) + fs[3](t, 1).flatten(2).sum(-1)), shape))

# ---------------------------------------------------------------- recurrent, regularisation
add("GRU", fn_case([nn.GRU], lambda s, t: s.m(t)[0] + s.m(t)[1][-1].unsqueeze(1), S, True,
                   m=lambda: nn.GRU(8, 8, batch_first=True)))
add("GRU_2_layers_bidirectional", fn_case([nn.GRU], lambda s, t: s.m(t)[0].sum(-1), S,
                                          m=lambda: nn.GRU(8, 4, num_layers=2, bidirectional=True)))
add("Dropout", module_case(nn.Dropout, lambda: nn.Dropout(0.3), V, True))
for n, shape in ((1, L1), (2, I), (3, V3)):
    add(f"Dropout{n}d", module_case(getattr(nn, f"Dropout{n}d"), lambda n=n: getattr(nn, f"Dropout{n}d")(0.3), shape, True))
add("F.dropout", fn_case([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d], lambda s, t: (
    F.dropout(t, 0.3, s.training) + F.dropout1d(t, 0.3, s.training) + F.dropout2d(t.unsqueeze(0), 0.3, s.training)[0]
    + F.dropout3d(t.unsqueeze(0), 0.3, s.training)[0]), L1, True))
add("StochasticDepth", module_case(torchvision.ops.StochasticDepth, lambda: torchvision.ops.StochasticDepth(0.5, "row"), I, True))
add("stochastic_depth", fn_case([torchvision.ops.stochastic_depth],
                                lambda s, t: torchvision.ops.stochastic_depth(t, 0.5, "batch", s.training), I, True))

# ---------------------------------------------------------------- shape and bookkeeping
add("Identity", module_case(nn.Identity, nn.Identity, V))
add("Flatten", fn_case([nn.Flatten, nn.Unflatten], lambda s, t: s.u(s.f(t)), I, f=nn.Flatten, u=lambda: nn.Unflatten(1, (4, 64))))
add("flatten", fn_case([torch.flatten, "flatten"], lambda s, t: torch.flatten(t, 1) + t.flatten(-3), I))
add("view", fn_case(["view", "reshape", torch.reshape, "size", "dim", "numel", getattr],
                    lambda s, t: t.view(t.size(0), -1) + t.reshape(t.shape[0], t.numel() // t.size(0))
                    + torch.reshape(t, (t.size()[0], -1)) * t.dim(), I))
add("getitem", fn_case([operator.getitem], lambda s, t: t[:, 1:3] + t[..., None, 0, :2].squeeze(-2), V))
add("copies", fn_case(["contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "cpu", "to", "type_as"],
                      lambda s, t: t.contiguous() + t.clone() + t.detach() + t.float() + t.double().to(t.dtype)
                      + t.half().type_as(t) + t.bfloat16().type_as(t) + t.cpu() + t.to(torch.float64).type_as(t), V))
add("permute", fn_case(["permute", torch.permute, "transpose", torch.transpose],
                       lambda s, t: t.permute(0, 2, 1).transpose(1, 2) + torch.transpose(torch.permute(t, (2, 0, 1)), 0, 1).transpose(1, 2), S))
add("squeeze", fn_case(["unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze],
                       lambda s, t: torch.squeeze(t.unsqueeze(1)) + torch.unsqueeze(t, 0).squeeze(0) + t.unsqueeze(2).squeeze(), V))
add("reduce", fn_case(["mean", "sum", torch.mean, torch.sum],
                      lambda s, t: t.mean(-1) + t.sum((1, 2)).unsqueeze(-1) + torch.mean(t, 2) + torch.sum(t, -1) + t.sum(), S))
add("chunk", fn_case(["chunk", torch.chunk, "split", torch.split],
                     lambda s, t: t.chunk(2, -1)[0] + torch.chunk(t, 2, 1)[1] + t.split(3, -1)[1] + torch.split(t, [3, 3], 1)[0], V))
add("cat", fn_case([torch.cat, torch.concat, torch.stack],
                   lambda s, t: torch.cat([s.w[:1], t], 0)[1:] + torch.concat([t, t], -1)[:, :6]
                   + torch.stack([t, s.w[:4]], 1).sum(1) + torch.cat([s.w[:4, :1], t], 1)[:, 1:], V))
add("expand", fn_case(["expand", "expand_as", "repeat", torch.repeat_interleave, "repeat_interleave", torch.flip, "flip"],
                      lambda s, t: t[:, :1].expand(-1, 6) + t[:1].expand_as(t) + t.repeat(1, 2)[:, :6] + t[None].repeat(2, 1, 1).sum(0)
                      + torch.repeat_interleave(t, 2, dim=1)[:, ::2] + t.repeat_interleave(1, 0) + torch.flip(t, (1,)) + t.flip(0), V))
add("pad", fn_case([F.pad], lambda s, t: F.pad(t, (1, 1)) + F.pad(t, (1, 1), value=1.5) + F.pad(t, (1, 1, 1, 1), "reflect")[:, :, 1:-1], I))
add("interpolate", fn_case([F.interpolate, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d], lambda s, t: (
    F.interpolate(t, scale_factor=2, mode="bilinear") + F.interpolate(t, size=16, mode="nearest")
    + s.u(t) + s.n(t) + s.b(t)), I, u=lambda: nn.Upsample(scale_factor=2, mode="bicubic"),
    n=lambda: nn.UpsamplingNearest2d(scale_factor=2), b=lambda: nn.UpsamplingBilinear2d(scale_factor=2)))
add("pixel_shuffle", fn_case([nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, torch.pixel_shuffle, torch.pixel_unshuffle,
                              torch.channel_shuffle], lambda s, t: (
    s.ps(s.pu(t)) + torch.pixel_shuffle(torch.pixel_unshuffle(t, 2), 2) + s.cs(t) + torch.channel_shuffle(t, 2)), I,
    ps=lambda: nn.PixelShuffle(2), pu=lambda: nn.PixelUnshuffle(2), cs=lambda: nn.ChannelShuffle(2)))

add("created_like", fn_case([torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
                             "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"],
                            lambda s, t: t + torch.zeros_like(t) + torch.ones_like(t) * 2 + torch.full_like(t, 0.5)
                            + torch.empty_like(t).zero_() + t.new_zeros(t.shape) + t.new_ones(6) + t.new_full((6,), 3.0)
                            + t.new_empty(6).fill_(1.0) + t.new_tensor([1.0] * 6), V))
add("where", fn_case([torch.where, "masked_fill"], lambda s, t: (
    torch.where(s.w[:4] > 0, t, t * 2) + torch.where(s.w[:4] > 0, t, 1.5) + torch.where(s.w[0] > 0, -1.0, t)
    + t.masked_fill(s.w[:4] > 0, 0.25) + (t.masked_fill(s.w[:4] > 0.5, float("-inf")).softmax(-1) * t)), V))
add("clamp", fn_case([torch.clamp, torch.clip, "clamp", "clip"], lambda s, t: (
    torch.clamp(t, -0.5, 0.5) + torch.clip(t, min=0.0) + t.clamp(max=0.2) + t.clip(-1, 1)), V))

add("clamp_bounds", fn_case([torch.clamp_min, torch.clamp_max, "clamp_min", "clamp_max"], lambda s, t: (
    torch.clamp_min(t, -0.2) + torch.clamp_max(t, 0.3) + t.clamp_min(0.1) + t.clamp_max(-0.1)), V))
add("addcmul", fn_case([torch.addcmul, "addcmul", torch.addcdiv, "addcdiv"], lambda s, t: (
    torch.addcmul(t, t, s.w[0], value=0.5) + t.addcmul(s.w[1], t) + torch.addcdiv(t, t, s.w[2].abs() + 1)
    + t.addcdiv(t, t.abs() + 1, value=2.0)), V))
add("addmm", fn_case([torch.addmm, "addmm", torch.baddbmm, "baddbmm"], lambda s, t: (
    torch.addmm(s.pre.bias, t, s.w) + s.pre.bias.addmm(t, s.w, beta=0.5, alpha=2.0)
    + torch.baddbmm(s.pre.bias, t.unsqueeze(0), s.w.unsqueeze(0))[0]
    + s.pre.bias.expand(1, 4, 6).baddbmm(t.unsqueeze(0), s.w.unsqueeze(0))[0]), V))
add("read_from_total", fn_case([
    operator.eq, operator.ne, operator.gt, operator.ge, operator.lt, operator.le, torch.eq, torch.ne, torch.gt,
    torch.ge, torch.lt, torch.le, torch.isfinite, torch.isnan, torch.isinf, torch.argmax, torch.argmin, torch.any,
    torch.all, torch.sign, torch.count_nonzero, torch.isclose, torch.logsumexp, torch.norm, torch.linalg.vector_norm,
    torch.linalg.norm, "eq", "ne", "gt", "ge", "lt", "le", "isfinite", "isnan", "isinf", "argmax", "argmin", "any",
    "all", "sign", "count_nonzero", "isclose", "logsumexp", "norm", "bool", "long", "int", "__eq__", "__ne__",
    "__gt__", "__ge__", "__lt__", "__le__", "__and__", "__or__", "__invert__"], lambda s, t: t * (
    (t == 0) + (t != 0) + (t > 0) + (t >= 0) + (t < 0) + (t <= 0) + torch.eq(t, 0) + torch.ne(t, 1) + torch.gt(t, 0)
    + torch.ge(t, 0) + torch.lt(t, 0) + torch.le(t, 0) + torch.isfinite(t) + torch.isnan(t) + torch.isinf(t)
    + torch.argmax(t, 1, keepdim=True) + torch.argmin(t, 1, keepdim=True) + torch.any(t > 0) + torch.all(t > -9)
    + torch.sign(t) + torch.count_nonzero(t, 1).unsqueeze(1) + torch.isclose(t, t) + torch.logsumexp(t, 1, True)
    + torch.norm(t, dim=1, keepdim=True) + torch.linalg.vector_norm(t, dim=1, keepdim=True)
    + torch.linalg.norm(t, dim=1, keepdim=True) + t.eq(0) + t.ne(0) + t.gt(0) + t.ge(0) + t.lt(0) + t.le(0)
    + t.isfinite() + t.isnan() + t.isinf() + t.argmax(1, keepdim=True) + t.argmin(1, keepdim=True) + t.any()
    + t.all() + t.sign() + t.count_nonzero() + t.isclose(t) + t.logsumexp(1, True) + t.norm(dim=1, keepdim=True)
    + (t > 0).bool() + (t > 0).long() + (t > 0).int() + t.__eq__(0) + t.__ne__(0) + t.__gt__(0) + t.__ge__(0)
    + t.__lt__(0) + t.__le__(0) + ((t > 0) & (t < 1)) + ((t > 0) | (t < -1)) + ~(t > 0)), V))
add("extremum", fn_case(["max", "min", torch.max, torch.min, "amax", "amin", torch.amax, torch.amin], lambda s, t: (
    t.max(1).values + t.min(1)[0] + torch.max(t, 1, keepdim=True).values.squeeze(1) + torch.min(t, 0).values.sum()
    + t.amax(1) + t.amin(-1) + torch.amax(t, 1) + torch.amin(t, 1)), V))
add("sort", fn_case(["sort", torch.sort, "topk", torch.topk], lambda s, t: (
    t.sort(1).values + torch.sort(t, dim=1, descending=True)[0] + t.topk(6, 1).values + torch.topk(t, 6, dim=-1)[0]), V))
add("batch_norm_function", fn_case([F.batch_norm], lambda s, t: F.batch_norm(
    t, s.bn.running_mean, s.bn.running_var, s.bn.weight, s.bn.bias, s.training, 0.1, 1e-5), V, train=True,
    bn=lambda: nn.BatchNorm1d(6)))
add("normalize", fn_case([F.normalize], lambda s, t: F.normalize(t, dim=1) + F.normalize(t, p=1.0, dim=0), V))
add("t", fn_case(["t", torch.t], lambda s, t: t.t().t() + torch.t(t).T + t.sum(0).t(), V))
add("aliases", fn_case([torch.multiply, "multiply", torch.special.expit], lambda s, t: (
    torch.multiply(t, s.w[0]) + t.multiply(torch.special.expit(t))), V))
add("unbind", fn_case(["unbind", torch.unbind], lambda s, t: sum(t.unbind(1)) + sum(torch.unbind(t, 0)).sum(), V))
add("roll", fn_case(["roll", torch.roll], lambda s, t: t.roll(2, 1) + torch.roll(t, (1, 3), (0, 1)) + t.roll(5), V))
add("narrow", fn_case(["narrow", torch.narrow], lambda s, t: t.narrow(1, 1, 3).sum(1, keepdim=True)
                      + torch.narrow(t, 0, 0, 2).sum(0), V))
add("movedim", fn_case(["movedim", "moveaxis", torch.movedim, torch.moveaxis], lambda s, t: (
    t.movedim(0, 1).T + torch.movedim(t, (0, 1), (1, 0)).T + t.moveaxis(1, 0).T + torch.moveaxis(t, 0, 1).T), V))
add("triangle", fn_case(["tril", "triu", torch.tril, torch.triu], lambda s, t: (
    t.tril() + t.triu(1) + torch.tril(t, -1) + torch.triu(t)), V))
add("cumsum", fn_case(["cumsum", torch.cumsum], lambda s, t: t.cumsum(1) + torch.cumsum(t, dim=0), V))
add("unfold", fn_case(["unfold", F.unfold, F.fold], lambda s, t: (
    t.unfold(-1, 2, 2).sum(-1).repeat_interleave(2, -1) + F.fold(F.unfold(t, 3, padding=1), (8, 8), 3, padding=1)), I))
add("gather", fn_case(["gather", torch.gather, "take_along_dim", torch.take_along_dim, "index_select",
                       torch.index_select], lambda s, t: (
    t.gather(1, torch.tensor([[5, 4, 3, 2, 1, 0]] * 4)) + torch.gather(t, 0, t.argmax(0, keepdim=True)).expand(4, 6)
    + t.take_along_dim(torch.tensor([[1, 0, 2, 3, 5, 4]]), 1) + torch.take_along_dim(t, t.argmin(1, keepdim=True), 1)
    + torch.take_along_dim(t, torch.arange(24).flip(0)).view(4, 6) + t.index_select(1, torch.tensor([5, 4, 3, 2, 1, 0]))
    + torch.index_select(t, 0, torch.tensor([3, 2, 1, 0]))), V))
add("grid_sample", fn_case([F.grid_sample], lambda s, t: F.grid_sample(
    t, torch.rand(2, 5, 5, 2) * 2 - 1, align_corners=False)
    + F.grid_sample(t, torch.tanh(t[:, :2].permute(0, 2, 3, 1))[:, :5, :5], align_corners=True), I))

COVERED = {key for case in CASES.values() for key in case.keys}


def test_every_registered_rule_has_a_case() -> None:
    missing = [key for key in registered_keys() if key not in COVERED]
    assert not missing, f"registered rules without a case in CASES: {missing}"


def run(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    rel, irrel = decompose(model, x, mask)
    torch.manual_seed(3)
    return rel + irrel, model(x)


def setup(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case.shape, generator=gen)
    mask = (torch.rand(1, *case.shape[1:], generator=gen) < 0.5).float()
    return model, x, mask


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", CASES)
def test_rule_is_complete_in_float32(name: str) -> None:
    model, x, mask = setup(name)
    total, logits = run(model.eval(), x, mask)
    assert relative(total, logits) < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_rule_gives_rel_zero_for_an_empty_mask_and_irrel_zero_for_a_full_one(name: str) -> None:
    """Nothing reaches rel from features outside the mask, constants (biases, f(0) of a
    nonlinearity, a class token) included; and nothing reaches irrel when every feature is in it."""
    model, x, mask = setup(name)
    model.eval()
    with torch.no_grad():
        scale = model(x).abs().max()
        rel, _ = decompose(model, x, torch.zeros_like(mask))
        _, irrel = decompose(model, x, torch.ones_like(mask))
    assert rel.abs().max() <= 1e-5 * scale and irrel.abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_rule_is_finite_and_within_precision_in_16_bit(name: str, dtype: torch.dtype) -> None:
    """Finite, and no further from the float32 result than a few times the plain 16-bit forward's
    own error; where the plain 16-bit forward raises (an op without a CPU kernel), decompose must too."""
    model, x, mask = setup(name)
    model.eval()
    with torch.no_grad():
        reference = model(x)
        low, xl = model.to(dtype), x.to(dtype)
        try:
            plain = low(xl)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                decompose(low, xl, mask)
            return
        rel, irrel = decompose(low, xl, mask)
    total = rel.float() + irrel.float()
    assert torch.isfinite(total).all()
    budget = 4 * relative(plain, reference) + 8 * torch.finfo(dtype).eps
    assert relative(total, reference) <= budget


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.train])
def test_rule_is_complete_in_train_mode(name: str) -> None:
    model, x, mask = setup(name)
    total, logits = run(model.train(), x, mask)
    assert relative(total, logits) < 1e-5


def _functional_and_grads(model: nn.Module, rel: torch.Tensor, irrel: torch.Tensor, weights: tuple) -> list:
    """A fixed linear functional of (rel, irrel), and its gradients with respect to the parameters."""
    value = (weights[0] * rel).sum() + (weights[1] * irrel).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = (torch.autograd.grad(value, params, allow_unused=True, retain_graph=True) if value.requires_grad
             else [None] * len(params))
    return [value, *grads]


@pytest.mark.parametrize("name, train", [(n, False) for n in CASES] + [(n, True) for n, c in CASES.items() if c.train])
def test_many_masks_match_one_mask_at_a_time(name: str, train: bool) -> None:
    """decompose_many carries k relevant streams next to one total: each stream must give what
    decompose gives for its mask alone, including an empty and a full mask, which take the bias
    split's tie-break; and the parameter gradients of a functional summed over the streams
    must be the sum of the single-mask ones."""
    model, x, mask = setup(name)
    model.train(train)
    masks = torch.stack((mask, torch.zeros_like(mask), torch.ones_like(mask), 1 - mask))
    torch.manual_seed(3)
    rel, irrel = decompose_many(model, x, masks)
    assert rel.shape == irrel.shape == (len(masks), *model(x).shape)
    gen = torch.Generator().manual_seed(4)
    weights = (torch.randn(rel.shape, generator=gen), torch.randn(rel.shape, generator=gen))
    together = _functional_and_grads(model, rel, irrel, weights)
    alone = None
    for j, m in enumerate(masks):
        torch.manual_seed(3)
        one_rel, one_irrel = decompose(model, x, m)
        torch.testing.assert_close(rel[j], one_rel, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(irrel[j], one_irrel, rtol=1e-5, atol=1e-6)
        this = _functional_and_grads(model, one_rel, one_irrel, (weights[0][j], weights[1][j]))
        alone = this if alone is None else [b if a is None else a if b is None else a + b for a, b in zip(alone, this)]
    # "copies" casts to float16 and bfloat16 and back: the gradient summed over the streams is
    # rounded to 16 bits once, the single-mask ones each on their own (bfloat16 keeps 8 bits of
    # mantissa: ~0.4 % a rounding). Otherwise the two sums add the same float32 terms in another
    # order, which moves single elements by ~1e-4 relative on some CPUs.
    rtol, atol = (5e-2, 1e-2) if name == "copies" else (5e-4, 1e-4)
    for a, b in zip(together, alone):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def test_a_user_rule_without_the_stream_mark_runs_once_per_stream() -> None:
    """An unmarked rule only ever sees one relevant part (rel has the value's shape)."""
    class Scale(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return 2 * t

    seen = []

    @register_rule(Scale)
    def scale(m: Scale, x: Decomposed) -> Decomposed:
        seen.append(x.rel.shape)
        return Decomposed.of(2 * x.rel, 2 * x.irrel)

    try:
        model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 2))
        x, masks = torch.randn(5, 3), torch.eye(3)
        rel, irrel = decompose_many(model, x, masks)
        assert seen == [torch.Size([5, 4])] * 3
        for j in range(3):
            one_rel, one_irrel = decompose(model, x, masks[j])
            torch.testing.assert_close(rel[j], one_rel)
            torch.testing.assert_close(irrel[j], one_irrel)
    finally:
        unregister_rule(Scale)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared masks", "per-sample masks"])
def test_many_masks_in_chunks_of_samples_match_one_pass(per_sample: bool) -> None:
    """On CPU decompose_many cuts a large batch into chunks of samples (max_rows); the result
    and the parameter gradients must not depend on the cut."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    x = torch.randn(7, 2, 8, 8)
    masks = (torch.rand(3, 7 if per_sample else 1, 1, 8, 8) < 0.4).float()
    one_pass = decompose_many(model, x, masks, max_rows=None)
    chunked = decompose_many(model, x, masks, max_rows=8)  # 4 streams: 2 samples a chunk
    weights = torch.randn(one_pass[0].shape)
    grads = [torch.autograd.grad((weights * (rel - irrel)).sum(), list(model.parameters()))
             for rel, irrel in (one_pass, chunked)]
    for a, b in zip(one_pass, chunked):
        torch.testing.assert_close(a, b)
    for a, b in zip(*grads):  # the chunks' gradients are summed in another order than one pass's
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_many_masks_refuse_masks_without_a_mask_axis() -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="leading axis"):
        decompose_many(model, torch.randn(3, 4), torch.ones(1, 1, 1, 4))
