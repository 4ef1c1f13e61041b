"""``prunekit train``: one recipe → a trained sparse (or slim) model and its report.

A run reads top to bottom:

1. **recipe** — validated data (:mod:`prunekit.app.recipe`);
2. **run directory** — ``out_dir`` claimed by :class:`~prunekit.app.run_dir.RunDir`: another run's
   outputs are never overwritten, a resume must match (recipe, world size, data, starting weights),
   a complete run is left as it is;
3. **data** (:mod:`prunekit.app.data`);
4. **model** — the architecture and its starting weights (:mod:`prunekit.app.model`), the optimizer,
   and the pruner (``pruning``) or group-sparsity optimizer (``structured``), restored from the
   checkpoint on resume;
5. **loop** (:mod:`prunekit.app.loop`);
6. **outputs** (:mod:`prunekit.app.outputs`).

Data parallel: inside an initialised process group, or under ``torchrun``, every rank runs
:func:`train`; each trains on its shard of every epoch with batches of ``batch_size`` (a global batch
of ``world_size × batch_size``) through :class:`~torch.nn.parallel.DistributedDataParallel`; rank 0
alone touches files, and the loss and test accuracy are gathered over all ranks. The launcher that
starts local ranks (``--nproc``) is :mod:`prunekit.app.launch`.

Everything the user controls is checked before the first step (device, ``out_dir``, recipe values,
the weights file); a problem raises :class:`~prunekit.config.ConfigError` with what to change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from prunekit.api import sparsify
from prunekit.app.checkpoint import CheckpointError, load_checkpoint
from prunekit.app.data import fingerprint, load_data
from prunekit.app.loop import Progress, Trainable, evaluate, fit
from prunekit.app.model import (
    Source,
    build_optimizer,
    build_recipe_model,
    build_source_model,
    resolve_source,
)
from prunekit.app.outputs import finish
from prunekit.app.ranks import (
    Ranks,
    agree,
    attach_communication,
    communication_metrics,
    join_process_group,
    leave_process_group,
    on_main,
    wrap_model,
)
from prunekit.app.recipe import Recipe, recipe_from_dict
from prunekit.app.run_dir import Opening, RunDir, portable
from prunekit.app.structured import build_structured_optimizer, finish_structured
from prunekit.data import ArrayDataset, BatchIterator
from prunekit.structured import find_groups

__all__ = ["RESUMABLE_CHANGES", "build_trainable", "train", "train_from_dict"]

logger = logging.getLogger(__name__)

#: Recipe keys that may differ when resuming (to get past a NaN stop from the last good checkpoint).
RESUMABLE_CHANGES = (
    "optimizer.lr",
    "optimizer.clip_grad_norm",
    "lr_schedule.warmup_epochs",
)


def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    data: ArrayDataset | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Run a recipe and write its outputs to ``out_dir``.

    Args:
        recipe: a validated recipe.
        out_dir: the run directory (created); see :class:`~prunekit.app.run_dir.RunDir`.
        resume: continue an unfinished run of the same recipe in ``out_dir`` from its checkpoint
            (``False``: start it again).
        overwrite: replace another run's outputs in ``out_dir`` instead of refusing.
        progress: show a progress bar.
        device: where to train; defaults to CUDA when available, else CPU.
        data: an already loaded data set (otherwise loaded from the recipe).
        stop_after_epoch: stop (as if interrupted) after this many epochs; for tests and time limits.

    Returns:
        The metrics written to ``metrics.json`` (a complete run's own, with ``outputs_unchanged``,
        when ``out_dir`` already holds this run complete; the partial history when stopped early);
        the same on every rank of a data-parallel run.

    Raises:
        ConfigError: a bad device, ``out_dir``, weights file, or a run directory that holds another
            run (or a resume that does not match).
        DivergenceError: the loss diverged; the last good checkpoint is intact.
    """
    ranks, dev = join_process_group(device)
    run = RunDir(out_dir, "train")
    try:
        return _train(recipe, run, ranks, dev, resume, overwrite, progress, data, stop_after_epoch)
    except BaseException:
        if ranks.is_main:
            run.abandon()
        raise
    finally:
        if ranks.is_main:
            run.close()
        leave_process_group(ranks)


def _train(
    recipe: Recipe,
    run: RunDir,
    ranks: Ranks,
    dev: torch.device,
    resume: bool,
    overwrite: bool,
    show_progress: bool,
    data: ArrayDataset | None,
    stop_after_epoch: int | None,
) -> dict[str, Any]:
    on_main(run.check_writable, ranks)
    torch.manual_seed(recipe.seed)
    data = data if data is not None else load_data(recipe.data, recipe.seed)
    source = resolve_source(recipe.model)
    if (read := source.path) is not None:
        on_main(lambda: run.refuse_inside(read, source.what), ranks)
    batches = BatchIterator(
        data.x_train,
        data.y_train,
        recipe.data.batch_size,
        seed=recipe.seed,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    # everything that can refuse the recipe is built before the directory is claimed
    t = build_trainable(recipe, source, data, dev, recipe.epochs * len(batches))
    opening = on_main(lambda: _open(run, recipe, ranks, data, source, resume, overwrite), ranks)
    if opening.status == "complete":
        logger.info("%s holds this run, complete: its outputs are left as they are", run.path)
        return {**on_main(run.read_metrics, ranks), "outputs_unchanged": True}
    progress, saved_comm = (
        _restore(t, run, opening) if opening.status == "resume" else (Progress(), None)
    )
    agree(progress.step, "the checkpoint step to resume from", ranks)
    net = wrap_model(t.model, dev, ranks)  # after sparsify and resume: DDP sees masks and weights
    comm = attach_communication(net, recipe.communication, ranks)
    if comm is not None and saved_comm is not None:  # each rank's own residuals and RNG
        comm.load_state_dict(saved_comm[ranks.rank])
    if ranks.distributed and ranks.is_main:
        b, w = recipe.data.batch_size, ranks.world_size
        logger.info("data parallel: %d ranks x batch %d = global batch %d", w, b, w * b)

    done = fit(
        recipe, t, net, data, batches, progress, run, ranks, dev, comm, show_progress,
        stop_after_epoch,
    )  # fmt: skip
    if not done:
        return {"history": progress.history, "stopped_after_epoch": progress.epoch}
    extra: dict[str, Any] = {}
    if recipe.structured is not None and ranks.is_main:
        assert t.example is not None
        extra.update(
            finish_structured(
                t.model,
                t.optimizer,
                t.groups,
                t.example,
                run,
                lambda m: evaluate(m, data.x_test, data.y_test),
            )
        )
    if comm is not None:
        extra.update(communication_metrics(comm, ranks))
    metrics = finish(
        recipe,
        (source.name, source.kwargs),
        t,
        data,
        progress,
        run,
        dev,
        ranks,
        extra,
        lambda: build_recipe_model(source.name, source.kwargs, data),
    )
    on_main(run.complete, ranks)
    return metrics


def _open(
    run: RunDir,
    recipe: Recipe,
    ranks: Ranks,
    data: ArrayDataset,
    source: Source,
    resume: bool,
    overwrite: bool,
) -> Opening:
    """Claim the run directory for this run (rank 0)."""
    identity = {
        "recipe": portable(recipe.to_dict()),
        "model": source.identity(),
        "world_size": ranks.world_size,
        "data": fingerprint(data),
    }
    return run.open(
        identity,
        overwrite=overwrite,
        resume=resume,
        resumable=tuple(f"recipe.{k}" for k in RESUMABLE_CHANGES),
        same_when_complete=("world_size",),
    )


def build_trainable(
    recipe: Recipe, source: Source, data: ArrayDataset, device: torch.device, total_steps: int
) -> Trainable:
    """The model (with its starting weights), its optimizer, and the pruner or structured groups
    the recipe asks for, on ``device``."""
    model = build_source_model(source, data, device)
    example = data.x_train[:2].to(device)
    if recipe.structured is not None:
        groups = find_groups(model, example)
        optimizer: torch.optim.Optimizer = build_structured_optimizer(
            recipe, model, groups, total_steps, example
        )
        return Trainable(model, optimizer, None, groups, example)
    optimizer = build_optimizer(recipe, model)
    pruner = None
    if recipe.pruning is not None:
        cfg = {k: v for k, v in recipe.pruning.items() if k != "method"}
        pruner = sparsify(
            model, optimizer, recipe.pruning["method"], total_steps=total_steps, **cfg
        )
    return Trainable(model, optimizer, pruner, [], example)


def _restore(
    t: Trainable, run: RunDir, opening: Opening
) -> tuple[Progress, list[dict[str, Any]] | None]:
    """Load the run's checkpoint into ``t`` (nothing to load: a fresh start)."""
    if not run.checkpoint.exists():
        return Progress(), None
    ckpt = load_checkpoint(run.checkpoint)
    try:
        if t.pruner is not None:
            t.pruner.load_state_dict(ckpt["pruner"])
        t.model.load_state_dict(ckpt["model"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        progress = Progress.from_checkpoint(ckpt)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        why = " ".join(str(exc).split())[:120]
        raise CheckpointError(
            f"{run.checkpoint} does not fit this run ({type(exc).__name__}: {why}); it was not "
            "written by this recipe: --no-resume starts the run again"
        ) from None
    progress.recipe_changes += [
        {"epoch": progress.epoch, "key": key.removeprefix("recipe."), "from": old, "to": new}
        for key, (old, new) in opening.changes.items()
    ]
    logger.info(
        "resumed from %s at epoch %d (step %d)", run.checkpoint, progress.epoch, progress.step
    )
    return progress, ckpt.get("communication")


def train_from_dict(data: dict[str, Any], out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Validate a recipe given as plain data and run it."""
    return train(recipe_from_dict(data), out_dir, **kwargs)
