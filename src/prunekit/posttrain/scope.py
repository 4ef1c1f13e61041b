"""Which layers post-training compression touches by default, and which it leaves, with the reason.

* A model with a block list (a ``ModuleList`` of blocks holding layers: a transformer's
  ``model.layers``, ``transformer.h``, ``encoder.layer``) is compressed inside its blocks: the
  default targets are the layers inside the blocks. The output head (``lm_head``), embeddings and
  anything else outside the blocks are left, each reported with the reason, as the reference code
  and llm-compressor do (pruning a language model's head costs perplexity for little size). Name
  them in ``targets=[...]`` to compress them anyway. A model without a block list (a CNN, an MLP)
  keeps every Linear/Conv layer as a target.
* Layers with a weight matrix of a type prunekit cannot compress (not Linear, Conv1d/2d, or
  ``transformers``' ``Conv1D``; embeddings aside) are never silently passed over: when they hold
  more weights than the targets do, :func:`check_coverage` refuses the model naming their types;
  otherwise each is reported as left, with a warning.
"""

from __future__ import annotations

import logging
from collections import Counter

from torch import Tensor, nn

from prunekit.config import ConfigError
from prunekit.core.targets import DEFAULT_TYPES, Target, is_selected_type
from prunekit.posttrain.report import CompressionReport
from prunekit.posttrain.sequential import layer_list

__all__ = ["check_coverage", "inside_blocks"]

logger = logging.getLogger(__name__)


def inside_blocks(
    model: nn.Module, targets: list[Target], report: CompressionReport
) -> list[Target]:
    """The default targets of ``model``: with a block list, the ``targets`` inside its blocks (the
    others go to ``report.skipped`` with the reason); without one, ``targets`` unchanged."""
    found = layer_list(model, targets)
    if found is None:
        return targets
    list_name, blocks = found
    inside = {id(m) for block in blocks for m in block.modules()}
    kept = [t for t in targets if id(t.module) in inside]
    for t in targets:
        if id(t.module) not in inside:
            report.skipped[t.name] = (
                f"outside the blocks of {list_name or 'the model'!r} (a model with a block list is "
                "compressed inside its blocks by default; name it in targets=[...] to compress it)"
            )
            logger.info("%s left unchanged: %s", t.name, report.skipped[t.name])
    return kept


def check_coverage(model: nn.Module, targets: list[Target], report: CompressionReport) -> None:
    """Refuse a model whose weights mostly live in layer types prunekit cannot compress, naming
    them; report such layers as left (with a warning) when they are the minority.

    A *weight layer* is a module with a ``weight`` parameter of two or more dimensions; embeddings
    are not counted (they are never compressed).

    Raises:
        ConfigError: the unsupported weight layers hold more weights than ``targets``.
    """
    chosen = {id(t.param) for t in targets}
    unsupported: dict[str, tuple[nn.Module, Tensor]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2 or id(weight) in chosen:
            continue
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            continue
        if not is_selected_type(module, DEFAULT_TYPES):
            unsupported[name] = (module, weight)
    if not unsupported:
        return
    counts = Counter(type(m).__name__ for m, _ in unsupported.values())
    kinds = ", ".join(f"{kind} ({n})" for kind, n in sorted(counts.items()))
    left = sum(w.numel() for _, w in unsupported.values())
    compressed = sum(t.param.numel() for t in targets)
    if left > compressed:
        raise ConfigError(
            f"most weights of {type(model).__name__} live in layer types prunekit cannot compress: "
            f"{kinds} hold {left} weights against {compressed} in the layers it can; compressing "
            "would leave the model nearly as it is (prunekit compresses Linear, Conv1d, Conv2d and "
            "transformers' Conv1D)"
        )
    for name, (module, _) in unsupported.items():
        report.skipped[name] = f"layer type {type(module).__name__} is not compressed"
    logger.warning("layers of types prunekit does not compress are left unchanged: %s", kinds)
