"""The pictures of `cdep_exp.tools.explain`: attribution maps of a few samples under several runs,
as heat maps over images, coloured words of texts, or bars over table columns.

Every map is scaled by its own largest |value|, so a panel shows where one explanation puts its
weight, not how large it is next to another run's. Red is weight for the sample's true class
(or a large gradient, which has no sign here), blue weight against it. The annotated features
(what the penalty says must not matter) are outlined in green (images), boxed (words) or drawn
as orange bars (tables); each panel gives the share of its |attribution| that lies on them.
"""
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from torch import Tensor

ANNOTATION_COLOUR = "#1b9e3a"
TABLE_COLOURS = ("#7f8c99", "#f28e2b")  # other columns, annotated columns


@dataclass
class Panel:
    """One explanation of one sample: its map (display shape, None where the method failed,
    with `note` saying why) and whether it is signed."""

    values: Tensor | None
    signed: bool
    note: str = ""


@dataclass
class SampleView:
    """What is drawn of one sample: the input (C, H, W image, (d,) row, or words), its true
    class, the annotation in display shape (0/1), and a heading."""

    x: Tensor | list[str]
    label: int
    annotation: Tensor
    heading: str


def annotated_share(values: Tensor, annotation: Tensor) -> float:
    """Share of Σ|values| that lies on the annotated features (0 where all values are 0)."""
    magnitude = values.abs().double()
    total = float(magnitude.sum())
    return float((magnitude * (annotation > 0)).sum()) / total if total > 0 else 0.0


def share_legend(annotation: Tensor, unit: str, marked: str) -> str:
    """What a panel's percentage means, against the share of features the annotation covers."""
    return (f"% on annot.: share of |attribution| on the annotated {unit} ({marked}: "
            f"{100 * float((annotation > 0).float().mean()):.0f}% of the {unit})")


def scaled(values: Tensor) -> np.ndarray:
    """values / max |values| as numpy (all zero stays zero)."""
    peak = float(values.abs().max()) if values.numel() else 0.0
    return (values / peak).double().numpy() if peak > 0 else np.zeros(tuple(values.shape))


def colours(v: np.ndarray) -> np.ndarray:
    """RGBA per value in [−1, 1]: red for positive, blue for negative, opacity |v|."""
    rgba = np.zeros(v.shape + (4,))
    rgba[..., 0] = np.where(v >= 0, 0.85, 0.1)
    rgba[..., 1] = 0.1
    rgba[..., 2] = np.where(v >= 0, 0.1, 0.85)
    rgba[..., 3] = np.clip(np.abs(v), 0, 1)
    return rgba


def _image_background(x: Tensor) -> tuple[np.ndarray, str | None]:
    """The image to show under a map: grey (H, W) for one channel, RGB scaled to [0, 1] else."""
    low, high = float(x.min()), float(x.max())
    unit = ((x - low) / (high - low if high > low else 1.0)).double()
    return (unit[0].numpy(), "gray") if x.shape[0] == 1 else (unit.permute(1, 2, 0).numpy(), None)


def outline(mask: np.ndarray) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The pixel edges between marked and unmarked pixels (or the image's border) of a 0/1 mask
    (H, W), as line segments in imshow's coordinates (pixel centres at integers)."""
    marked = np.pad(mask > 0, 1)
    segments = []
    for i, j in zip(*np.nonzero(marked)):
        y, x = i - 1, j - 1
        if not marked[i - 1, j]:
            segments.append(((x - 0.5, y - 0.5), (x + 0.5, y - 0.5)))
        if not marked[i + 1, j]:
            segments.append(((x - 0.5, y + 0.5), (x + 0.5, y + 0.5)))
        if not marked[i, j - 1]:
            segments.append(((x - 0.5, y - 0.5), (x - 0.5, y + 0.5)))
        if not marked[i, j + 1]:
            segments.append(((x + 0.5, y - 0.5), (x + 0.5, y + 0.5)))
    return segments


def _note(ax, panel: Panel, annotation: Tensor) -> None:
    text = panel.note if panel.values is None else f"{100 * annotated_share(panel.values, annotation):.0f}% on annot."
    ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=7, va="bottom", ha="left",
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75))


def image_figure(samples: list[SampleView], runs: list[str], columns: list[str],
                 panels: list[list[list[Panel]]], title: str) -> Figure:
    """Rows: each sample under each run; columns: the input, then one per method.
    panels[s][r][m] is sample s under run r by method m."""
    rows = len(samples) * len(runs)
    fig = Figure(figsize=(1.65 * (len(columns) + 1) + 1.6, 1.65 * rows + 0.9))
    axes = fig.subplots(rows, len(columns) + 1, squeeze=False)
    for s, sample in enumerate(samples):
        background, cmap = _image_background(sample.x)
        grey = background if cmap else background.mean(-1)
        mask = sample.annotation.double().numpy()
        for r, run in enumerate(runs):
            row = axes[s * len(runs) + r]
            row[0].imshow(background, cmap=cmap, interpolation="nearest")
            row[0].set_ylabel(f"{run}\n{sample.heading}" if r == 0 else run, fontsize=7)
            for ax, panel in zip(row[1:], panels[s][r]):
                ax.imshow(grey, cmap="gray_r", interpolation="nearest", alpha=0.3)
                if panel.values is not None:
                    ax.imshow(colours(scaled(panel.values)), interpolation="nearest")
                _note(ax, panel, sample.annotation)
            for ax in row:
                ax.add_collection(LineCollection(outline(mask), colors=ANNOTATION_COLOUR, linewidths=1.2))
                ax.set_xticks([])
                ax.set_yticks([])
    for ax, name in zip(axes[0], ["input", *columns]):
        ax.set_title(name, fontsize=8)
    fig.suptitle(f"{title}\n{share_legend(samples[0].annotation, 'pixels', 'outlined green')}", fontsize=9)
    fig.tight_layout()
    return fig


def shown_columns(panels: list[list[Panel]], features: int, limit: int) -> np.ndarray:
    """All columns when there are at most `limit`; else the `limit` with the largest scaled
    |attribution| summed over one sample's panels (every run and method), in column order."""
    if features <= limit:
        return np.arange(features)
    weight = np.zeros(features)
    for panel in (p for run in panels for p in run if p.values is not None):
        weight += np.abs(scaled(panel.values))
    return np.sort(np.argsort(-weight, kind="stable")[:limit])


def table_figure(samples: list[SampleView], runs: list[str], columns: list[str],
                 panels: list[list[list[Panel]]], title: str, names: list[str] | None = None,
                 limit: int = 40) -> Figure:
    """Rows: each sample under each run; columns: one bar chart per method, a bar per table
    column (annotated columns orange), each chart scaled to its largest |value|. Columns are
    labelled by `names` (e.g. the words of a bag-of-words input), else by index; of a wider
    table each sample shows its `limit` weightiest columns (`shown_columns`), the shares still
    counting all of them."""
    rows = len(samples) * len(runs)
    features = len(samples[0].annotation)
    width = max(2.6, 0.09 * min(features, limit) + 0.8)
    fig = Figure(figsize=(width * len(columns) + 1.2, (1.5 if features <= limit else 1.9) * rows + 1.0))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    labels = np.array(names if names is not None and len(names) == features else [str(i) for i in range(features)])
    for s, sample in enumerate(samples):
        shown = shown_columns(panels[s], features, limit)
        positions = np.arange(len(shown))
        bar_colours = [TABLE_COLOURS[int(sample.annotation[i] > 0)] for i in shown]
        for r, run in enumerate(runs):
            row = axes[s * len(runs) + r]
            row[0].set_ylabel(f"{run}\n{sample.heading}" if r == 0 else run, fontsize=7)
            for ax, panel in zip(row, panels[s][r]):
                if panel.values is not None:
                    ax.bar(positions, scaled(panel.values)[shown], color=bar_colours, width=0.8)
                ax.axhline(0, color="black", linewidth=0.5)
                ax.set_ylim(-1.05, 1.05)
                ax.tick_params(labelsize=6)
                last = r == len(runs) - 1 and (features > limit or s == len(samples) - 1)
                ax.set_xticks(positions, labels[shown] if last else [], rotation=90,
                              fontsize=5 if len(shown) > 20 else 7)
                _note(ax, panel, sample.annotation)
    for ax, name in zip(axes[0], columns):
        ax.set_title(name, fontsize=8)
    subset = f"; each sample's {limit} weightiest columns of {features}" if features > limit else ""
    fig.suptitle(f"{title}\n{share_legend(samples[0].annotation, 'columns', 'orange bars')}{subset}", fontsize=9)
    fig.tight_layout()
    return fig


def _word_layout(words: list[str], width: float, font: FontProperties, dpi: float) -> tuple[list[tuple[float, int]], int]:
    """(x in inches, line) of each word wrapped into `width` inches, and the number of lines."""
    renderer = FigureCanvasAgg(Figure(dpi=dpi)).get_renderer()
    gap = 0.08
    x, line, places = 0.0, 0, []
    for word in words:
        w = renderer.get_text_width_height_descent(word, font, ismath=False)[0] / dpi + gap
        if x > 0 and x + w > width:
            x, line = 0.0, line + 1
        places.append((x, line))
        x += w
    return places, line + 1


def text_figure(samples: list[SampleView], runs: list[str], columns: list[str],
                panels: list[list[list[Panel]]], title: str, width: float = 11.0, dpi: float = 100) -> Figure:
    """One line of coloured words per (sample, method, run), grouped by sample, then method,
    the runs of one method together; annotated words boxed in green."""
    font = FontProperties(size=9)
    label_width, text_width, line_height = 2.9, width - 3.2, 0.24
    lines = []  # (kind, sample, method, run, places, count)
    for s, sample in enumerate(samples):
        places, count = _word_layout(sample.x, text_width, font, dpi)
        lines.append(("heading", s, None, None, None, 1))
        for m in range(len(columns)):
            for r in range(len(runs)):
                lines.append(("words", s, m, r, places, count))
    height = sum(count for *_, count in lines) * line_height + 0.3 * len(samples) * len(columns) + 0.8
    fig = Figure(figsize=(width, height), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ax.text(0.15, 0.3, f"{title}\n% = share of |attribution| on the annotated words (boxed green)",
            fontsize=9, va="center")
    y = 0.7
    for kind, s, m, r, places, count in lines:
        sample = samples[s]
        if kind == "heading":
            ax.text(0.15, y, sample.heading, fontsize=9, weight="bold", va="center")
            y += line_height
            continue
        panel = panels[s][r][m]
        label = f"{columns[m]} · {runs[r]}"
        if panel.values is not None:
            label += f" · {100 * annotated_share(panel.values[:len(sample.x)], sample.annotation):.0f}%"
        ax.text(0.15, y, label, fontsize=7, va="center")
        if panel.values is None:
            ax.text(label_width, y, panel.note, fontsize=8, va="center", style="italic")
        else:
            rgba = colours(scaled(panel.values[:len(sample.x)]))
            for word, (x, line), colour, marked in zip(sample.x, places, rgba, sample.annotation):
                box = dict(boxstyle="square,pad=0.12", fc=colour, ec=ANNOTATION_COLOUR if marked > 0 else "none",
                           lw=1.2)
                ax.text(label_width + x, y + line * line_height, word, fontproperties=font, va="center", bbox=box)
        y += count * line_height + (0.3 if r == len(runs) - 1 else 0.02)
    return fig


FIGURES = {"image": image_figure, "table": table_figure, "text": text_figure}
