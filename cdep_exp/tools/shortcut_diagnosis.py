"""Where a trained model keeps the annotated features' effect: in CD's rel, or in the interactions
CD books under irrel, through which a CDEP-trained model can bypass the penalty.

    python -m cdep_exp.tools.shortcut_diagnosis outputs/sc/isic_synthetic/cdep/lam=1/seed=0/<tag> [...]

For the annotated samples of a split (default: each dataset's primary counterfactual's samples,
else "test") and x' = x without the annotated features (`cdep_exp.penalties.base.without_annotated`),
with c(·) the centring over classes and means over samples:

* ``rel``: mean Σ_c c(rel)², what every CD penalty sees;
* ``gap``: mean Σ_c c(irrel − f(x'))², the part of the features' effect that CD assigns to
  irrel (their interactions with the rest of the input);
* ``effect``: mean Σ_c c(f(x) − f(x'))², the total effect of taking the features out;
* ``rel_share``: rel / (rel + gap), how much of the effect's energy CD can see.

On a linear model without bias gap = 0 and effect = rel. Needs mask-type or relevant-part
annotations (not ColorMNIST's sampled masks).
"""
import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cdep_exp.cd import decompose
from cdep_exp.penalties.base import annotated_samples, centred, eval_mode, without_annotated
from cdep_exp.run.restore import restore_run


@torch.no_grad()
def interaction_energies(model: torch.nn.Module, loader: DataLoader, relevant: bool) -> dict[str, float]:
    """The module docstring's energies over the annotated samples of `loader` (eval mode)."""
    sums = {"rel": 0.0, "gap": 0.0, "effect": 0.0}
    count = 0
    with eval_mode(model):
        model.eval()
        for x, _, annotation in loader:
            keep = annotated_samples(annotation, x)
            if not keep.any():
                continue
            x, annotation = x[keep], annotation[keep]
            rel, irrel = decompose(model, x, rel=annotation) if relevant else decompose(model, x, annotation)
            without = model(without_annotated(x, annotation, relevant))
            sums["rel"] += centred(rel).pow(2).sum().item()
            sums["gap"] += centred(irrel - without).pow(2).sum().item()
            sums["effect"] += centred(rel + irrel - without).pow(2).sum().item()
            count += len(x)
    if not count:
        raise ValueError("no annotated samples in this split")
    out = {k: v / count for k, v in sums.items()}
    out["rel_share"] = out["rel"] / max(out["rel"] + out["gap"], 1e-30)
    out["samples"] = count
    return out


def diagnose(run_dir: Path, split: str | None = None, dataset_overrides: dict | None = None) -> dict[str, float]:
    """Energies of the run's best checkpoint on `split` (see the module docstring), with the
    dataset config changed by `dataset_overrides` (e.g. {"annotation": "colour"} to read a
    vanilla ColorMNIST run through the colour-part annotation)."""
    restored = restore_run(run_dir, dataset_overrides)
    splits, model = restored.splits, restored.model
    if split is None:
        cf = splits.counterfactuals.get(splits.shortcut)
        dataset = cf.dataset if cf is not None else splits.tests["test"]
    else:
        dataset = splits.counterfactuals[split].dataset if split in splits.counterfactuals else splits.tests[split]
    relevant = splits.annotation == "relevant"
    loader = DataLoader(dataset, batch_size=250, collate_fn=splits.collate_fn)
    return interaction_energies(model, loader, relevant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--split", help="a test or counterfactual name (default: the primary counterfactual)")
    parser.add_argument("--dataset", action="append", default=[], metavar="KEY=VALUE",
                        help="change a dataset setting, e.g. annotation=colour")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.dataset)
    for run_dir in args.run_dirs:
        out = diagnose(run_dir, args.split, overrides)
        print(run_dir, " ".join(f"{k}={v:.4g}" for k, v in out.items()))


if __name__ == "__main__":
    main()
