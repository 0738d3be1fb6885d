"""What every dataset builder returns: train/val/test splits of (x, y, annotation) samples."""
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset, Sampler


@dataclass(frozen=True)
class Counterfactual:
    """A test set, or the validation set, changed only in its annotated features, for the
    shortcut-reliance metric.

    `dataset` holds the samples of `Splits.tests[test]` (or of `Splits.val` when `test` is
    "val") in the same order and with the same labels; only the features the annotation marks
    differ (e.g. the patch removed, the bias word swapped). `description` says what was changed,
    in a few words.
    """

    test: str
    dataset: Dataset
    description: str


@dataclass
class Splits:
    """Datasets of one experiment.

    Each item is `(x, y, annotation)`: `annotation` has x's shape, or one broadcastable to it,
    and is 1 where a feature must not matter. `annotation` names what it holds: "mask" (1 = must
    not matter; soft values allowed), "weights" (a sampling distribution over feature
    positions, ColorMNIST) or "relevant" (the relevant part of x itself, as a frozen backbone's
    cached decomposition yields it); penalties check that they can read it. `tests` maps a name (e.g. "test",
    "test_no_patches") to a dataset evaluated after training. `groups` maps a split name (train,
    val, a test) to per-sample labels of the shortcut attribute (e.g. race for COMPAS, "class shade" or
    "other shade" for a DecoyMNIST patch): with the class they form the groups of the
    worst-group metrics and fairness rates. `description`
    says where the data came from (recorded in every run's metrics.json). `batch_sampler`,
    when set, makes the training batches: called with (batch_size, generator) it returns a
    sampler of index lists (e.g. length buckets for text); otherwise batches are shuffled.
    What a model needs to fit the data: `num_classes`, `input_shape` (one sample's x shape;
    None for variable-length token ids) and `vocab` (token id → word, for text).
    `counterfactuals` maps a name (e.g. "patch_removed") to a `Counterfactual` of a test set;
    the app measures how far predictions move between the two (`cdep_exp.scoring.shortcut`).
    `shortcut` names the counterfactual that measures the shortcut (the annotated feature set
    to point at the true class, e.g. "patch_train_shade"): runs record it, and reports show its
    numbers beside accuracy. `val_shortcut` names a counterfactual of "val" that sets the
    annotated feature independently of the class (a random shade, colour or decoy word), so a
    selection rule can score a model on same-distribution validation data with the shortcut
    broken, without looking at the test set. `counterfactual_input(x, annotation)` builds, for a batch, the
    inputs with the annotated feature removed (the patch painted over, the colour taken out, the
    bias word deleted, race zeroed), which augmentation and counterfactual logit pairing train
    on; None where the data only say where the feature is (ISIC's patch masks) and no such
    input can be built.
    """

    train: Dataset
    val: Dataset
    tests: dict[str, Dataset]
    num_classes: int
    input_shape: tuple[int, ...] | None = None
    vocab: list[str] | None = None
    annotation: str = "mask"
    class_weights: torch.Tensor | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    collate_fn: Callable | None = None
    description: str = ""
    batch_sampler: Callable[[int, torch.Generator], Sampler[list[int]]] | None = None
    counterfactuals: dict[str, Counterfactual] = field(default_factory=dict)
    shortcut: str | None = None
    val_shortcut: str | None = None
    counterfactual_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Named regions of the input (0/1 masks of one sample's shape, or its spatial shape): the app
    # reports on "test" the share of each sample's largest input gradients inside each one
    # (`grad_in_<name>`, cdep_exp.scoring.explanation), as the RRR paper locates explanations.
    regions: dict[str, torch.Tensor] = field(default_factory=dict)

    def named_datasets(self) -> dict[str, Dataset]:
        """Every dataset of the experiment by name: train, val, the tests, cf_<name> counterfactuals."""
        return {"train": self.train, "val": self.val, **self.tests,
                **{f"cf_{name}": cf.dataset for name, cf in self.counterfactuals.items()}}


# What the annotation of a sample holds; "group" (a one-hot of its training group,
# `cdep_exp.data.groups`) and "weight" (a per-sample loss weight) are made by the run for the
# group-robust methods, never by a builder.
ANNOTATIONS = ("mask", "weights", "relevant", "group", "weight")
