"""Recipes, the training loop, checkpoints and plots behind the CLI."""

from prunekit.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_sparse,
    save_atomic,
    save_checkpoint,
    save_sparse,
)
from prunekit.training.recipe import Recipe, load_recipe, recipe_from_dict
from prunekit.training.trainer import (
    DivergenceError,
    NonFiniteLossError,
    evaluate,
    lr_factor,
    train,
    train_from_dict,
)

__all__ = [
    "CheckpointError",
    "DivergenceError",
    "NonFiniteLossError",
    "Recipe",
    "evaluate",
    "load_checkpoint",
    "load_recipe",
    "load_sparse",
    "lr_factor",
    "recipe_from_dict",
    "save_atomic",
    "save_checkpoint",
    "save_sparse",
    "train",
    "train_from_dict",
]
