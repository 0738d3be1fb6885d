"""Composing a run from its config: checks before any data loads, then the data, the model (its
`???` keys filled in from the data), the penalty, the feature cache of a frozen backbone, the
loaders and the optimisation. Each step is a small function; `cdep_exp.run.app` strings them
together."""
import dataclasses
import logging
import math
import random
import sys
from collections.abc import Callable
from functools import partial
from numbers import Real
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from cdep_exp.data.base import ANNOTATIONS, Splits
from cdep_exp.data.groups import group_annotated
from cdep_exp.data.word_vectors import word_vectors
from cdep_exp.errors import ConfigError
from cdep_exp.feature_cache import CacheSettings, cache_splits, frozen_backbone
from cdep_exp.penalties.base import Penalty
from cdep_exp.run.checks import check_target, non_finite
from cdep_exp.run.stages import Stage, StageContext
from cdep_exp.scoring.evaluation import evaluate_splits
from cdep_exp.training import EpochBatches, Optimisation, Precision, TrainerSettings

log = logging.getLogger(__name__)

# Keys of a dataset config that describe the experiment rather than being builder arguments.
DATASET_META_KEYS = ("name", "metrics")


def validate(cfg: DictConfig) -> float:
    """Fail before any data loads on settings that cannot run (every key is named); returns λ."""
    lam = cfg.method.lam
    if isinstance(lam, bool) or not isinstance(lam, Real) or not np.isfinite(lam) or lam < 0:
        raise ConfigError(f"method.lam={lam!r} is invalid: λ must be a finite number >= 0 (e.g. method.lam=100).")
    if cfg.method.penalty._target_.endswith(".Vanilla") and lam != 0:
        raise ConfigError(f"method={cfg.method.name} has no penalty, so method.lam must be 0; choose a method with "
                          f"one (cdep, rrr, eg, …).")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed!r} must be an integer >= 0.")
    for key in ("data_dir", "output_dir"):
        value = cfg.paths.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"paths.{key}={value!r} must be one folder (a path), e.g. paths.{key}=data.")
    bad = non_finite(OmegaConf.to_container(cfg, resolve=True))
    if bad:
        raise ConfigError(f"{bad[0]}={OmegaConf.select(cfg, bad[0])} is not a finite number.")
    check_target(cfg.dataset, "dataset", skip=DATASET_META_KEYS)
    check_target(cfg.model, "model", skip=("embeddings",))
    check_target(cfg.method.penalty, "method.penalty")
    if cfg.method.get("stage"):
        check_target(cfg.method.stage, "method.stage")
    for group in ("optimizer", "scheduler"):
        if cfg.get(group):
            check_target(cfg[group], group)
    return float(lam)


def check_splits(splits: Splits, builder: str) -> None:
    """Every split must hold samples, and tensor inputs must be finite: an empty split or a NaN
    in the data fails here, before the first step, instead of as a NaN loss blamed on λ."""
    parts = splits.named_datasets()
    empty = [name for name, dataset in parts.items() if len(dataset) == 0]
    if empty:
        raise ConfigError(f"{builder} returned an empty {empty[0]} split; check the data files and the "
                          f"dataset's split settings.")
    for name, dataset in parts.items():
        x = dataset.tensors[0] if isinstance(dataset, TensorDataset) else None
        if x is not None and x.is_floating_point() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise ConfigError(f"{builder}: {bad} sample(s) of the {name} split hold NaN or infinite inputs; "
                              f"check the data files.")


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
    for field, base in (("shortcut", None), ("val_shortcut", "val")):
        name = getattr(splits, field)
        if name is None:
            continue
        cf = splits.counterfactuals.get(name)
        if cf is None or (base is not None and cf.test != base):
            raise ConfigError(f"{dataset_cfg._target_} names {field}={name!r}, which is none of its counterfactuals"
                              f"{' of ' + repr(base) if base else ''} "
                              f"({', '.join(splits.counterfactuals) or 'none'}).")
    bases = {"val", *splits.tests}
    for name, cf in splits.counterfactuals.items():
        if cf.test not in bases:
            raise ConfigError(f"{dataset_cfg._target_}: counterfactual {name!r} changes split {cf.test!r}, which is "
                              f"neither 'val' nor a test set ({', '.join(splits.tests)}).")
    check_splits(splits, dataset_cfg._target_)
    return splits


def data_contract(splits: Splits) -> dict[str, int]:
    """Model arguments the data fixes: class count, input channels (a sample's first axis),
    input features (all of a sample's values: an MLP flattens images), vocabulary size."""
    known = {"num_classes": splits.num_classes}
    if splits.input_shape:
        known["in_channels"] = splits.input_shape[0]
        known["in_features"] = math.prod(splits.input_shape)
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
    """Whether to train the head of a frozen-backbone model on cached backbone outputs: not for a
    penalty that needs input gradients (RRR, EG), nor for one that can read neither the cache's
    relevant-part annotation nor the group or weight annotations the run makes."""
    if settings.enabled is False or frozen_backbone(model) is None:
        return False
    if penalty.input_gradients or not {"relevant", "group", "weight"} & set(penalty.annotations):
        why = "gradients with respect to the inputs" if penalty.input_gradients else "its annotation on the inputs"
        if settings.enabled is True:
            raise ConfigError(f"method={method} needs {why}, which cached features do not have: "
                              f"set feature_cache.enabled=auto or false.")
        log.info("Feature cache off: method=%s needs %s, so the whole %s runs on them.", method, why,
                 type(model).__name__)
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


def trainer_settings(trainer_cfg: DictConfig) -> TrainerSettings:
    """The trainer group as its structured config (Hydra has checked the types while composing;
    the ranges are checked here, with the key named in a ConfigError), `progress="auto"`
    resolved: bars in a terminal, one log line per epoch otherwise."""
    known = [f.name for f in dataclasses.fields(TrainerSettings)]
    unknown = sorted(set(trainer_cfg.keys()) - set(known))
    if unknown:  # appended with "+", which Hydra lets through even on a structured config
        raise ConfigError(f"trainer.{unknown[0]} is not a trainer setting (known: {', '.join(known)}).")
    settings = OmegaConf.to_object(trainer_cfg)
    return dataclasses.replace(settings, progress=progress_bars(settings.progress))


def make_loaders(splits: Splits, settings: TrainerSettings, seed: int, device: torch.device
                 ) -> tuple[EpochBatches, Callable[[Dataset], DataLoader]]:
    """(the training batches, reshuffled per epoch from `seed`; a factory of evaluation loaders)."""
    generator = torch.Generator()
    loader = partial(DataLoader, num_workers=settings.num_workers, collate_fn=splits.collate_fn,
                     pin_memory=device.type == "cuda")
    if splits.batch_sampler is None:
        train = loader(splits.train, batch_size=settings.batch_size, shuffle=True, generator=generator)
    else:
        train = loader(splits.train, batch_sampler=splits.batch_sampler(settings.batch_size, generator))
    return EpochBatches(train, generator, seed), partial(loader, batch_size=settings.eval_batch_size, shuffle=False)


def build_optimisation(cfg: DictConfig, model: torch.nn.Module, max_epochs: int) -> Optimisation:
    """The optimizer over the model's parameters and the learning-rate schedule, if any
    (`T_max: ???` of a cosine schedule becomes the run's epoch count)."""
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler_cfg = cfg.get("scheduler")
    if not scheduler_cfg:
        return Optimisation(optimizer)
    if "T_max" in scheduler_cfg.keys() and OmegaConf.is_missing(scheduler_cfg, "T_max"):
        scheduler_cfg.T_max = max_epochs
    return Optimisation(optimizer, instantiate_plain(scheduler_cfg)(optimizer))


def progress_bars(setting: bool | str) -> bool:
    """trainer.progress: true / false, or auto: bars in a terminal, one log line per epoch otherwise."""
    return sys.stderr.isatty() if setting == "auto" else bool(setting)


def build_learner(cfg: DictConfig, splits: Splits, device: torch.device, settings: TrainerSettings,
                  directory: Path) -> tuple[torch.nn.Module, Penalty, Splits, Stage | None, StageContext]:
    """The model (on `device`), the penalty bound to the data's annotation, the splits it trains
    on, and the method's stage (`method.stage`, or None) with what the stage uses. For a model
    with a frozen backbone that the method can train on cached features: the trainable head and
    the splits of cached backbone outputs. A penalty that reads groups gets each training
    sample's group as its annotation; a stage before the fit (JTT's error identification) runs
    here and may re-annotate the training data. Every combination that cannot train fails here
    with one line (a penalty that cannot read the annotation, a dataset without the groups a
    method reads, a model that does not fit the data, a precision the device lacks)."""
    model = build_model(cfg.model, splits).to(device)
    penalty = build_penalty(cfg.method)
    cache = CacheSettings(**OmegaConf.to_container(cfg.feature_cache, resolve=True))
    if use_feature_cache(model, penalty, cache, cfg.method.name):
        if not cfg.method.get("stage"):  # a stage may re-annotate the data: bound after it, below
            # A method that cannot read this data fails now, not after the cache is built (a minute for VGG16).
            try:
                annotated = group_annotated(splits)[0] if "group" in penalty.annotations else splits
            except ValueError as err:
                raise not_applicable(cfg, err) from err
            bind_penalty(cfg, penalty, annotated)
        backbone, model = frozen_backbone(model)
        cache_dir = Path(cache.dir) if cache.dir else Path(cfg.paths.data_dir) / "cache" / "features"
        splits = cache_splits(splits, backbone, cache, cache_dir, device, bool(settings.progress))
    check_model_fits(model, splits, device)
    try:
        if "group" in penalty.annotations:
            splits, names = group_annotated(splits)
            log.info("%s reads %d training groups (class, attribute): %s", cfg.method.name, len(names),
                     ", ".join(f"({y}, {a})" for y, a in names))
        stage = instantiate_plain(cfg.method.stage) if cfg.method.get("stage") else None
        context = stage_context(cfg, splits, settings, device, directory, penalty)
        if stage is not None:
            splits = stage.before_fit(model, context)
            context = context.rebuild(splits)  # loaders of the new splits
    except ValueError as err:
        raise not_applicable(cfg, err) from err
    bind_penalty(cfg, penalty, splits)
    try:
        Precision(settings.precision, device)
    except ValueError as err:
        raise ConfigError(f"{err}.") from err
    return model, penalty, splits, stage, context


def not_applicable(cfg: DictConfig, err: ValueError) -> ConfigError:
    """The one-line error of a method that cannot train on the run's dataset."""
    return ConfigError(f"method={cfg.method.name} on dataset {cfg.dataset.name}: {str(err).rstrip('.')}.")


def bind_penalty(cfg: DictConfig, penalty: Penalty, splits: Splits) -> None:
    """Hands `penalty` the data's counterfactual builder and binds it to the annotation kind
    (`Penalty.bind`). Raises ConfigError (`not_applicable`) where the penalty cannot read it."""
    try:
        penalty.counterfactual = splits.counterfactual_input
        penalty.bind(splits.annotation)
    except ValueError as err:
        raise not_applicable(cfg, err) from err


def stage_context(cfg: DictConfig, splits: Splits, settings: TrainerSettings, device: torch.device,
                  directory: Path, penalty: Penalty | None = None) -> StageContext:
    """What a method's stage (and the main fit) train with: loaders, optimisation, task loss, the
    method's penalty and λ, the run's scoring of a model, and the same for other splits."""
    batches, eval_loader = make_loaders(splits, settings, cfg.seed, device)
    weights = None if splits.class_weights is None else splits.class_weights.to(device)
    val_weights = weights if settings.weighted_val_loss else None
    score = partial(evaluate_splits, splits=splits, make_loader=eval_loader, device=device,
                    metric_names=list(cfg.dataset.metrics), val_weights=val_weights)
    return StageContext(splits, settings, batches, eval_loader,
                        lambda model: build_optimisation(cfg, model, settings.max_epochs),
                        partial(F.cross_entropy, weight=weights), device, directory, penalty, float(cfg.method.lam),
                        score, partial(stage_context, cfg, settings=settings, device=device, directory=directory,
                                       penalty=penalty))
