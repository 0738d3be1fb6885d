"""A finished run back in memory: its record, its data and its best checkpoint's model, rebuilt
from the run directory alone, for the tools that inspect trained models
(`cdep_exp.tools.shortcut_diagnosis`, `cdep_exp.tools.explain`)."""
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from cdep_exp.data.base import Splits
from cdep_exp.run.compose import DATASET_META_KEYS, build_model, build_splits
from cdep_exp.run.record import RunRecord


@dataclass
class RestoredRun:
    """What `restore_run` rebuilds: the record, its resolved config (data paths decoded), the
    data's splits and the model with the best checkpoint's weights, in eval mode."""

    run_dir: Path
    record: RunRecord
    config: DictConfig
    splits: Splits
    model: torch.nn.Module


def current_dataset_keys(dataset: DictConfig) -> DictConfig:
    """The dataset config without keys its builder no longer takes (records of older code)."""
    accepted = set(inspect.signature(get_object(dataset._target_)).parameters)
    return OmegaConf.create({k: v for k, v in dataset.items()
                             if k in accepted or k in DATASET_META_KEYS or k.startswith("_")})


def run_config(run_dir: Path, data_dir: str | None = None) -> tuple[RunRecord, DictConfig]:
    """The run's record and its config with `<data_dir>` decoded (default: the record's own
    paths.data_dir) and the dataset keys today's builder takes. Raises OSError or ValueError
    when run_dir/metrics.json cannot be read as a record."""
    record = RunRecord.load(Path(run_dir) / RunRecord.FILE)
    cfg = OmegaConf.create(record.config_on(data_dir))
    cfg.dataset = current_dataset_keys(cfg.dataset)
    return record, cfg


def load_best(model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    """`model` with run_dir/checkpoints/best.pt loaded. A frozen-backbone model trained on cached
    features checkpoints its head only; that state goes into `model.head`. Returns the model."""
    state = torch.load(Path(run_dir) / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    head = getattr(model, "head", None)
    target = head if head is not None and not any(k.startswith("backbone.") for k in state) and \
        set(state) <= set(head.state_dict()) else model
    target.load_state_dict(state)
    return model


def restore_run(run_dir: Path, dataset_overrides: dict | None = None, data_dir: str | None = None,
                splits: Splits | None = None) -> RestoredRun:
    """Rebuild a run from its directory: data from the recorded dataset config changed by
    `dataset_overrides` (or the given `splits`, e.g. shared by runs of one dataset), the model
    from the recorded model config with the best checkpoint, in eval mode on the CPU.
    `data_dir` replaces the recorded data root."""
    run_dir = Path(run_dir)
    record, cfg = run_config(run_dir, data_dir)
    for key, value in (dataset_overrides or {}).items():
        cfg.dataset[key] = value
    return restore_loaded(run_dir, record, cfg, splits)


def restore_loaded(run_dir: Path, record: RunRecord, cfg: DictConfig, splits: Splits | None = None) -> RestoredRun:
    """`restore_run` for a record and config already read with `run_config`: the data built
    from `cfg.dataset` (unless `splits` are given) and the model with the best checkpoint."""
    if splits is None:
        splits = build_splits(cfg.dataset)
    model = load_best(build_model(cfg.model, splits), Path(run_dir)).eval()
    return RestoredRun(Path(run_dir), record, cfg, splits, model)
