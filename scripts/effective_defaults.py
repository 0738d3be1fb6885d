"""The effective defaults of every dataset × method: what `python train.py dataset=D method=M`
runs with, composed by Hydra as train.py composes it (conf/config.yaml, the dataset's recipe, the
method, and the pair file conf/pair/<D>_<M>.yaml where one exists), as a Markdown table.

    python scripts/effective_defaults.py                               # the table on stdout
    python scripts/effective_defaults.py --write docs/configuration.md  # replace the marked block
    python scripts/effective_defaults.py --check docs/configuration.md  # exit 1 when it is stale

`--write` replaces what stands between `<!-- defaults:start -->` and `<!-- defaults:end -->`.
Pairs the run refuses (REFUSED) are left out and named under the table. Composing only: no
data is read and nothing trains (about ten seconds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import cdep_exp.training.settings  # noqa: F401  (registers the trainer group's schema, as train.py's imports do)
from cdep_exp.run.identity import differences, spell_number

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The paper datasets first, in the order the docs discuss them, then any other dataset config.
PAPER_DATASETS = ("decoymnist", "decoyfmnist", "colormnist", "compas", "sst", "isic", "isic_synthetic")
DATASETS = (*PAPER_DATASETS,
            *sorted(p.stem for p in (CONF / "dataset").glob("*.yaml") if p.stem not in PAPER_DATASETS))
METHODS = ("vanilla", "cdep", "cdep_original", "rrr", "eg", "augment", "clp", "group_dro", "jtt", "dfr",
           "find_another")
# Pairs that compose but that the run refuses before training (cdep_exp/run/compose.py:
# build_learner; tests/test_every_pair_trains.py checks the isic_synthetic ones), and why.
NO_COUNTERFACTUAL = "ISIC's data gives a mask only, not the counterfactual input these methods train on"
NO_GROUPS = "Toy Colors has no groups: both rules agree with the class in every split"
NO_NEWSGROUPS_GROUPS = ("20 Newsgroups has no groups: every post carries headers, so none has a shortcut that "
                        "disagrees with its class")
NO_INPUT_GRADIENT = "SST's inputs are token ids, which have no input gradient to take M_c from"
REFUSED = {**{(dataset, method): NO_COUNTERFACTUAL
              for dataset in ("isic", "isic_synthetic") for method in ("augment", "clp")},
           **{("toy_colors", method): NO_GROUPS for method in ("group_dro", "dfr")},
           **{("newsgroups", method): NO_NEWSGROUPS_GROUPS for method in ("group_dro", "dfr")},
           ("sst", "find_another"): NO_INPUT_GRADIENT}
START, END = "<!-- defaults:start -->", "<!-- defaults:end -->"
HEADER = ("dataset", "method", "λ", "model", "optimizer", "batch", "epochs", "penalty / stage settings",
          "pair file: what it sets")


def compose_run(overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """The run's config (the hydra node left out) and Hydra's group choices."""
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return cfg, choices


def spell(value: Any) -> str:
    """A value as it is written on the command line (true, 0.001, null)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return spell_number(value)
    return "null" if value is None else str(value)


def settings(node: DictConfig | None, prefix: str = "") -> list[str]:
    """`key=value` for the keys of a penalty or stage node, `_target_` and unset (null) ones left out."""
    if node is None:
        return []
    return [f"{prefix}{key}={spell(value)}" for key, value in node.items() if key != "_target_" and value is not None]


def pair_changes(dataset: str, method: str, cfg: DictConfig) -> list[str]:
    """What the pair file changes against the same composition without it."""
    without, _ = compose_run([f"dataset={dataset}", f"method={method}", "~pair"])
    old, new = (OmegaConf.to_container(c, resolve=True) for c in (without, cfg))
    return [f"{key}={spell(OmegaConf.select(cfg, key))}" for key in differences(old, new)]


def row(dataset: str, method: str) -> list[str]:
    cfg, choices = compose_run([f"dataset={dataset}", f"method={method}"])
    pair = choices.get("pair")
    pair_cell = ""
    if pair and (CONF / "pair" / f"{pair}.yaml").is_file():
        changes = pair_changes(dataset, method, cfg)
        pair_cell = f"`{pair}`: " + (", ".join(f"`{c}`" for c in changes) or "the defaults' values")
    optimizer = f"{choices['optimizer']}, lr {spell(cfg.optimizer.lr)}"
    if cfg.optimizer.get("weight_decay"):
        optimizer += f", wd {spell(cfg.optimizer.weight_decay)}"
    if choices.get("scheduler"):
        optimizer += f", {choices['scheduler']} schedule"
    trainer = cfg.trainer
    epochs = spell(trainer.max_epochs) + (f", patience {trainer.patience}" if trainer.patience is not None else
                                          ", no early stopping")
    penalty = settings(cfg.method.penalty) + settings(cfg.method.get("stage"), "stage.")
    return [dataset, method, spell(cfg.method.lam), choices["model"], optimizer, spell(trainer.batch_size), epochs,
            ", ".join(penalty) or "–", pair_cell or "–"]


def rows() -> list[list[str]]:
    """One row per dataset × method the run accepts; Hydra must be initialised on conf/."""
    return [row(d, m) for d in DATASETS for m in METHODS if (d, m) not in REFUSED]


def render(table_rows: list[list[str]]) -> str:
    """The generated block: a line on how it is made, the table, and the refused pairs."""
    lines = ["Generated by `python scripts/effective_defaults.py --write docs/configuration.md` (do not edit "
             "by hand): `python train.py dataset=<dataset> method=<method>` with nothing else set.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows]
    by_reason: dict[str, list[str]] = {}
    for (dataset, method), reason in REFUSED.items():
        by_reason.setdefault(reason, []).append(f"{dataset} × {method}")
    lines += ["", *(f"Not shown, refused by the run with one line: {', '.join(pairs)} ({reason})."
                    for reason, pairs in by_reason.items())]
    return "\n".join(lines)


def table() -> str:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return render(rows())


def replace_block(text: str, block: str, path: Path) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{path} needs one {START} line and, after it, one {END} line around the table.")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="replace the block between the markers in FILE")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 when FILE's block is not the table")
    args = parser.parse_args(argv)
    block = table()
    if args.write is None and args.check is None:
        print(block)
        return 0
    path = args.write or args.check
    text = path.read_text()
    updated = replace_block(text, block, path)
    if args.check:
        if updated != text:
            print(f"{path}: the defaults table is stale; run python scripts/effective_defaults.py --write {path}",
                  file=sys.stderr)
            return 1
        return 0
    if updated != text:
        path.write_text(updated)
    print(f"{path}: defaults table written ({len(DATASETS) * len(METHODS) - len(REFUSED)} dataset × method pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
