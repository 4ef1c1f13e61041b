"""``prunekit compress``: a trained model in, a compressed model and its report out.

A run reads top to bottom:

1. **recipe** (:mod:`prunekit.app.compress_recipe`);
2. **source** — the trained model: a prunekit run directory (``model.run``) or an architecture and
   a weights file (:mod:`prunekit.app.model`), every way of being wrong one line;
3. **run directory** — ``out_dir`` claimed by :class:`~prunekit.app.run_dir.RunDir` (never the
   run it reads, never another run's outputs; a complete run is left as it is);
4. **data** and calibration batches (:mod:`prunekit.app.data`);
5. **compress** — :func:`prunekit.compress`, then the optional sparse fine-tuning;
6. **outputs** — ``model.pt`` (dense format), ``model_sparse.pt`` (sparse export),
   ``model_quantized.pt`` (integer export, when ``bits`` is set), ``metrics.json``, ``report.md``
   and ``layer_error.png``, each written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.api import sparsify
from prunekit.app.compress_recipe import CompressRecipe, FinetuneSpec, LMCompressRecipe
from prunekit.app.data import calibration_batches, fingerprint, load_data
from prunekit.app.lm_compression import compress_lm_run
from prunekit.app.loop import evaluate
from prunekit.app.model import Source, build_source_model, resolve_source
from prunekit.app.ranks import resolve_device
from prunekit.app.recipe import DataSpec, ModelSpec, Recipe
from prunekit.app.run_dir import RunDir, portable
from prunekit.config import ConfigError
from prunekit.core import sparsity_report
from prunekit.data import ArrayDataset, BatchIterator
from prunekit.posttrain import HessianError, compress
from prunekit.posttrain.export import save_quantized
from prunekit.posttrain.methods import get_compressor
from prunekit.posttrain.report import CompressionReport

logger = logging.getLogger(__name__)

__all__ = ["compress_run", "sparse_finetune"]


def compress_run(
    recipe: CompressRecipe | LMCompressRecipe,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Compress the recipe's trained model and write the outputs (see the module docstring).

    Args:
        recipe: a validated compress recipe (a :class:`LMCompressRecipe` runs
            :func:`~prunekit.app.lm_compression.compress_lm_run`).
        out_dir: the run directory (created); see :class:`~prunekit.app.run_dir.RunDir`.
        device: where to compress; defaults to CUDA when available, else CPU.
        progress: show a progress bar.
        overwrite: replace another run's outputs in ``out_dir`` instead of refusing.

    Returns:
        The metrics written to ``metrics.json`` (a complete run's own, with ``outputs_unchanged``,
        when ``out_dir`` already holds this run complete).

    Raises:
        ConfigError: a bad device, source model, ``out_dir`` or compress config; the files of
            ``out_dir`` and of the source are left as they were.
    """
    if isinstance(recipe, LMCompressRecipe):  # a Hugging Face language model folder
        return compress_lm_run(
            recipe, out_dir, device=device, progress=progress, overwrite=overwrite
        )
    dev = resolve_device(device)
    source = resolve_source(recipe.model)
    run = RunDir(out_dir, "compress")
    if source.path is not None:
        run.refuse_inside(source.path, source.what)
    with run:  # abandoned if it raises, released either way
        return _compress_run(recipe, source, run, dev, progress, overwrite)


def _training_recipe(recipe: CompressRecipe, source: Source) -> Recipe:
    """The recipe describing the source model's architecture and data (the run's own, with the
    compress recipe's ``data`` section in its place when there is one)."""
    if source.recipe is not None:
        if recipe.data is None:
            return source.recipe
        return dataclasses.replace(source.recipe, data=recipe.data)
    model = ModelSpec(name=source.name, kwargs=source.kwargs)
    return Recipe(model=model, data=recipe.data or DataSpec())


def _compress_run(
    recipe: CompressRecipe,
    source: Source,
    run: RunDir,
    dev: torch.device,
    progress: bool,
    overwrite: bool,
) -> dict[str, Any]:
    run.check_writable()
    train_recipe = _training_recipe(recipe, source)
    data = load_data(train_recipe.data, train_recipe.seed)
    identity = {
        "recipe": portable(recipe.to_dict()),
        "model": source.identity(),
        "data": fingerprint(data),
    }
    if run.open(identity, overwrite=overwrite, resume=False).status == "complete":
        logger.info("%s holds this run, complete: its outputs are left as they are", run.path)
        return {**run.read_metrics(), "outputs_unchanged": True}
    assert source.state is not None  # the compress recipe requires trained weights
    model = build_source_model(source, data, dev).eval()
    input_acc = evaluate(model, data.x_test, data.y_test)
    input_sparsity = sparsity_report(model)["global_sparsity"]
    section = dict(recipe.compress)
    method = str(section.pop("method"))
    c = recipe.calibration
    cal = calibration_batches(data, c.samples, c.batch_size, c.seed, dev)
    labels = [y for _, y in cal] if get_compressor(method).global_method else None
    start = time.perf_counter()
    try:
        report = compress(
            model, [x for x, _ in cal], method, progress=progress, labels=labels, **section
        )
    except (HessianError, ConfigError):
        raise
    except (ValueError, TypeError) as exc:  # a target/ignore typo, too few samples for ngrads...
        raise ConfigError(f"compress: {exc}") from None
    seconds = time.perf_counter() - start
    acc = evaluate(model, data.x_test, data.y_test)
    metrics: dict[str, Any] = {
        "name": recipe.name,
        "method": method,
        "model": source.name,
        "input_test_accuracy": input_acc,
        "input_global_sparsity": input_sparsity,
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
    _write_outputs(run, model, report, recipe, train_recipe, source, metrics)
    run.complete()
    return metrics


def sparse_finetune(
    model: nn.Module, data: ArrayDataset, spec: FinetuneSpec, device: torch.device, seed: int
) -> None:
    """SGD over the training data with the model's zeros fixed (``method="constant"``), the
    learning rate decaying to 0 on a cosine; the model is left in evaluation mode."""
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


def _write_outputs(
    run: RunDir,
    model: nn.Module,
    report: CompressionReport,
    recipe: CompressRecipe,
    train_recipe: Recipe,
    source: Source,
    metrics: dict[str, Any],
) -> None:
    from prunekit.app.plots import plot_layer_error

    cpu_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics["model_file_bytes"] = run.save("model.pt", cpu_state)
    meta = {"model": source.name, "kwargs": source.kwargs, "recipe": train_recipe.to_dict()}
    metrics["sparse_file_bytes"] = run.save_sparse("model_sparse.pt", cpu_state, meta)
    if report.grids and "finetuned_test_accuracy" not in metrics:
        metrics["quantized_file_bytes"] = run.write_with(
            "model_quantized.pt", lambda path: save_quantized(model, report, path, meta)
        )
    elif report.grids:
        logger.warning("fine-tuning moved the weights off the grid: no integer export written")
    metrics["report"] = report.to_dict()
    metrics["compress_recipe"] = recipe.to_dict()
    run.write_metrics(metrics)
    title = f"{metrics['model']} / {report.method}"
    run.write_with("layer_error.png", lambda path: plot_layer_error(report.to_dict(), path, title))
    lines = [
        f"# {recipe.name or metrics['model']}: {report.method}",
        "",
        f"- input model ({100 * metrics['input_global_sparsity']:.2f}% sparse): "
        f"{100 * metrics['input_test_accuracy']:.2f}% test accuracy",
        f"- compressed ({100 * metrics['global_sparsity']:.2f}% sparse, no fine-tuning): "
        f"{100 * metrics['test_accuracy']:.2f}%",
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
    run.write_text("report.md", "\n".join(lines))
