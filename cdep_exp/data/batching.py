"""Batches of similar-length texts, so an LSTM steps through little padding."""
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthBuckets(Sampler[list[int]]):
    """Shuffled batches of indices whose `lengths` are close.

    Each epoch shuffles all indices, cuts them into pools of `pool_batches` batches, sorts each
    pool by length and cuts it into batches, then shuffles the batches: every batch is random
    but nearly padding-free (the idea of torchtext's BucketIterator, which the original used).
    Randomness comes from `generator`, so seeding it per epoch replays an epoch exactly.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, pool_batches: int = 50
    ) -> None:
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.pool = batch_size * pool_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator)
        batches = []
        for pool in order.split(self.pool):
            by_length = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches.extend(by_length.split(self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i].tolist()


def delete_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token ids (B, T), right-padded with 0, with the tokens where `mask` (B, T) is non-zero
    deleted and the rest moved left (an id of 0 mid-sentence would read as the end of the text)."""
    keep = (mask == 0) & (tokens != 0)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    moved = tokens.gather(1, order)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return torch.where(positions < keep.sum(1, keepdim=True), moved, torch.zeros_like(tokens))
