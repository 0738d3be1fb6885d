"""One run: validate → lock its directory → seed → data → model and penalty → fit → evaluate →
record. The steps live in `compose` (building), `cdep_exp.training` (the loop),
`cdep_exp.scoring` (evaluation), `record` and `directory`; this module only orders them."""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from cdep_exp.data.fingerprint import splits_fingerprint
from cdep_exp.errors import ConfigError
from cdep_exp.provenance import device_name, git_revision, peak_memory_gib, reset_peak_memory, resolve_device
from cdep_exp.run.compose import build_learner, build_splits, seed_everything, trainer_settings, validate
from cdep_exp.run.directory import RunDirectory
from cdep_exp.run.identity import DataRoot, config_hash, config_identity, register_resolvers
from cdep_exp.run.record import FAILED, RunRecord
from cdep_exp.scoring.metrics import compute_metrics
from cdep_exp.training import Checkpointer, NonFiniteLossError, Objective, TrainerSettings, Validation, fit

log = logging.getLogger(__name__)

register_resolvers()


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as metrics.json keeps it, data paths written <data_dir>
    (`DataRoot.decode` restores them); the `paths` block itself stays as given."""
    config = OmegaConf.to_container(cfg, resolve=True)
    paths = config.pop("paths", None)
    return {**DataRoot(cfg.paths.data_dir).encode(config), "paths": paths}


def overrides() -> list[str]:
    """The command-line overrides of this run, when Hydra launched it."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# The datasets on which the methods' default λ (conf/method/*.yaml) were measured (docs/methods.md,
# "Default λ per dataset × method"); elsewhere a dataset × method pair without a pair file runs
# on a λ nobody tuned for it.
DEFAULT_LAMBDA_DATASETS = ("decoymnist", "decoyfmnist", "colormnist")


def untuned_lambda(choices: dict, config_dirs: list[Path], command_line: list[str], lam: float) -> str | None:
    """The warning for a run whose λ is its method's default on a dataset it was never tuned
    for, or None: no experiment preset, no `method.lam` on the command line, no pair file
    `pair/<dataset>_<method>.yaml` in any config directory, λ ≠ 0, another dataset than
    `DEFAULT_LAMBDA_DATASETS`."""
    dataset, method = choices.get("dataset"), choices.get("method")
    if choices.get("experiment") or dataset in DEFAULT_LAMBDA_DATASETS or lam == 0:
        return None
    if any(o.split("=", 1)[0].lstrip("+~") == "method.lam" for o in command_line):
        return None
    if any((root / "pair" / f"{dataset}_{method}.yaml").exists() for root in config_dirs):
        return None
    return (f"method={method} runs on dataset={dataset} with its default λ={lam:g}, which was never tuned for "
            f"this dataset (no conf/pair/{dataset}_{method}.yaml): set method.lam, or sweep it "
            f"(python train.py -m dataset={dataset} method={method} method.lam=0.01,1,100).")


def warn_untuned_lambda(lam: float) -> None:
    """Log `untuned_lambda`'s warning for a run Hydra launched."""
    if not HydraConfig.initialized():
        return
    runtime = HydraConfig.get().runtime
    dirs = [Path(source.path) for source in runtime.config_sources if source.schema == "file"]
    message = untuned_lambda(dict(runtime.choices), dirs, overrides(), lam)
    if message:
        log.warning(message)


def check_launcher_alive() -> None:
    """In a worker process of a local sweep (joblib), refuse to start when the sweep that
    launched it has been killed (the worker was re-parented), instead of running queued jobs."""
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        raise ConfigError(f"The sweep process {parent.pid} that launched this run has stopped; not starting it.")


def run(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Train and evaluate one configuration; returns the best validation loss (for sweepers).

    `run_dir` defaults to Hydra's output directory; tests and notebooks pass their own. The
    directory is locked while the run works in it; a second process fails at once. Raises
    ConfigError (one line: what to change) for settings or data that cannot work, and
    NonFiniteLossError when training diverges (its record is kept with status "failed").
    """
    check_launcher_alive()
    directory = RunDirectory(Path(run_dir or HydraConfig.get().runtime.output_dir))
    lam = validate(cfg)
    settings = trainer_settings(cfg.trainer)
    with directory.locked() as writable:
        return _run_locked(cfg, directory, lam, settings, writable)


def _start(directory: RunDirectory, identity: dict, settings: TrainerSettings, writable: bool) -> RunRecord | None:
    """Archive earlier outputs (trainer.force), or check that the directory holds this run;
    returns the finished record of a run to skip. Records the code revision of this attempt.
    A directory that cannot be written allows nothing but the skip."""
    previous = directory.record()
    if not writable:
        directory.check_identity(identity)
        if previous is None or not previous.finished or settings.force:
            raise ConfigError(f"Cannot write the run directory {directory.path} (read-only?) and its run is not "
                              f"finished (or trainer.force=true): choose a writable paths.output_dir.")
        log.info("Already finished (read-only directory): %s", directory.path / RunRecord.FILE)
        return previous
    directory.remove_partial_writes()
    if settings.force and directory.has_outputs():
        log.info("trainer.force=true: archiving the earlier outputs of %s and starting over", directory.path)
        directory.archive()
    else:
        directory.check_identity(identity)
        if previous is not None and previous.finished:
            log.info("Already finished: %s (trainer.force=true runs it again)", directory.path / RunRecord.FILE)
            return previous
    earlier, now = (directory.identity() or {}).get("revisions", []), identity["revisions"][-1]
    if earlier and earlier[-1] != now:
        log.warning("Resuming %s with other code: started at %s, now %s (dirty: %s); every revision is recorded.",
                    directory.path, earlier[-1]["commit"][:10], now["commit"][:10], now["dirty"])
    identity["revisions"] = earlier if earlier[-1:] == [now] else [*earlier, now]
    directory.write_identity(identity)
    return None


def _run_locked(cfg: DictConfig, directory: RunDirectory, lam: float, settings: TrainerSettings,
                writable: bool) -> float:
    seed_everything(cfg.seed, settings.deterministic)
    device = resolve_device(cfg.device)
    reset_peak_memory(device)
    splits = build_splits(cfg.dataset)
    data_root = DataRoot(cfg.paths.data_dir)
    description = data_root.encode(splits.description or cfg.dataset.name)
    identity = {"config_hash": config_hash(cfg), "config": config_identity(cfg), "data": splits_fingerprint(splits),
                "description": description, "revisions": [git_revision(Path(__file__).parent)]}
    finished = _start(directory, identity, settings, writable)
    if finished is not None:
        return finished.best_val_loss
    model, penalty, splits, stage, context = build_learner(cfg, splits, device, settings, directory.checkpoints)
    # Only now: a method that cannot apply to the data has failed with its one line, and a finished run was skipped.
    warn_untuned_lambda(lam)
    log.info("%s | %s λ=%g | %s on %s | run dir %s", description, cfg.method.name, lam,
             type(model).__name__, device, directory.path)
    metric_names = list(cfg.dataset.metrics)
    weights = None if splits.class_weights is None else splits.class_weights.to(device)
    val_weights = weights if settings.weighted_val_loss else None
    checkpointer = Checkpointer(directory.checkpoints, resume=settings.resume)
    objective = Objective(penalty, lam, context.task_loss, task_weight=0.0 if penalty.replaces_task_loss else 1.0)
    validation = Validation(
        context.eval_loader(splits.val), val_weights,
        lambda ev: compute_metrics(metric_names, ev.probs, ev.labels, splits.groups.get("val")))
    record = RunRecord(
        dataset=cfg.dataset.name, data=description, run_id=identity["config_hash"], data_fingerprint=identity["data"],
        overrides=data_root.encode(overrides()), method=cfg.method.name, lam=lam, seed=cfg.seed,
        model=type(model).__name__, device=str(device), device_name=device_name(device), metrics={}, shortcut=splits.shortcut,
        val_shortcut=splits.val_shortcut,
        git=identity["revisions"][-1], revisions=identity["revisions"], config=recorded_config(cfg))

    with SummaryWriter(directory.tensorboard) as writer:
        try:
            state = fit(model, objective, context.batches, validation, context.optimisation(model), settings,
                        checkpointer, writer)
        except NonFiniteLossError as err:
            record.status, record.error, record.history = FAILED, str(err), err.history
            record.write(directory.path)  # kept for diagnosis; tables and sweeps never count it
            raise
        if settings.restore_best:
            checkpointer.load_best(model)
        if stage is not None:
            stage.after_fit(model, context)
        results = context.score(model)
        for split, values in results.items():
            for key, value in values.items():
                writer.add_scalar(f"{split}/{key}", value, state.epoch)

    record.metrics, record.history = results, state.history
    record.stage = stage.summary(results) if stage is not None else {}
    record.epochs_run, record.best_epoch, record.best_val_loss = state.epoch, state.best_epoch, state.best_val_loss
    record.seconds_per_epoch = state.seconds / max(len(state.history), 1)
    for key, value in peak_memory_gib(device).items():
        setattr(record, key, value)
    record.write(directory.path)
    summary = ", ".join(f"{split} {k}={v:.4g}" for split, vals in results.items() for k, v in vals.items())
    log.info("Done: %s", summary)
    return state.best_val_loss
