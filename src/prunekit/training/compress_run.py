"""``prunekit compress``: one-shot post-training compression of a trained model, as a recipe.

Example recipe::

    name: lenet300-sparsegpt50
    model: {run: runs/lenet300-dense}     # a `prunekit train` output directory
    # model: {name: lenet300_100, weights: path/to/model.pt}   (a state dict), with a data section
    calibration: {samples: 1024, batch_size: 128, seed: 0}   # drawn from the training split
    compress: {method: sparsegpt, sparsity: 0.5}             # the method's config
    finetune: {epochs: 1, lr: 0.01}                          # optional: sparse fine-tuning

Writes to the output directory: ``model.pt`` (the compressed model, dense format),
``model_sparse.pt`` (sparse export), ``model_quantized.pt`` (integer export, when ``bits`` is
set), ``metrics.json``, ``report.md`` and ``layer_error.png``. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.api import sparsify
from prunekit.atomic import save_atomic, write_text_atomic
from prunekit.config import ConfigError, check_keys, from_dict, to_dict
from prunekit.core import sparsity_report
from prunekit.data import ArrayDataset
from prunekit.posttrain import HessianError, compress
from prunekit.posttrain.export import save_quantized
from prunekit.posttrain.methods import get_compressor
from prunekit.posttrain.report import CompressionReport
from prunekit.training.checkpoint import load_sparse, read_sparse_metadata, save_sparse
from prunekit.training.guards import build_recipe_model
from prunekit.training.recipe import (
    DataSpec,
    ModelSpec,
    Recipe,
    apply_overrides,
    read_recipe_file,
    recipe_from_dict,
)
from prunekit.training.trainer import evaluate, load_data

logger = logging.getLogger(__name__)

__all__ = ["CompressRecipe", "compress_run", "load_compress_recipe"]


@dataclass(kw_only=True)
class SourceSpec:
    """Where the trained model comes from: a ``prunekit train`` directory, or a named model and a
    state-dict file."""

    run: str | None = None
    name: str | None = None
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.run is None) == (self.name is None):
            raise ConfigError(
                "model needs exactly one of 'run' (a prunekit train output directory) or 'name' "
                "(with 'weights': a state-dict file)"
            )
        if self.name is not None:
            ModelSpec(name=self.name, kwargs=self.kwargs)  # validates the name
            if self.weights is None:
                raise ConfigError(
                    "model.weights is required with model.name: compressing an untrained model "
                    "is meaningless"
                )


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

    model: SourceSpec
    compress: dict[str, Any]
    data: DataSpec | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    finetune: FinetuneSpec | None = None
    name: str | None = None

    def __post_init__(self) -> None:
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
    "model": SourceSpec,
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
            values[key] = from_dict(cls, values[key] or {}, where=key)
    return from_dict(CompressRecipe, values, where="compress recipe")


def load_compress_recipe(path: str | Path, overrides: list[str] | None = None) -> CompressRecipe:
    """Read and validate a YAML compress recipe, applying ``section.key=value`` overrides."""
    path = Path(path)
    data = read_recipe_file(path)
    try:
        return compress_recipe_from_dict(apply_overrides(data or {}, overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _train_recipe(recipe: CompressRecipe) -> tuple[Recipe, dict[str, Any]]:
    """The training recipe that describes the model and data, and the trained state dict."""
    src = recipe.model
    if src.run is not None:
        run = Path(src.run)
        sparse = run / "model_sparse.pt"
        if not sparse.is_file():
            raise ConfigError(
                f"model.run {run} holds no model_sparse.pt; pass the output directory of "
                "`prunekit train`"
            )
        trained = read_sparse_metadata(sparse).get("recipe")
        if not isinstance(trained, dict):
            raise ConfigError(f"{sparse} does not record its training recipe")
        data = dict(trained)
        if recipe.data is not None:
            data["data"] = dataclasses.asdict(recipe.data)
        return recipe_from_dict(data), load_sparse(sparse)
    assert src.name is not None and src.weights is not None
    state = torch.load(src.weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"model.weights {src.weights} is not a state dict")
    data_spec = recipe.data or DataSpec()
    train = Recipe(model=ModelSpec(name=src.name, kwargs=src.kwargs), data=data_spec)
    return train, state


def calibration_batches(
    data: ArrayDataset, spec: CalibrationSpec, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """``(images, labels)`` batches of ``spec.samples`` random training examples (seeded)."""
    g = torch.Generator().manual_seed(spec.seed)
    n = min(spec.samples, len(data.x_train))
    idx = torch.randperm(len(data.x_train), generator=g)[:n]
    return [
        (
            data.x_train[idx[i : i + spec.batch_size]].to(device),
            data.y_train[idx[i : i + spec.batch_size]].to(device),
        )
        for i in range(0, n, spec.batch_size)
    ]


def sparse_finetune(
    model: nn.Module, data: ArrayDataset, spec: FinetuneSpec, device: torch.device, seed: int
) -> None:
    """SGD over the training data with the model's zeros fixed (``method="constant"``), the
    learning rate decaying to 0 on a cosine; the model is left in evaluation mode."""
    from prunekit.data.datasets import BatchIterator

    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    pruner = sparsify(model, opt, method="constant")
    loader = BatchIterator(data.x_train, data.y_train, spec.batch_size, seed=seed)
    total = spec.epochs * len(loader)
    step = 0
    model.train()
    for epoch in range(spec.epochs):
        for x, y in loader.epoch(epoch):
            for group in opt.param_groups:  # cosine decay to 0 over the fine-tune
                group["lr"] = spec.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pruner.step()
            step += 1
    pruner.finalize()
    model.eval()


def compress_run(
    recipe: CompressRecipe,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compress the recipe's trained model and write the outputs (see the module docstring).

    Returns:
        The metrics written to ``metrics.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_recipe, state = _train_recipe(recipe)
    data = load_data(train_recipe)
    model = build_recipe_model(train_recipe, data)
    model.load_state_dict(state)
    model.to(dev).eval()
    dense_acc = evaluate(model, data.x_test, data.y_test)
    section = dict(recipe.compress)
    method = str(section.pop("method"))
    cal = calibration_batches(data, recipe.calibration, dev)
    labels = [y for _, y in cal] if get_compressor(method).global_method else None
    start = time.perf_counter()
    try:
        report = compress(
            model, [x for x, _ in cal], method, progress=progress, labels=labels, **section
        )
    except HessianError:
        raise
    except (ValueError, TypeError) as exc:  # a target/ignore typo, too few samples for ngrads...
        raise ConfigError(f"compress: {exc}") from None
    seconds = time.perf_counter() - start
    acc = evaluate(model, data.x_test, data.y_test)
    metrics: dict[str, Any] = {
        "name": recipe.name,
        "method": method,
        "model": train_recipe.model.name,
        "dense_test_accuracy": dense_acc,
        "test_accuracy": acc,
        "compress_seconds": seconds,
        "calibration_samples": sum(len(x) for x, _ in cal),
        "global_sparsity": sparsity_report(model)["global_sparsity"],
    }
    if recipe.finetune is not None:
        t0 = time.perf_counter()
        sparse_finetune(model, data, recipe.finetune, dev, recipe.calibration.seed)
        metrics["finetuned_test_accuracy"] = evaluate(model, data.x_test, data.y_test)
        metrics["finetune_seconds"] = time.perf_counter() - t0
        metrics["finetuned_global_sparsity"] = sparsity_report(model)["global_sparsity"]
    _write_outputs(out, model, report, recipe, train_recipe, metrics)
    return metrics


def _write_outputs(
    out: Path,
    model: nn.Module,
    report: CompressionReport,
    recipe: CompressRecipe,
    train_recipe: Recipe,
    metrics: dict[str, Any],
) -> None:
    from prunekit.training.plots import plot_layer_error

    cpu_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic(cpu_state, out / "model.pt")
    meta = {"model": train_recipe.model.name, "recipe": train_recipe.to_dict()}
    save_sparse(cpu_state, out / "model_sparse.pt", meta)
    if report.grids and "finetuned_test_accuracy" not in metrics:
        metrics["quantized_file_bytes"] = save_quantized(
            model, report, out / "model_quantized.pt", meta
        )
    elif report.grids:
        logger.warning("fine-tuning moved the weights off the grid: no integer export written")
    metrics["report"] = report.to_dict()
    metrics["compress_recipe"] = recipe.to_dict()
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    plot_layer_error(
        report.to_dict(), out / "layer_error.png", f"{metrics['model']} / {report.method}"
    )
    lines = [
        f"# {recipe.name or metrics['model']}: {report.method}",
        "",
        f"- dense test accuracy: {100 * metrics['dense_test_accuracy']:.2f}%",
        f"- compressed (no fine-tuning): {100 * metrics['test_accuracy']:.2f}%",
    ]
    if "finetuned_test_accuracy" in metrics:
        lines.append(
            f"- after {recipe.finetune.epochs if recipe.finetune else 0} epoch(s) of sparse "
            f"fine-tuning: {100 * metrics['finetuned_test_accuracy']:.2f}%"
        )
    lines += [
        f"- compression time: {metrics['compress_seconds']:.1f} s "
        f"({metrics['calibration_samples']} calibration samples)",
        "",
        report.table(),
        "",
    ]
    write_text_atomic(out / "report.md", "\n".join(lines))
