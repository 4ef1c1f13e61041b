"""Only-Train-Once structured pruning side by side with only-train-once 3.0.1 and Torch-Pruning 1.6.1.

Five parts, every library run in this same process on the same models and data:

1. ``discovery`` — time to find the prunable groups / dependency graph, and exactness: 70% of the
   groups zeroed at random, the slim model's output compared with the zeroed model's (max |diff|).
2. ``accuracy`` — MNIST, the same training loop for everybody (same batches, cosine learning rate):
   dense; prunekit HESSO; OTO's HESSO (shimmed to run on CPU); Torch-Pruning magnitude pruning to the
   same MACs after half the budget, then fine-tuning for the other half. Reports accuracy, parameters
   and MACs of the slim models.
3. ``latency`` — CPU latency of the dense and slim models at batch 1 and 64 and the speed-up
   relative to the FLOPs-reduction factor, in fresh processes (medians and range over them), in three
   regimes: PyTorch eager with glibc's default allocator, with its mmap threshold pinned (no page
   faults), and onnxruntime on the exported models.
4. ``ceiling`` — the same latency measurement for hand-picked slim architectures (random weights,
   made with ``find_groups`` + ``zero_`` + ``slim``): which widths and depths can reach a speed-up of
   0.8 × the FLOPs factor on this CPU at all, whatever the pruning method; ``ceiling-accuracy``
   trains those architectures from scratch with the dense loop and budget.

One module per part (``discovery``, ``accuracy``, ``latency``, ``ceiling``), the shared
models, loop and peer loaders in ``shared``, the markdown in ``tables``, the command line in ``cli``
and the entry point in ``__main__``: run it as ``python -m structured`` from ``benchmarks/``.

Usage (from ``benchmarks/``)::

    python -m structured --parts discovery latency           # minutes
    python -m structured --parts accuracy --epochs 4 --train-subset 20000 --flops-removed 0.72 --threads 1 [--seed 1]   # ~15 min
    # prunekit variants (own rows and slim models): widths ×16, whole residual branches may go
    python -m structured --parts accuracy --models resnet20 --epochs 4 --train-subset 20000 --flops-removed 0.72 --threads 1 --libraries prunekit --channel-multiple 16 --empty-branches

Peers are benchmark extras: ``pip install torch-pruning==1.6.1 only-train-once==3.0.1 packaging``;
only-train-once 3.0.1 does not import on torch 2.13 as published; pass a module that patches it
with ``--oto-shim PATH`` (the benchmark skips only-train-once without one).
"""

from __future__ import annotations
