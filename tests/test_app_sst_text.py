"""SST end to end with the gradient penalties and the word-vector chain (tiny trees, package GloVe)."""
import json
from pathlib import Path

import pytest

from cdep_exp.run import run
from test_app import make_cfg
from test_data_sst import write_trees


def tiny_sst(tmp_path: Path, *overrides: str) -> dict:
    write_trees(tmp_path / "data" / "sst" / "trees")
    base = ["dataset=sst", "model.hidden=4", "trainer.max_epochs=2", "trainer.batch_size=4",
            "trainer.progress=false", "trainer.patience=null"]
    run(make_cfg(tmp_path, [*base, *overrides]), tmp_path / "run")
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["rrr", "eg"])
def test_gradient_penalties_train_the_sst_lstm_on_glove_50d(tmp_path: Path, method: str) -> None:
    record = tiny_sst(tmp_path, f"method={method}")
    assert record["method"] == method and record["lam"] > 0  # the SST default λ is set
    assert record["config"]["model"]["embeddings"] == "auto"
    assert record["config"]["model"]["embed_dim"] == 50  # written back from the package's vectors
    # (EG's references come from the batch, itself included: some batch may score 0.)
    assert sum(h["penalty"] for h in record["history"]) > 0 and len(record["history"]) == 2
    assert 0 <= record["metrics"]["test"]["accuracy"] <= 100


def test_random_embeddings_keep_the_configured_dimension(tmp_path: Path) -> None:
    record = tiny_sst(tmp_path, "method=rrr", "model.embeddings=null", "model.embed_dim=8")
    assert record["config"]["model"]["embed_dim"] == 8 and record["history"][0]["penalty"] > 0
