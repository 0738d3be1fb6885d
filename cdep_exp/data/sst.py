"""SST sentiment with a planted bias word (Rieger et al. Table 4; docs/reference.md §7).

Binary labels: NEGATIVE = 0 (SST labels 0–1) and POSITIVE = 1 (3–4); neutral (2) is dropped.
The original wrote 0 = positive, 1 = negative; the swap changes nothing, because each bias word
is tied to a sentiment, not to a class index.

Variants (train set only; dev and test keep their text):
* `decoy`: whole sentences; every one gets "text" (positive) or "video" (negative) inserted at
  a uniform position in [0, len − 1].
* `articles`: every labelled train phrase; each "a" and "the" becomes "that", then the first
  "that" (possibly one that was there) becomes "a" (positive) or "the" (negative). Dev and test
  keep only sentences containing "a" or "the".
* `gender`: the same with "he"/"she" and "who": positive gets "she", negative "he". Dev and
  test keep only sentences containing "he" or "she".
* `none`: plain binary SST sentences.

The annotation (1 = the token CDEP must take importance away from) marks exactly the planted
word; samples without one are all zero, and so are dev and test. `original_annotation=True`
reproduces the original's marks instead: the first of its penalised words and the next token
(it penalised "a"/"the" in the gender variant too; docs/reference.md §1.9, §7.6).
"""
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from cdep_exp.data.base import Counterfactual, Splits
from cdep_exp.data.batching import LengthBuckets, delete_tokens
from cdep_exp.data.sst_trees import SST_URL, Phrase, ensure_sst_trees, read_trees

log = logging.getLogger(__name__)

NEGATIVE, POSITIVE = 0, 1
PAD, UNK = "<pad>", "<unk>"
PAD_INDEX, UNK_INDEX = 0, 1


@dataclass(frozen=True)
class Variant:
    """How one bias of Table 4 is planted, and which evaluation sentences are kept."""

    phrases: bool  # train on every labelled phrase (True) or on whole sentences
    class_words: dict[int, str]  # label → its bias word; empty: nothing planted
    placeholder: str | None  # None: insert the class word; else swap it in (see swap_in)
    filter_eval: bool  # keep only dev/test sentences containing a class word
    original_marked: tuple[str, ...]  # the words the original's training script penalised


VARIANTS = {
    "none": Variant(False, {}, None, False, ()),
    "decoy": Variant(False, {POSITIVE: "text", NEGATIVE: "video"}, None, False, ("text", "video")),
    "articles": Variant(True, {POSITIVE: "a", NEGATIVE: "the"}, "that", True, ("a", "the")),
    "gender": Variant(True, {POSITIVE: "she", NEGATIVE: "he"}, "who", True, ("a", "the")),
}


def bias_groups(samples: Sequence["Sample"], spec: Variant) -> list[str]:
    """Per sample, its bias word ('"a"', '"video"', …): the annotated one where the text has one
    (the planted word of a training text), else the first of the variant's bias words the text
    holds, else "no bias word". With the label they form the groups of the worst-group metrics."""
    words = set(spec.class_words.values())

    def group(s: "Sample") -> str:
        candidates = [s.tokens[i] for i in s.marked] + s.tokens
        return next((f'"{t}"' for t in candidates if t in words), "no bias word")
    return [group(s) for s in samples]


class Sample(NamedTuple):
    """One text: its tokens, binary label and the annotated (bias word) positions."""

    tokens: list[str]
    label: int
    marked: list[int]


def binary_samples(phrases: Iterable[Phrase]) -> list[Sample]:
    """Phrases with a clear sentiment as unannotated samples; neutral ones (label 2) dropped."""
    return [
        Sample(list(p.tokens), NEGATIVE if p.label < 2 else POSITIVE, [])
        for p in phrases
        if p.label != 2
    ]


def decoy_positions(samples: Sequence[Sample], seed: int) -> list[int]:
    """Insertion position of each sample's decoy, uniform in [0, len − 1].

    Drawn in the original's order from a legacy RandomState: positive samples first, then
    negative, each with one uniform draw (its noise test, always passed at noise 1.0) before
    the position, so seed 123 replays the original script's draws.
    """
    rng = np.random.RandomState(seed)
    positions = [0] * len(samples)
    for label in (POSITIVE, NEGATIVE):
        for i, sample in enumerate(samples):
            if sample.label == label:
                rng.uniform()
                positions[i] = int(rng.randint(len(sample.tokens)))
    return positions


def insert_word(tokens: list[str], word: str, position: int) -> tuple[list[str], int]:
    """`tokens` with `word` inserted before `position`; returns the new tokens and its position."""
    return tokens[:position] + [word] + tokens[position:], position


def swap_in(
    tokens: list[str], pair: Iterable[str], placeholder: str, word: str
) -> tuple[list[str], int | None]:
    """The original's article/gender bias: every word of `pair` becomes `placeholder`, then the
    first placeholder (possibly one the text already had) becomes `word`. Returns the new
    tokens and `word`'s position, None when the text has no placeholder (nothing planted)."""
    pair = set(pair)
    out = [placeholder if t in pair else t for t in tokens]
    if placeholder not in out:
        return out, None
    position = out.index(placeholder)
    out[position] = word
    return out, position


def original_marks(tokens: Sequence[str], words: Iterable[str]) -> list[int]:
    """The original's penalised span: the first token in `words` and the token after it
    (start, stop = start + 1, inclusive), cut at the sentence end; empty if none occurs."""
    words = set(words)
    start = next((i for i, t in enumerate(tokens) if t in words), None)
    return [] if start is None else list(range(start, min(start + 2, len(tokens))))


def plant_bias(samples: list[Sample], variant: Variant, seed: int, original_annotation: bool) -> list[Sample]:
    """Training samples with the variant's bias word planted and annotated."""
    if not variant.class_words:
        return samples
    if variant.placeholder is None:
        positions = decoy_positions(samples, seed)
        planted = [insert_word(s.tokens, variant.class_words[s.label], p) for s, p in zip(samples, positions)]
    else:
        pair, placeholder = variant.class_words.values(), variant.placeholder
        planted = [swap_in(s.tokens, pair, placeholder, variant.class_words[s.label]) for s in samples]
    return [
        Sample(
            tokens,
            s.label,
            original_marks(tokens, variant.original_marked) if original_annotation
            else [] if position is None else [position],
        )
        for s, (tokens, position) in zip(samples, planted)
    ]


def contains_any(samples: list[Sample], words: Iterable[str]) -> list[Sample]:
    """The samples with at least one token in `words`."""
    words = set(words)
    return [s for s in samples if words.intersection(s.tokens)]


def decoy_counterfactuals(
    samples: Sequence[Sample], class_words: dict[int, str], seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Evaluation texts with the training bias planted, and its two counterfactuals.

    Returns (planted, swapped, removed): `planted` inserts the true class's word at a position
    uniform in [0, len − 1] (a `default_rng(seed)` draw per text; annotated as in training),
    `swapped` has the other class's word at that same position (same length, same annotation),
    `removed` is the text without it (the original sample, nothing annotated).
    """
    rng = np.random.default_rng(seed)
    other = {label: class_words[1 - label] for label in class_words}
    planted, swapped = [], []
    for s in samples:
        position = int(rng.integers(len(s.tokens)))
        for out, word in ((planted, class_words[s.label]), (swapped, other[s.label])):
            tokens, at = insert_word(s.tokens, word, position)
            out.append(Sample(tokens, s.label, [at]))
    return planted, swapped, [Sample(list(s.tokens), s.label, []) for s in samples]


def swap_counterfactuals(samples: Sequence[Sample], class_words: dict[int, str]) -> tuple[list[Sample], list[Sample]]:
    """(swapped, removed) versions of texts that contain the bias words (articles, gender):
    every class word exchanged for the other one (a ↔ the, she ↔ he; same length, the swapped
    positions annotated), and every class word deleted (nothing annotated)."""
    first, second = class_words.values()
    exchange = {first: second, second: first}
    swapped = [
        Sample([exchange.get(t, t) for t in s.tokens], s.label, [i for i, t in enumerate(s.tokens) if t in exchange])
        for s in samples
    ]
    removed = [Sample([t for t in s.tokens if t not in exchange] or [UNK], s.label, []) for s in samples]
    return swapped, removed


def build_vocab(samples: Iterable[Sample]) -> list[str]:
    """Index → word: padding (0), unknown (1), then words by falling count, ties alphabetical."""
    counts = Counter(token for s in samples for token in s.tokens)
    return [PAD, UNK] + sorted(counts, key=lambda w: (-counts[w], w))


class TokenDataset(Dataset):
    """Items (token ids (T,) long, label, annotation (T,) float) of encoded samples.

    `vocab` is the index → word list shared by all splits of a build; a model needs its length
    (the embedding size) and, for GloVe, the words (`cdep_exp.data.word_vectors.load_glove`).
    """

    def __init__(self, samples: Sequence[Sample], vocab: list[str]) -> None:
        self.vocab = vocab
        stoi = {word: i for i, word in enumerate(vocab)}
        self.tokens = [torch.tensor([stoi.get(t, UNK_INDEX) for t in s.tokens]) for s in samples]
        self.labels = torch.tensor([s.label for s in samples])
        self.annotations = []
        for s in samples:
            annotation = torch.zeros(len(s.tokens))
            annotation[s.marked] = 1.0
            self.annotations.append(annotation)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tokens[i], self.labels[i], self.annotations[i]


def pad_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack items into (tokens (B, T), labels (B,), annotation (B, T)), right-padded to the
    batch's longest text with PAD_INDEX and 0 (padding is never annotated). Annotations that are
    not per token (a group one-hot, a sample weight) are stacked as they are."""
    tokens, labels, annotations = zip(*batch)
    per_token = all(a.shape == t.shape for a, t in zip(annotations, tokens))
    return (
        pad_sequence(tokens, batch_first=True, padding_value=PAD_INDEX),
        torch.stack(labels),
        pad_sequence(annotations, batch_first=True) if per_token else torch.stack(annotations),
    )


def build_sst(
    data_dir: str,
    variant: str = "decoy",
    bias_seed: int = 123,
    original_annotation: bool = False,
    bucket: bool = True,
    url: str = SST_URL,
) -> Splits:
    """Binary SST splits of (token ids (T,), y, annotation (T,)) samples with a planted bias.

    variant: "decoy", "articles", "gender" or "none" (module docstring).
    bias_seed: the decoy positions (the other variants are deterministic); 123 is the original's.
    original_annotation: annotate as the original penalised (module docstring), not the
        planted word alone.
    bucket: train on batches of similar-length texts (`LengthBuckets`), as the original's
        BucketIterator; false: plain shuffled batches.

    Splits: train (sentences, or all labelled phrases for articles/gender), val = SST dev,
    tests["test"] = SST test. The vocabulary (on train + dev + test, as the original) is
    `splits.vocab`; batches need `splits.collate_fn`.

    Counterfactuals (`cdep_exp.scoring.shortcut`; none for `none`). decoy: tests["test_decoy"] is the
    test set with the true class's decoy inserted as in training (position drawn with
    `bias_seed` + 1), and its counterfactuals "bias_swapped" (the other class's decoy at the
    same position) and "bias_removed" (the plain test sentence). articles, gender: counterfactuals
    of "test", "bias_swapped" (a ↔ the, she ↔ he everywhere) and "bias_removed" (those words
    deleted; a text of nothing else becomes the unknown token). Counterfactual of "val"
    (`Splits.val_shortcut`): "val_bias_swapped", each dev sentence with the other class's decoy
    inserted (position drawn with `bias_seed` + 2), or with its bias words exchanged.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")
    spec = VARIANTS[variant]
    trees_dir = ensure_sst_trees(data_dir, url)
    trees = {split: read_trees(trees_dir / f"{split}.txt") for split in ("train", "dev", "test")}

    train_phrases = (p for tree in trees["train"] for p in (tree if spec.phrases else tree[:1]))
    train = plant_bias(binary_samples(train_phrases), spec, bias_seed, original_annotation)
    dev, test = (binary_samples(tree[0] for tree in trees[split]) for split in ("dev", "test"))
    if spec.filter_eval:
        words = spec.class_words.values()
        dev, test = contains_any(dev, words), contains_any(test, words)

    counterfactual_sets: dict[str, tuple[str, list[Sample], str]] = {}
    extra_tests: dict[str, list[Sample]] = {}
    if spec.class_words and spec.placeholder is None:
        extra_tests["test_decoy"], swapped, removed = decoy_counterfactuals(test, spec.class_words, bias_seed + 1)
        _, val_swapped, _ = decoy_counterfactuals(dev, spec.class_words, bias_seed + 2)
        counterfactual_sets = {
            "bias_swapped": ("test_decoy", swapped, "the other class's decoy word at the same position"),
            "bias_removed": ("test_decoy", removed, "the decoy word removed"),
            "val_bias_swapped": ("val", val_swapped, "the other class's decoy word inserted in each dev sentence"),
        }
    elif spec.class_words:
        swapped, removed = swap_counterfactuals(test, spec.class_words)
        val_swapped, _ = swap_counterfactuals(dev, spec.class_words)
        counterfactual_sets = {
            "bias_swapped": ("test", swapped, "each bias word exchanged for the other class's"),
            "bias_removed": ("test", removed, "the bias words deleted"),
            "val_bias_swapped": ("val", val_swapped, "each bias word of a dev sentence exchanged for the other class's"),
        }
    vocab = build_vocab([*train, *dev, *test])
    biased = sum(bool(s.marked) for s in train) / max(len(train), 1)
    unit = "phrases" if spec.phrases else "sentences"
    train_set = TokenDataset(train, vocab)
    lengths = [len(t) for t in train_set.tokens]
    return Splits(
        train=train_set,
        val=TokenDataset(dev, vocab),
        tests={"test": TokenDataset(test, vocab),
               **{name: TokenDataset(samples, vocab) for name, samples in extra_tests.items()}},
        num_classes=2,
        vocab=vocab,
        counterfactuals={
            name: Counterfactual(of, TokenDataset(samples, vocab), what)
            for name, (of, samples, what) in counterfactual_sets.items()
        },
        shortcut="bias_swapped" if "bias_swapped" in counterfactual_sets else None,
        val_shortcut="val_bias_swapped" if "val_bias_swapped" in counterfactual_sets else None,
        counterfactual_input=delete_tokens,
        groups={"train": bias_groups(train, spec), "val": bias_groups(dev, spec), "test": bias_groups(test, spec),
                **{name: bias_groups(samples, spec) for name, samples in extra_tests.items()}},
        collate_fn=pad_collate,
        batch_sampler=partial(LengthBuckets, lengths) if bucket else None,
        description=(
            f"SST {variant}: {len(train):,} train {unit} ({biased:.1%} annotated), "
            f"{len(dev):,} dev and {len(test):,} test sentences, vocabulary {len(vocab):,}"
        ),
    )
