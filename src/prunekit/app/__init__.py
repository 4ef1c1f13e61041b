"""The prunekit application: what ``prunekit train`` and ``prunekit compress`` run.

It sits on top of the library and the library never imports it. A run reads top to bottom: recipe
(:mod:`~prunekit.app.recipe`, :mod:`~prunekit.app.compress_recipe`) → run directory
(:mod:`~prunekit.app.run_dir`) → data (:mod:`~prunekit.app.data`) → model
(:mod:`~prunekit.app.model`) → loop (:mod:`~prunekit.app.loop`) → outputs
(:mod:`~prunekit.app.outputs`); :mod:`~prunekit.app.training` and :mod:`~prunekit.app.compression` are
those steps in order, :mod:`~prunekit.app.launch` starts data-parallel ranks, and
:mod:`~prunekit.app.ranks` is where a process stands among them.

Besides running a recipe, the steps of a ``prunekit compress`` run that a caller can repeat on its
own model are exported too: the calibration batches it draws (:func:`calibration_batches`, with
:class:`CalibrationSpec`'s defaults) and its sparse fine-tuning (:func:`sparse_finetune`,
:class:`FinetuneSpec`).
"""

from prunekit.app.checkpoint import load_checkpoint, save_checkpoint
from prunekit.app.compress_recipe import (
    CalibrationSpec,
    CompressRecipe,
    FinetuneSpec,
    load_compress_recipe,
)
from prunekit.app.compression import compress_run, sparse_finetune
from prunekit.app.data import calibration_batches, load_data
from prunekit.app.divergence import DivergenceError, NonFiniteLossError
from prunekit.app.launch import launch_train
from prunekit.app.loop import evaluate, lr_factor
from prunekit.app.recipe import Recipe, load_recipe, recipe_from_dict
from prunekit.app.run_dir import RunDir
from prunekit.app.training import train, train_from_dict
from prunekit.serialization import CheckpointError

__all__ = [
    "CalibrationSpec",
    "CheckpointError",
    "CompressRecipe",
    "DivergenceError",
    "FinetuneSpec",
    "NonFiniteLossError",
    "Recipe",
    "RunDir",
    "calibration_batches",
    "compress_run",
    "evaluate",
    "launch_train",
    "load_checkpoint",
    "load_compress_recipe",
    "load_data",
    "load_recipe",
    "lr_factor",
    "recipe_from_dict",
    "save_checkpoint",
    "sparse_finetune",
    "train",
    "train_from_dict",
]
