"""A plain contextual decomposition, layer by layer and one part at a time (tests only).

Written straight from REFERENCE §1.2–1.4 to check the engine against: the bias is layer(0), each
part goes through the layer on its own, and max-pooling keeps each part at the arg-max of the
sum through a MaxUnpool mask, as the original code did. The one addition to the original bias
split is the engine's documented tie-break where both parts are exactly zero (the original
dropped the bias there): the bias then goes by the sample's overall |rel| : |irrel| share at
that layer, or the batch's where the sample's layer input is all zero.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdep_exp.models import MLP, MNISTCNN

EPS = 1e-20


def linear(layer: nn.Module, rel: Tensor, irrel: Tensor) -> tuple[Tensor, Tensor]:
    bias = layer(torch.zeros_like(rel[:1]))
    rel_lin = layer(rel) - bias
    irrel_lin = layer(irrel) - bias
    rel_mag, irrel_mag = rel_lin.abs(), irrel_lin.abs()
    total = rel_mag + irrel_mag
    rel_share = rel_mag / (total + EPS)
    irrel_share = irrel_mag / (total + EPS)

    rel_sum = rel_mag.flatten(1).sum(1)
    irrel_sum = irrel_mag.flatten(1).sum(1)
    batch_share = rel_sum.sum() / (rel_sum.sum() + irrel_sum.sum() + EPS)
    overall = torch.where(rel_sum + irrel_sum == 0, batch_share, rel_sum / (rel_sum + irrel_sum + EPS))
    overall = overall.view(-1, *([1] * (rel.ndim - 1)))
    dead = total == 0
    rel_share = torch.where(dead, overall, rel_share)
    irrel_share = torch.where(dead, 1 - overall, irrel_share)
    return rel_lin + bias * rel_share, irrel_lin + bias * irrel_share


def relu(rel: Tensor, irrel: Tensor) -> tuple[Tensor, Tensor]:
    rel_out = F.relu(rel)
    return rel_out, F.relu(rel + irrel) - rel_out


def max_pool(rel: Tensor, irrel: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    total = rel + irrel
    pooled, idx = F.max_pool2d(total, k, return_indices=True)
    at_max = F.max_unpool2d(torch.ones_like(pooled), idx, k, output_size=total.shape[-2:])
    return F.avg_pool2d(at_max * rel, k) * k * k, F.avg_pool2d(at_max * irrel, k) * k * k


def cd_mnist_cnn(model: MNISTCNN, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    rel, irrel = mask * x, (1 - mask) * x
    for conv in (model.conv1, model.conv2):
        rel, irrel = linear(conv, rel, irrel)
        if model.pool_before_relu:
            rel, irrel = relu(*max_pool(rel, irrel))
        else:
            rel, irrel = max_pool(*relu(rel, irrel))
    rel, irrel = rel.flatten(1), irrel.flatten(1)
    rel, irrel = relu(*linear(model.fc1, rel, irrel))
    return linear(model.fc2, rel, irrel)


def cd_mlp(model: MLP, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    assert not model.training, "the reference covers eval mode only"
    rel, irrel = mask * x, (1 - mask) * x
    for layer in model:
        if isinstance(layer, nn.Linear):
            rel, irrel = linear(layer, rel, irrel)
        elif isinstance(layer, nn.ReLU):
            rel, irrel = relu(rel, irrel)
        else:
            assert isinstance(layer, nn.Dropout)
    return rel, irrel
