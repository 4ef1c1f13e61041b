"""The model of a run: its architecture, the trained weights it may start from, its optimizer.

A recipe's ``model`` section names an architecture (``name``, ``kwargs``), optionally with trained
``weights`` (a state-dict file, a prunekit sparse model file or a training checkpoint), or a prunekit
run directory (``run``: its final model, and the architecture its recipe recorded). Every way a
weights file can be wrong (missing, not a torch file, truncated, a pickled module, not a state dict,
non-finite values, keys or shapes of another model) is one :class:`~prunekit.config.ConfigError`
line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.app.data import digest
from prunekit.app.recipe import ModelSpec, Recipe, recipe_from_dict
from prunekit.config import ConfigError, short_repr
from prunekit.data import ArrayDataset
from prunekit.models import available_models, build_model
from prunekit.serialization import SPARSE_FORMAT, CheckpointError, load_sparse, read_sparse_metadata

__all__ = [
    "Source",
    "build_optimizer",
    "build_recipe_model",
    "load_state",
    "load_weights",
    "resolve_source",
]


@dataclass
class Source:
    """A resolved ``model`` section: the architecture, and the trained state it starts from.

    Attributes:
        name: the registered architecture.
        kwargs: its keyword arguments.
        state: the trained weights (``None``: a fresh initialisation).
        recipe: the training recipe a run directory recorded (``model.run`` only).
        where: how messages name the weights (``model.weights FILE`` / ``model.run DIR``).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Tensor] | None = None
    recipe: Recipe | None = None
    where: str = ""
    #: the file or run directory the weights come from, and the recipe key that names it
    path: Path | None = None
    what: str = ""

    def fingerprint(self) -> str | None:
        """A content hash of the starting weights (``None`` for a fresh initialisation)."""
        if self.state is None:
            return None
        return digest(*(self.state[k] for k in sorted(self.state)))

    def identity(self) -> dict[str, Any]:
        """What makes two runs start from the same model: architecture and weights' content
        (not the path they were read from)."""
        return {"name": self.name, "kwargs": self.kwargs, "weights": self.fingerprint()}


def resolve_source(spec: ModelSpec) -> Source:
    """The architecture and starting weights ``spec`` names (see the module docstring)."""
    if spec.run is not None:
        run = Path(spec.run)
        sparse = run / "model_sparse.pt"
        if not sparse.is_file():
            raise ConfigError(
                f"model.run {run} holds no model_sparse.pt; pass the output directory of "
                "`prunekit train` or `prunekit compress`"
            )
        try:
            meta = read_sparse_metadata(sparse)
            state = load_sparse(sparse)
        except CheckpointError as exc:
            raise ConfigError(f"model.run: {exc}") from None
        recorded, name = meta.get("recipe"), meta.get("model")
        if not isinstance(recorded, dict) or not isinstance(name, str):
            raise ConfigError(f"{sparse} does not record its architecture and training recipe")
        try:
            recipe = recipe_from_dict(recorded, recorded=True)
        except ConfigError as exc:
            raise ConfigError(f"{sparse} records a recipe this prunekit refuses: {exc}") from None
        kwargs = meta.get("kwargs", recipe.model.kwargs)
        if name not in available_models() or not isinstance(kwargs, dict):
            raise ConfigError(
                f"{sparse} records model {short_repr(name, 40)} with kwargs {short_repr(kwargs, 40)}, not a "
                f"registered architecture; available: {', '.join(available_models())}"
            )
        where = f"model.run {run}"
        _check_finite(state, where)
        return Source(name, dict(kwargs), state, recipe, where, run, "model.run")
    assert spec.name is not None
    if spec.weights is None:
        return Source(spec.name, dict(spec.kwargs))
    where = f"model.weights {spec.weights}"
    state = load_weights(spec.weights)
    path = Path(spec.weights)
    return Source(spec.name, dict(spec.kwargs), state, None, where, path, "model.weights")


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict in ``path``: a ``torch.save`` of a state dict, a prunekit sparse model file,
    or a prunekit training checkpoint (its model).

    Raises:
        ConfigError: one line for each way the file is not that.
    """
    path = Path(path)
    where = f"model.weights {path}"
    if not path.exists():
        raise ConfigError(f"{where} not found")
    if path.is_dir():
        raise ConfigError(f"{where} is a directory; for a prunekit run directory use model.run")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = " ".join(str(exc).split())
        why = (
            "it holds pickled Python objects (a whole model?), not tensors: save model.state_dict()"
            if "Unsupported global" in text or "This file can still be loaded" in text
            else "it is truncated, corrupt or not a torch file"
        )
        raise ConfigError(f"{where} cannot be read as a state dict: {why}") from None
    if isinstance(obj, dict) and obj.get("format") == SPARSE_FORMAT:
        try:
            obj = load_sparse(path)
        except CheckpointError as exc:
            raise ConfigError(f"model.weights: {exc}") from None
    elif isinstance(obj, dict) and obj.get("format") == "prunekit-checkpoint":
        obj = obj.get("model")
    if isinstance(obj, dict):
        obj = _apply_masks(obj)
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise ConfigError(
            f"{where} is not a state dict (a dict of tensor names to tensors; found "
            f"{type(obj).__name__}); save model.state_dict()"
        )
    _check_finite(obj, where)
    return obj


def _apply_masks(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict saved with prunekit's masks attached (a training checkpoint, or a model
    mid-``sparsify``): each ``X_mask`` buffer folded into ``X`` (``X ⊙ mask``, the weights the
    model computes with) and dropped."""
    masks = [k for k in state if k.endswith("_mask") and k[: -len("_mask")] in state]
    if not masks:
        return state
    out = dict(state)
    for key in masks:
        mask, target = out.pop(key), key[: -len("_mask")]
        if isinstance(mask, Tensor) and isinstance(out[target], Tensor):
            out[target] = out[target] * mask.to(out[target].dtype)
    return out


def _check_finite(state: dict[str, Tensor], where: str) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConfigError(
                f"{where}: tensor {name!r} has {bad} non-finite value(s); the weights are broken"
            )


def load_state(model: nn.Module, state: dict[str, Tensor], where: str, name: str) -> None:
    """Load ``state`` into ``model``, or say in one line why it does not fit.

    Raises:
        ConfigError: missing or unexpected keys, or shapes that differ (the first few named).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} is {list(state[k].shape)} in the file, {list(own[k].shape)} in the model"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if shapes:
        problems.append(_first(shapes))
    if problems:
        raise ConfigError(
            f"{where} does not fit model {name!r} ({'; '.join(problems)}): the weights are of "
            "another model or other model.kwargs"
        )
    model.load_state_dict(state)


def _first(items: list[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def build_recipe_model(name: str, kwargs: dict[str, Any], data: ArrayDataset) -> nn.Module:
    """Architecture ``name`` for ``data``; keyword arguments it refuses are a ConfigError."""
    try:
        return build_model(name, data.input_shape, data.num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        if not kwargs:
            raise
        raise ConfigError(
            f"model {name!r} refuses model.kwargs {kwargs} ({exc}); fix or remove them"
        ) from None


def build_source_model(source: Source, data: ArrayDataset, device: torch.device) -> nn.Module:
    """The architecture ``source`` names for ``data``, with its starting weights, on ``device``."""
    model = build_recipe_model(source.name, source.kwargs, data)
    if source.state is not None:
        load_state(model, source.state, source.where, source.name)
    return model.to(device)


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's ``optimizer`` section over all of ``model``'s parameters."""
    o = recipe.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=o.nesterov,
        )
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
