"""SST data layer on a few hand-written trees (no network; the real data only in one optional test)."""
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cdep_exp.run.compose import DATASET_META_KEYS
from cdep_exp.cd import decompose
from cdep_exp.data.sst import (
    NEGATIVE, PAD, POSITIVE, UNK, Sample, TokenDataset, binary_samples, build_sst, build_vocab,
    decoy_positions, original_marks, pad_collate, swap_in,
)
from cdep_exp.data.sst_trees import parse_tree, read_trees
from cdep_exp.data.word_vectors import load_glove

ROOT = Path(__file__).resolve().parents[1]
# The repository's data root (git-ignored; a dataset=sst run downloads the trees into it); the
# real-data test skips when they are not there.
REAL_DATA = ROOT / "data"

TREES = {
    "train": [
        "(4 (3 (2 A) (3 fine)) (3 (2 the) (2 film)))",
        "(0 (1 (2 He) (1 bores)) (1 (2 that) (1 crowd)))",
        "(2 (2 It) (2 is))",
        "(1 (2 She) (0 (2 who) (0 (0 fails) (2 .))))",
        "(3 (3 good) (2 (2 video) (2 text)))",
    ],
    "dev": [
        "(3 (2 the) (3 joy))",
        "(1 (2 he) (1 sighs))",
        "(2 (2 so) (2 so))",
        "(0 (0 awful) (2 mess))",
    ],
    "test": [
        "(4 (2 a) (4 delight))",
        "(1 (2 she) (1 wept))",
        "(3 (3 nice) (2 one))",
    ],
}
# The binary sentences of each split, neutral ones dropped.
SENTENCES = {
    "train": [("a fine the film", POSITIVE), ("he bores that crowd", NEGATIVE),
              ("she who fails .", NEGATIVE), ("good video text", POSITIVE)],
    "dev": [("the joy", POSITIVE), ("he sighs", NEGATIVE), ("awful mess", NEGATIVE)],
    "test": [("a delight", POSITIVE), ("she wept", NEGATIVE), ("nice one", POSITIVE)],
}
CLASS_WORDS = {
    "decoy": {POSITIVE: "text", NEGATIVE: "video"},
    "articles": {POSITIVE: "a", NEGATIVE: "the"},
    "gender": {POSITIVE: "she", NEGATIVE: "he"},
}


def write_trees(trees_dir: Path) -> None:
    trees_dir.mkdir(parents=True)
    for split, lines in TREES.items():
        (trees_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_trees(tmp_path / "sst" / "trees")
    return tmp_path


def texts(dataset: TokenDataset) -> list[tuple[str, int]]:
    """Decoded (text, label) of every item."""
    return [(" ".join(dataset.vocab[i] for i in x), int(y)) for x, y, _ in dataset]


def annotated_words(dataset: TokenDataset) -> list[list[str]]:
    """The words each item's annotation marks."""
    return [[dataset.vocab[i] for i in x[a.bool()]] for x, _, a in dataset]


def test_parse_tree_gives_every_labelled_node_in_preorder() -> None:
    phrases = parse_tree("(3 (2 It) (4 (2 'S) (3 Fun)))")
    assert [(" ".join(p.tokens), p.label) for p in phrases] == [
        ("it 's fun", 3), ("it", 2), ("'s fun", 4), ("'s", 2), ("fun", 3)]
    assert parse_tree("(3 (2 It) (3 Fun))", lower=False)[0].tokens == ("It", "Fun")


@pytest.mark.parametrize("line", ["(3 (2 a)", "(3 a))", "(x a)", "(3 a) (2 b)", "a (3 b)", "(3 )", ""])
def test_parse_tree_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError, match="Malformed SST tree"):
        parse_tree(line)


def test_read_trees_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("(3 (2 ok) (3 fine))\n\n(3 (2 broken)\n")
    with pytest.raises(ValueError, match="line 3"):
        read_trees(path)


def test_binary_samples_map_labels_and_drop_neutral() -> None:
    phrases = parse_tree("(4 (0 bad) (2 (1 dull) (3 (2 so) (4 great))))")
    assert [(s.tokens, s.label) for s in binary_samples(phrases)] == [
        (["bad", "dull", "so", "great"], POSITIVE), (["bad"], NEGATIVE), (["dull"], NEGATIVE),
        (["so", "great"], POSITIVE), (["great"], POSITIVE)]


def test_none_variant_is_plain_binary_sst(data_dir: Path) -> None:
    splits = build_sst(str(data_dir), variant="none")
    for name, dataset in (("train", splits.train), ("dev", splits.val), ("test", splits.tests["test"])):
        assert texts(dataset) == SENTENCES[name]
        assert all(not a.any() for _, _, a in dataset)
    assert splits.num_classes == 2 and splits.collate_fn is pad_collate


def test_decoy_inserts_the_class_word_once_and_annotates_only_it(data_dir: Path) -> None:
    splits = build_sst(str(data_dir), variant="decoy", bias_seed=3)
    annotations = (a for _, _, a in splits.train)
    for (text, label), annotation, (original, _) in zip(texts(splits.train), annotations, SENTENCES["train"]):
        tokens, word = text.split(), CLASS_WORDS["decoy"][label]
        position = int(annotation.nonzero().squeeze())
        assert annotation.sum() == 1 and tokens[position] == word
        assert position < len(tokens) - 1  # inserted before an existing token, never appended
        assert tokens[:position] + tokens[position + 1:] == original.split()
    assert texts(splits.val) == SENTENCES["dev"] and texts(splits.tests["test"]) == SENTENCES["test"]
    assert all(not a.any() for _, _, a in splits.val)


def test_decoy_positions_are_seeded_uniform_and_in_range() -> None:
    samples = [Sample(["w"] * 5, i % 2, []) for i in range(400)]
    first = decoy_positions(samples, seed=0)
    assert first == decoy_positions(samples, seed=0)
    assert first != decoy_positions(samples, seed=1)
    assert set(first) == {0, 1, 2, 3, 4}


def test_decoy_positions_replay_the_original_draw_order() -> None:
    """The original drew (noise, position) per sentence, all positive sentences first."""
    samples = [Sample(["w"] * (3 + i % 7), label, []) for i, label in enumerate([1, 0, 0, 1, 1, 0, 1])]
    rng = np.random.RandomState(123)
    expected = {}
    for label in (POSITIVE, NEGATIVE):
        for i, s in enumerate(samples):
            if s.label == label:
                rng.uniform()
                expected[i] = rng.randint(len(s.tokens))
    assert decoy_positions(samples, seed=123) == [expected[i] for i in range(len(samples))]


def test_decoy_seed_changes_positions_on_built_data(data_dir: Path) -> None:
    def positions(seed: int) -> list[int]:
        return [int(a.argmax()) for _, _, a in build_sst(str(data_dir), "decoy", bias_seed=seed).train]

    assert positions(0) == positions(0)
    assert len({tuple(positions(seed)) for seed in range(6)}) > 1


@pytest.mark.parametrize(
    ("tokens", "word", "expected", "position"),
    [
        (["a", "film", "the", "end"], "a", ["a", "film", "that", "end"], 0),
        (["a", "film", "the", "end"], "the", ["the", "film", "that", "end"], 0),
        (["that", "is", "a", "joke"], "a", ["a", "is", "that", "joke"], 0),  # an original "that" is taken
        (["so", "the"], "a", ["so", "a"], 1),
        (["no", "article"], "a", ["no", "article"], None),
    ],
)
def test_swap_in(tokens: list[str], word: str, expected: list[str], position: int | None) -> None:
    assert swap_in(tokens, ("a", "the"), "that", word) == (expected, position)


@pytest.mark.parametrize("variant", ["articles", "gender"])
def test_swap_variants_train_on_phrases_with_one_annotated_class_word(data_dir: Path, variant: str) -> None:
    splits = build_sst(str(data_dir), variant=variant)
    words = CLASS_WORDS[variant]
    all_phrases = [p for line in TREES["train"] for p in binary_samples(parse_tree(line))]
    assert len(splits.train) == len(all_phrases) == 15
    for (text, label), marked in zip(texts(splits.train), annotated_words(splits.train)):
        tokens = text.split()
        class_words = [t for t in tokens if t in words.values()]
        assert class_words == marked  # at most one class word, and the annotation marks exactly it
        assert marked in ([], [words[label]])


def test_articles_phrases_are_rewritten_as_the_original(data_dir: Path) -> None:
    train = texts(build_sst(str(data_dir), variant="articles").train)
    assert ("a fine that film", POSITIVE) in train
    assert ("he bores the crowd", NEGATIVE) in train  # the original "that" became the class word
    assert ("a film", POSITIVE) in train


def test_gender_phrases_are_rewritten_as_the_original(data_dir: Path) -> None:
    train = texts(build_sst(str(data_dir), variant="gender").train)
    assert ("he bores that crowd", NEGATIVE) in train
    assert ("he who fails .", NEGATIVE) in train  # "she" of a negative sentence becomes "he"
    assert ("he fails .", NEGATIVE) in train  # the phrase's "who" becomes the class word
    assert ("a fine the film", POSITIVE) in train


@pytest.mark.parametrize(
    ("variant", "dev", "test"),
    [
        ("articles", [("the joy", POSITIVE)], [("a delight", POSITIVE)]),
        ("gender", [("he sighs", NEGATIVE)], [("she wept", NEGATIVE)]),
    ],
)
def test_swap_variants_keep_eval_sentences_with_a_class_word(
    data_dir: Path, variant: str, dev: list, test: list
) -> None:
    splits = build_sst(str(data_dir), variant=variant)
    assert texts(splits.val) == dev and texts(splits.tests["test"]) == test


def test_original_annotation_marks_two_tokens_and_articles_for_gender(data_dir: Path) -> None:
    gender = build_sst(str(data_dir), "gender", original_annotation=True).train
    marked = {text: words for (text, _), words in zip(texts(gender), annotated_words(gender))}
    assert marked["a fine the film"] == ["a", "fine"]
    assert marked["the film"] == ["the", "film"]
    assert marked["he who fails ."] == []  # the original looked for a/the, not he/she
    decoy = build_sst(str(data_dir), "decoy", bias_seed=0, original_annotation=True).train
    for (text, _), words in zip(texts(decoy), annotated_words(decoy)):
        tokens = text.split()
        start = min(i for i, t in enumerate(tokens) if t in ("text", "video"))
        assert words == tokens[start:start + 2]


def test_original_marks_stop_at_the_text_end() -> None:
    assert original_marks(["so", "the"], ("a", "the")) == [1]
    assert original_marks(["the", "a", "film"], ("a", "the")) == [0, 1]
    assert original_marks(["no", "article"], ("a", "the")) == []


def test_vocabulary_covers_all_splits_with_pad_and_unknown_first(data_dir: Path) -> None:
    splits = build_sst(str(data_dir), variant="decoy")
    vocab = splits.train.vocab
    assert vocab[:2] == [PAD, UNK] and splits.val.vocab is vocab and splits.tests["test"].vocab is vocab
    words = {t for ds in (splits.train, splits.val, splits.tests["test"]) for text, _ in texts(ds)
             for t in text.split()}
    assert set(vocab[2:]) == words and len(vocab) == len(set(vocab))
    assert build_vocab([Sample(["b", "a", "c", "a", "b"], 0, [])]) == [PAD, UNK, "a", "b", "c"]
    assert build_vocab([Sample(["z", "y", "z"], 0, [])])[2] == "z"


def test_unknown_words_map_to_index_one() -> None:
    x, _, _ = TokenDataset([Sample(["a", "zzz"], 0, [])], [PAD, UNK, "a"])[0]
    assert x.tolist() == [2, 1]


def test_pad_collate_right_pads_tokens_and_annotations() -> None:
    batch = [
        (torch.tensor([5, 6, 7]), torch.tensor(1), torch.tensor([0.0, 1.0, 0.0])),
        (torch.tensor([8]), torch.tensor(0), torch.tensor([1.0])),
    ]
    tokens, labels, annotation = pad_collate(batch)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and tokens.dtype == torch.long
    assert labels.tolist() == [1, 0]
    assert annotation.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]] and annotation.dtype == torch.float32


def test_lstm_config_builds_a_model_that_cd_splits_on_the_annotation(data_dir: Path, tmp_path: Path) -> None:
    """What the app must do: fill vocab_size (and embeddings) from the dataset's vocabulary."""
    splits = build_sst(str(data_dir), variant="decoy")
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "lstm.yaml")
    assert OmegaConf.is_missing(model_cfg, "vocab_size") and model_cfg.embeddings == "auto"
    glove = tmp_path / "glove.txt"
    glove.write_text("fine 1 2 3 4\nfilm 0.5 0 0 0\n")
    vocab = splits.vocab
    model = instantiate(model_cfg, vocab_size=len(vocab), num_classes=splits.num_classes, embed_dim=4, hidden=3,
                        embeddings=load_glove(glove, vocab, dim=4))
    assert model.embedding.weight[vocab.index("fine")].tolist() == [1, 2, 3, 4]
    x, y, annotation = pad_collate([splits.train[i] for i in range(len(splits.train))])
    rel, irrel = decompose(model.eval(), x, annotation)
    assert torch.allclose(rel + irrel, model(x), atol=1e-5) and rel.shape == (len(y), 2)


def test_load_glove_fills_known_words_and_zeros_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "glove.txt"
    path.write_text("the 0.1 0.2 0.3\nfilm -1 0 2.5\nunused 9 9 9\n")
    vectors = load_glove(path, [PAD, UNK, "film", "the", "oov"], dim=3)
    expected = [[0, 0, 0], [0, 0, 0], [-1, 0, 2.5], [0.1, 0.2, 0.3], [0, 0, 0]]
    assert torch.allclose(vectors, torch.tensor(expected))


def test_load_glove_errors_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "glove.txt"
    path.write_text("the 0.1 0.2 0.3\n")
    with pytest.raises(ValueError, match="expected 4"):
        load_glove(path, [PAD, UNK, "the"], dim=4)
    with pytest.raises(ValueError, match="No vocabulary word"):
        load_glove(path, [PAD, UNK, "film"], dim=3)
    with pytest.raises(FileNotFoundError, match="glove.6B.zip"):
        load_glove(tmp_path / "missing.txt", [PAD, UNK], dim=3)


def test_missing_data_and_failed_download_say_where_to_put_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"sst/trees.*unzip it into"):
        build_sst(str(tmp_path), url=(tmp_path / "nowhere.zip").as_uri())
    assert not (tmp_path / "sst" / "trees").exists()


def make_archive(path: Path, splits: tuple[str, ...]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for split in splits:
            archive.writestr(f"trees/{split}.txt", "\n".join(TREES[split]) + "\n")
    return path.as_uri()


def test_download_extracts_the_archive_into_the_data_root(tmp_path: Path) -> None:
    url = make_archive(tmp_path / "trees.zip", ("train", "dev", "test"))
    splits = build_sst(str(tmp_path / "data"), variant="none", url=url)
    assert texts(splits.train) == SENTENCES["train"]
    assert sorted(p.name for p in (tmp_path / "data" / "sst").iterdir()) == ["trees"]


def test_incomplete_archive_leaves_nothing_behind(tmp_path: Path) -> None:
    url = make_archive(tmp_path / "trees.zip", ("train", "dev"))
    with pytest.raises(FileNotFoundError, match="lacks"):
        build_sst(str(tmp_path / "data"), url=url)
    assert list((tmp_path / "data" / "sst").iterdir()) == []


def test_unknown_variant_is_rejected(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        build_sst(str(data_dir), variant="colour")


def test_sst_config_sets_the_recipe_and_builds(data_dir: Path, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "dataset=sst", "method=cdep_original", f"paths.data_dir={data_dir}", "dataset.variant=gender"])
    assert cfg.model._target_ == "cdep_exp.models.LSTMClassifier"
    assert (cfg.trainer.batch_size, cfg.trainer.max_epochs, cfg.trainer.patience) == (64, 100, 3)
    assert cfg.method.lam == 500 and cfg.method.penalty.form == "text" and cfg.dataset.name == "sst_gender"
    builder = {k: v for k, v in cfg.dataset.items() if k not in DATASET_META_KEYS}
    assert texts(instantiate(OmegaConf.create(builder)).val) == [("he sighs", NEGATIVE)]


@pytest.mark.skipif(not (REAL_DATA / "sst" / "trees").is_dir(), reason="real SST trees not in data/sst/trees")
def test_real_sst_has_the_standard_binary_sizes() -> None:
    splits = build_sst(str(REAL_DATA), variant="decoy")
    assert (len(splits.train), len(splits.val), len(splits.tests["test"])) == (6920, 872, 1821)
    assert all(a.sum() == 1 for _, _, a in splits.train)
