"""Accuracy against λ per method (paper Fig. S2) from the table runs, written under results/figures/.

    python -m cdep_exp.reporting --figures --scale quick     # results/figures/quick/*.png

One figure per Table 2 dataset (ColorMNIST is the paper's Fig. S2), with the shortcut metric
(flipped predictions under the counterfactual) against λ beside accuracy, and one per Table 4
SST variant. The RRR paper's tables get accuracy and input-gradient location against λ
(Iris-Cancer; Decoy MNIST, the paper's Figure 9), for Toy Colors against the share of
annotated training images (the paper's Figure 3), and for find-another-explanation per model of
the iteration (the paper's Figure 10). The shortcut benchmark gets one figure of test accuracy against flips, a panel per
dataset and a point per method and λ (shortcut_tradeoff.png). Other scripts (e.g. ISIC heatmaps) write their figures into results/figures/ too;
the notebooks show them all.
"""
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from cdep_exp.reporting.archive import archive_dir
from cdep_exp.reporting.tables import (BENCHMARK_DATASETS, BENCHMARK_METHODS, CLEAN, FAE_DATASETS, TABLES, build,
                                       load, scored)

# (table, column that splits it into figures (None: one figure), rows kept, panels: (metric column, y label))
FIGURES = (
    ("table2", "dataset", None, (("accuracy", "test accuracy (%)"),
                                 ("flip_rate", "flipped by the shortcut edit (%)"))),
    ("table4", "variant", ("protocol", "corrected"), (("accuracy", "test accuracy (%), best-dev-loss epoch"),)),
    ("rrr_iris", None, None, (("accuracy", "test accuracy (%)"), ("without_iris", "test accuracy without Iris (%)"),
                              ("grad_in_iris", "top input gradients on Iris (%)"))),
    ("rrr_decoy", None, None, (("train", "train accuracy (%)"), ("accuracy", "test accuracy (%)"),
                               ("grad_in_corners", "top input gradients on the corners (%)"))),
)


def against_lam(ax, runs: pd.DataFrame, metric: str, ylabel: str) -> None:
    """Mean ± std over seeds of `metric` against λ (log axis) for each penalised method; the
    unpenalised model (λ 0, which a log axis cannot show) as a dashed line with its ±std band."""
    for method, group in runs[runs["lam"] > 0].groupby("method", sort=False):
        stats = group.groupby("lam")[metric].agg(["mean", "std"]).sort_index()
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3, label=method)
    vanilla = runs.loc[runs["lam"] == 0, metric].dropna()
    if not vanilla.empty:
        mean, std = vanilla.mean(), vanilla.std() if len(vanilla) > 1 else 0.0
        ax.axhline(mean, color="grey", linestyle="--", label="Vanilla (λ = 0)")
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("λ")
    ax.set_ylabel(ylabel)


def lambda_figure(runs: pd.DataFrame, panels: tuple[tuple[str, str], ...], title: str) -> Figure:
    """One panel per (metric, y label) against λ, side by side, with one legend."""
    fig = Figure(figsize=(5.5 * len(panels), 3.8))  # no pyplot: no GUI backend, nothing global to close
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, ylabel) in zip(axes, panels):
        against_lam(ax, runs, metric, ylabel)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def lambda_figures(scale: str, outputs: Path, results: Path | None = None) -> dict[str, Figure]:
    """One figure per Table 2 dataset and Table 4 variant, and one per RRR-paper λ table
    (Iris-Cancer, Decoy MNIST), with finished runs, by file stem. `results`: as `finished_runs`."""
    made = {}
    for table, split, keep, panels in FIGURES:
        runs = finished_runs(table, scale, outputs, results)
        if keep and not runs.empty:
            runs = runs[runs[keep[0]] == keep[1]]
        if runs.empty:
            continue
        if split is None:
            made[f"{table}_lambda"] = lambda_figure(runs.assign(method=runs["row"]), panels,
                                                    f"{TABLES[table].title.split(':')[0]}: against λ ({scale} scale)")
            continue
        for name, group in runs.groupby(split):
            stem = f"{table}_{str(name).lower().replace(' ', '_')}_lambda"
            made[stem] = lambda_figure(group, panels, f"{name}: against λ ({scale} scale)")
    return made


def annotated_share_figure(runs: pd.DataFrame, title: str) -> Figure:
    """Toy Colors (the RRR paper's Figure 3): test accuracy and the % of the largest input
    gradients on each rule's pixels against the share of annotated training images (symmetric
    log axis, so 0 % shows), mean ± std over seeds; the unpenalised model as dashed lines."""
    fig = Figure(figsize=(11, 3.8))
    left, right = fig.subplots(1, 2)
    penalised = runs[runs["lam"] > 0].assign(share=runs["dataset.annotated_fraction"].astype(float) * 100)
    vanilla = runs[runs["lam"] == 0]
    for ax, metrics in ((left, (("accuracy", "test accuracy"),)),
                        (right, (("grad_in_corners", "corners"), ("grad_in_top_middle", "top middle")))):
        for i, (metric, label) in enumerate(metrics):
            stats = penalised.groupby("share")[metric].agg(["mean", "std"]).sort_index()
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3,
                        color=f"C{i}", label=f"RRR: {label}")
            if not vanilla.empty:
                ax.axhline(vanilla[metric].mean(), color=f"C{i}", linestyle="--", label=f"Vanilla: {label}")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.2, 150)
        ax.set_xticks([0, 1, 10, 100], ["0", "1", "10", "100"])
        ax.set_xlabel("training images with the corners annotated (%)")
        ax.legend(fontsize="small")
    left.set_ylabel("test accuracy (%)")
    right.set_ylabel("top input gradients on the rule's pixels (%)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def has_records(table: str, scale: str, outputs: Path, results: Path | None) -> bool:
    """Whether outputs/<scale>/<table>/ or the table's run archive under `results` holds a record."""
    roots = [Path(outputs) / scale / table] + ([archive_dir(results, table)] if results is not None else [])
    return any(next(root.glob("**/metrics.json"), None) for root in roots if root.is_dir())


def finished_runs(table: str, scale: str, outputs: Path, results: Path | None = None) -> pd.DataFrame:
    """The table's finished runs, labelled and scored, those of its run archive under `results`
    (the scale's results folder) included; empty, without composing its presets, when nothing
    of the table was trained at this scale."""
    if not has_records(table, scale, outputs, results):
        return pd.DataFrame()
    return scored(TABLES[table], load(table, scale, outputs, results=results).found)


def tradeoff_figure(lines: pd.DataFrame, title: str) -> Figure:
    """Test accuracy against the % of predictions flipped by the shortcut edit, one panel per
    dataset, one marker per method, one point per λ (mean over seeds; bars: std). `lines`: one
    per dataset, method and λ with `accuracy mean/std` and `flip_rate mean/std`
    (`Table.every_lam_numbers`). Up and to the left is better: accurate without reading the shortcut."""
    datasets = [d for d in BENCHMARK_DATASETS.values() if d in set(lines["dataset"])]
    columns = min(3, len(datasets))
    rows = -(-len(datasets) // columns)
    # The legend names up to 12 methods below the panels: wide enough for it, a line per `ncol` methods.
    ncol = 6 if columns == 3 else 4
    methods = sum(method in set(lines["method"]) for method in BENCHMARK_METHODS.values())
    legend = 0.3 * -(-methods // ncol) + 0.3
    height = 4.0 * rows + legend + 0.4
    fig = Figure(figsize=(max(5.0 * columns, 12.0), height))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    markers = "os^vD<>phX*P"
    colours = [f"C{i}" for i in range(10)] + ["black", "olive"]
    handles = {}
    for ax, dataset in zip(axes, datasets):
        group = lines[lines["dataset"] == dataset]
        for i, method in enumerate(BENCHMARK_METHODS.values()):
            points = group[group["method"] == method].sort_values("lam")
            if points.empty:
                continue
            handles[method] = ax.errorbar(
                points["flip_rate mean"], points["accuracy mean"], xerr=points["flip_rate std"].fillna(0),
                yerr=points["accuracy std"].fillna(0), marker=markers[i], color=colours[i], linestyle="-",
                linewidth=0.8, capsize=2, label=method)
        ax.set_title(dataset)
        ax.set_xlabel("flipped by the shortcut edit (%)")
        ax.set_ylabel("test accuracy (%)")
    for ax in axes[len(datasets):]:
        ax.set_visible(False)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, legend / height, 1, 1))
    return fig


def tradeoff_figures(scale: str, outputs: Path, results: Path | None = None) -> dict[str, Figure]:
    """The benchmark's accuracy-against-flips figure, when it has finished runs (`results`: as
    `finished_runs`), from the table's Every-λ lines: its carried-over rows included."""
    # Composing its 70 presets takes a while: only when there is something to plot.
    if not has_records("shortcut", scale, outputs, results):
        return {}
    lines = build("shortcut", scale, outputs, results=results).every_lam_numbers()
    if lines.empty:
        return {}
    return {"shortcut_tradeoff": tradeoff_figure(lines, f"Shortcut benchmark: accuracy against shortcut reliance "
                                                        f"({scale} scale, every λ)")}


def iterations_figure(runs: pd.DataFrame, title: str) -> Figure:
    """Find-another-explanation (the RRR paper's Figure 10): per dataset, test accuracy, accuracy
    without the shortcut and the % of the largest gradients on it for each model of the
    iteration (mean ± std over seeds); the clean-digits model as a dashed line."""
    datasets = [d for d in FAE_DATASETS.values() if d in set(runs["dataset"])]
    fig = Figure(figsize=(5.5 * len(datasets), 3.8))
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        group = runs[runs["dataset"] == dataset]
        models = group[group["model"].str.startswith("model ")]
        index = models["model"].str.removeprefix("model ").astype(int)
        for i, (metric, label) in enumerate((("accuracy", "test accuracy"), ("without", "without the shortcut"),
                                             ("on_shortcut", "top gradients on the shortcut"))):
            stats = models.assign(i=index).groupby("i")[metric].agg(["mean", "std"]).sort_index()
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3,
                        color=f"C{i}", label=label)
        clean = group.loc[group["model"] == CLEAN, "accuracy"].dropna()
        if not clean.empty:
            ax.axhline(clean.mean(), color="grey", linestyle="--", label=CLEAN)
        ax.set_xticks(sorted(index.unique()))
        ax.set_xlabel("model (iteration of find-another-explanation)")
        ax.set_ylabel("%")
        ax.set_title(dataset)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# Figures of one table each: (file stem, table, drawing function, title).
TABLE_FIGURES = (
    ("rrr_toy_colors_share", "rrr_toy_colors", annotated_share_figure,
     "RRR paper, Toy Colors: which rule as annotations grow"),
    ("rrr_fae_iterations", "rrr_fae", iterations_figure, "RRR paper, find-another-explanation: each model of the iteration"),
)


def table_figures(scale: str, outputs: Path, results: Path | None = None) -> dict[str, Figure]:
    """The TABLE_FIGURES whose table has finished runs, by file stem (`results`: as `finished_runs`)."""
    made = {}
    for stem, table, draw, title in TABLE_FIGURES:
        runs = finished_runs(table, scale, outputs, results)
        if not runs.empty:
            made[stem] = draw(runs, f"{title} ({scale} scale)")
    return made


def write_figures(scale: str, outputs: Path, out_dir: Path, results: Path | None = None) -> list[Path]:
    """The λ figures and the benchmark's trade-off figure as PNG files under out_dir, from the
    runs under outputs/ and, with `results` (the scale's results folder), the tables' run
    archives there; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figures = {**lambda_figures(scale, outputs, results), **tradeoff_figures(scale, outputs, results),
               **table_figures(scale, outputs, results)}
    for stem, fig in figures.items():
        fig.savefig(out_dir / f"{stem}.png", dpi=120)
        written.append(out_dir / f"{stem}.png")
    return written
