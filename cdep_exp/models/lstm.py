"""The SST sentiment classifier: embedding → one LSTM layer → linear head on the last real token."""
import torch
from torch import nn


class LSTMClassifier(nn.Module):
    """Token ids (B, T), right-padded with `pad_index`, to logits (B, num_classes).

    Implements `cdep_exp.models.base.TokenModel` (embed / forward_embedded) for RRR and EG.

    The head reads the hidden state at each sequence's last non-pad token, so padding never
    changes the output (the original read the last time step of the padded batch). A sequence
    of padding only is read at position 0. `embeddings` (vocab_size, embed_dim), e.g. GloVe,
    initialises the embedding table; `freeze_embeddings` keeps it fixed.
    `cd_detach_embeddings` makes its contextual decomposition (and so the CDEP penalty) treat the
    word vectors as constants, as the original did: the penalty then trains only the LSTM and head.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 300,
        hidden: int = 128,
        num_classes: int = 2,
        pad_index: int = 0,
        embeddings: torch.Tensor | None = None,
        freeze_embeddings: bool = False,
        cd_detach_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.pad_index = pad_index
        self.cd_detach_embeddings = cd_detach_embeddings
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_index)
        if embeddings is not None:
            if embeddings.shape != (vocab_size, embed_dim):
                raise ValueError(
                    f"embeddings has shape {tuple(embeddings.shape)}, expected "
                    f"(vocab_size, embed_dim) = {(vocab_size, embed_dim)}"
                )
            with torch.no_grad():
                self.embedding.weight.copy_(embeddings)
        self.embedding.weight.requires_grad_(not freeze_embeddings)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def at_last_token(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Pick states[b, length_b − 1] from per-step states (..., B, T, H), length = non-pad count."""
        last = (tokens != self.pad_index).sum(1).clamp_min(1) - 1
        return states[..., torch.arange(tokens.shape[0], device=tokens.device), last, :]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) → word vectors (B, T, embed_dim) (`cdep_exp.models.base.TokenModel`)."""
        return self.embedding(tokens)

    def forward_embedded(self, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Word vectors (B, T, embed_dim) → logits (B, num_classes), read at each sequence's last
        non-pad token of `tokens` (B, T); what stands at padded positions never matters."""
        states, _ = self.lstm(embedded)
        return self.head(self.at_last_token(states, tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(self.embed(tokens), tokens)
