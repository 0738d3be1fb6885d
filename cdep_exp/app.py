"""Compose one run from its config: validate → seed → splits → model → penalty → fit →
evaluate → record. Each step is a small function; the heavy lifting lives in the modules
they call (data builders, models, `feature_cache`, penalties, `training`, `evaluation`)."""
import logging
import multiprocessing
import os
import random
import sys
from functools import partial
from numbers import Real
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, default_collate
from torch.utils.tensorboard import SummaryWriter

from cdep_exp.checkpoint import Checkpointer
from cdep_exp.config_schema import check_target, check_trainer
from cdep_exp.data.base import ANNOTATIONS, Splits
from cdep_exp.data.fingerprint import splits_fingerprint
from cdep_exp.data.word_vectors import word_vectors
from cdep_exp.errors import ConfigError
from cdep_exp.evaluation import evaluate_splits
from cdep_exp.feature_cache import CacheSettings, cache_splits, frozen_backbone
from cdep_exp.metrics import compute_metrics
from cdep_exp.penalties.base import Penalty
from cdep_exp.provenance import device_name, git_revision, peak_memory_gib, reset_peak_memory, resolve_device
from cdep_exp.run_identity import config_hash, config_identity, differences, register_resolvers
from cdep_exp.run_record import (
    archive_previous, has_outputs, map_strings, read_identity, read_record, relative_to_data, write_identity,
    write_record,
)
from cdep_exp.training import Precision, TrainerSettings, fit

log = logging.getLogger(__name__)

# Keys of a dataset config that describe the experiment rather than being builder arguments.
DATASET_META_KEYS = ("name", "metrics")


register_resolvers()


def validate(cfg: DictConfig) -> float:
    """Fail before any data loads on settings that cannot run (every key is named); returns λ."""
    lam = cfg.method.lam
    if isinstance(lam, bool) or not isinstance(lam, Real) or not np.isfinite(lam) or lam < 0:
        raise ConfigError(f"method.lam={lam!r} is invalid: λ must be a finite number >= 0 (e.g. method.lam=100).")
    if cfg.method.name == "vanilla" and lam != 0:
        raise ConfigError("method=vanilla has no penalty, so method.lam must be 0; choose method=cdep|rrr|eg.")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed!r} must be an integer >= 0.")
    check_trainer(cfg.trainer)
    check_target(cfg.dataset, "dataset", skip=DATASET_META_KEYS)
    check_target(cfg.model, "model", skip=("embeddings",))
    check_target(cfg.method.penalty, "method.penalty")
    for group in ("optimizer", "scheduler"):
        if cfg.get(group):
            check_target(cfg[group], group)
    return float(lam)


def check_splits(splits: Splits, builder: str) -> None:
    """Every split must hold samples: an empty one fails here, before the first step."""
    parts = splits.named_datasets()
    empty = [name for name, dataset in parts.items() if len(dataset) == 0]
    if empty:
        raise ConfigError(f"{builder} returned an empty {empty[0]} split; check the data files and the "
                          f"dataset's split settings.")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def instantiate_plain(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, but a user error raised inside the target (a ConfigError, a
    missing file) comes out as itself, not wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError | FileNotFoundError):
            raise cause from None
        if type(cause) in (ValueError, TypeError):  # a builder refusing an argument's value
            raise ConfigError(f"{node.get('_target_')}: {cause}") from cause
        raise


def build_splits(dataset_cfg: DictConfig) -> Splits:
    """Call the dataset's builder (`_target_`) with its arguments; checks what it returns."""
    builder_cfg = {k: v for k, v in dataset_cfg.items() if k not in DATASET_META_KEYS}
    splits = instantiate_plain(OmegaConf.create(builder_cfg))
    if not isinstance(splits, Splits):
        raise ConfigError(f"dataset._target_={dataset_cfg._target_} must return cdep_exp.data.base.Splits, "
                          f"got {type(splits).__name__}.")
    if splits.annotation not in ANNOTATIONS:
        raise ConfigError(f"{dataset_cfg._target_} declares annotation {splits.annotation!r}; use one of {ANNOTATIONS}.")
    check_splits(splits, dataset_cfg._target_)
    return splits


def data_contract(splits: Splits) -> dict[str, int]:
    """Model arguments the data fixes: class count, input channels or features, vocabulary size."""
    known = {"num_classes": splits.num_classes}
    if splits.input_shape:
        known["in_channels"] = known["in_features"] = splits.input_shape[0]
    if splits.vocab is not None:
        known["vocab_size"] = len(splits.vocab)
    return known


def build_model(model_cfg: DictConfig, splits: Splits) -> torch.nn.Module:
    """Instantiate the model, filling each `???` key that the data fixes (`data_contract`:
    num_classes, in_channels, in_features, vocab_size; written back so the run record shows
    them) and its word vectors for text (`embeddings`: a `word_vectors` source; `embed_dim` is set to
    the vectors' dimension)."""
    contract = data_contract(splits)
    for key in model_cfg.keys():
        if OmegaConf.is_missing(model_cfg, key):
            if key not in contract:
                raise ConfigError(f"model.{key} is unset and the dataset does not fix it; set model.{key}=...")
            model_cfg[key] = contract[key]
    if model_cfg.get("embeddings") in (None, "random"):
        return instantiate_plain(model_cfg, embeddings=None) if "embeddings" in model_cfg else instantiate_plain(model_cfg)
    if splits.vocab is None:
        raise ConfigError("model.embeddings (word vectors) needs a text dataset with a vocabulary.")
    loaded = word_vectors(splits.vocab, model_cfg.embeddings)
    if loaded.dim is not None:
        model_cfg.embed_dim = loaded.dim
    return instantiate_plain(model_cfg, embeddings=loaded.vectors)


def build_penalty(method_cfg: DictConfig) -> Penalty:
    penalty = instantiate(method_cfg.penalty)
    if not isinstance(penalty, Penalty):
        raise ConfigError(f"method.penalty._target_ must build a cdep_exp.penalties.Penalty, got {type(penalty).__name__}.")
    return penalty


def use_feature_cache(model: torch.nn.Module, penalty: Penalty, settings: CacheSettings, method: str) -> bool:
    """Whether to train the head of a frozen-backbone model on cached backbone outputs."""
    if settings.enabled is False or frozen_backbone(model) is None:
        return False
    if "relevant" not in penalty.annotations:
        if settings.enabled is True:
            raise ConfigError(f"method={method} needs input gradients, which cached features do not have: "
                              f"set feature_cache.enabled=auto or false.")
        log.info("Feature cache off: method=%s needs gradients with respect to the inputs, so the whole "
                 "%s runs on them.", method, type(model).__name__)
        return False
    return True


def check_model_fits(model: torch.nn.Module, splits: Splits, device: torch.device) -> None:
    """One eval-mode forward of two validation samples; a model that does not fit the data fails
    here with one line instead of a shape traceback inside training. Draws no random numbers."""
    items = [splits.val[i] for i in range(min(2, len(splits.val)))]
    if not items:
        raise ConfigError("The validation split is empty; check the dataset's split settings.")
    x = (splits.collate_fn or default_collate)(items)[0].to(device)
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    except (RuntimeError, ValueError, IndexError) as err:
        raise ConfigError(f"{type(model).__name__} does not fit this data (input {tuple(x.shape)}): "
                          f"{str(err).splitlines()[0]}") from err
    finally:
        model.train(mode)
    if logits.shape != (len(items), splits.num_classes):
        raise ConfigError(f"{type(model).__name__} gives outputs {tuple(logits.shape)} for {len(items)} samples "
                          f"of a {splits.num_classes}-class dataset; set model.num_classes={splits.num_classes}.")


def make_loaders(splits: Splits, cfg: DictConfig, device: torch.device, generator: torch.Generator):
    """(train loader, factory of evaluation loaders)."""
    loader = partial(DataLoader, num_workers=cfg.trainer.num_workers, collate_fn=splits.collate_fn,
                     pin_memory=device.type == "cuda")
    if splits.batch_sampler is None:
        train = loader(splits.train, batch_size=cfg.trainer.batch_size, shuffle=True, generator=generator)
    else:
        train = loader(splits.train, batch_sampler=splits.batch_sampler(cfg.trainer.batch_size, generator))
    return train, partial(loader, batch_size=cfg.trainer.eval_batch_size, shuffle=False)


def build_scheduler(scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer, max_epochs: int):
    """The learning-rate schedule; `T_max: ???` (cosine) becomes the run's epoch count."""
    if "T_max" in scheduler_cfg.keys() and OmegaConf.is_missing(scheduler_cfg, "T_max"):
        scheduler_cfg.T_max = max_epochs
    return instantiate_plain(scheduler_cfg)(optimizer)


def progress_bars(setting: bool | str) -> bool:
    """trainer.progress: true / false, or auto: bars in a terminal, one log line per epoch otherwise."""
    return sys.stderr.isatty() if setting == "auto" else bool(setting)


def steps_per_batch(scheduler: object | None) -> bool:
    """Schedulers that expect a step per batch (one-cycle, cyclic) rather than per epoch."""
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR | torch.optim.lr_scheduler.CyclicLR)


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffling seed of one epoch, so a resumed run sees the same batches it would have seen."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as metrics.json keeps it, data paths relative to the data root
    (`run_record.with_data_root` restores them); the `paths` block itself stays as given."""
    config = OmegaConf.to_container(cfg, resolve=True)
    paths = config.pop("paths", None)
    return {**map_strings(config, lambda text: relative_to_data(text, cfg.paths.data_dir)), "paths": paths}


def check_identity(run_dir: Path, identity: dict) -> None:
    """Refuse to resume or skip a run directory made by another config or from other data."""
    previous = read_identity(run_dir)
    if previous is None:
        return
    if previous["config_hash"] != identity["config_hash"]:
        changed = differences(previous["config"], identity["config"])
        raise ConfigError(f"{run_dir} holds a run of another config (differs in {', '.join(changed[:5]) or 'its hash'}): "
                          f"use another paths.output_dir, or trainer.force=true to archive it and start over.")
    changed = differences(previous["data"], identity["data"])
    if changed:
        raise ConfigError(f"{run_dir} was trained on other data ({', '.join(changed[:4])} differ; was "
                          f"{previous['description']!r}): use another paths.output_dir, or trainer.force=true "
                          f"to archive it and start over.")


def overrides() -> list[str]:
    """The command-line overrides of this run, when Hydra launched it."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_launcher_alive() -> None:
    """In a worker process of a local sweep (joblib), refuse to start when the sweep that
    launched it has been killed (the worker was re-parented), instead of running queued jobs."""
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        raise ConfigError(f"The sweep process {parent.pid} that launched this run has stopped; not starting it.")


def run(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Train and evaluate one configuration; returns the best validation loss (for sweepers).

    `run_dir` defaults to Hydra's output directory; tests and notebooks pass their own.
    The directory is locked while the run works in it; a second process fails at once.
    """
    check_launcher_alive()
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    lam = validate(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / ".lock")
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"{run_dir} is in use by another process running the same settings; wait for it "
                          f"or choose another paths.output_dir.") from None
    except OSError as err:
        raise ConfigError(f"Cannot write the run directory {run_dir} ({err.strerror}); choose a writable "
                          f"paths.output_dir.") from None
    try:
        return _run_locked(cfg, run_dir, lam)
    finally:
        lock.release()


def _run_locked(cfg: DictConfig, run_dir: Path, lam: float) -> float:
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = resolve_device(cfg.device)
    reset_peak_memory(device)
    splits = build_splits(cfg.dataset)
    description = relative_to_data(splits.description or cfg.dataset.name, cfg.paths.data_dir)
    identity = {"config_hash": config_hash(cfg), "config": config_identity(cfg),
                "data": splits_fingerprint(splits), "description": description}
    previous = read_record(run_dir)
    if cfg.trainer.force and has_outputs(run_dir):
        log.info("trainer.force=true: archiving the earlier outputs of %s and starting over", run_dir)
        archive_previous(run_dir)
        previous = None
    else:
        check_identity(run_dir, identity)
        if previous is not None:
            log.info("Already finished: %s (trainer.force=true runs it again)", run_dir / "metrics.json")
            return previous["best_val_loss"]
    write_identity(identity, run_dir)
    model = build_model(cfg.model, splits).to(device)
    penalty = build_penalty(cfg.method)
    cache = CacheSettings(**OmegaConf.to_container(cfg.feature_cache, resolve=True))
    if use_feature_cache(model, penalty, cache, cfg.method.name):
        backbone, model = frozen_backbone(model)
        cache_dir = Path(cache.dir) if cache.dir else Path(cfg.paths.data_dir) / "cache" / "features"
        splits = cache_splits(splits, backbone, cache, cache_dir, device, progress_bars(cfg.trainer.progress))
    try:
        penalty.bind(splits.annotation)
    except ValueError as err:
        raise ConfigError(f"method={cfg.method.name} on dataset {cfg.dataset.name}: {err}.") from err
    check_model_fits(model, splits, device)
    try:
        Precision(cfg.trainer.precision, device)
    except ValueError as err:
        raise ConfigError(f"{err}.") from err
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.trainer.max_epochs) if cfg.get("scheduler") else None
    log.info("%s | %s λ=%g | %s on %s | run dir %s", description, cfg.method.name, lam,
             type(model).__name__, device, run_dir)

    generator = torch.Generator()
    train_loader, eval_loader = make_loaders(splits, cfg, device, generator)
    weights = None if splits.class_weights is None else splits.class_weights.to(device)
    val_weights = weights if cfg.trainer.weighted_val_loss else None
    metric_names = list(cfg.dataset.metrics)
    checkpointer = Checkpointer(run_dir / "checkpoints", resume=cfg.trainer.resume)
    settings = TrainerSettings(
        max_epochs=cfg.trainer.max_epochs, patience=cfg.trainer.patience, two_step=cfg.trainer.two_step,
        max_steps_per_epoch=cfg.trainer.max_steps_per_epoch, progress=progress_bars(cfg.trainer.progress),
        step_scheduler_per_batch=steps_per_batch(scheduler), precision=str(cfg.trainer.precision),
    )

    with SummaryWriter(run_dir / "tensorboard") as writer:
        state = fit(
            model, penalty, lam, train_loader, eval_loader(splits.val), optimizer,
            task_loss=partial(F.cross_entropy, weight=weights), device=device,
            checkpointer=checkpointer, writer=writer, settings=settings, scheduler=scheduler,
            val_class_weights=val_weights,
            val_metrics=lambda ev: compute_metrics(metric_names, ev.probs, ev.labels, splits.groups.get("val")),
            on_epoch_start=lambda epoch: generator.manual_seed(epoch_seed(cfg.seed, epoch)),
        )
        if cfg.trainer.restore_best:
            checkpointer.load_best(model)
        results = evaluate_splits(model, splits, eval_loader, device, metric_names, val_weights)
        for split, values in results.items():
            for key, value in values.items():
                writer.add_scalar(f"{split}/{key}", value, state.epoch)

    write_record({
        "dataset": cfg.dataset.name,
        "data": description,
        "run_id": identity["config_hash"],
        "data_fingerprint": identity["data"],
        "overrides": [relative_to_data(o, cfg.paths.data_dir) for o in overrides()],
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
        "config": recorded_config(cfg),
    }, run_dir)
    summary = ", ".join(f"{split} {k}={v:.4g}" for split, vals in results.items() for k, v in vals.items())
    log.info("Done: %s", summary)
    return state.best_val_loss
