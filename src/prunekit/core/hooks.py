"""Optimizer step hooks owned by one object, removable, and restored after ``copy.deepcopy``.

``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``: hooks are
lost when an optimizer is copied or pickled. :class:`OptimizerHooks` re-registers its hooks on the
copied optimizer, so a model, its optimizer and its pruner deep-copied together keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

StepHook = Callable[[Optimizer, tuple[Any, ...], dict[str, Any]], Any]


class OptimizerHooks:
    """A pre-step and/or post-step hook on ``optimizer``.

    The pre-step hook may return ``(args, kwargs)`` to replace the arguments of ``optimizer.step``.
    """

    def __init__(
        self, optimizer: Optimizer, pre: StepHook | None = None, post: StepHook | None = None
    ):
        self.optimizer = optimizer
        self.pre = pre
        self.post = post
        self._handles: list[Any] = []
        self._register()

    def _register(self) -> None:
        if self.pre is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self.pre))
        if self.post is not None:
            self._handles.append(self.optimizer.register_step_post_hook(self.post))

    def remove(self) -> None:
        """Unregister both hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.pre = self.post = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register()
