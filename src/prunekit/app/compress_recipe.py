"""``prunekit compress`` recipes: one-shot post-training compression of a trained model, as data.

Example::

    name: lenet300-sparsegpt50
    model: {run: runs/lenet300-dense}     # a `prunekit train` output directory
    # model: {name: lenet300_100, weights: path/to/model.pt}   (a state dict), with a data section
    calibration: {samples: 1024, batch_size: 128, seed: 0}   # drawn from the training split
    compress: {method: sparsegpt, sparsity: 0.5}             # the method's config
    finetune: {epochs: 1, lr: 0.01}                          # optional: sparse fine-tuning

A Hugging Face causal language model, from a local folder, with plain-text calibration and
evaluation (:class:`LMCompressRecipe`)::

    model: {pretrained: models/llama-tiny}                 # a save_pretrained folder, read offline
    calibration: {text: data/train.txt, samples: 128, seq_len: 512, seed: 0}
    evaluation: {text: data/test.txt}                      # perplexity before and after
    compress: {method: sparsegpt, sparsity: 0.5}

For a language model SparseGPT's ``mask_scope`` defaults to ``"block"`` (measured better on decoder
LMs; :class:`~prunekit.posttrain.methods.SparseGPTConfig`).

Every section is a dataclass validated strictly; the ``compress`` section against the method's own
config class (:mod:`prunekit.posttrain.methods`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.app.recipe import DataSpec, ModelSpec, apply_overrides, read_recipe_file
from prunekit.config import ConfigError, check_int, check_keys, from_dict, to_dict
from prunekit.posttrain.methods import get_compressor

__all__ = [
    "CalibrationSpec",
    "CompressRecipe",
    "FinetuneSpec",
    "LMCompressRecipe",
    "PretrainedSpec",
    "TextCalibrationSpec",
    "TextEvaluationSpec",
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
        cfg = _check_method(self.compress)
        if self.finetune is not None and cfg.bits is not None:
            raise ConfigError(
                "finetune after quantization would move the weights off the grid (and lose the "
                "integer export); remove 'finetune' or 'bits'"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _check_method(section: dict[str, Any]) -> Any:
    """The compress section's method config (validated), or a one-line error."""
    fields = dict(section)
    method = fields.pop("method", None)
    if method is None:
        raise ConfigError("compress needs a 'method' key (e.g. method: sparsegpt)")
    try:
        cls = get_compressor(str(method))
    except ValueError as exc:
        raise ConfigError(f"compress.method: {exc}") from None
    return cls.config_class.from_dict(fields)


@dataclass(kw_only=True)
class PretrainedSpec:
    """A Hugging Face model folder (``save_pretrained``'s), read offline."""

    pretrained: str


@dataclass(kw_only=True)
class TextCalibrationSpec:
    """Calibration from a text file: ``samples`` sequences of ``seq_len`` tokens (default: the
    smaller of 2048 and the model's longest), drawn from the packed text with ``seed``."""

    text: str
    samples: int = 128
    seq_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("calibration.samples", self.samples, 1)
        if self.seq_len is not None:
            check_int("calibration.seq_len", self.seq_len, 2)
        check_int("calibration.seed", self.seed, 0)


@dataclass(kw_only=True)
class TextEvaluationSpec:
    """Perplexity on a text file, packed into sequences of ``seq_len`` tokens (default: the
    calibration's)."""

    text: str
    seq_len: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.seq_len is not None:
            check_int("evaluation.seq_len", self.seq_len, 2)
        check_int("evaluation.batch_size", self.batch_size, 1)


@dataclass(kw_only=True)
class LMCompressRecipe:
    """A validated ``prunekit compress`` recipe for a Hugging Face causal language model."""

    model: PretrainedSpec
    compress: dict[str, Any]
    calibration: TextCalibrationSpec
    evaluation: TextEvaluationSpec | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        _check_method(self.compress)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


#: SparseGPT's mask scope for a causal language model unless the recipe sets one: measured lower
#: perplexity than the library's default "row" (see SparseGPTConfig.mask_scope)
DECODER_MASK_SCOPE = "block"

_LM_SECTIONS: dict[str, type] = {
    "model": PretrainedSpec,
    "calibration": TextCalibrationSpec,
    "evaluation": TextEvaluationSpec,
}


def _lm_recipe_from_dict(data: dict[str, Any]) -> LMCompressRecipe:
    check_keys(data, [*_LM_SECTIONS, "compress", "name"], "compress recipe (pretrained model)")
    for key in ("compress", "calibration"):
        if key not in data:
            raise ConfigError(f"compress recipe needs a '{key}' section")
    values = dict(data)
    for key, cls in _LM_SECTIONS.items():
        if values.get(key) is not None:
            values[key] = from_dict(cls, values[key], where=key)
    section = values["compress"]
    if isinstance(section, dict) and section.get("method") == "sparsegpt":
        # decoder LMs: the block mask, measured better (see SparseGPTConfig.mask_scope)
        values["compress"] = {"mask_scope": DECODER_MASK_SCOPE, **section}
    return from_dict(LMCompressRecipe, values, where="compress recipe")


_SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "data": DataSpec,
    "calibration": CalibrationSpec,
    "finetune": FinetuneSpec,
}


def compress_recipe_from_dict(data: dict[str, Any]) -> CompressRecipe | LMCompressRecipe:
    """Strict construction from plain data (unknown keys name the valid ones); a ``model`` section
    with ``pretrained`` makes a :class:`LMCompressRecipe`."""
    if not isinstance(data, dict):
        raise ConfigError(f"a compress recipe must be a mapping, got {type(data).__name__}")
    model = data.get("model")
    if isinstance(model, dict) and "pretrained" in model:
        return _lm_recipe_from_dict(data)
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


def load_compress_recipe(
    path: str | Path, overrides: list[str] | None = None
) -> CompressRecipe | LMCompressRecipe:
    """Read and validate a YAML compress recipe, applying ``section.key=value`` overrides."""
    path = Path(path)
    data = read_recipe_file(path)
    try:
        return compress_recipe_from_dict(apply_overrides(data or {}, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
