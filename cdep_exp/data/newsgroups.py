"""20 Newsgroups, alt.atheism vs soc.religion.christian (Ross et al. 2017, "Right for the Right
Reasons", §4), as TF-IDF vectors for an MLP.

The paper's setup: scikit-learn's "bydate" train/test split of the two groups, a
`TfidfVectorizer(lowercase=False, max_features=5000)` fitted on the training posts' full text,
the 50-30 MLP (`model=mlp_rrr`); it shows input-gradient explanations of words. The shortcut
of this pair is well known: the posts' headers (e-mail addresses, hosts, names, the
"Organization:" and "NNTP-Posting-Host:" lines), signatures and quoted replies name who wrote
and from where, which predicts the group without reading what was written. scikit-learn's
`fetch_20newsgroups(remove=('headers', 'footers', 'quotes'))` strips exactly these parts.

The annotation (1 = must not matter) is one mask over the vocabulary, the same for every post:
the words whose occurrences in the training posts lie in their headers, footers or quotes (the
full text) and not in what scikit-learn's stripping leaves (the body); `metadata_share` < 1
also marks words with at least that share of their training occurrences there. A word such as
"church" in a "Subject:" line is not marked when it also occurs in bodies: a bag of words
cannot tell where a word stood, and marking it would ask the model to ignore the topic. Being
one fixed mask, it is also the region "metadata" of `grad_in_metadata` (the share of each test
post's largest input gradients on metadata words, as the paper locates explanations).

Counterfactuals of "test": "metadata_removed", the posts with headers, footers and quotes
stripped by scikit-learn's rules and vectorised again by the same fitted vectorizer (the
standard "realistic" 20 Newsgroups evaluation; it also lowers the counts of words shared with
the body and re-normalises each row, so it changes more than the annotated features);
"metadata_zeroed", the annotated features set to 0 and nothing else (what augmentation and
counterfactual logit pairing train on); "metadata_swapped" (the shortcut metric), each post's
annotated features taken from a test post of another group. Of "val": "val_metadata_shuffled",
the annotated features permuted among validation posts. No groups: every post carries metadata,
so there is no group where the shortcut disagrees with the class (group_dro and dfr refuse).

Sources (`source`): "sklearn", the real posts through `sklearn.datasets.fetch_20newsgroups`,
with its cache in `<data_dir>/newsgroups/` (downloaded there once, 14 MB, on a machine with a
network; scikit-learn's own cache, ~/scikit_learn_data or $SCIKIT_LEARN_DATA, is read when the
data root has none); without either, the build fails with one line saying how to get it.
"generated", small synthetic two-class posts in the same format (header lines, quoted replies,
signatures) for tests and demos, clearly labelled as such: their headers predict the class
perfectly, their bodies only noisily.
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cdep_exp.data.base import Counterfactual, Splits
from cdep_exp.errors import ConfigError

CATEGORIES = ("alt.atheism", "soc.religion.christian")
NEWSGROUPS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware",
    "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey",
    "sci.crypt", "sci.electronics", "sci.med", "sci.space", "soc.religion.christian", "talk.politics.guns",
    "talk.politics.mideast", "talk.politics.misc", "talk.religion.misc",
)
SOURCES = ("sklearn", "generated")
# What fetch_20newsgroups writes under its data_home (scikit-learn's `_pkl_filepath` adds "_py3").
CACHE_FILE = "20news-bydate_py3.pkz"
REGION = "metadata"


@dataclass
class Posts:
    """Raw posts of the standard train and test subsets; labels index `class_names`."""

    train: list[str]
    train_labels: np.ndarray
    test: list[str]
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    origin: str


def strip_metadata(text: str) -> str:
    """The post without headers, footers and quotes, by scikit-learn's rules and in its order
    (what `fetch_20newsgroups(remove=('headers', 'footers', 'quotes'))` returns)."""
    from sklearn.datasets._twenty_newsgroups import (strip_newsgroup_footer, strip_newsgroup_header,
                                                     strip_newsgroup_quoting)
    return strip_newsgroup_quoting(strip_newsgroup_footer(strip_newsgroup_header(text)))


# --- the real posts ---------------------------------------------------------------------------

def sklearn_home() -> Path:
    """scikit-learn's default data folder ($SCIKIT_LEARN_DATA or ~/scikit_learn_data), without
    creating it (sklearn.datasets.get_data_home would)."""
    return Path(os.environ.get("SCIKIT_LEARN_DATA", "~/scikit_learn_data")).expanduser()


def fetch_posts(data_dir: str | os.PathLike, categories: Sequence[str] = CATEGORIES) -> Posts:
    """The posts of `categories` from scikit-learn's 20news-bydate cache: `<data_dir>/newsgroups/`,
    else scikit-learn's own data folder, else downloaded into `<data_dir>/newsgroups/`.

    Raises FileNotFoundError (one line: how to get the data) when no cache exists and the
    download fails, e.g. offline.
    """
    from sklearn.datasets import fetch_20newsgroups

    home = Path(data_dir) / "newsgroups"
    if (home / CACHE_FILE).is_file():
        origin = f"scikit-learn's cache {home / CACHE_FILE}"
    elif (sklearn_home() / CACHE_FILE).is_file():
        home = sklearn_home()
        origin = f"scikit-learn's cache {home / CACHE_FILE}"
    else:
        origin = f"downloaded by scikit-learn into {home / CACHE_FILE}"
    existed = home.exists()
    try:
        subsets = {subset: fetch_20newsgroups(data_home=str(home), subset=subset, categories=list(categories),
                                              shuffle=False, remove=()) for subset in ("train", "test")}
    except (OSError, EOFError, tarfile.TarError) as err:
        # The folders scikit-learn made for the download (its extraction folder, the data home), if empty.
        for folder in (home / "20news_home", *(() if existed else (home,))):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"20 Newsgroups not found: no scikit-learn cache {CACHE_FILE} in {home} or {sklearn_home()}, and "
            f"scikit-learn's download failed ({reason}). Run the same command once on a machine with a network "
            f"(it saves {home / CACHE_FILE}), or, from a machine where sklearn.datasets.fetch_20newsgroups() has "
            f"run, copy ~/scikit_learn_data/{CACHE_FILE} into {home}/. dataset.source=generated makes synthetic "
            f"posts for tests."
        ) from err
    train, test = subsets["train"], subsets["test"]
    return Posts(list(train.data), np.asarray(train.target), list(test.data), np.asarray(test.target),
                 tuple(train.target_names), origin)


# --- generated posts --------------------------------------------------------------------------

SHARED_WORDS = (
    "God", "people", "believe", "think", "question", "world", "life", "time", "know", "say", "true", "good",
    "point", "book", "word", "mean", "moral", "history", "claim", "read", "answer", "man", "power", "love",
)
CLASS_WORDS = (
    ("atheist", "atheism", "evidence", "reason", "science", "argument", "logic", "proof", "exist", "myth",
     "rational", "theist", "skeptic", "natural", "dogma"),
    ("church", "Christ", "Jesus", "faith", "prayer", "Bible", "scripture", "sin", "grace", "Lord", "Gospel",
     "worship", "holy", "salvation", "Spirit"),
)
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def _pseudo_word(rng: np.random.Generator, taken: set[str]) -> str:
    """A new made-up word of 2–3 consonant-vowel syllables, none of `taken` (lower-case compared)."""
    while True:
        word = "".join(rng.choice(list(CONSONANTS)) + rng.choice(list(VOWELS))
                       for _ in range(int(rng.integers(2, 4))))
        if word not in taken:
            taken.add(word)
            return word


def _posters(rng: np.random.Generator, per_class: int, taken: set[str]) -> list[list[dict[str, str]]]:
    """Per class, posters (user, host, name, organisation) on that class's own domains."""
    posters = []
    for _ in range(2):
        domains = [f"{_pseudo_word(rng, taken)}.edu", f"{_pseudo_word(rng, taken)}.com"]
        orgs = [f"{_pseudo_word(rng, taken).title()} University", f"{_pseudo_word(rng, taken).title()} Institute"]
        posters.append([{"user": _pseudo_word(rng, taken),
                         "host": f"{_pseudo_word(rng, taken)}.{domains[k % 2]}",
                         "name": f"{_pseudo_word(rng, taken).title()} {_pseudo_word(rng, taken).title()}",
                         "org": orgs[k % 2]} for k in range(per_class)])
    return posters


def _words(rng: np.random.Generator, label: int, n: int, own: float = 0.1, other: float = 0.06) -> list[str]:
    """n body words: from the class's own list with probability `own`, the other class's with
    `other`, else shared (the body predicts the class, noisily)."""
    draws = rng.random(n)
    lists = [CLASS_WORDS[label] if d < own else CLASS_WORDS[1 - label] if d < own + other else SHARED_WORDS
             for d in draws]
    return [str(rng.choice(words)) for words in lists]


def _lines(words: list[str], per_line: int = 9) -> list[str]:
    return [" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line)]


def _post(rng: np.random.Generator, label: int, posters: list[list[dict[str, str]]]) -> str:
    """One post: header lines, a blank line, maybe a quoted reply, the body (one paragraph, so
    that scikit-learn's footer rule finds no blank line in it), maybe a signature after "--"."""
    me = posters[label][int(rng.integers(len(posters[label])))]
    body = _lines(_words(rng, label, int(rng.integers(15, 46))))
    reply = rng.random() < 0.5
    header = [f"From: {me['user']}@{me['host']} ({me['name']})",
              f"Subject: {'Re: ' if reply else ''}{' '.join(_words(rng, label, int(rng.integers(2, 5))))}",
              f"Organization: {me['org']}"]
    if rng.random() < 0.5:
        header.append(f"NNTP-Posting-Host: {me['host']}")
    header.append(f"Lines: {len(body) + 2}")
    quote = []
    if reply:
        them = posters[label][int(rng.integers(len(posters[label])))]
        quote = [f"In article <1993Apr{int(rng.integers(1, 31))}.{them['user']}@{them['host']}>, "
                 f"{them['user']}@{them['host']} ({them['name']}) writes:",
                 *(f"> {line}" for line in _lines(_words(rng, label, int(rng.integers(5, 16)))))]
    footer = ["--", me["name"], f"{me['user']}@{me['host']}"] if rng.random() < 0.5 else []
    return "\n".join(header) + "\n\n" + "\n".join([*quote, *body, *footer]) + "\n"


def generate_posts(n_train: int = 600, n_test: int = 400, seed: int = 0, posters_per_class: int = 8) -> Posts:
    """Synthetic posts of two classes named like the paper's pair: each class's posters write
    from their own hosts and organisations (the headers, quotes and signatures give the class
    away), and their bodies draw a tenth of their words from the class's list, a sixteenth from
    the other's, the rest from a shared list. Both classes occur in each subset."""
    if n_train < 4 or n_test < 2:
        raise ValueError(f"dataset.generate: n_train={n_train} and n_test={n_test} must be at least 4 and 2")
    rng = np.random.default_rng(seed)
    taken = {w.lower() for words in (SHARED_WORDS, *CLASS_WORDS) for w in words}
    posters = _posters(rng, posters_per_class, taken)
    labels = {n: rng.permutation(np.arange(n) % 2) for n in (n_train, n_test)}
    train = [_post(rng, int(y), posters) for y in labels[n_train]]
    test = [_post(rng, int(y), posters) for y in labels[n_test]]
    return Posts(train, labels[n_train], test, labels[n_test], CATEGORIES,
                 f"GENERATED synthetic posts (seed {seed}), not the real 20 Newsgroups")


# --- features ---------------------------------------------------------------------------------

def train_val_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of the standard training subset: a random `val_fraction` held out."""
    perm = np.random.default_rng(split_seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def metadata_words(vectorizer, full: list[str], stripped: list[str], share: float) -> np.ndarray:
    """(V,) bool: the vocabulary words with at least `share` of their occurrences in `full` lying
    outside `stripped` (the headers, footers and quotes); share 1 = words never in a body."""
    from sklearn.feature_extraction.text import CountVectorizer
    counter = CountVectorizer(lowercase=vectorizer.lowercase, token_pattern=vectorizer.token_pattern,
                              vocabulary=vectorizer.vocabulary_)
    total = np.asarray(counter.transform(full).sum(0)).ravel()
    in_body = np.asarray(counter.transform(stripped).sum(0)).ravel()
    return 1 - in_body / np.maximum(total, 1) >= share


def _dense(vectorizer, texts: list[str]) -> torch.Tensor:
    return torch.from_numpy(vectorizer.transform(texts).toarray().astype(np.float32))


def splits_from_posts(posts: Posts, max_features: int = 5000, lowercase: bool = False, metadata_share: float = 1.0,
                      val_fraction: float = 0.2, split_seed: int = 0) -> Splits:
    """Splits of (x (V,) TF-IDF, y, annotation (V,)) from raw posts; see the module docstring.

    The vectorizer (and the annotation) is fitted on the training posts only, validation held
    out. Raises ValueError for settings outside their range or a subset with a single class.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not 0 < val_fraction < 1:
        raise ValueError(f"dataset.val_fraction={val_fraction} must lie in (0, 1)")
    if not 0 < metadata_share <= 1:
        raise ValueError(f"dataset.metadata_share={metadata_share} must lie in (0, 1]")
    if max_features < 1:
        raise ValueError(f"dataset.max_features={max_features} must be at least 1")
    num_classes = len(posts.class_names)
    for name, labels in (("train", posts.train_labels), ("test", posts.test_labels)):
        if len(np.unique(labels)) < 2:
            raise ValueError(f"the {name} posts hold a single class; need posts of at least two groups")
    train_idx, val_idx = train_val_indices(len(posts.train), val_fraction, split_seed)
    texts = {"train": [posts.train[i] for i in train_idx], "val": [posts.train[i] for i in val_idx],
             "test": posts.test}
    labels = {"train": posts.train_labels[train_idx], "val": posts.train_labels[val_idx], "test": posts.test_labels}
    vectorizer = TfidfVectorizer(lowercase=lowercase, max_features=max_features, dtype=np.float32)
    vectorizer.fit(texts["train"])
    vocab = vectorizer.get_feature_names_out().tolist()
    stripped_train = [strip_metadata(t) for t in texts["train"]]
    marks = torch.from_numpy(metadata_words(vectorizer, texts["train"], stripped_train, metadata_share)).float()
    x = {name: _dense(vectorizer, split_texts) for name, split_texts in texts.items()}
    y = {name: torch.as_tensor(split_labels, dtype=torch.long) for name, split_labels in labels.items()}

    def dataset(name: str, inputs: torch.Tensor | None = None) -> TensorDataset:
        features = x[name] if inputs is None else inputs
        return TensorDataset(features, y[name], marks.expand(len(features), -1))

    def zeroed(inputs: torch.Tensor, annotation: torch.Tensor) -> torch.Tensor:
        return torch.where(annotation > 0, torch.zeros_like(inputs), inputs)

    rng = np.random.default_rng(split_seed + 1)
    test_labels = labels["test"]
    donors = [rng.choice(np.flatnonzero(test_labels != label)) for label in test_labels]
    swapped = torch.where(marks > 0, x["test"][torch.as_tensor(np.array(donors, dtype=np.int64))], x["test"])
    shuffled = torch.where(marks > 0, x["val"][torch.as_tensor(rng.permutation(len(val_idx)))], x["val"])
    removed = _dense(vectorizer, [strip_metadata(t) for t in texts["test"]])
    counts = {name: len(split_texts) for name, split_texts in texts.items()}
    rule = "only in headers, footers or quotes" if metadata_share == 1 else \
        f"≥ {metadata_share:g} of their occurrences in headers, footers or quotes"
    return Splits(
        train=dataset("train"),
        val=dataset("val"),
        tests={"test": dataset("test")},
        num_classes=num_classes,
        input_shape=(len(vocab),),
        vocab=vocab,
        counterfactuals={
            "metadata_removed": Counterfactual("test", dataset("test", removed),
                                               "headers, footers and quotes stripped from the text, TF-IDF recomputed"),
            "metadata_zeroed": Counterfactual("test", dataset("test", zeroed(x["test"], marks)),
                                              "metadata words' features set to 0"),
            "metadata_swapped": Counterfactual("test", dataset("test", swapped),
                                               "metadata words' features from a post of another group"),
            "val_metadata_shuffled": Counterfactual("val", dataset("val", shuffled),
                                                    "metadata words' features permuted among posts"),
        },
        shortcut="metadata_swapped",
        val_shortcut="val_metadata_shuffled",
        counterfactual_input=zeroed,
        regions={REGION: marks.clone()},
        description=(f"20 Newsgroups {' vs '.join(posts.class_names)} ({posts.origin}): {counts['train']:,} train / "
                     f"{counts['val']:,} val (split seed {split_seed}) / {counts['test']:,} test posts; TF-IDF over "
                     f"{len(vocab):,} words fitted on train, {int(marks.sum()):,} annotated ({rule})"),
    )


def build_newsgroups(data_dir: str, source: str = "sklearn", categories: Sequence[str] = CATEGORIES,
                     max_features: int = 5000, lowercase: bool = False, metadata_share: float = 1.0,
                     val_fraction: float = 0.2, split_seed: int = 0,
                     generate: Mapping | None = None) -> Splits:
    """20 Newsgroups splits of TF-IDF vectors (module docstring). source: "sklearn" (the real
    posts of `categories`) or "generated" (`generate_posts(**generate)`, two classes). Raises
    FileNotFoundError when the real posts cannot be had, ValueError for settings that cannot work.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown 20 Newsgroups source {source!r}; choose one of {SOURCES}")
    categories = tuple(categories)
    unknown = [c for c in categories if c not in NEWSGROUPS]
    if unknown or len(set(categories)) < 2:
        raise ValueError(f"dataset.categories={list(categories)}: name at least two distinct groups of "
                         f"{', '.join(NEWSGROUPS)}")
    if source == "generated":
        if categories != CATEGORIES:
            raise ValueError(f"dataset.categories applies to the real posts; the generated ones imitate {CATEGORIES}")
        posts = generate_posts(**dict(generate or {}))
    else:
        posts = fetch_posts(data_dir, categories)
    try:
        return splits_from_posts(posts, max_features, lowercase, metadata_share, val_fraction, split_seed)
    except ValueError as err:
        if "empty vocabulary" in str(err):  # scikit-learn's message for posts without a single word
            raise ConfigError(f"20 Newsgroups: the training posts hold no word ({posts.origin})") from err
        raise
