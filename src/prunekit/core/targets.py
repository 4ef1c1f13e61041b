"""Which parameters of a model are pruned.

A *target* is one parameter of one module, named by its fully qualified name (``"features.0.weight"``).
Selection is by module type (dispatch on ``isinstance``; the one exception is ``transformers``'
``Conv1D``, recognised by :func:`is_transposed_linear` so that ``transformers`` is never imported)
and by names:
a plain string matches a module or parameter name exactly, a string starting with ``re:`` is a regular
expression matched in full against the parameter's fully qualified name. Biases and normalisation
layers are excluded by default because they are not in :data:`DEFAULT_TYPES` and only ``weight`` is
selected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is of ``transformers``' ``Conv1D`` class (its class name and its integer
    ``nf``, the output width), without importing ``transformers`` and whatever its weight's shape
    (:func:`is_transposed_linear` also checks the weight)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (GPT-2 and its kin): a linear layer
    ``y = x W + b`` whose weight is stored ``(in, out)``, the transpose of ``nn.Linear``'s.

    Recognised by its class name, its ``nf`` attribute (the output width) and a 2-D weight of
    ``nf`` columns, so that ``transformers`` need not be imported. It counts as a Linear wherever
    ``nn.Linear`` is a selected type.
    """
    # the registered parameter itself: while torch.fx traces, module.weight is a proxy
    weight = module._parameters.get("weight")
    return (
        is_hf_conv1d(module)
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
    )


def is_selected_type(module: nn.Module, types: Sequence[type[nn.Module]]) -> bool:
    """Whether ``module`` is one of ``types`` (a transposed linear counts as ``nn.Linear``)."""
    kinds = tuple(types)
    return isinstance(module, kinds) or (nn.Linear in kinds and is_transposed_linear(module))


class NoPrunableLayersError(ValueError):
    """Raised when target selection finds nothing to prune."""


def require_values(targets: Sequence[Target], what: str) -> None:
    """Raise a clear error when weights have no values (the ``meta`` device): ``what`` needs them."""
    meta = [t.name for t in targets if t.param.is_meta]
    if meta:
        raise ValueError(
            f"{what} needs weight values, but {', '.join(meta[:3])}"
            f"{' …' if len(meta) > 3 else ''} are on the meta device; materialise the model first "
            "(model.to_empty(device=...) and load its weights)"
        )


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable parameter: ``getattr(module, param_name)``."""

    module_name: str
    param_name: str
    module: nn.Module

    @property
    def name(self) -> str:
        """Fully qualified parameter name, as in ``model.state_dict()``."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def param(self) -> Tensor:
        return getattr(self.module, self.param_name)

    @property
    def transposed(self) -> bool:
        """The weight is stored ``(in, out)`` (:func:`is_transposed_linear`)."""
        return self.param_name == "weight" and is_transposed_linear(self.module)


def _matches(pattern: str, module_name: str, param_name: str) -> bool:
    full = f"{module_name}.{param_name}" if module_name else param_name
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], full) is not None
    return pattern in (module_name, full)


def _ignores(pattern: str, module_name: str, param_name: str) -> bool:
    """An ignore pattern also covers every module inside a module it names: ``ignore=["pooler"]``
    keeps ``pooler.dense`` dense."""
    if _matches(pattern, module_name, param_name):
        return True
    return not pattern.startswith("re:") and module_name.startswith(pattern + ".")


def select_targets(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    types: Sequence[type[nn.Module]] = DEFAULT_TYPES,
    param_name: str = "weight",
) -> list[Target]:
    """Select the parameters to prune.

    Args:
        model: any module.
        targets: module or parameter names (``re:`` prefix for a regular expression). ``None``
            selects every module of one of ``types``.
        ignore: names or ``re:`` patterns to leave dense (e.g. the classifier); a plain name of a
            module also leaves every layer inside it dense.
        types: module types considered when ``targets`` is ``None`` (with ``nn.Linear``, also
            ``transformers``' ``Conv1D``: :func:`is_transposed_linear`).
        param_name: the parameter of each module that is pruned.

    Returns:
        The targets in module registration order.

    Raises:
        NoPrunableLayersError: nothing matched; the message lists what the model contains.
        ValueError: a pattern in ``targets`` or ``ignore`` matched nothing (likely a typo).

    A parameter shared by several modules (tied weights) is one target, under its first name.
    """
    type_tuple = tuple(types)
    # remove_duplicate=False: a module registered twice, or a weight tied between two modules, is
    # visited under every name, so that patterns naming any of its places count
    places = list(model.named_modules(remove_duplicate=False))
    unused_ignore = [
        p
        for p in ignore
        if not any(
            _matches(p, n, pn)
            for n, m in places
            for pn in [param_name, *(name for name, _ in m.named_parameters(recurse=False))]
        )
    ]  # a pattern naming a layer that would not be pruned anyway (an Embedding) is fine
    # a tied weight ignored under one name is ignored under every name
    ignored_ids = {
        id(getattr(m, param_name))
        for n, m in places
        if isinstance(getattr(m, param_name, None), nn.Parameter)
        and any(_ignores(p, n, param_name) for p in ignore)
    }
    found: list[Target] = []
    used: set[str] = set()
    seen: set[int] = set()
    for module_name, module in places:
        param = getattr(module, param_name, None)
        if not isinstance(param, nn.Parameter) or param.dim() < 2:
            continue
        if targets is None:
            if not is_selected_type(module, type_tuple):
                continue
        else:
            hits = [p for p in targets if _matches(p, module_name, param_name)]
            if not hits:
                continue
            used.update(hits)
        if id(param) in ignored_ids or id(param) in seen:  # tied: one parameter, one target
            continue
        seen.add(id(param))
        found.append(Target(module_name, param_name, module))
    if targets is not None:
        unused = [p for p in targets if p not in used]
        if unused:
            raise ValueError(f"target patterns matched no {param_name!r} parameter: {unused}")
    if unused_ignore:
        raise ValueError(
            f"ignore patterns matched no module or parameter: {unused_ignore} (a typo would prune "
            "the layer you meant to keep)"
        )
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise NoPrunableLayersError(
            f"no prunable layers found in {type(model).__name__}: it has modules {kinds}; "
            f"prunable types are {[t.__name__ for t in type_tuple]}. Pass targets=[...] with module "
            "names or 're:' patterns to choose parameters explicitly."
        )
    return found
