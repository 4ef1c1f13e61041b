"""``prunekit compress`` recipes: one-shot post-training compression of a trained model, as data.

Example::

    name: lenet300-sparsegpt50
    model: {run: runs/lenet300-dense}     # a `prunekit train` output directory
    # model: {name: lenet300_100, weights: path/to/model.pt}   (a state dict), with a data section
    calibration: {samples: 1024, batch_size: 128, seed: 0}   # drawn from the training split
    compress: {method: sparsegpt, sparsity: 0.5}             # the method's config
    finetune: {epochs: 1, lr: 0.01}                          # optional: sparse fine-tuning

Every section is a dataclass validated strictly; the ``compress`` section against the method's own
config class (:mod:`prunekit.posttrain.methods`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.app.recipe import DataSpec, ModelSpec, apply_overrides, read_recipe_file
from prunekit.config import ConfigError, check_keys, from_dict, to_dict
from prunekit.posttrain.methods import get_compressor

__all__ = [
    "CalibrationSpec",
    "CompressRecipe",
    "FinetuneSpec",
    "compress_recipe_from_dict",
    "load_compress_recipe",
]


@dataclass(kw_only=True)
class CalibrationSpec:
    """Calibration inputs: ``samples`` random training images in batches of ``batch_size``."""

    samples: int = 1024
    batch_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"calibration.{key} must be >= 1, got {getattr(self, key)}")


@dataclass(kw_only=True)
class FinetuneSpec:
    """Sparse fine-tuning after compression (``method="constant"``: the zeros stay zero)."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"finetune.epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"finetune.lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"finetune.momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"finetune.weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise ConfigError(f"finetune.batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class CompressRecipe:
    """A validated ``prunekit compress`` recipe (see the module docstring)."""

    model: ModelSpec
    compress: dict[str, Any]
    data: DataSpec | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    finetune: FinetuneSpec | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.model.name is not None and self.model.weights is None:
            raise ConfigError(
                "model.weights is required with model.name: compressing an untrained model is "
                "meaningless (or give model.run, a prunekit output directory)"
            )
        section = dict(self.compress)
        method = section.pop("method", None)
        if method is None:
            raise ConfigError("compress needs a 'method' key (e.g. method: sparsegpt)")
        try:
            cls = get_compressor(str(method))
        except ValueError as exc:
            raise ConfigError(f"compress.method: {exc}") from None
        cfg = cls.config_class.from_dict(section)
        if self.finetune is not None and cfg.bits is not None:
            raise ConfigError(
                "finetune after quantization would move the weights off the grid (and lose the "
                "integer export); remove 'finetune' or 'bits'"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "calibration": CalibrationSpec,
    "finetune": FinetuneSpec,
}


def compress_recipe_from_dict(data: dict[str, Any]) -> CompressRecipe:
    """Strict construction from plain data (unknown keys name the valid ones)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a compress recipe must be a mapping, got {type(data).__name__}")
    check_keys(data, [*_SECTIONS, "compress", "name"], "compress recipe")
    for key in ("model", "compress"):
        if key not in data:
            raise ConfigError(f"compress recipe needs a '{key}' section")
    values = dict(data)
    for key, cls in _SECTIONS.items():
        if key in values and values[key] is not None:
            value = values[key]
            if key == "model" and isinstance(value, str):
                value = {"name": value}
            values[key] = from_dict(cls, value or {}, where=key)
    return from_dict(CompressRecipe, values, where="compress recipe")


def load_compress_recipe(path: str | Path, overrides: list[str] | None = None) -> CompressRecipe:
    """Read and validate a YAML compress recipe, applying ``section.key=value`` overrides."""
    path = Path(path)
    data = read_recipe_file(path)
    try:
        return compress_recipe_from_dict(apply_overrides(data or {}, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
