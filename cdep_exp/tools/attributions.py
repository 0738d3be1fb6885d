"""Per-feature attribution maps of a trained model, one number per displayed feature: a pixel
of an image (B, H, W), a column of a table (B, d), a token of a text (B, T).

* `gradient_map`: |∂(Σ_k log p_k)/∂x|, what RRR penalises (Ross et al. 2017, Eq. 1), summed
  over an image's channels or a token's embedding coordinates (the gradient with respect to
  the embedded tokens). Unsigned.
* `cd_map`: the contextual decomposition of each feature group alone (Murdoch et al. 2018;
  Singh et al. 2019): the relevant part of the logits when only that group is relevant,
  centred over classes, read at class y: how much the group alone speaks for y. Groups are
  square patches of an image (`patch_groups`), single columns of a table, single tokens of a
  text (the classic CD picture of a sentence). Signed.
* `eg_map`: expected gradients of class y (`cdep_exp.penalties.eg.expected_gradients`, what
  the EG prior penalises in absolute value), references from the training data, summed over
  channels or embedding coordinates. Signed.

LIME (`cdep_exp.tools.lime_maps`) gives the same shapes.
"""

import torch
from torch import Tensor, nn

from cdep_exp.cd import decompose_many
from cdep_exp.penalties.base import centred, differentiable_input
from cdep_exp.penalties.eg import expected_gradients
from cdep_exp.scoring.explanation import input_gradients

KINDS = ("image", "table", "text")


def input_kind(x: Tensor) -> str:
    """"text" for token ids (B, T), "image" for (B, C, H, W), "table" for (B, d); ValueError else."""
    if not torch.is_floating_point(x):
        return "text"
    if x.ndim == 4:
        return "image"
    if x.ndim == 2:
        return "table"
    raise ValueError(f"cannot explain inputs of shape {tuple(x.shape)}: expected token ids (B, T), "
                     f"images (B, C, H, W) or table rows (B, d)")


def token_input_gradients(model: nn.Module, tokens: Tensor) -> Tensor:
    """∂(Σ_k log p_k)/∂e for token ids (B, T) of a `TokenModel`, e the embedded tokens (B, T, D):
    the gradient RRR penalises on text, through the same embedding step as the penalty
    (`differentiable_input`). TypeError for a model without `embed`/`forward_embedded`."""
    with torch.enable_grad():
        embedded, forward, _ = differentiable_input(model, tokens, torch.zeros(tokens.shape), "input gradients")
        log_probs = torch.log_softmax(forward(embedded), dim=1)
        (grad,) = torch.autograd.grad(log_probs.sum(), embedded)
    return grad


def gradient_map(model: nn.Module, x: Tensor) -> Tensor:
    """|input gradient| per displayed feature (module docstring): (B, H, W), (B, d) or (B, T)."""
    kind = input_kind(x)
    if kind == "text":
        return token_input_gradients(model, x).abs().sum(-1)
    grad = input_gradients(model, x).abs()
    return grad.sum(1) if kind == "image" else grad


def default_patch(height: int, width: int) -> int:
    """A patch side giving about 7 patches along the shorter side: 4 pixels on 28 × 28, 1 on 5 × 5."""
    return max(1, round(min(height, width) / 7))


def patch_groups(height: int, width: int, patch: int) -> Tensor:
    """One 0/1 mask (1, 1, H, W) per patch × patch square of a grid over the image, stacked:
    (G, 1, 1, H, W), row by row; the last row and column of patches may be narrower."""
    masks = []
    for top in range(0, height, patch):
        for left in range(0, width, patch):
            mask = torch.zeros(1, 1, height, width)
            mask[..., top:top + patch, left:left + patch] = 1
            masks.append(mask)
    return torch.stack(masks)


def feature_groups(x: Tensor, patch: int | None = None) -> Tensor:
    """The groups `cd_map` decomposes one at a time: image patches (`patch_groups`, side
    `patch` or `default_patch`), single columns (d, 1, d) or single token positions (T, 1, T)."""
    kind = input_kind(x)
    if kind == "image":
        height, width = x.shape[-2:]
        return patch_groups(height, width, patch or default_patch(height, width)).to(x.device)
    size = x.shape[-1]
    return torch.eye(size, device=x.device).unsqueeze(1)


@torch.no_grad()
def cd_map(model: nn.Module, x: Tensor, y: Tensor, groups: Tensor | None = None) -> Tensor:
    """CD of each group alone (module docstring), spread over the displayed features: each
    feature gets its group's score (a token or column is its own group). groups: as
    `feature_groups` returns (its default). Raises what `cdep_exp.cd.decompose` raises for a
    model it cannot decompose."""
    groups = feature_groups(x) if groups is None else groups
    rel, _ = decompose_many(model, x, groups.to(x.dtype) if torch.is_floating_point(x) else groups)  # (G, B, C)
    score = centred(rel.flatten(0, 1)).view(rel.shape).gather(2, y.view(1, -1, 1).expand(len(groups), -1, 1))[..., 0]
    flat = groups.flatten(2).amax(1) if input_kind(x) == "image" else groups[:, 0]  # (G, features)
    spread = score.transpose(0, 1) @ flat.to(score.dtype)  # (B, features)
    return spread.view(len(x), *x.shape[-2:]) if input_kind(x) == "image" else spread


def eg_map(model: nn.Module, x: Tensor, y: Tensor, references: Tensor, draws: int = 100) -> Tensor:
    """Expected gradients of class y per displayed feature (module docstring); `references`:
    training inputs (R, ...) of x's kind (token ids padded to a common length)."""
    attribution = expected_gradients(model, x, y, references, draws)
    return attribution.sum(1) if input_kind(x) == "image" else attribution

