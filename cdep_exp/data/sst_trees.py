"""Stanford Sentiment Treebank in PTB form: fetch the official archive and read its trees.

Each line of `trees/{train,dev,test}.txt` is one sentence as a binarised parse such as
`(3 (2 It) (4 (2 's) (3 fun)))`: every node carries SST's sentiment label, 0 (very negative) to
4 (very positive), and the leaves are the sentence's tokens.
"""
import io
import os
import re
import tempfile
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cdep_exp.data.download import fetch

SST_URL = "https://nlp.stanford.edu/sentiment/trainDevTestTrees_PTB.zip"
SPLITS = ("train", "dev", "test")
LABELS = frozenset("01234")

_PIECE = re.compile(r"\(|\)|[^\s()]+")


@dataclass(frozen=True)
class Phrase:
    """One labelled node of a tree: the tokens it spans and SST's 0–4 sentiment label."""

    tokens: tuple[str, ...]
    label: int


def parse_tree(line: str, lower: bool = True) -> list[Phrase]:
    """Every labelled node of one tree, in pre-order, so index 0 is the whole sentence.

    Single-word nodes are phrases too, as in torchtext's `train_subtrees` (which the original
    used). Tokens are lower-cased when `lower`, as the original's text field did.
    """
    phrases: list[Phrase | None] = []
    labels: list[int] = []
    open_nodes: list[tuple[int, list[str]]] = []  # (index in phrases, tokens read so far)
    pieces = iter(_PIECE.findall(line))
    for piece in pieces:
        if piece == "(":
            label = next(pieces, "")
            if label not in LABELS or (phrases and not open_nodes):
                raise ValueError(f"Malformed SST tree (expected one '(label ...' tree): {line[:80]!r}")
            open_nodes.append((len(phrases), []))
            phrases.append(None)
            labels.append(int(label))
        elif piece == ")":
            if not open_nodes or not open_nodes[-1][1]:
                raise ValueError(f"Malformed SST tree (unbalanced or empty node): {line[:80]!r}")
            index, tokens = open_nodes.pop()
            phrases[index] = Phrase(tuple(tokens), labels[index])
            if open_nodes:
                open_nodes[-1][1].extend(tokens)
        elif open_nodes:
            open_nodes[-1][1].append(piece.lower() if lower else piece)
        else:
            raise ValueError(f"Malformed SST tree (word outside the tree): {line[:80]!r}")
    if open_nodes or not phrases:
        raise ValueError(f"Malformed SST tree (unclosed or empty): {line[:80]!r}")
    return phrases


def read_trees(path: str | os.PathLike, lower: bool = True) -> list[list[Phrase]]:
    """The phrases of every tree in a file (one tree per non-blank line), in file order."""
    trees = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                trees.append(parse_tree(line, lower))
            except ValueError as err:
                raise ValueError(f"{path}, line {number}: {err}") from err
    return trees


def ensure_sst_trees(data_dir: str | os.PathLike, url: str = SST_URL) -> Path:
    """The folder `<data_dir>/sst/trees` holding train/dev/test.txt, downloaded from `url` if missing."""
    trees_dir = Path(data_dir) / "sst" / "trees"
    if all((trees_dir / f"{split}.txt").is_file() for split in SPLITS):
        return trees_dir
    try:
        _download_trees(url, trees_dir)
    except (urllib.error.URLError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise FileNotFoundError(
            f"SST trees not found in {trees_dir} (need {', '.join(s + '.txt' for s in SPLITS)}) "
            f"and the download from {url} failed ({err}). On a machine with network access, "
            f"download {url} and unzip it into {trees_dir.parent} (it holds the trees/ folder)."
        ) from err
    return trees_dir


def _download_trees(url: str, trees_dir: Path, timeout: float = 30.0) -> None:
    """Fetch the zip archive and move its trees/ folder into place in one rename, so an
    interrupted download or extraction never leaves a partial `trees_dir` behind."""
    payload = fetch(url, timeout)
    trees_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=trees_dir.parent, prefix=".trees.") as tmp:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            archive.extractall(tmp)
        extracted = Path(tmp) / "trees"
        missing = [f"trees/{s}.txt" for s in SPLITS if not (extracted / f"{s}.txt").is_file()]
        if missing:
            raise ValueError(f"the archive lacks {missing}")
        os.replace(extracted, trees_dir)
