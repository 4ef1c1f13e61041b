"""``prunekit compress`` for a Hugging Face causal language model: a model folder and plain text in,
the compressed model folder, its perplexity and report out.

A run reads top to bottom:

1. **recipe** (:class:`~prunekit.app.compress_recipe.LMCompressRecipe`);
2. **run directory** — ``out_dir`` claimed by :class:`~prunekit.app.run_dir.RunDir` (never the
   model folder it reads, never another run's outputs; a complete run is left as it is);
3. **model and text** — the folder read offline, the calibration and evaluation texts tokenised
   with its tokenizer and packed into sequences (:mod:`prunekit.app.text`);
4. **compress** — perplexity before, :func:`prunekit.compress` on the calibration sequences (one
   progress bar step per block), perplexity after;
5. **outputs** — ``model/`` (a model folder with the tokenizer: ``save_pretrained``'s, or, for a
   quantized model, the compressed-tensors ``pack-quantized`` layout that ``transformers`` and
   vLLM read; ``prunekit evaluate --model OUT/model`` reads either), ``metrics.json``,
   ``report.md`` and ``layer_error.png``, each written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from prunekit.app.compress_recipe import LMCompressRecipe
from prunekit.app.ranks import resolve_device
from prunekit.app.run_dir import RunDir, portable
from prunekit.app.text import (
    WEIGHT_FILES,
    Pretrained,
    load_pretrained,
    perplexity,
    sample_sequences,
    token_sequences,
)
from prunekit.config import ConfigError
from prunekit.posttrain import HessianError, compress
from prunekit.posttrain.report import CompressionReport

logger = logging.getLogger(__name__)

__all__ = ["compress_lm_run", "evaluate_pretrained"]

#: the longest default sequence (the reference code's 2048 tokens)
MAX_DEFAULT_SEQ_LEN = 2048


def _file_hash(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read() if limit is None else f.read(limit))
    return f"{path.stat().st_size}:{h.hexdigest()[:16]}"


def _folder_identity(folder: Path) -> dict[str, str]:
    """The model folder's config and weights files, by size and content hash (the first MiB of
    a weights file)."""
    out = {"config.json": _file_hash(folder / "config.json")}
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            out[name] = _file_hash(folder / name, limit=1 << 20)
    return out


def _seq_len(wanted: int | None, pretrained: Pretrained) -> int:
    longest = pretrained.max_length
    if wanted is None:
        return min(MAX_DEFAULT_SEQ_LEN, longest or MAX_DEFAULT_SEQ_LEN)
    if longest is not None and wanted > longest:
        raise ConfigError(f"seq_len {wanted} is longer than the model takes ({longest} tokens)")
    return wanted


def compress_lm_run(
    recipe: LMCompressRecipe,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Compress the recipe's language model and write the outputs (see the module docstring).

    Returns:
        The metrics written to ``metrics.json`` (a complete run's own, with ``outputs_unchanged``,
        when ``out_dir`` already holds this run complete).

    Raises:
        ConfigError: a bad device, model folder, text file, ``out_dir`` or compress config; the
            files of ``out_dir`` and of the model folder are left as they were.
    """
    dev = resolve_device(device)
    folder = Path(recipe.model.pretrained)
    run = RunDir(out_dir, "compress")
    run.refuse_inside(folder, "model.pretrained")
    with run:  # abandoned if it raises, released either way
        return _compress_lm_run(recipe, folder, run, dev, progress, overwrite)


def _compress_lm_run(
    recipe: LMCompressRecipe,
    folder: Path,
    run: RunDir,
    dev: torch.device,
    progress: bool,
    overwrite: bool,
) -> dict[str, Any]:
    run.check_writable()
    pretrained = load_pretrained(folder, dev)
    texts = {"calibration": Path(recipe.calibration.text)}
    if recipe.evaluation is not None:
        texts["evaluation"] = Path(recipe.evaluation.text)
    for what, path in texts.items():
        if not path.is_file():
            raise ConfigError(f"{what}.text: {path} does not exist")
    identity = {
        "recipe": portable({k: v for k, v in recipe.to_dict().items() if k != "calibration"}),
        "calibration": {k: v for k, v in recipe.to_dict()["calibration"].items() if k != "text"},
        "model": _folder_identity(folder),
        "texts": {what: _file_hash(path) for what, path in texts.items()},
    }
    if run.open(identity, overwrite=overwrite, resume=False).status == "complete":
        logger.info("%s holds this run, complete: its outputs are left as they are", run.path)
        return {**run.read_metrics(), "outputs_unchanged": True}
    c = recipe.calibration
    seq_len = _seq_len(c.seq_len, pretrained)
    sequences = token_sequences(pretrained.tokenizer, c.text, seq_len, "calibration.text")
    calibration = sample_sequences(sequences, c.samples, c.seed)
    evaluation = None
    batch = recipe.evaluation.batch_size if recipe.evaluation is not None else 1
    if recipe.evaluation is not None:
        e = recipe.evaluation
        eval_len = _seq_len(e.seq_len or seq_len, pretrained)
        evaluation = token_sequences(pretrained.tokenizer, e.text, eval_len, "evaluation.text")
    model = pretrained.model
    metrics: dict[str, Any] = {"name": recipe.name, "model": str(folder)}
    if evaluation is not None:
        metrics["input_perplexity"] = perplexity(model, evaluation, batch)
    section = dict(recipe.compress)
    method = str(section.pop("method"))
    items = [{"input_ids": s.unsqueeze(0).to(dev)} for s in calibration]
    start = time.perf_counter()
    try:
        report = compress(model, items, method, progress=progress, **section)
    except (HessianError, ConfigError):
        raise
    except (ValueError, TypeError) as exc:  # a target/ignore typo ...
        raise ConfigError(f"compress: {exc}") from None
    metrics.update(
        method=method,
        compress_seconds=time.perf_counter() - start,
        calibration_sequences=len(items),
        seq_len=seq_len,
        global_sparsity=_target_sparsity(report),
    )
    if evaluation is not None:
        metrics["perplexity"] = perplexity(model, evaluation, batch)
        metrics["evaluation_sequences"] = int(evaluation.shape[0])
    _write_outputs(run, pretrained, report, recipe, metrics)
    run.complete()
    return metrics


def _target_sparsity(report: CompressionReport) -> float:
    """The fraction of zeros over the compressed layers."""
    total = sum(math.prod(r.shape) for r in report.layers)
    zeros = sum(r.sparsity * math.prod(r.shape) for r in report.layers)
    return zeros / total if total else 0.0


def _save_folder(pretrained: Pretrained, report: CompressionReport, path: Path) -> dict[str, Any]:
    """The model and tokenizer in folder ``path``, atomically (written beside it, then renamed): a
    quantized model in the compressed-tensors ``pack-quantized`` layout
    (:func:`prunekit.export.save_compressed`), any other with ``save_pretrained``. Returns what the
    compressed-tensors export wrote (``{}`` for ``save_pretrained``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    written: dict[str, Any] = {}
    try:
        if report.grids:
            from prunekit.export import save_compressed

            written = save_compressed(pretrained.model, report, tmp).to_dict()
        else:
            pretrained.model.save_pretrained(tmp)  # type: ignore[operator]
        pretrained.tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _write_outputs(
    run: RunDir,
    pretrained: Pretrained,
    report: CompressionReport,
    recipe: LMCompressRecipe,
    metrics: dict[str, Any],
) -> None:
    from prunekit.app.plots import plot_layer_error

    export = run.write_with("model", lambda path: _save_folder(pretrained, report, path))
    metrics["model_folder_bytes"] = _folder_bytes(run.path / "model")
    if export:
        metrics["export"] = export
    metrics["report"] = report.to_dict()
    metrics["compress_recipe"] = recipe.to_dict()
    run.write_metrics(metrics)
    title = f"{pretrained.path.name} / {report.method}"
    run.write_with("layer_error.png", lambda path: plot_layer_error(report.to_dict(), path, title))
    lines = [f"# {recipe.name or pretrained.path.name}: {report.method}", ""]
    if "perplexity" in metrics:
        lines += [
            f"- perplexity on {recipe.evaluation.text if recipe.evaluation else ''}: "
            f"{metrics['input_perplexity']:.3f} before, {metrics['perplexity']:.3f} after "
            f"({metrics['evaluation_sequences']} sequences of {metrics['seq_len']} tokens)",
        ]
    lines += [
        f"- {100 * metrics['global_sparsity']:.2f}% of the compressed layers' weights are zero",
        f"- compression time: {metrics['compress_seconds']:.1f} s "
        f"({metrics['calibration_sequences']} calibration sequences of {metrics['seq_len']} "
        "tokens)",
        "",
        report.table(),
        "",
    ]
    run.write_text("report.md", "\n".join(lines))


def evaluate_pretrained(
    model: str | Path,
    text: str | Path,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Perplexity of the language model in folder ``model`` on text file ``text`` (``prunekit
    evaluate``): ``{"perplexity", "sequences", "seq_len"}``."""
    pretrained = load_pretrained(model, resolve_device(device))
    length = _seq_len(seq_len, pretrained)
    sequences = token_sequences(pretrained.tokenizer, text, length, "--eval")
    return {
        "perplexity": perplexity(pretrained.model, sequences, batch_size),
        "sequences": int(sequences.shape[0]),
        "seq_len": length,
    }
