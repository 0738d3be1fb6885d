"""Models from the zoos train through train.py's config path: a tiny Hugging Face classifier on
SST token ids and a tiny timm ViT on DecoyMNIST, each with CDEP, RRR and Expected Gradients (the
penalties that need the CD engine's eager capture or the input gradients of embedded tokens)."""
import json
import math
from pathlib import Path

import pytest

from cdep_exp.run import run
from test_app import make_cfg
from test_data_sst import write_trees

pytest.importorskip("transformers")
pytest.importorskip("timm")

CAPS = ["trainer.max_epochs=1", "trainer.max_steps_per_epoch=2", "trainer.batch_size=4", "trainer.progress=false"]
ZOO = {
    "hf_text": ["dataset=sst", "model=hf_text", "model.hidden_size=16", "model.heads=2", "model.intermediate_size=16",
                "model.layers=1", "model.max_len=64"],
    "hf_gpt2": ["dataset=sst", "model=hf_text", "model.model_type=gpt2", "model.hidden_size=16", "model.heads=2",
                "model.intermediate_size=16", "model.layers=1", "model.max_len=64"],
    "timm": ["dataset=decoymnist", "dataset.source=idx", "model=timm", "model.image_size=32",
             "+model.kwargs.depth=1", "+model.kwargs.embed_dim=24", "+model.kwargs.num_heads=2"],
}


@pytest.mark.parametrize("method", ["cdep", "rrr", "eg"])
@pytest.mark.parametrize("zoo", ZOO)
def test_zoo_model_trains(tmp_path: Path, fake_mnist_dir: Path, zoo: str, method: str) -> None:
    root = fake_mnist_dir if zoo == "timm" else tmp_path / "data"
    if zoo != "timm":
        write_trees(root / "sst" / "trees")
    run(make_cfg(tmp_path, [*ZOO[zoo], f"method={method}", f"paths.data_dir={root}", *CAPS]), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] != "failed" and record["epochs_run"] == 1
    assert math.isfinite(record["history"][0]["penalty"]) and record["history"][0]["penalty"] >= 0
    assert record["model"] == ("ResizedInput" if zoo == "timm" else "HuggingFaceTextClassifier")
