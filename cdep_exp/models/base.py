"""What a model of token ids offers gradient penalties: its embedding as a separate step."""
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenModel(Protocol):
    """A model of token ids (B, T) whose forward is `forward_embedded(embed(tokens), tokens)`.

    Input-gradient penalties (RRR, Expected Gradients) differentiate with respect to the
    embedded tokens, since token ids have no gradient.
    """

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) long → embedded tokens (B, T, D)."""
        ...

    def forward_embedded(self, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Embedded tokens (B, T, D) → logits (B, C). `tokens` (B, T) gives what the embedding
        does not: lengths and padding (which positions are real)."""
        ...


def require_token_model(model: object, method: str) -> TokenModel:
    """`model` if it implements `TokenModel`, else a TypeError naming what is missing."""
    if not isinstance(model, TokenModel):
        raise TypeError(
            f"{method} on token ids needs a model with embed(tokens) and "
            f"forward_embedded(embedded, tokens) (cdep_exp.models.base.TokenModel); "
            f"{type(model).__name__} has not."
        )
    return model
