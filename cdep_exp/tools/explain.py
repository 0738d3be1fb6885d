"""Explanations to look at, and what each costs: attribution maps of a few samples under several
trained runs (before and after a penalty), and the seconds one explanation takes per method (the
RRR paper's Table 1, input gradients against LIME).

    python -m cdep_exp.tools.explain VANILLA_RUN RRR_RUN --out results/figures/explanations
    python -m cdep_exp.tools.explain IRIS_RUN TOY_RUN DECOY_RUN --timing timing/rrr_table1

Runs whose dataset configs agree are drawn together, one PNG per dataset (<out>/<dataset>.png;
<dataset>_<n>.png for runs of it with other data settings):
a row per sample and run, a column per method, the same samples for every run. Methods
(`--methods`, docs/explanations.md): input gradients (what RRR penalises), CD of each patch,
column or word alone (what CDEP reads), expected gradients (what the EG prior reads), and LIME.
Samples: `--samples` annotated samples of the split (default: the test set the dataset's
shortcut counterfactual edits, e.g. SST's test sentences with the decoy word planted), drawn
with `--seed`, or `--indices`.

`--timing STEM` writes STEM.md and STEM.csv: per dataset (its first run), the mean wall seconds
of one explanation of one sample by each method, over `--timing-samples` samples, after one
untimed call (fx tracing, LIME's set-up), all in this one process.
"""
import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from cdep_exp.atomic import write_atomic
from cdep_exp.cd import UnsupportedOperationError
from cdep_exp.data.base import Splits
from cdep_exp.run.compose import build_splits
from cdep_exp.run.identity import identity_hash, normalise
from cdep_exp.run.record import RunRecord
from cdep_exp.run.restore import RestoredRun, restore_loaded, run_config
from cdep_exp.tools.attributions import cd_map, eg_map, feature_groups, gradient_map, input_kind
from cdep_exp.tools.explain_figures import FIGURES, Panel, SampleView
from cdep_exp.tools.lime_maps import LimeExplainer

log = logging.getLogger(__name__)

# name → (column title, short title, signed)
METHODS = {
    "grad": ("input gradient |∂Σ log p/∂x|", "gradient", False),
    "cd": ("CD, each {group} alone", "CD", True),
    "eg": ("expected gradients", "EG", True),
    "lime": ("LIME", "LIME", True),
}
GROUP_NAMES = {"image": "patch", "table": "column", "text": "word"}


@dataclass
class Batch:
    """Samples of one split: inputs x (collated), true classes y (B,), annotations in display
    shape (B, H, W), (B, d) or (B, T), each text's length, and the samples' indices."""

    x: Tensor
    y: Tensor
    annotation: Tensor
    lengths: list[int]
    indices: list[int]
    split: str


def collate(splits: Splits, items: list) -> tuple[Tensor, Tensor, Tensor]:
    return (splits.collate_fn or default_collate)(items)


def display_annotation(x: Tensor, annotation: Tensor) -> Tensor:
    """The annotation as 0/1 per displayed feature: an image's pixels (any channel marked), a
    table's columns, a text's tokens."""
    marked = torch.broadcast_to(annotation, x.shape) if annotation.dim() == x.dim() else annotation
    marked = marked.ne(0).float()
    return marked.amax(1) if input_kind(x) == "image" else marked


def split_dataset(splits: Splits, split: str | None) -> tuple[str, Dataset]:
    """The named dataset (train, val, a test, cf_<counterfactual>), by default the test set that
    the shortcut counterfactual edits (its samples carry the shortcut), else "test"."""
    if split is None:
        cf = splits.counterfactuals.get(splits.shortcut) if splits.shortcut else None
        split = cf.test if cf is not None else "test"
    named = {**splits.named_datasets(), **{name: cf.dataset for name, cf in splits.counterfactuals.items()}}
    if split not in named:
        raise ValueError(f"no split {split!r}; this dataset has: {', '.join(splits.named_datasets())}")
    return split, named[split]


def pick_samples(splits: Splits, split: str | None, count: int, seed: int, indices: list[int] | None,
                 max_tokens: int) -> Batch:
    """`indices` of the split, or `count` annotated samples drawn with `seed` (texts of at most
    `max_tokens` tokens; unannotated ones only where too few are annotated)."""
    split, dataset = split_dataset(splits, split)
    if indices is None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        annotated, plain = [], []
        for i in order:
            x, _, annotation = dataset[i]
            if not torch.is_floating_point(x) and len(x) > max_tokens:
                continue
            (annotated if torch.as_tensor(annotation).ne(0).any() else plain).append(i)
            if len(annotated) >= count:
                break
        indices = (annotated + plain)[:count]
    outside = [i for i in indices if not -len(dataset) <= i < len(dataset)]
    if outside:
        raise ValueError(f"--indices {outside} lie outside {split}, which holds {len(dataset)} samples")
    items = [dataset[i] for i in indices]
    x, y, annotation = collate(splits, items)
    lengths = [len(item[0]) for item in items]
    return Batch(x, y, display_annotation(x, annotation), lengths, list(indices), split)


def reference_inputs(splits: Splits, count: int, seed: int) -> Tensor:
    """`count` training inputs drawn with `seed` (collated): expected gradients' references,
    LIME's training statistics."""
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))[:count]
    return collate(splits, [splits.train[int(i)] for i in order])[0]


class Explainers:
    """The methods of `METHODS` for one trained model: `explain(name, x, y, lengths)` gives
    their maps in display shape, (B, H, W), (B, d) or (B, T)."""

    def __init__(self, restored: RestoredRun, references: Tensor, patch: int | None, draws: int, seed: int) -> None:
        self.model, self.references, self.draws, self.seed, self.patch = restored.model, references, draws, seed, patch
        self.vocab = restored.splits.vocab
        self._lime: LimeExplainer | None = None

    @property
    def lime(self) -> LimeExplainer:
        if self._lime is None:
            self._lime = LimeExplainer(self.model, self.references, self.vocab, self.patch, self.seed)
        return self._lime

    def explain(self, name: str, x: Tensor, y: Tensor, lengths: list[int]) -> Tensor:
        if name == "grad":
            return gradient_map(self.model, x)
        if name == "cd":
            return cd_map(self.model, x, y, feature_groups(x, self.patch))
        if name == "eg":
            torch.manual_seed(self.seed)
            return eg_map(self.model, x, y, self.references, self.draws)
        if name == "lime":
            maps = [self.lime.explain(x[i, :lengths[i]] if input_kind(x) == "text" else x[i], int(y[i]))
                    for i in range(len(x))]
            if input_kind(x) == "text":
                maps = [torch.nn.functional.pad(m, (0, x.shape[1] - len(m))) for m in maps]
            return torch.stack(maps)
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")

    def panels(self, names: list[str], batch: Batch) -> list[list[Panel]]:
        """panels[sample][method]; a method that cannot explain this model gets its reason."""
        out = [[] for _ in batch.indices]
        for name in names:
            try:
                maps = self.explain(name, batch.x, batch.y, batch.lengths).detach().cpu()
                for i, row in enumerate(out):
                    row.append(Panel(maps[i], METHODS[name][2]))
            except (UnsupportedOperationError, TypeError) as err:
                log.warning("%s: %s", name, err)
                for row in out:
                    row.append(Panel(None, METHODS[name][2], f"not available: {str(err).splitlines()[0][:60]}"))
        return out


def run_label(restored: RestoredRun) -> str:
    """e.g. 'rrr λ=100': the method, and λ when penalised."""
    record = restored.record
    return record.method if not record.lam else f"{record.method} λ={record.lam:g}"


def accuracies(group: list[RestoredRun], split: str) -> str:
    """e.g. 'accuracy on test: vanilla 60.2%, rrr λ=100 98.9%', from the runs' records."""
    found = [(run_label(r), (r.record.metrics.get(split) or {}).get("accuracy")) for r in group]
    known = [f"{label} {value:.1f}%" for label, value in found if value is not None]
    return f"accuracy on {split}: {', '.join(known)}" if known else ""


def sample_view(batch: Batch, i: int, vocab: list[str] | None) -> SampleView:
    x = batch.x[i]
    label = int(batch.y[i])
    heading = f"{batch.split}[{batch.indices[i]}], class {label}"
    if input_kind(batch.x) == "text":
        words = [vocab[int(t)] if vocab else str(int(t)) for t in x[:batch.lengths[i]]]
        return SampleView(words, label, batch.annotation[i, :batch.lengths[i]], heading)
    return SampleView(x.cpu(), label, batch.annotation[i].cpu(), heading)


def load_groups(run_dirs: list[Path], data_dir: str | None) -> list[list[RestoredRun]]:
    """The runs, grouped by dataset config (one data build per group), in the order given."""
    groups: dict[str, list[tuple[Path, RunRecord, DictConfig]]] = {}
    for run_dir in run_dirs:
        record, cfg = run_config(run_dir, data_dir)
        # Normalised, so that one dataset spelled `1` in one run and `1.0` in another is one group.
        key = identity_hash(normalise(OmegaConf.to_container(cfg.dataset, resolve=True)))
        groups.setdefault(key, []).append((run_dir, record, cfg))
    out = []
    for runs in groups.values():
        splits = build_splits(runs[0][2].dataset)
        out.append([restore_loaded(run_dir, record, cfg, splits) for run_dir, record, cfg in runs])
    return out


def draw(group: list[RestoredRun], batch: Batch, methods: list[str], explainers: list[Explainers]) -> Figure:
    kind = input_kind(batch.x)
    splits = group[0].splits
    per_run = [e.panels(methods, batch) for e in explainers]
    panels = [[per_run[r][s] for r in range(len(group))] for s in range(len(batch.indices))]
    samples = [sample_view(batch, i, splits.vocab) for i in range(len(batch.indices))]
    columns = [METHODS[m][1 if kind == "text" else 0].format(group=GROUP_NAMES[kind]) for m in methods]
    runs = [run_label(r) for r in group]
    title = (f"{group[0].record.dataset}: {batch.split} samples; red: for the true class (gradient: its size), "
             f"blue: against\n{accuracies(group, batch.split)}")
    if kind == "table":  # a bag-of-words input names its columns with its vocabulary
        return FIGURES[kind](samples, runs, columns, panels, title, names=splits.vocab)
    return FIGURES[kind](samples, runs, columns, panels, title)


def one_sample(batch: Batch, i: int) -> tuple[Tensor, Tensor, list[int]]:
    """Sample i of the batch as a batch of one (a text cut to its own length)."""
    x = batch.x[i:i + 1, :batch.lengths[i]] if input_kind(batch.x) == "text" else batch.x[i:i + 1]
    return x, batch.y[i:i + 1], batch.lengths[i:i + 1]


def time_methods(explainers: Explainers, batch: Batch, methods: list[str],
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Mean seconds of one explanation of one sample per method, over the batch's samples,
    after one untimed call."""
    out = {}
    for name in methods:
        explainers.explain(name, *one_sample(batch, 0))
        spent = []
        for i in range(len(batch.indices)):
            sample = one_sample(batch, i)
            start = clock()
            explainers.explain(name, *sample)
            spent.append(clock() - start)
        out[name] = sum(spent) / len(spent)
    return out


def describe_input(batch: Batch, patch: int | None) -> dict[str, str | float]:
    """The timing table's description of a dataset's inputs and how many groups CD decomposes
    (for texts, their mean word count over the timed samples)."""
    x, kind = batch.x, input_kind(batch.x)
    groups = [len(feature_groups(one_sample(batch, i)[0], patch)) for i in range(len(batch.indices))]
    described = {"image": f"image {'×'.join(map(str, x.shape[1:]))}", "table": f"{x.shape[-1]} columns",
                 "text": "text"}[kind]
    return {"input": described, "CD groups": round(sum(groups) / len(groups), 1)}


def timing_table(rows: list[dict]) -> pd.DataFrame:
    """One row per dataset: seconds per explanation by method and LIME's multiple of the gradient's."""
    table = pd.DataFrame(rows)
    if "lime" in table and "grad" in table:
        table["LIME / gradient"] = (table["lime"] / table["grad"]).round().astype(int)
    return table.rename(columns={m: f"{m} (s)" for m in METHODS})


def write_timing(table: pd.DataFrame, stem: Path, note: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(stem.with_suffix(".csv"), table.to_csv(index=False))
    body = table.to_markdown(index=False, floatfmt=".3g")
    write_atomic(stem.with_suffix(".md"), f"# Seconds per explanation (RRR paper, Table 1)\n\n{body}\n\n{note}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=" ".join(first.split()), epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (metrics.json, checkpoints/best.pt)")
    parser.add_argument("--out", type=Path, help="folder for the PNGs, one per dataset")
    parser.add_argument("--timing", type=Path, metavar="STEM", help="write the timing table to STEM.md and STEM.csv")
    parser.add_argument("--methods", default="grad,cd,eg,lime", help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--samples", type=int, default=3, help="samples per dataset")
    parser.add_argument("--indices", help="comma-separated sample indices of the split (instead of --samples)")
    parser.add_argument("--split", help="train, val, a test set or a counterfactual (default: the shortcut's test set)")
    parser.add_argument("--seed", type=int, default=0, help="draws of samples, references, EG and LIME")
    parser.add_argument("--patch", type=int, help="side of CD's and LIME's image patches (default: about 7 per side)")
    parser.add_argument("--eg-draws", type=int, default=100, help="(reference, α) pairs per EG attribution")
    parser.add_argument("--references", type=int, default=1000, help="training inputs for EG and LIME")
    parser.add_argument("--max-tokens", type=int, default=30, help="longest text drawn as a sample")
    parser.add_argument("--timing-samples", type=int, default=5, help="samples timed per dataset")
    parser.add_argument("--data-dir", help="data root, if not the one the runs recorded")
    parser.add_argument("--dpi", type=int, default=130)
    args = parser.parse_args(argv)
    if args.out is None and args.timing is None:
        parser.error("say what to make: --out DIR (pictures) and/or --timing STEM (table)")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    args.indices = [int(i) for i in args.indices.split(",")] if args.indices else None
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the command; returns the files written. A run directory without a readable record, or
    samples outside the split, end the command with one line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        return explain(args)
    except (OSError, ValueError) as err:
        raise SystemExit(f"Error: {err}") from None


def explain(args: argparse.Namespace) -> list[Path]:
    """What `main` does, from parsed arguments."""
    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "metrics.json").is_file():
            raise ValueError(f"{run_dir} is not a run directory: it has no metrics.json (pass the folders "
                             f"train.py logs as 'run dir')")
    written, rows, names = [], [], set()
    for group in load_groups(args.run_dirs, args.data_dir):
        splits = group[0].splits
        references = reference_inputs(splits, args.references, args.seed)
        explainers = [Explainers(r, references, args.patch, args.eg_draws, args.seed) for r in group]
        if args.out is not None:
            batch = pick_samples(splits, args.split, args.samples, args.seed, args.indices, args.max_tokens)
            fig = draw(group, batch, args.methods, explainers)
            name = group[0].record.dataset
            stem = name if name not in names else f"{name}_{len(names)}"
            names.add(stem)
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"{stem}.png"
            fig.savefig(path, dpi=args.dpi)
            log.info("wrote %s", path)
            written.append(path)
        if args.timing is not None:
            batch = pick_samples(splits, args.split, args.timing_samples, args.seed + 1, None, args.max_tokens)
            seconds = time_methods(explainers[0], batch, args.methods)
            rows.append({"dataset": group[0].record.dataset, "model": group[0].record.model,
                         **describe_input(batch, args.patch), **seconds})
            log.info("timed %s: %s", rows[-1]["dataset"], seconds)
    if args.timing is not None:
        note = (f"Mean wall seconds of one explanation of one sample, over {args.timing_samples} samples of each "
                f"dataset, after one untimed call; one process, torch on {torch.get_num_threads()} CPU thread(s). "
                f"CD: every group (image patch, column, word; for texts the mean word count) decomposed alone; "
                f"EG: {args.eg_draws} (reference, α) draws; LIME: its default sample counts (1,000 images, 5,000 tables and texts). "
                f"Made by `python -m cdep_exp.tools.explain` (docs/explanations.md).")
        write_timing(timing_table(rows), args.timing, note)
        written += [args.timing.with_suffix(".md"), args.timing.with_suffix(".csv")]
        log.info("wrote %s.{md,csv}", args.timing)
    return written


if __name__ == "__main__":
    main()
