"""Groups for the group-robust methods: a group is a class together with a sample's shortcut
attribute (`Splits.groups`, e.g. (class 3, "other shade")), as in Sagawa et al. (2020).

`group_annotated(splits)` gives the splits whose training samples carry, in place of their
annotation, a one-hot vector of their training group: what GroupDRO reads. Only the training
split changes; nothing else of the data does.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import Dataset

from cdep_exp.data.base import Splits


def group_ids(labels: list[int], attributes: list[str]) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """Per sample, the index of its (class, attribute) group, and the groups in index order
    (sorted, so the same data always number them the same way)."""
    pairs = list(zip(labels, attributes))
    names = sorted(set(pairs))
    index = {pair: i for i, pair in enumerate(names)}
    return torch.tensor([index[pair] for pair in pairs]), names


class Relabelled(Dataset):
    """A dataset whose items (x, y, annotation) get another annotation per sample (`annotations`,
    indexable by the sample's index), x and y unchanged."""

    def __init__(self, dataset: Dataset, annotations: torch.Tensor) -> None:
        if len(annotations) != len(dataset):
            raise ValueError(f"{len(annotations)} annotations for {len(dataset)} samples")
        self.dataset, self.annotations = dataset, annotations

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        x, y, _ = self.dataset[i]
        return x, y, self.annotations[i]


def labels_of(dataset: Dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def group_annotated(splits: Splits) -> tuple[Splits, list[tuple[int, str]]]:
    """The splits with each training sample annotated by the one-hot (G,) of its group, and the
    G groups (class, attribute). Raises ValueError when the dataset gives no training groups."""
    if "train" not in splits.groups:
        raise ValueError("this method reads training groups, and the dataset defines none (Splits.groups['train'])")
    ids, names = group_ids(labels_of(splits.train), splits.groups["train"])
    one_hot = torch.nn.functional.one_hot(ids, len(names)).float()
    return dataclasses.replace(splits, train=Relabelled(splits.train, one_hot), annotation="group"), names
