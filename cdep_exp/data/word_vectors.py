"""Pretrained word vectors for a vocabulary (GloVe text format), shared by text datasets."""
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def load_glove(path: str | os.PathLike, itos: Sequence[str], dim: int = 300) -> torch.Tensor:
    """Embedding rows (len(itos), dim) from a GloVe text file (one word and `dim` numbers per
    line, e.g. glove.6B.300d.txt from https://nlp.stanford.edu/data/glove.6B.zip, the original's
    choice). Words the file lacks, padding and unknown get zero rows, as in the original."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"GloVe file {path} not found. Download https://nlp.stanford.edu/data/glove.6B.zip, "
            f"unzip it and set model.embeddings to glove.6B.300d.txt's path (null: random init)."
        )
    stoi = {word: i for i, word in enumerate(itos)}
    vectors = torch.zeros(len(itos), dim)
    found = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            word, _, values = line.rstrip().partition(" ")
            if word not in stoi:
                continue
            numbers = values.split(" ")
            if len(numbers) != dim:
                raise ValueError(
                    f"{path}, line {number}: {len(numbers)} numbers for {word!r}, expected {dim}; "
                    f"set model.embed_dim to the file's dimension."
                )
            vectors[stoi[word]] = torch.tensor([float(v) for v in numbers])
            found += 1
    if found == 0:
        raise ValueError(f"No vocabulary word occurs in {path}; is it a GloVe text file?")
    log.info("GloVe %s covers %d of %d vocabulary words", path.name, found, len(itos))
    return vectors
