"""Compose one run from its config: data → model → penalty → training loop → metrics.json."""
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from functools import partial
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

from cdep_exp.checkpoint import Checkpointer
from cdep_exp.data.base import Splits
from cdep_exp.data.word_vectors import word_vectors
from cdep_exp.metrics import compute_metrics
from cdep_exp.provenance import device_name, git_revision, peak_memory_gib, reset_peak_memory, resolve_device
from cdep_exp.shortcut import shortcut_reliance
from cdep_exp.training import Evaluation, evaluate, fit

log = logging.getLogger(__name__)

# Keys of a dataset config that describe the experiment rather than being builder arguments.
DATASET_META_KEYS = ("name", "metrics", "cdep_form", "cdep_annotation", "mask_samples", "lam")
ARTIFACTS = ("metrics.json", "checkpoints", "tensorboard")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what to use instead."""


def run_tag(override_dirname: str) -> str:
    """Last run-directory component: the overrides that do not already name the path."""
    return override_dirname.replace("/", "_") or "default"


OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)


def validate(cfg: DictConfig) -> float:
    """Fail before any work on settings that cannot run; returns λ."""
    lam = cfg.method.lam
    if isinstance(lam, bool) or not isinstance(lam, Real) or not np.isfinite(lam) or lam < 0:
        raise ConfigError(f"method.lam={lam!r} is invalid: λ must be a finite number >= 0 (e.g. method.lam=100).")
    if cfg.method.name == "vanilla" and lam != 0:
        raise ConfigError("method=vanilla has no penalty, so method.lam must be 0; choose method=cdep|rrr|eg.")
    for key in ("batch_size", "max_epochs"):
        if cfg.trainer[key] < 1:
            raise ConfigError(f"trainer.{key}={cfg.trainer[key]} must be >= 1.")
    return float(lam)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def build_splits(dataset_cfg: DictConfig) -> Splits:
    builder_cfg = {k: v for k, v in dataset_cfg.items() if k not in DATASET_META_KEYS}
    return instantiate(OmegaConf.create(builder_cfg))


def build_model(model_cfg: DictConfig, splits: Splits) -> torch.nn.Module:
    """Instantiate the model, filling in what only the data knows: a text model's vocabulary
    size (`vocab_size: ???`, written back so the run record shows it) and its word vectors
    (`embeddings`: a `word_vectors` source; `embed_dim` is set to its dimension)."""
    vocab = getattr(splits.train, "vocab", None)
    if "vocab_size" in model_cfg.keys() and OmegaConf.is_missing(model_cfg, "vocab_size"):
        if vocab is None:
            raise ConfigError("model.vocab_size is unset and the dataset has no vocabulary; set model.vocab_size.")
        model_cfg.vocab_size = len(vocab)
    if model_cfg.get("embeddings") in (None, "random"):
        return instantiate(model_cfg, embeddings=None) if "embeddings" in model_cfg else instantiate(model_cfg)
    if vocab is None:
        raise ConfigError("model.embeddings (word vectors) needs a text dataset with a vocabulary.")
    loaded = word_vectors(vocab, model_cfg.embeddings)
    if loaded.dim is not None:
        model_cfg.embed_dim = loaded.dim
    return instantiate(model_cfg, embeddings=loaded.vectors)


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffling seed of one epoch, so a resumed run sees the same batches it would have seen."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def archive_previous(run_dir: Path) -> None:
    """Move a finished run's outputs aside (never delete them) before it is run again."""
    target = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True)
    for name in ARTIFACTS:
        if (run_dir / name).exists():
            shutil.move(run_dir / name, target / name)
    log.info("Earlier outputs moved to %s", target)


def write_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def scores(
    evaluation: Evaluation,
    metric_names: list[str],
    groups: list[str] | None,
    thresholds: dict[str, float] | None = None,
) -> dict[str, float]:
    metrics = compute_metrics(metric_names, evaluation.probs, evaluation.labels, groups, thresholds)
    return {"loss": evaluation.loss, **metrics}


def evaluate_splits(
    model: torch.nn.Module,
    splits: Splits,
    make_loader: Callable[[Dataset], DataLoader],
    device: torch.device,
    metric_names: list[str],
    val_weights: torch.Tensor | None,
) -> dict[str, dict[str, float]]:
    """Loss and the dataset's metrics on validation and on every test set it declares, and the
    shortcut reliance (`cdep_exp.shortcut`) under each counterfactual, as split `cf_<name>`.

    Decision thresholds (e.g. F1's, recorded as `f1_threshold`) are chosen on validation and
    reused on the test sets.
    """
    results = {"val": scores(evaluate(model, make_loader(splits.val), device, val_weights),
                             metric_names, splits.groups.get("val"))}
    thresholds = {m: results["val"][f"{m}_threshold"] for m in metric_names if f"{m}_threshold" in results["val"]}
    factual = {}
    for name, dataset in splits.tests.items():
        factual[name] = evaluate(model, make_loader(dataset), device)
        results[name] = scores(factual[name], metric_names, splits.groups.get(name), thresholds)
    for name, cf in splits.counterfactuals.items():
        changed = evaluate(model, make_loader(cf.dataset), device)
        if not np.array_equal(changed.labels, factual[cf.test].labels):
            raise ValueError(f"counterfactual {name!r} does not hold the samples of {cf.test!r} in order")
        results[f"cf_{name}"] = shortcut_reliance(factual[cf.test].probs, changed.probs, changed.labels)
    return results


def run(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Train and evaluate one configuration; returns the best validation loss (for sweepers).

    `run_dir` defaults to Hydra's output directory; tests and notebooks pass their own.
    """
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    lam = validate(cfg)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        if not cfg.trainer.force:
            record = json.loads(metrics_path.read_text())
            log.info("Already finished: %s (trainer.force=true runs it again)", metrics_path)
            return record["best_val_loss"]
        archive_previous(run_dir)

    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = resolve_device(cfg.device)
    reset_peak_memory(device)
    splits = build_splits(cfg.dataset)
    model = build_model(cfg.model, splits).to(device)
    penalty = instantiate(cfg.method.penalty)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer) if cfg.get("scheduler") else None
    log.info("%s | %s λ=%g | %s on %s | run dir %s", splits.description or cfg.dataset.name,
             cfg.method.name, lam, type(model).__name__, device, run_dir)

    generator = torch.Generator()
    loader = partial(DataLoader, num_workers=cfg.trainer.num_workers, collate_fn=splits.collate_fn,
                     pin_memory=device.type == "cuda")
    if splits.batch_sampler is None:
        train_loader = loader(splits.train, batch_size=cfg.trainer.batch_size, shuffle=True, generator=generator)
    else:
        train_loader = loader(splits.train, batch_sampler=splits.batch_sampler(cfg.trainer.batch_size, generator))
    eval_loader = partial(loader, batch_size=cfg.trainer.eval_batch_size, shuffle=False)
    weights = None if splits.class_weights is None else splits.class_weights.to(device)
    val_weights = weights if cfg.trainer.weighted_val_loss else None
    metric_names = list(cfg.dataset.metrics)
    checkpointer = Checkpointer(run_dir / "checkpoints", resume=cfg.trainer.resume)

    with SummaryWriter(run_dir / "tensorboard") as writer:
        state = fit(
            model, penalty, lam, train_loader, eval_loader(splits.val), optimizer,
            task_loss=partial(F.cross_entropy, weight=weights), device=device,
            checkpointer=checkpointer, writer=writer, scheduler=scheduler,
            max_epochs=cfg.trainer.max_epochs, patience=cfg.trainer.patience,
            val_class_weights=val_weights,
            val_metrics=lambda ev: compute_metrics(metric_names, ev.probs, ev.labels, splits.groups.get("val")),
            two_step=cfg.trainer.two_step, max_steps_per_epoch=cfg.trainer.max_steps_per_epoch,
            progress=cfg.trainer.progress,
            on_epoch_start=lambda epoch: generator.manual_seed(epoch_seed(cfg.seed, epoch)),
        )
        if cfg.trainer.restore_best:
            checkpointer.load_best(model)
        results = evaluate_splits(model, splits, eval_loader, device, metric_names, val_weights)
        for split, values in results.items():
            for key, value in values.items():
                writer.add_scalar(f"{split}/{key}", value, state.epoch)

    record = {
        "dataset": cfg.dataset.name,
        "data": splits.description,
        "method": cfg.method.name,
        "lam": lam,
        "seed": cfg.seed,
        "model": type(model).__name__,
        "device": str(device),
        "device_name": device_name(device),
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "seconds_per_epoch": state.seconds / max(len(state.history), 1),
        **peak_memory_gib(device),
        "metrics": results,
        "history": state.history,
        "git": git_revision(Path(__file__).parent),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(record, metrics_path)
    summary = ", ".join(f"{split} {k}={v:.4g}" for split, vals in results.items() for k, v in vals.items())
    log.info("Done: %s", summary)
    return state.best_val_loss
