"""20 Newsgroups (the RRR paper's text dataset): TF-IDF splits, the metadata annotation and its
counterfactuals on generated posts, and the real source read through scikit-learn's own fetch
from a cache written here (no network)."""
import codecs
import json
import pickle
import re
from collections import Counter
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.utils import Bunch

from cdep_exp.data import newsgroups
from cdep_exp.data.newsgroups import (CACHE_FILE, CATEGORIES, CLASS_WORDS, NEWSGROUPS, SHARED_WORDS, build_newsgroups,
                                      generate_posts, strip_metadata, train_val_indices)
from cdep_exp.errors import ConfigError
from cdep_exp.run import run
from test_app import make_cfg

TOKEN = re.compile(r"(?u)\b\w\w+\b")  # TfidfVectorizer's default token pattern
GENERATE = {"n_train": 200, "n_test": 100, "seed": 3}
METADATA_TOKENS = ("From", "Subject", "Organization", "Lines", "NNTP", "Posting", "Host", "Re", "In", "article",
                   "writes", "University", "edu")


def build(**kwargs) -> newsgroups.Splits:
    return build_newsgroups("unused", source="generated", generate=GENERATE, val_fraction=0.25, **kwargs)


@pytest.fixture(scope="module")
def posts() -> newsgroups.Posts:
    return generate_posts(**GENERATE)


@pytest.fixture(scope="module")
def splits() -> newsgroups.Splits:
    return build()


def training_texts(posts: newsgroups.Posts) -> list[str]:
    train_idx, _ = train_val_indices(len(posts.train), 0.25, 0)
    return [posts.train[i] for i in train_idx]


def test_generated_posts_have_headers_quotes_and_signatures_that_stripping_removes(posts: newsgroups.Posts) -> None:
    hosts = [set(), set()]
    for text, label in zip(posts.train, posts.train_labels):
        header, body = text.split("\n\n", 1)
        fields = [line.split(":", 1)[0] for line in header.splitlines()]
        assert fields[:3] == ["From", "Subject", "Organization"] and fields[-1] == "Lines"
        hosts[label].add(header.splitlines()[0].split("@")[1].split()[0])
        stripped = strip_metadata(text)
        assert "@" not in stripped and "writes:" not in stripped and "Organization" not in stripped
        assert stripped and set(TOKEN.findall(stripped)) <= {*SHARED_WORDS, *CLASS_WORDS[0], *CLASS_WORDS[1]}
    assert hosts[0] and hosts[1] and not hosts[0] & hosts[1]  # the headers give the class away
    assert sum("writes:" in t for t in posts.train) > 50 and sum("\n--\n" in t for t in posts.train) > 50
    assert set(np.unique(posts.test_labels)) == {0, 1} and posts.class_names == CATEGORIES


def test_splits_are_tfidf_over_a_vocabulary_fitted_on_the_training_posts_only(
        posts: newsgroups.Posts, splits: newsgroups.Splits) -> None:
    assert [len(splits.train), len(splits.val), len(splits.tests["test"])] == [150, 50, 100]
    expected = TfidfVectorizer(lowercase=False).fit(training_texts(posts))
    assert splits.vocab == expected.get_feature_names_out().tolist()  # not val's or test's words
    assert "God" in splits.vocab and "god" not in splits.vocab  # case kept, as the paper
    x, y, annotation = splits.tests["test"][:]
    assert x.dtype == torch.float32 and x.shape == (100, len(splits.vocab)) == (100, *splits.input_shape)
    torch.testing.assert_close(x, torch.from_numpy(expected.transform(posts.test).toarray()).float())
    torch.testing.assert_close(x.norm(dim=1), torch.ones(100))
    assert torch.equal(y, torch.as_tensor(posts.test_labels)) and splits.num_classes == 2
    assert "GENERATED" in splits.description and "150 train / 50 val" in splits.description
    capped = build(max_features=30)
    assert len(capped.vocab) == 30 and capped.train[:][0].shape == (150, 30) and capped.input_shape == (30,)
    assert capped.vocab == TfidfVectorizer(lowercase=False, max_features=30).fit(
        training_texts(posts)).get_feature_names_out().tolist()


def test_the_annotation_marks_exactly_the_words_no_training_body_holds(
        posts: newsgroups.Posts, splits: newsgroups.Splits) -> None:
    in_bodies = {w for text in training_texts(posts) for w in TOKEN.findall(strip_metadata(text))}
    marks = splits.regions["metadata"]
    marked = {w for w, m in zip(splits.vocab, marks) if m}
    assert marked == set(splits.vocab) - in_bodies
    assert set(METADATA_TOKENS) <= marked and not marked & {*SHARED_WORDS, *CLASS_WORDS[0], *CLASS_WORDS[1]}
    annotation = splits.train[:][2]
    assert torch.equal(annotation, marks.expand_as(annotation)) and set(marks.unique().tolist()) == {0.0, 1.0}
    # metadata_share < 1: also the words with at least that share of their training occurrences outside bodies.
    full = Counter(w for text in training_texts(posts) for w in TOKEN.findall(text))
    body = Counter(w for text in training_texts(posts) for w in TOKEN.findall(strip_metadata(text)))
    share = {w: 1 - body[w] / full[w] for w in splits.vocab}
    mixed = sorted(s for s in share.values() if 0 < s < 1)  # body words that also stand in a Subject line
    threshold = mixed[len(mixed) // 2]
    looser = build(metadata_share=threshold).regions["metadata"]
    assert {w for w, m in zip(splits.vocab, looser) if m} == {w for w, s in share.items() if s >= threshold}
    assert marks.sum() < looser.sum() < len(splits.vocab)


def test_counterfactuals_change_only_the_metadata_features(posts: newsgroups.Posts, splits: newsgroups.Splits) -> None:
    marks = splits.regions["metadata"].bool()
    x, y, annotation = splits.tests["test"][:]
    cf = {name: c.dataset[:] for name, c in splits.counterfactuals.items()}
    for name in ("metadata_zeroed", "metadata_swapped"):
        assert splits.counterfactuals[name].test == "test" and torch.equal(cf[name][1], y)
        assert torch.equal(cf[name][0][:, ~marks], x[:, ~marks])
    assert cf["metadata_zeroed"][0][:, marks].eq(0).all()
    assert torch.equal(splits.counterfactual_input(x, annotation), cf["metadata_zeroed"][0])
    swapped = cf["metadata_swapped"][0][:, marks]
    for row, label in zip(swapped, y):  # each post's metadata comes from a post of the other group
        donors = (x[:, marks] == row).all(1)
        assert donors.any() and (y[donors] != label).all()
    val_x = splits.val[:][0]
    shuffled = cf["val_metadata_shuffled"][0]
    assert splits.counterfactuals["val_metadata_shuffled"].test == "val"
    assert torch.equal(shuffled[:, ~marks], val_x[:, ~marks]) and not torch.equal(shuffled, val_x)
    assert sorted(map(tuple, shuffled[:, marks].tolist())) == sorted(map(tuple, val_x[:, marks].tolist()))
    # Stripped text vectorised again: no metadata word is left (generated bodies hold none), no new word appears.
    removed = cf["metadata_removed"][0]
    assert removed[:, marks].eq(0).all() and ((removed != 0) <= (x != 0)).all()
    refit = TfidfVectorizer(lowercase=False).fit(training_texts(posts))
    stripped = refit.transform([strip_metadata(t) for t in posts.test]).toarray()
    torch.testing.assert_close(removed, torch.from_numpy(stripped).float())
    assert splits.shortcut == "metadata_swapped" and splits.val_shortcut == "val_metadata_shuffled"


def write_cache(home: Path, posts: newsgroups.Posts) -> Path:
    """scikit-learn's 20news-bydate cache (a zlib-compressed pickle of two load_files bunches),
    holding `posts` under the paper's two groups plus a few sci.space posts that must be left out."""
    subsets = {}
    for subset, texts, labels in (("train", posts.train, posts.train_labels), ("test", posts.test, posts.test_labels)):
        space = [f"From: a@b.gov\nSubject: orbit\n\nlaunch {i} rocket orbit\n" for i in range(3)]
        target = [NEWSGROUPS.index(CATEGORIES[y]) for y in labels] + [NEWSGROUPS.index("sci.space")] * 3
        subsets[subset] = Bunch(data=list(texts) + space, target=np.array(target), target_names=list(NEWSGROUPS),
                                filenames=np.array([f"{subset}/{i}" for i in range(len(target))]))
    home.mkdir(parents=True, exist_ok=True)
    path = home / CACHE_FILE
    path.write_bytes(codecs.encode(pickle.dumps(subsets), "zlib_codec"))
    return path


def test_the_real_source_reads_scikit_learns_cache_in_the_data_root(
        tmp_path: Path, posts: newsgroups.Posts, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import fetch_20newsgroups
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "elsewhere"))
    cache = write_cache(tmp_path / "newsgroups", posts)
    real = build_newsgroups(str(tmp_path), source="sklearn", val_fraction=0.25)
    generated = build()
    assert f"cache {cache}" in real.description and "150 train / 50 val" in real.description
    assert real.vocab == generated.vocab  # the same posts, the sci.space ones left out
    for name in ("train", "val"):
        assert torch.equal(real.named_datasets()[name][:][0], generated.named_datasets()[name][:][0])
    assert torch.equal(real.tests["test"][:][1], torch.as_tensor(posts.test_labels))
    # The stripping is scikit-learn's remove=('headers', 'footers', 'quotes').
    plain = fetch_20newsgroups(data_home=str(cache.parent), subset="test", categories=list(CATEGORIES),
                               shuffle=False, remove=("headers", "footers", "quotes"))
    assert [strip_metadata(t) for t in posts.test] == plain.data
    assert not (tmp_path / "elsewhere").exists()


def test_scikit_learns_own_cache_serves_when_the_data_root_has_none(
        tmp_path: Path, posts: newsgroups.Posts, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sklearn_data"))
    cache = write_cache(tmp_path / "sklearn_data", posts)
    splits = build_newsgroups(str(tmp_path / "root"), source="sklearn")
    assert f"cache {cache}" in splits.description and len(splits.tests["test"]) == 100
    assert not (tmp_path / "root" / "newsgroups" / CACHE_FILE).exists()


def test_without_cache_or_network_the_real_source_fails_with_one_line_saying_how_to_get_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sklearn_data"))

    def offline(data_home: str, **kwargs) -> None:
        (Path(data_home) / "20news_home").mkdir(parents=True)  # as scikit-learn leaves it
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sklearn.datasets, "fetch_20newsgroups", offline)
    with pytest.raises(FileNotFoundError) as err:
        build_newsgroups(str(tmp_path), source="sklearn")
    message = str(err.value)
    assert "\n" not in message and "machine with a network" in message and CACHE_FILE in message
    assert str(tmp_path / "newsgroups") in message and "Name or service not known" in message
    assert not (tmp_path / "newsgroups").exists()  # nothing left behind
    # The app passes it on as itself (train.py prints it as one line), not wrapped by Hydra.
    with pytest.raises(FileNotFoundError, match="machine with a network"):
        run(make_cfg(tmp_path, ["dataset=newsgroups", f"paths.data_dir={tmp_path}"]), tmp_path / "run")


@pytest.mark.parametrize(("settings", "says"), [
    ({"source": "download"}, "choose one of"),
    ({"categories": ["alt.atheism", "sci.spice"]}, "two distinct groups"),
    ({"categories": ["alt.atheism"]}, "two distinct groups"),
    ({"source": "generated", "categories": ["alt.atheism", "sci.space"]}, "generated ones imitate"),
    ({"source": "generated", "val_fraction": 0}, "val_fraction"),
    ({"source": "generated", "metadata_share": 0}, "metadata_share"),
    ({"source": "generated", "generate": {"n_train": 2}}, "at least 4"),
])
def test_settings_that_cannot_work_are_refused(settings: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        build_newsgroups("unused", **settings)


def test_a_run_on_generated_posts_reports_the_metadata_region_and_the_shortcut(tmp_path: Path) -> None:
    tiny = ["dataset=newsgroups", "dataset.source=generated", "dataset.generate.n_train=120",
            "dataset.generate.n_test=60", "trainer.max_epochs=1", "trainer.progress=false"]
    run(make_cfg(tmp_path, [*tiny, "method=rrr"]), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["config"]["model"]["hidden"] == [50, 30] and record["history"][0]["penalty"] > 0
    assert 0 <= record["metrics"]["test"]["grad_in_metadata"] <= 100
    assert {"cf_metadata_swapped", "cf_metadata_removed", "cf_val_metadata_shuffled"} <= set(record["metrics"])
    # No groups (the shortcut is in every post): the group methods refuse with one line.
    for method, says in (("group_dro", "defines none"), ("dfr", "no validation groups")):
        with pytest.raises(ConfigError, match=says) as err:
            run(make_cfg(tmp_path, [*tiny, f"method={method}"]), tmp_path / method)
        assert "\n" not in str(err.value)
