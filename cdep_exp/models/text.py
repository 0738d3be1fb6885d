"""Text classifiers for token ids (B, T), right-padded with `pad_index`, to logits (B, num_classes):
a transformer encoder and a GRU, with the LSTM classifier's embedding options.

Each splits into an embedding and a `body` that maps the embedded sequence to logits; the
body is what the generic CD engine traces, and cdep_exp/cd/text.py splits the embeddings by
the token mask in front of it (as the LSTM's rule does).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _embedding(vocab_size: int, embed_dim: int, pad_index: int, embeddings: Tensor | None,
               freeze: bool) -> nn.Embedding:
    emb = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_index)
    if embeddings is not None:
        if embeddings.shape != (vocab_size, embed_dim):
            raise ValueError(f"embeddings has shape {tuple(embeddings.shape)}, expected {(vocab_size, embed_dim)}")
        with torch.no_grad():
            emb.weight.copy_(embeddings)
    emb.weight.requires_grad_(not freeze)
    return emb


class TransformerBody(nn.Module):
    """Embedded tokens (B, T, D) and the real-token mask (B, T) to logits: encoder, then the
    mean over real tokens, then a linear head."""

    def __init__(self, encoder: nn.TransformerEncoder, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, emb: Tensor, keep: Tensor) -> Tensor:
        h = self.encoder(emb, src_key_padding_mask=~keep)
        weights = keep.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp_min(1)
        return self.head(pooled)


class TransformerClassifier(nn.Module):
    """Token + learned position embeddings → nn.TransformerEncoder (post-norm, batch_first) →
    mean over real tokens → linear. Attention ignores padding, so padding never changes the
    output; a sequence of padding only attends to (and is read at) position 0.
    `attention_dropout` is the attention probabilities' dropout (`dropout` the rest's)."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff_dim: int = 128,
        num_classes: int = 2,
        pad_index: int = 0,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        max_len: int = 512,
        embeddings: Tensor | None = None,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.pad_index = pad_index
        self.embedding = _embedding(vocab_size, embed_dim, pad_index, embeddings, freeze_embeddings)
        self.position = nn.Parameter(torch.randn(max_len, embed_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(embed_dim, heads, ff_dim, dropout, batch_first=True)
        layer.self_attn.dropout = attention_dropout
        encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.body = TransformerBody(encoder, nn.Linear(embed_dim, num_classes))

    def keep_mask(self, tokens: Tensor) -> Tensor:
        """Real tokens (B, T) bool; position 0 counts as real in an all-padding sequence."""
        keep = tokens != self.pad_index
        keep[:, 0] |= ~keep.any(1)
        return keep

    def embed(self, tokens: Tensor) -> Tensor:
        """(B, T) ids to (B, T, D) token + position embeddings."""
        return self.embedding(tokens) + self.position[: tokens.shape[1]]

    def forward(self, tokens: Tensor) -> Tensor:
        return self.body(self.embed(tokens), self.keep_mask(tokens))


class GRUBody(nn.Module):
    """Embedded tokens (B, T, D) and the token ids to logits: GRU, the state at each sequence's
    last real token, a linear head."""

    def __init__(self, gru: nn.GRU, head: nn.Linear, pad_index: int) -> None:
        super().__init__()
        self.gru = gru
        self.head = head
        self.pad_index = pad_index

    def forward(self, emb: Tensor, tokens: Tensor) -> Tensor:
        states, _ = self.gru(emb)
        last = (tokens != self.pad_index).sum(1).clamp_min(1) - 1
        return self.head(states[torch.arange(tokens.shape[0], device=tokens.device), last])


class GRUClassifier(nn.Module):
    """Embedding → one GRU layer (batch_first) → linear head on the last real token, like
    LSTMClassifier (padding never changes the output)."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 64,
        hidden: int = 64,
        num_classes: int = 2,
        pad_index: int = 0,
        embeddings: Tensor | None = None,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.pad_index = pad_index
        self.embedding = _embedding(vocab_size, embed_dim, pad_index, embeddings, freeze_embeddings)
        self.body = GRUBody(nn.GRU(embed_dim, hidden, batch_first=True), nn.Linear(hidden, num_classes), pad_index)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.body(self.embedding(tokens), tokens)
