"""Saving and loading slim models without pickling code.

A slim model is described by a JSON *spec* — for every sliced tensor, the axis and the indices kept,
and the new values of counted attributes such as head counts — plus an ordinary state dict.
:func:`load_slim` rebuilds the slim architecture on a fresh instance of the original class (the same
slicing and attribute updates as :func:`~prunekit.structured.slim`) and loads the weights, so no
Python objects are unpickled (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.structured.groups import Group
from prunekit.structured.slim import SPEC_FORMAT, apply_kept, slim_with_plan

__all__ = ["SPEC_FORMAT", "load_slim", "save_slim", "slim_spec"]


def slim_spec(
    model: nn.Module, groups: Sequence[Group], example_inputs: Sequence[Any] | torch.Tensor
) -> dict[str, Any]:
    """The JSON-ready spec of the slim model :func:`~prunekit.structured.slim` builds (the inputs
    decide whether emptied layers can be folded); ``slim_with_plan(...)[1].spec()`` gives the same
    without slimming twice."""
    return slim_with_plan(model, example_inputs, groups, check=False)[1].spec()


def save_slim(slim_model: nn.Module, spec: dict[str, Any], directory: str | Path) -> None:
    """Write ``spec.json`` and ``weights.pt`` (tensors only) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    torch.save(
        {k: v.detach().cpu() for k, v in slim_model.state_dict().items()}, out / "weights.pt"
    )


def load_slim(fresh_model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the slim model on ``fresh_model`` (a new instance of the original class) and load it."""
    src = Path(directory)
    spec = json.loads((src / "spec.json").read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{src / 'spec.json'} is not a {SPEC_FORMAT} spec")
    model = apply_kept(fresh_model, spec["kept"], attributes=spec.get("attributes"),
                       broadcast_folds=spec.get("broadcast_folds", True))  # fmt: skip
    model.load_state_dict(torch.load(src / "weights.pt", map_location="cpu", weights_only=True))
    return model
