import torch

from cdep_exp.data.batching import LengthBuckets


def batches(lengths: list[int], seed: int, **kwargs) -> list[list[int]]:
    return list(LengthBuckets(lengths, generator=torch.Generator().manual_seed(seed), **kwargs))


def test_every_index_once_in_full_batches_but_the_last() -> None:
    lengths = torch.randint(1, 40, (103,), generator=torch.Generator().manual_seed(0)).tolist()
    out = batches(lengths, seed=1, batch_size=8, pool_batches=4)
    assert sorted(i for b in out for i in b) == list(range(103))
    assert len(out) == len(LengthBuckets(lengths, 8, torch.Generator())) == 13
    assert sorted(len(b) for b in out)[1:] == [8] * 12


def test_one_pool_gives_batches_of_consecutive_lengths() -> None:
    lengths = list(range(64))
    out = batches(lengths, seed=0, batch_size=8, pool_batches=8)
    assert sorted(sorted(lengths[i] for i in b) for b in out) == [list(range(k, k + 8)) for k in range(0, 64, 8)]


def test_batches_are_tight_in_length_but_come_in_random_order() -> None:
    lengths = torch.randint(1, 50, (2000,), generator=torch.Generator().manual_seed(0))
    bucketed = [torch.as_tensor(b) for b in batches(lengths.tolist(), seed=0, batch_size=32, pool_batches=10)]
    shuffled = torch.randperm(2000, generator=torch.Generator().manual_seed(0)).split(32)

    def padding(bs: list[torch.Tensor]) -> int:
        return sum((lengths[b].max() - lengths[b]).sum().item() for b in bs)

    assert padding(bucketed) < 0.2 * padding(shuffled)
    shortest = [lengths[b].min().item() for b in bucketed]
    assert shortest != sorted(shortest)


def test_seeded_generator_replays_an_epoch_and_epochs_differ() -> None:
    lengths = list(range(50)) * 2
    assert batches(lengths, seed=3, batch_size=10) == batches(lengths, seed=3, batch_size=10)
    assert batches(lengths, seed=3, batch_size=10) != batches(lengths, seed=4, batch_size=10)
