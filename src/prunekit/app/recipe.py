"""YAML recipes: a whole training run as data, validated strictly.

Example::

    model: {name: lenet300_100}
    data: {name: mnist, batch_size: 128}
    pruning: {method: dpf, sparsity: 0.98}      # omit for dense training
    communication: {method: qsgd, levels: 16}   # data-parallel runs: compressed gradients
    optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.0001}
    lr_schedule: {name: cosine}
    epochs: 20
    seed: 0

Every section is a dataclass; an unknown key anywhere is an error naming it and the valid keys. The
``pruning`` section is checked against the method's own config class (``total_steps`` is filled in
from ``epochs`` and the data), the ``structured`` section (``{optimizer: hesso, ...}``) against that
optimizer's config class (:mod:`prunekit.structured.registry`).

Files and ``--set`` values are read with YAML 1.2 scalar rules (:mod:`prunekit.app.yaml12`), so
``pattern: 2:4`` is the string ``"2:4"`` and ``lr: 1e-3`` is a float (YAML 1.1 made them the integer
124 and a string).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunekit.app.yaml12 import load_yaml
from prunekit.config import ConfigError, check_keys, from_dict, to_dict
from prunekit.data import DATASETS
from prunekit.methods.registry import get_method
from prunekit.models import available_models

OPTIMIZERS = ("sgd", "adam", "adamw")
#: ``train+val``: all 60k MNIST training images; ``train``: the first 50k (MNIST only)
DATA_SPLITS = ("train+val", "train")
LR_SCHEDULES = ("constant", "cosine", "linear", "step")


@dataclass(kw_only=True)
class ModelSpec:
    """The network: a registered architecture ``name`` (with ``kwargs``), optionally starting from
    trained ``weights`` (a state-dict file or a prunekit model file); or ``run``, the final model of a
    prunekit run directory, whose architecture comes from the recipe that run recorded."""

    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    run: str | None = None

    def __post_init__(self) -> None:
        if (self.run is None) == (self.name is None):
            raise ConfigError(
                "model needs exactly one of 'name' (an architecture, optionally with 'weights': a "
                "state-dict file) or 'run' (a prunekit output directory)"
            )
        if self.run is not None and (self.kwargs or self.weights is not None):
            raise ConfigError(
                "model.run takes the architecture and weights from that run; remove model.kwargs "
                "and model.weights"
            )
        if self.name is not None and self.name not in available_models():
            raise ConfigError(
                f"model.name {self.name!r} unknown; available: {', '.join(available_models())}"
            )
        fixed = sorted({"input_shape", "num_classes"} & set(self.kwargs))
        if fixed:
            raise ConfigError(
                f"model.kwargs may not set {', '.join(fixed)}: it comes from the data set"
            )

    @property
    def label(self) -> str:
        """The architecture's name, or the run it comes from."""
        return self.name if self.name is not None else f"run {self.run}"


@dataclass(kw_only=True)
class DataSpec:
    name: str = "mnist"
    root: str | None = None
    split: str = "train+val"
    batch_size: int = 128
    train_subset: int | None = None
    test_subset: int | None = None
    num_samples: int = 5000

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"data.name {self.name!r} unknown; available: {', '.join(DATASETS)}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(
                    f"data.{key} must be >= 1 (the number of examples to keep) or null for all, "
                    f"got {value}"
                )
        if self.split not in DATA_SPLITS:
            raise ConfigError(
                f"data.split {self.split!r} unknown; available: {', '.join(DATA_SPLITS)}"
            )
        if self.num_samples < 1:
            raise ConfigError(f"data.num_samples must be >= 1, got {self.num_samples}")


@dataclass(kw_only=True)
class OptimizerSpec:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    #: clip the gradient's global 2-norm to this before each step (``None``: no clipping)
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer.name {self.name!r} unknown; available: {', '.join(OPTIMIZERS)}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optimizer.lr must be positive and finite, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0.0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0.0):
            raise ConfigError(
                "optimizer.nesterov needs optimizer.name sgd and a positive optimizer.momentum"
            )
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(
                f"optimizer.clip_grad_norm must be positive, got {self.clip_grad_norm}"
            )


@dataclass(kw_only=True)
class ScheduleSpec:
    name: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ConfigError(
                f"lr_schedule.name {self.name!r} unknown; available: {', '.join(LR_SCHEDULES)}"
            )
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise ConfigError(f"lr_schedule.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not all(0 < m <= 1 for m in self.milestones):
            raise ConfigError(
                f"lr_schedule.milestones are fractions of training in (0, 1], got {self.milestones}"
            )
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"lr_schedule.gamma must be positive, got {self.gamma}")


@dataclass(kw_only=True)
class Recipe:
    """A validated recipe. ``pruning`` is the method's config minus ``total_steps``, plus ``method``."""

    model: ModelSpec
    data: DataSpec = field(default_factory=DataSpec)
    pruning: dict[str, Any] | None = None
    #: Only-Train-Once structured pruning: ``{optimizer: hesso, <HESSOConfig fields>}`` (or
    #: ``hspg`` / ``dhspg`` and their config's fields), validated against that optimizer's config;
    #: without ``optimizer`` the section is for HESSO. Fractions of training become steps when
    #: training starts; the update rule comes from the ``optimizer`` section.
    structured: dict[str, Any] | None = None
    #: data-parallel runs: the gradient compression (a gradient compression method of ``prunekit.distributed``) and its
    #: config, e.g. ``{method: qsgd, levels: 16}``; ignored (with a warning) by a single process
    communication: dict[str, Any] | None = None
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    lr_schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    epochs: int = 10
    seed: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.pruning is not None:
            validate_pruning(self.pruning)
        if self.communication is not None:
            validate_communication(self.communication)
        if self.structured is not None:
            self.structured = validate_structured(self.structured)
        if self.pruning is not None and self.structured is not None:
            raise ConfigError(
                "a recipe has either 'pruning' (sparse training) or 'structured' (OTO), not both"
            )

    @property
    def sparsity_target(self) -> float | None:
        """The sparsity a ``pruning`` section asks for (``None`` for dense and structured runs)."""
        if self.pruning is None:
            return None
        if "sparsity" in self.pruning:
            return float(self.pruning["sparsity"])
        config = get_method(str(self.pruning["method"])).config_class
        default = {f.name: f.default for f in dataclasses.fields(config)}.get("sparsity")
        return float(default) if isinstance(default, int | float) else None

    @property
    def method(self) -> str:
        if self.structured is not None:
            return str(self.structured["optimizer"])
        return "dense" if self.pruning is None else str(self.pruning["method"])

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "optimizer": OptimizerSpec,
    "lr_schedule": ScheduleSpec,
}


def validate_pruning(section: dict[str, Any], total_steps: int = 1_000_000) -> None:
    """Check a ``pruning`` section against its method's config class.

    The real ``total_steps`` is known only when the data is loaded; checks that depend on it run
    again when training starts.
    """
    if "method" not in section:
        raise ConfigError("pruning needs a 'method' key (e.g. method: dpf)")
    try:
        cls = get_method(str(section["method"]))
    except ValueError as exc:
        raise ConfigError(f"pruning.method: {exc}") from None
    fields = {k: v for k, v in section.items() if k != "method"}
    if "total_steps" in fields:
        raise ConfigError("pruning.total_steps is derived from epochs and the data; remove it")
    valid = [f.name for f in dataclasses.fields(cls.config_class) if f.name != "total_steps"] + [
        "method"
    ]
    check_keys(section, valid, f"pruning (method {section['method']})")
    from_dict(cls.config_class, {**fields, "total_steps": total_steps}, where="pruning")


def validate_communication(section: dict[str, Any]) -> None:
    """Check a ``communication`` section against its gradient compression method's config class."""
    from prunekit.distributed import get_gradient_method

    if not isinstance(section, dict) or "method" not in section:
        raise ConfigError("communication needs a 'method' key (e.g. communication: {method: qsgd})")
    try:
        entry = get_gradient_method(str(section["method"]))
    except ConfigError as exc:
        raise ConfigError(f"communication.method: {exc}") from None
    valid = [f.name for f in dataclasses.fields(entry.config_class)] + ["method"]
    check_keys(section, valid, f"communication (method {section['method']})")
    fields = {k: v for k, v in section.items() if k != "method"}
    from_dict(entry.config_class, fields, where="communication")


def validate_structured(section: dict[str, Any]) -> dict[str, Any]:
    """Check a ``structured`` section against its optimizer's config class; return it with the
    ``optimizer`` key filled in (HESSO when absent)."""
    from prunekit.structured.registry import DEFAULT_STRUCTURED, config_from_section

    config_from_section(section, where="structured")
    return {"optimizer": DEFAULT_STRUCTURED, **section}


def recipe_from_dict(data: dict[str, Any], *, recorded: bool = False) -> Recipe:
    """Build a :class:`Recipe` strictly from plain data.

    Args:
        data: the recipe as written by a user (a YAML file), or as recorded by a run.
        recorded: ``data`` comes from :meth:`Recipe.to_dict` (a checkpoint, a model file's
            metadata), where a ``None`` section means "absent"; in a user's file ``structured:``
            alone means HESSO with its defaults.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping, got {type(data).__name__}")
    data = copy.deepcopy(data)
    check_keys(
        data,
        [*_SECTIONS, "pruning", "structured", "communication", "epochs", "seed", "name"],
        "recipe",
    )
    if "model" not in data:
        raise ConfigError("recipe needs a 'model' section (e.g. model: {name: lenet300_100})")
    for key, cls in _SECTIONS.items():
        if key in data:
            value = data[key]
            if key == "model" and isinstance(value, str):
                value = {"name": value}
            data[key] = from_dict(cls, value or {}, where=key)
    if "structured" in data and data["structured"] is None:
        if recorded:
            del data["structured"]
        else:  # `structured:` alone in a file: HESSO with its defaults
            data["structured"] = {}
    return from_dict(Recipe, data, where="recipe")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML 1.2, like the recipe file)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        keys = path.split(".")
        node = data
        if len(keys) > 1 and isinstance(data.get("model"), str) and keys[0] == "model":
            data["model"] = {"name": data["model"]}  # `model: NAME` is short for {name: NAME}
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        try:
            node[keys[-1]] = load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_one_line(exc)}); quote it, "
                "e.g. --set 'name=\"a: b\"'"
            ) from None
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def read_recipe_file(path: Path) -> Any:
    """The YAML 1.2 data of a recipe file; every way of not being one is a one-line ConfigError."""
    if not path.exists():
        raise ConfigError(f"recipe {path} not found")
    if not path.is_file():
        raise ConfigError(f"recipe {path} is not a file; pass a YAML recipe file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(
            f"recipe {path} is not a text file (not UTF-8); pass a YAML recipe"
        ) from None
    except OSError as exc:
        raise ConfigError(f"recipe {path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a YAML recipe file, applying ``overrides``."""
    path = Path(path)
    data = read_recipe_file(path)
    try:
        return recipe_from_dict(apply_overrides(data or {}, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
