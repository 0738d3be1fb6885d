"""The explanation pictures and timing table (cdep_exp.tools.explain): attribution maps of models
whose one used feature is known, the figures' panels, and the command on tiny real runs."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from cdep_exp.models import LSTMClassifier
from cdep_exp.penalties.eg import expected_gradients
from cdep_exp.run import run
from cdep_exp.tools import explain
from cdep_exp.tools.attributions import cd_map, eg_map, feature_groups, gradient_map
from cdep_exp.tools.explain_figures import FIGURES, Panel, SampleView, annotated_share, outline
from cdep_exp.tools.lime_maps import LimeExplainer
from test_app import make_cfg


def reads_column(column: int, features: int = 6) -> nn.Module:
    """A linear classifier whose logits depend on one input column only."""
    model = nn.Linear(features, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, column], model.weight[1, column] = 2.0, -2.0
        model.bias.zero_()
    return model.eval()


class ReadsPatch(nn.Module):
    """Logits from the mean of one 2 × 2 corner patch of a (1, 6, 6) image."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(9, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[0, 0], self.head.weight[1, 0] = 3.0, -3.0
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x).flatten(1))


class ReadsWord(nn.Module):
    """A bag of words whose only non-zero word vector is word `word`'s: it reads that word alone."""

    def __init__(self, vocab: int, word: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 3, padding_idx=0)
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.embedding.weight.zero_()
            self.embedding.weight[word] = torch.tensor([1.0, 0.5, -0.5])
        self.eval()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)

    def forward_embedded(self, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(embedded.sum(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(self.embed(tokens), tokens)


def share_on(values: torch.Tensor, feature: int) -> float:
    return float(values.abs()[..., feature].sum() / values.abs().sum())


def test_every_method_puts_a_one_column_model_on_that_column() -> None:
    torch.manual_seed(0)
    model, x, y = reads_column(3), torch.randn(4, 6), torch.tensor([0, 1, 0, 1])
    train = torch.randn(200, 6)
    maps = {"grad": gradient_map(model, x), "cd": cd_map(model, x, y), "eg": eg_map(model, x, y, train, draws=32),
            "lime": torch.stack([LimeExplainer(model, train).explain(x[i], int(y[i])) for i in range(2)])}
    for name, values in maps.items():
        assert share_on(values, 3) > (0.999 if name != "lime" else 0.9), name


def test_image_maps_sit_on_the_patch_the_model_reads() -> None:
    torch.manual_seed(0)
    model, x, y = ReadsPatch().eval(), torch.randn(3, 1, 6, 6), torch.tensor([0, 1, 1])
    patch = torch.zeros(6, 6)
    patch[:2, :2] = 1
    groups = feature_groups(x, 2)
    assert groups.shape == (9, 1, 1, 6, 6)
    for values in (gradient_map(model, x), cd_map(model, x, y, groups), eg_map(model, x, y, torch.randn(50, 1, 6, 6), 16)):
        assert values.shape == (3, 6, 6)
        assert all(annotated_share(v, patch) > 0.999 for v in values)
    lime = LimeExplainer(model, torch.randn(50, 1, 6, 6), patch=2).explain(x[0], 0)
    assert lime.shape == (6, 6) and annotated_share(lime, patch) > 0.9


def test_cd_of_a_patch_alone_is_its_centred_relevant_logit() -> None:
    torch.manual_seed(1)
    model, x, y = ReadsPatch().eval(), torch.randn(1, 1, 6, 6), torch.tensor([0])
    values = cd_map(model, x, y, feature_groups(x, 2))
    logits = model(x)[0].detach()  # a linear model: the patch's rel is all of the logits but the zero bias
    assert values[0, 0, 0] == pytest.approx(float(logits[0] - logits.mean()), rel=1e-5)


def test_text_maps_sit_on_the_word_the_model_reads() -> None:
    torch.manual_seed(0)
    model = ReadsWord(10, 7)
    x = torch.tensor([[3, 7, 2, 5], [7, 4, 0, 0]])
    y = torch.tensor([0, 1])
    train = torch.randint(1, 7, (40, 5))  # references without the word: EG credits only x's own
    cd, eg = cd_map(model, x, y), eg_map(model, x, y, train, draws=16)
    assert cd.shape == eg.shape == (2, 4)
    assert share_on(cd[0], 1) > 0.999 and share_on(cd[1], 0) > 0.999
    assert share_on(eg[0], 1) > 0.999 and share_on(eg[1], 0) > 0.999
    assert gradient_map(model, x).shape == (2, 4)
    vocab = ["<pad>", "<unk>"] + [f"w{i}" for i in range(2, 10)]
    lime = LimeExplainer(model, train, vocab).explain(x[0], 0)
    assert lime.shape == (4,) and share_on(lime, 1) > 0.9


def test_expected_gradients_sum_to_the_probability_gap_on_a_linear_path() -> None:
    """Completeness in expectation, exact for one reference: Σ_i EG_i = p_y(x) − p_y(ref) as draws grow."""
    torch.manual_seed(0)
    model, x, y = reads_column(1, 3), torch.randn(1, 3), torch.tensor([0])
    ref = torch.randn(1, 3)
    total = expected_gradients(model, x, y, ref, draws=4000).sum()
    with torch.no_grad():
        gap = torch.softmax(model(x), 1)[0, 0] - torch.softmax(model(ref), 1)[0, 0]
    assert float(total) == pytest.approx(float(gap), abs=0.02)


def panels(samples: int, runs: int, methods: int, shape: tuple[int, ...]) -> list[list[list[Panel]]]:
    return [[[Panel(torch.randn(shape), True) for _ in range(methods)] for _ in range(runs)] for _ in range(samples)]


@pytest.mark.parametrize("kind", ["image", "table", "text"])
def test_figures_have_a_panel_per_sample_run_and_method(kind: str) -> None:
    shape = {"image": (5, 5), "table": (6,), "text": (4,)}[kind]
    x = {"image": torch.rand(3, 5, 5), "table": torch.randn(6), "text": ["a", "b", "c", "d"]}[kind]
    annotation = torch.zeros(shape)
    annotation.view(-1)[0] = 1
    samples = [SampleView(x, 0, annotation, "test[0]") for _ in range(2)]
    fig = FIGURES[kind](samples, ["vanilla", "rrr λ=100"], ["grad", "cd", "eg"], panels(2, 2, 3, shape), "t")
    if kind == "image":
        assert len(fig.axes) == 2 * 2 * (3 + 1)  # a row per (sample, run): input + 3 methods
    elif kind == "table":
        assert len(fig.axes) == 2 * 2 * 3
    else:
        words = [t.get_text() for t in fig.axes[0].texts]
        assert words.count("c") == 2 * 2 * 3


@pytest.fixture(scope="module")
def iris_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny Iris-Cancer runs (vanilla, RRR), a second each."""
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for method in ("vanilla", "rrr"):
        overrides = ["dataset=iris_cancer", f"method={method}", "trainer.max_epochs=3", "trainer.progress=false"]
        run(make_cfg(root, overrides), root / method)
        dirs.append(root / method)
    return dirs


def test_command_draws_the_runs_and_writes_the_timing_table(iris_runs: list[Path], tmp_path: Path) -> None:
    written = explain.main([*map(str, iris_runs), "--out", str(tmp_path / "figs"), "--samples", "2",
                            "--eg-draws", "8", "--timing", str(tmp_path / "t" / "rrr_table1"),
                            "--timing-samples", "2"])
    png = tmp_path / "figs" / "iris_cancer.png"
    assert png in written and imread(png).shape[0] > 300
    with open(tmp_path / "t" / "rrr_table1.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["dataset"] == "iris_cancer" and float(rows[0]["CD groups"]) == 34
    for column in ("grad (s)", "cd (s)", "eg (s)", "lime (s)"):
        assert float(rows[0][column]) > 0
    # LIME fits a model to 5,000 perturbed rows; one gradient is one backward pass.
    assert float(rows[0]["lime (s)"]) > float(rows[0]["grad (s)"])
    assert "Seconds per explanation" in (tmp_path / "t" / "rrr_table1.md").read_text()


def test_samples_are_the_shortcut_test_set_s_annotated_ones(iris_runs: list[Path]) -> None:
    restored = explain.load_groups(iris_runs[:1], None)[0][0]
    batch = explain.pick_samples(restored.splits, None, 3, 0, None, 30)
    assert batch.split == "test" and batch.x.shape == (3, 34)
    assert batch.annotation[:, :4].eq(1).all() and batch.annotation[:, 4:].eq(0).all()
    again = explain.pick_samples(restored.splits, "test", 2, 0, [5, 1], 30)
    assert again.indices == [5, 1]


def test_a_method_that_cannot_explain_the_model_says_why() -> None:
    model, tokens = LSTMClassifier(20, 8, 6).eval(), torch.randint(1, 20, (2, 5))
    batch = explain.Batch(tokens, torch.tensor([0, 1]), torch.zeros(2, 5), [5, 5], [0, 1], "test")

    class Plain(nn.Module):  # token ids in, but no embed/forward_embedded: no input gradient
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    restored = type("R", (), {"model": Plain().eval(), "splits": type("S", (), {"vocab": None})()})()
    out = explain.Explainers(restored, tokens, None, 4, 0).panels(["grad"], batch)
    assert out[0][0].values is None and "not available" in out[0][0].note


def test_unknown_methods_are_refused() -> None:
    with pytest.raises(SystemExit):
        explain.parse_args(["run", "--out", "x", "--methods", "grad,shap"])
    with pytest.raises(SystemExit):
        explain.parse_args(["run"])


def test_outline_follows_pixel_edges() -> None:
    mask = np.zeros((5, 5))
    mask[:2, :2] = 1  # a 2 × 2 corner: 8 pixel edges around it
    segments = outline(mask)
    assert len(segments) == 8 and ((-0.5, -0.5), (0.5, -0.5)) in segments


def test_a_wide_table_shows_each_sample_s_weightiest_columns_by_name() -> None:
    features, names = 100, [f"word{i}" for i in range(100)]
    values = torch.zeros(features)
    values[[7, 42]] = torch.tensor([1.0, -0.5])
    panel = [[Panel(values, True)]]
    annotation = torch.zeros(features)
    fig = FIGURES["table"]([SampleView(torch.zeros(features), 0, annotation, "t")], ["vanilla"], ["cd"],
                           [panel], "t", names=names, limit=5)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) == 5 and "word7" in labels and "word42" in labels
