"""Only-Train-Once structured pruning side by side with only-train-once 3.0.1 and Torch-Pruning 1.6.1.

Three parts, every library run in this same process on the same models and data:

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

Usage::

    python benchmarks/structured.py --parts discovery latency           # minutes
    python benchmarks/structured.py --parts accuracy --epochs 4 --train-subset 20000 --flops-removed 0.72 --threads 1 [--seed 1]   # ~15 min
    # prunekit variants (own rows and slim models): widths ×16, whole residual branches may go
    python benchmarks/structured.py --parts accuracy --models resnet20 --epochs 4 --train-subset 20000 --flops-removed 0.72 --threads 1 --libraries prunekit --channel-multiple 16 --empty-branches

Peers are benchmark extras: ``pip install torch-pruning==1.6.1 only-train-once==3.0.1 packaging``;
only-train-once needs ``../shared/peers/oto_shim.py`` on torch 2.13 (found via ``--oto-shim``).
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core import count_macs, count_params
from prunekit.data import BatchIterator, load_mnist
from prunekit.models import build_model
from prunekit.schedules import cosine
from prunekit.structured import HESSO, emptiable, find_groups, group_macs, macs_rates, slim

from common import RESULTS, environment, write_results

MODELS = {
    "resnet20": {},
    "resnet56": {},
    "vgg_bn": {"width": 0.25},
    "mobilenet_v2": {"width": 0.5},
    "densenet": {},  # concatenation followed by batch norm (OTO's exactness bug)
}
SHAPE = (1, 28, 28)
# HESSO (both libraries) prunes over this part of training; the rest is pruning-free. Ending at 40%
# rather than 60% left 0.1-0.2 points more accuracy at 72% of the MACs removed (ResNet-20, VGG).
PRUNE_START, PRUNE_END = 0.05, 0.4
SLIM_DIR = Path(__file__).resolve().parents[1] / "runs" / "structured"  # gitignored


def load_oto(shim: Path) -> Any | None:
    """only_train_once.OTO, or None (with the reason printed) if it cannot run here."""
    try:
        sys.path.insert(0, str(shim.parent))
        importlib.import_module(shim.stem)
        from only_train_once import OTO

        return OTO
    except Exception as exc:
        print(f"only-train-once unavailable: {type(exc).__name__}: {exc}")
        return None


def load_tp() -> Any | None:
    try:
        import torch_pruning as tp

        return tp
    except Exception as exc:
        print(f"torch-pruning unavailable: {exc}")
        return None


def zero_random_groups(groups: list[Any], fraction: float) -> int:
    """Zero each prunable group with probability ``fraction`` (seeded); returns how many are prunable."""
    prunable = [g for g in groups if g.prunable]
    gen = torch.Generator().manual_seed(0)
    for g in prunable:
        if torch.rand((), generator=gen) < fraction:
            g.zero_()
    return len(prunable)


# --------------------------------------------------------------------------------------- part 1
def discovery(oto_cls: Any, tp: Any, repeats: int = 3) -> list[dict[str, Any]]:
    rows = []
    x = torch.randn(1, *SHAPE)
    for name, kwargs in MODELS.items():
        row: dict[str, Any] = {"model": name}
        model = build_model(name, SHAPE, 10, **kwargs).eval()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            groups = find_groups(model, x)
            times.append(time.perf_counter() - t)
        row["prunekit_find_s"] = min(times)
        row["prunekit_groups"] = zero_random_groups(groups, 0.7)
        with torch.no_grad():
            ref = model(x)
            small = slim(model, x, groups, check=False).eval()
            row["prunekit_max_diff"] = float((small(x) - ref).abs().max())
        row["prunekit_params_after"] = count_params(small)
        if oto_cls is not None:
            m = build_model(name, SHAPE, 10, **kwargs).eval()
            try:
                t = time.perf_counter()
                oto = oto_cls(model=m, dummy_input=x)
                row["oto_find_s"] = time.perf_counter() - t
                oto.random_set_zero_groups(target_group_sparsity=0.7)
                with torch.no_grad():
                    zeroed = m(x)
                with tempfile.TemporaryDirectory() as d:
                    oto.construct_subnet(out_dir=d)
                    cm = torch.load(oto.compressed_model_path, weights_only=False).eval()
                with torch.no_grad():
                    row["oto_max_diff"] = float((cm(x) - zeroed).abs().max())
                row["oto_params_after"] = count_params(cm)
            except Exception as exc:
                row["oto_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        if tp is not None:
            m = build_model(name, SHAPE, 10, **kwargs).eval()
            t = time.perf_counter()
            tp.DependencyGraph().build_dependency(m, example_inputs=x)
            row["tp_graph_s"] = time.perf_counter() - t
        rows.append(row)
        print(row, flush=True)
    return rows


# --------------------------------------------------------------------------------------- part 2
def train_loop(model: nn.Module, opt: torch.optim.Optimizer, data: Any, epochs: int, start_epoch: int = 0,
               total_epochs: int | None = None, batch_size: int = 128, seed: int = 0) -> None:  # fmt: skip
    batches = BatchIterator(data.x_train, data.y_train, batch_size, seed=seed)
    total = (total_epochs or epochs) * len(batches)
    base = [g["lr"] for g in opt.param_groups]
    step = start_epoch * len(batches)
    model.train()
    for epoch in range(start_epoch, start_epoch + epochs):
        for xb, yb in batches.epoch(epoch):
            for g, lr0 in zip(opt.param_groups, base, strict=True):
                g["lr"] = lr0 * cosine(step, 1.0, total)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1


@torch.no_grad()
def accuracy(model: nn.Module, data: Any) -> float:
    model.eval()
    correct = sum(int((model(data.x_test[i : i + 1000]).argmax(1) == data.y_test[i : i + 1000]).sum())
                  for i in range(0, len(data.x_test), 1000))  # fmt: skip
    return correct / len(data.x_test)


def accuracy_runs(oto_cls: Any, tp: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    data = load_mnist().subset(args.train_subset, None)
    x1 = torch.randn(1, *SHAPE)
    rows = []
    steps = args.epochs * len(BatchIterator(data.x_train, data.y_train, 128))
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
    for name in args.models:
        kwargs = MODELS[name]
        if "dense" in args.libraries:
            torch.manual_seed(args.seed)
            dense = build_model(name, SHAPE, 10, **kwargs)
            macs0, params0 = count_macs(dense, x1), count_params(dense)
            torch.manual_seed(args.seed)
            t = time.perf_counter()
            train_loop(
                dense, torch.optim.SGD(dense.parameters(), **hp), data, args.epochs, seed=args.seed
            )
            rows.append({"model": name, "seed": args.seed, "library": "dense", "accuracy": accuracy(dense, data),
                         "params": params0, "macs": macs0, "seconds": time.perf_counter() - t})  # fmt: skip
            print(rows[-1], flush=True)
        if "prunekit" not in args.libraries:
            continue  # the peers are matched to prunekit's result

        torch.manual_seed(args.seed)
        model = build_model(name, SHAPE, 10, **kwargs)
        groups = find_groups(model, x1)
        cost: dict[str, Any] = {}
        if args.flops_removed is not None:  # HESSO's target in FLOPs: groups priced by their MACs
            rates = macs_rates(model, x1)
            cost = {"group_costs": group_macs(model, groups, x1, rates), "cost_target": args.flops_removed,
                    "cost_rates": rates, "channel_multiple": args.channel_multiple}  # fmt: skip
            if args.empty_branches:
                cost["may_empty"] = emptiable(model, groups, x1)
            if args.max_layer_fraction is not None:
                cost["max_layer_fraction"] = args.max_layer_fraction
            if args.cost_power is not None:
                cost["cost_power"] = args.cost_power
        start, pruning = round(PRUNE_START * steps), round((PRUNE_END - PRUNE_START) * steps)
        opt = HESSO(model.parameters(), groups, target_group_sparsity=args.target, start_step=start,
                    pruning_steps=pruning, periods=min(10, max(1, pruning)), **cost, **hp)  # fmt: skip
        t = time.perf_counter()
        train_loop(model, opt, data, args.epochs, seed=args.seed)
        small = slim(model, x1, groups)
        # only-train-once has no FLOPs target: it gets the group sparsity prunekit reached
        target = opt.group_sparsity() if args.flops_removed is not None else args.target
        label, stem = "prunekit HESSO", "prunekit"
        if args.channel_multiple > 1:
            label, stem = (
                f"{label}, widths in multiples of {args.channel_multiple}",
                f"{stem}-x{args.channel_multiple}",
            )
        if args.empty_branches:  # whole residual branches may go (folded by slim)
            label, stem = f"{label}, whole branches may go", f"{stem}-depth"
        if args.max_layer_fraction is not None:
            label += f", at most {args.max_layer_fraction:.0%} of a layer"
            stem += f"-m{round(100 * args.max_layer_fraction)}"
        if args.cost_power is not None:
            label, stem = f"{label}, cost power {args.cost_power:g}", f"{stem}-p{args.cost_power:g}"
        rows.append({"model": name, "seed": args.seed, "library": label, "slim_name": stem, "accuracy": accuracy(small, data),
                     "group_sparsity": target,
                     "params": count_params(small), "macs": count_macs(small, x1),
                     "seconds": time.perf_counter() - t, "slim": small})  # fmt: skip
        print({k: v for k, v in rows[-1].items() if k != "slim"}, flush=True)
        target_macs = rows[-1]["macs"]

        if oto_cls is not None and "oto" in args.libraries:
            torch.manual_seed(args.seed)
            model = build_model(name, SHAPE, 10, **kwargs)
            try:
                oto = oto_cls(model=model, dummy_input=x1)
                opt = oto.hesso(variant="sgd", lr=hp["lr"], weight_decay=hp["weight_decay"], first_momentum=0.9,
                                target_group_sparsity=target, start_pruning_step=start,
                                pruning_steps=pruning, pruning_periods=min(10, max(1, pruning)))  # fmt: skip
                t = time.perf_counter()
                train_loop(model, opt, data, args.epochs, seed=args.seed)
                with tempfile.TemporaryDirectory() as d:
                    oto.construct_subnet(out_dir=d)
                    cm = torch.load(oto.compressed_model_path, weights_only=False)
                rows.append({"model": name, "seed": args.seed, "library": "only-train-once HESSO", "accuracy": accuracy(cm, data),
                             "params": count_params(cm), "macs": count_macs(cm, x1),
                             "seconds": time.perf_counter() - t, "slim": cm})  # fmt: skip
            except Exception as exc:
                rows.append(
                    {
                        "model": name,
                        "seed": args.seed,
                        "library": "only-train-once HESSO",
                        "error": f"{type(exc).__name__}: {exc}"[:200],
                    }
                )
            print({k: v for k, v in rows[-1].items() if k != "slim"}, flush=True)

        if tp is not None and "tp" in args.libraries:
            torch.manual_seed(args.seed)
            model = build_model(name, SHAPE, 10, **kwargs)
            t = time.perf_counter()
            half = max(1, args.epochs // 2)
            opt = torch.optim.SGD(model.parameters(), **hp)
            train_loop(model, opt, data, half, total_epochs=args.epochs, seed=args.seed)
            ratio = tp_ratio_for_macs(tp, model, x1, target_macs)
            pruned = tp_prune(tp, copy.deepcopy(model), x1, ratio)
            opt = torch.optim.SGD(pruned.parameters(), **hp)
            train_loop(
                pruned,
                opt,
                data,
                args.epochs - half,
                start_epoch=half,
                total_epochs=args.epochs,
                seed=args.seed,
            )
            rows.append({"model": name, "seed": args.seed, "library": "torch-pruning (magnitude, prune + fine-tune)",
                         "accuracy": accuracy(pruned, data), "params": count_params(pruned),
                         "macs": count_macs(pruned, x1), "seconds": time.perf_counter() - t,
                         "pruning_ratio": ratio, "slim": pruned})  # fmt: skip
            print({k: v for k, v in rows[-1].items() if k != "slim"}, flush=True)
    return rows


def tp_prune(tp: Any, model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # TP needs it named
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=[classifier])  # fmt: skip
    pruner.step()
    return model


def tp_ratio_for_macs(tp: Any, model: nn.Module, x: torch.Tensor, target_macs: int) -> float:
    """Bisection on Torch-Pruning's channel ratio until its MACs match ``target_macs``."""

    def macs(ratio: float) -> int:
        return count_macs(tp_prune(tp, copy.deepcopy(model), x, ratio), x)

    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) > target_macs else (lo, mid)
    return min((lo, hi), key=lambda r: abs(macs(r) - target_macs))  # MACs move in channel steps


# --------------------------------------------------------------------------------------- part 3
Runner = Callable[[torch.Tensor], Any]


def torch_runner(model: nn.Module, batch: int) -> Runner:
    """Eager PyTorch, no autograd."""
    model.eval()

    def run(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return model(x)

    return run


def onnxruntime_runner(model: nn.Module, batch: int) -> Runner:
    """The model exported to ONNX (fixed batch) and run by onnxruntime's CPU provider, which fuses
    conv + batch norm and keeps its own memory arena; threads as torch's."""
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(
        model.eval(), (torch.randn(batch, *SHAPE),), buf, input_names=["x"], dynamo=False
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.numpy()})


RUNNERS: dict[str, Callable[[nn.Module, int], Runner]] = {
    "torch": torch_runner,
    "onnxruntime": onnxruntime_runner,
}


def latency(run: Runner, x: torch.Tensor, runs: int) -> float:
    """Median wall time of ``runs`` forward passes, after five warm-up passes."""
    for _ in range(5):
        run(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def latency_rows(models: dict[str, nn.Module], runs: int, rounds: int = 5,
                 runner: Callable[[nn.Module, int], Runner] = torch_runner) -> list[dict[str, Any]]:  # fmt: skip
    """Latency of every model in ``rounds`` rounds, the order rotated each round.

    Each round times every model in a block of ``runs // rounds`` passes; a speed-up is the median
    over rounds of that round's dense time over the model's, so a slow spell of the machine (other
    processes, frequency changes) hits both sides of a ratio instead of one model.
    """
    x1 = torch.randn(1, *SHAPE)
    macs0 = count_macs(models["dense"], x1)
    labels = list(models)
    ms: dict[tuple[str, int], list[float]] = {(k, b): [] for k in labels for b in (1, 64)}
    for b in (1, 64):
        x = torch.randn(b, *SHAPE)
        runs_of = {label: runner(models[label], b) for label in labels}
        for r in range(rounds):
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                ms[label, b].append(1000 * latency(runs_of[label], x, max(1, runs // rounds)))
    rows = []
    for label, m in models.items():
        row: dict[str, Any] = {"model": label, "params": count_params(m), "macs": count_macs(m, x1)}
        for b in (1, 64):
            row[f"ms_b{b}"] = statistics.median(ms[label, b])
            row[f"speedup_b{b}"] = statistics.median(
                d / t for d, t in zip(ms["dense", b], ms[label, b], strict=True)
            )
        row["flops_factor"] = macs0 / row["macs"]
        row["speedup_over_flops_b64"] = row["speedup_b64"] / row["flops_factor"]
        rows.append(row)
        print(row, flush=True)
    return rows


# The allocator decides much of a CPU latency here: glibc serves the large activations of a batch of
# 64 (3.2 MB per 16-channel 28×28 map) with fresh mmap()s, page-faulted on every forward pass, and
# whether a process stays in that state varies from process to process (dense ResNet-20: 14 ms vs
# 24–32 ms). So latency runs in fresh processes, with glibc's defaults and with its mmap threshold
# pinned high (memory reused, no page faults: what jemalloc/tcmalloc-style allocators give).
# onnxruntime (its own arena, conv + batch norm fused) is the third: what a deployment would use.
REGIMES: dict[str, tuple[str, dict[str, str]]] = {
    "PyTorch eager, default allocator": ("torch", {}),
    "PyTorch eager, allocator without page faults": ("torch", {
        "MALLOC_MMAP_THRESHOLD_": "4294967295",
        "MALLOC_TRIM_THRESHOLD_": "4294967295",
    }),
    "onnxruntime 1.32 (exported slim models)": ("onnxruntime", {}),
}  # fmt: skip


def latency_models(name: str) -> dict[str, nn.Module]:
    """The dense model and every slim model the accuracy part saved for ``name``."""
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {"dense": build_model(name, SHAPE, 10, **MODELS[name])}
    for f in sorted((SLIM_DIR / name).glob("*.pt")):
        models[f"{f.stem} slim"] = torch.load(f, weights_only=False)
    if len(models) == 1:  # no accuracy run: a 70% group-sparse model, slimmed
        m = build_model(name, SHAPE, 10, **MODELS[name])
        groups = find_groups(m, torch.randn(1, *SHAPE))
        zero_random_groups(groups, 0.7)
        models["prunekit slim (70% groups)"] = slim(m, torch.randn(1, *SHAPE), groups)
    return models


# Hand-picked architectures for the ``ceiling`` part: kept width per family (named by its first
# producing tensor); families not named keep every channel, 0 removes a residual branch (folded).
_R20_DEPTH = {f"layers.{b}.bn1.bias": 0 for b in (1, 2, 4, 5, 7, 8)}
_VGG = [f"features.{i}.weight" for i in (0, 3, 7, 10, 14, 17, 21, 24)]
_VGG_WIDTHS = [
    (5, 5, 10, 10, 26, 34, 126, 124),  # what HESSO learned (seed 0)
    (8, 8, 16, 16, 32, 32, 64, 64),
    (4, 4, 16, 16, 32, 32, 96, 128),
    (2, 2, 16, 16, 32, 32, 128, 128),
    (2, 2, 16, 16, 32, 32, 112, 128),
    (1, 1, 16, 16, 32, 32, 128, 128),
]
CEILING: dict[str, dict[str, dict[str, int]]] = {
    "resnet20": {
        "uniform widths 8/17/34": {"bn1.bias": 8, "layers.3.bn2.bias": 17, "layers.6.bn2.bias": 34}
        | {f"layers.{b}.bn1.bias": (8, 17, 34)[b // 3] for b in range(9)},
        "as HESSO depth ×16 learned (seed 0)": {"layers.3.bn2.bias": 16, "layers.7.bn1.bias": 48}
        | {"layers.8.bn1.bias": 16}
        | {f"layers.{b}.bn1.bias": 0 for b in (0, 1, 2, 4, 5)},
        "branches 2-3 of each stage removed, full width": _R20_DEPTH,
        "branches 2-3 removed, branch 1 of stage 3 at 48": _R20_DEPTH | {"layers.6.bn1.bias": 48},
    },
    "vgg_bn": {
        f"widths {'/'.join(map(str, w))}": dict(zip(_VGG, w, strict=True)) for w in _VGG_WIDTHS
    },
}


def hand_slim(name: str, widths: dict[str, int]) -> nn.Module:
    """The dense ``name`` (seed 0, batch-norm statistics settled) with each family cut to
    ``widths`` by zeroing its last groups, then slimmed."""
    torch.manual_seed(0)
    model = build_model(name, SHAPE, 10, **MODELS[name])
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        model.train()(x)
    model.eval()
    groups = find_groups(model, x)
    families: dict[str, list[Any]] = {}
    for g in groups:
        if g.prunable:
            families.setdefault(min(n for n, _ in g.slices("out")), []).append(g)
    for family, width in widths.items():
        for g in families[family][width:]:
            g.zero_()
    return slim(model, x, groups)


def ceiling_models(name: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {"dense": build_model(name, SHAPE, 10, **MODELS[name])}
    return models | {label: hand_slim(name, w) for label, w in CEILING[name].items()}


def ceiling_accuracy(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each ceiling architecture trained from scratch (fresh initialisation) with the dense budget
    and loop: could a method that found it meet the accuracy goal too?"""
    data = load_mnist().subset(args.train_subset, None)
    x1 = torch.randn(1, *SHAPE)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        macs0 = count_macs(build_model(name, SHAPE, 10, **MODELS[name]), x1)
        for label, widths in CEILING[name].items():
            model = hand_slim(name, widths)
            torch.manual_seed(args.seed)  # hand_slim seeds its own dense model
            for m in model.modules():
                if m is not model and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            torch.manual_seed(args.seed)
            train_loop(
                model, torch.optim.SGD(model.parameters(), **hp), data, args.epochs, seed=args.seed
            )
            rows.append({"model": name, "seed": args.seed, "architecture": label,
                         "accuracy": accuracy(model, data), "macs_removed": 1 - count_macs(model, x1) / macs0,
                         "epochs": args.epochs, "train_subset": args.train_subset})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


MODEL_SETS: dict[str, Callable[[str], dict[str, nn.Module]]] = {
    "trained": latency_models,
    "ceiling": ceiling_models,
}


def latency_over_processes(
    name: str,
    args: argparse.Namespace,
    runtime: str,
    env: dict[str, str],
    model_set: str = "trained",
) -> list[dict[str, Any]]:
    """:func:`latency_rows` in ``args.processes`` fresh processes; medians over them, and the range
    of the speed-up / FLOPs ratio."""
    runs: list[list[dict[str, Any]]] = []
    for _ in range(args.processes):
        cmd = [sys.executable, __file__, "--latency-worker", name, "--runtime", runtime, "--runs", str(args.runs),
               "--rounds", str(args.rounds), "--model-set", model_set]  # fmt: skip
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(
            cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for i, first in enumerate(runs[0]):
        row = dict(first)
        for key in ("ms_b1", "ms_b64", "speedup_b1", "speedup_b64", "speedup_over_flops_b64"):
            row[key] = statistics.median(r[i][key] for r in runs)
        ratios = [r[i]["speedup_over_flops_b64"] for r in runs]
        row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)
        rows.append(row)
        print(name, env or "default", row, flush=True)
    return rows


def md_tables(payload: dict[str, Any]) -> str:
    md = ["# Structured pruning: prunekit vs only-train-once 3.0.1 vs Torch-Pruning 1.6.1", ""]
    if "discovery" in payload:
        md += ["## Group discovery and exactness (70% of groups zeroed at random, then slimmed)", "",
               "| model | prunekit groups | prunekit find (s) | prunekit max diff | OTO find (s) | OTO max diff | TP graph (s) |",
               "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in payload["discovery"]:
            oto_diff = r.get("oto_error", f"{r.get('oto_max_diff', float('nan')):.1e}")
            md.append(f"| {r['model']} | {r['prunekit_groups']} | {r['prunekit_find_s']:.3f} | {r['prunekit_max_diff']:.1e} | "
                      f"{r.get('oto_find_s', float('nan')):.3f} | {oto_diff} | {r.get('tp_graph_s', float('nan')):.3f} |")  # fmt: skip
        md.append("")
    if "accuracy" in payload:
        a = payload["accuracy_args"]
        rows = payload["accuracy"]
        goal = (f"prunekit HESSO targets {100 * a['flops_removed']:.0f}% of the MACs, only-train-once the group sparsity it reached" if a.get("flops_removed")
                else f"target group sparsity {a['target']}")  # fmt: skip
        md += [f"## MNIST accuracy ({a['epochs']} epochs on {a['train_subset']} images, {goal}; Torch-Pruning matched to prunekit's MACs)", "",
               "| model | seed | library | accuracy | Δ vs dense (points) | params | MACs | FLOPs removed | train s |",
               "|---|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        base = {(r["model"], r.get("seed", 0)): r for r in rows if r["library"] == "dense"}
        for r in sorted(rows, key=lambda r: (r["model"], r.get("seed", 0))):
            if "error" in r:
                md.append(
                    f"| {r['model']} | {r.get('seed', 0)} | {r['library']} | error: {r['error']} | | | | | |"
                )
                continue
            b = base[r["model"], r.get("seed", 0)]
            removed = 1 - r["macs"] / b["macs"]
            md.append(f"| {r['model']} | {r.get('seed', 0)} | {r['library']} | {100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - b['accuracy']):+.2f} | "
                      f"{r['params']:,} | {r['macs']:,} | {100 * removed:.1f}% | {r['seconds']:.0f} |")  # fmt: skip
        md.append("")
    la = payload.get("latency_args", {})
    for name, regimes in payload.get("latency", {}).items():
        for regime, rows in regimes.items():
            md += [f"## CPU latency: {name}, {regime} (medians over {la['processes']} fresh processes; in each, {la['rounds']} rounds of {la['runs'] // la['rounds']} runs, order rotated, speed-ups are medians of per-round ratios; {la['threads']} threads)", "",
                   "| model | params | MACs | FLOPs factor | ms b=1 | speed-up b=1 | ms b=64 | speed-up b=64 | speed-up / FLOPs factor (b=64) | range over processes |",
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
            for r in rows:
                md.append(f"| {r['model']} | {r['params']:,} | {r['macs']:,} | {r['flops_factor']:.2f}× | {r['ms_b1']:.2f} | "
                          f"{r['speedup_b1']:.2f}× | {r['ms_b64']:.2f} | {r['speedup_b64']:.2f}× | {r['speedup_over_flops_b64']:.2f} | "
                          f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f} |")  # fmt: skip
            md.append("")
    ca = payload.get("ceiling_args", {})
    for name, regimes in payload.get("ceiling", {}).items():
        labels = list(regimes)
        md += [f"## Latency ceiling: {name}, hand-picked slim architectures (random weights; speed-up / FLOPs factor at b=64, median and range over {ca['processes']} fresh processes)", "",
               "| architecture | MACs removed | " + " | ".join(labels) + " |",
               "|---|---:|" + "---:|" * len(labels)]  # fmt: skip
        for i, r in enumerate(regimes[labels[0]]):
            cells = [f"{regimes[k][i]['speedup_over_flops_b64']:.2f} ({regimes[k][i]['ratio_min']:.2f}–{regimes[k][i]['ratio_max']:.2f})" for k in labels]  # fmt: skip
            md.append(f"| {r['model']} | {100 * (1 - 1 / r['flops_factor']):.1f}% | " + " | ".join(cells) + " |")  # fmt: skip
        md.append("")
    if payload.get("ceiling_accuracy"):
        dense = {(r["model"], r.get("seed", 0)): r["accuracy"] for r in payload.get("accuracy", []) if r["library"] == "dense"}  # fmt: skip
        md += ["## Ceiling architectures trained from scratch (dense loop and budget; Δ against the dense model of the same seed)", "",
               "| model | seed | architecture | MACs removed | accuracy | Δ vs dense (points) |", "|---|---:|---|---:|---:|---:|"]  # fmt: skip
        for r in sorted(payload["ceiling_accuracy"], key=lambda r: (r["model"], r["seed"])):
            d = dense.get((r["model"], r["seed"]))
            delta = f"{100 * (r['accuracy'] - d):+.2f}" if d is not None else ""
            md.append(f"| {r['model']} | {r['seed']} | {r['architecture']} | {100 * r['macs_removed']:.1f}% | {100 * r['accuracy']:.2f}% | {delta} |")  # fmt: skip
        md.append("")
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["discovery", "latency"],
        choices=["discovery", "accuracy", "latency", "ceiling", "ceiling-accuracy"],
    )
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg_bn"], choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument("--libraries", nargs="+", default=["dense", "prunekit", "oto", "tp"],
                        choices=["dense", "prunekit", "oto", "tp"], help="accuracy: which to train")  # fmt: skip
    parser.add_argument("--channel-multiple", type=int, default=1,
                        help="HESSO keeps layer widths multiples of this (a separate prunekit row)")  # fmt: skip
    parser.add_argument("--empty-branches", action="store_true",
                        help="HESSO may remove whole residual branches (structured.emptiable)")  # fmt: skip
    parser.add_argument("--max-layer-fraction", type=float, default=None,
                        help="HESSO's cap on the share of a layer's channels removed (default 0.7)")  # fmt: skip
    parser.add_argument("--cost-power", type=float, default=None,
                        help="HESSO ranks by importance / cost**power (default 0.5)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--target", type=float, default=0.7, help="target group sparsity")
    parser.add_argument(
        "--flops-removed",
        type=float,
        default=None,
        help="instead of --target: HESSO removes this fraction of the MACs (groups priced by MACs)",
    )
    parser.add_argument(
        "--runs", type=int, default=100, help="latency passes per model and batch size"
    )
    parser.add_argument("--processes", type=int, default=5, help="fresh processes for latency")
    parser.add_argument("--latency-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="torch", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument(
        "--model-set", default="trained", choices=list(MODEL_SETS), help=argparse.SUPPRESS
    )
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds (order rotated)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--oto-shim",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "peers" / "oto_shim.py",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.latency_worker is not None:  # one process of latency_over_processes: JSON rows out
        rows = latency_rows(MODEL_SETS[args.model_set](args.latency_worker), args.runs, args.rounds,
                            RUNNERS[args.runtime])  # fmt: skip
        print(json.dumps(rows))
        return
    oto_cls, tp = load_oto(args.oto_shim), load_tp()
    path = RESULTS / "structured.json"
    new: dict[str, Any] = {}
    if "discovery" in args.parts:
        new["discovery"] = discovery(oto_cls, tp)
    if "accuracy" in args.parts:
        rows = accuracy_runs(oto_cls, tp, args)
        for r in rows:
            if "slim" in r:  # kept for a latency run in a quiet window (no retraining)
                seed_dir = SLIM_DIR / r["model"] / ("" if args.seed == 0 else f"seed{args.seed}")
                out = seed_dir / f"{r.get('slim_name', r['library'].split(' ')[0])}.pt"
                out.parent.mkdir(parents=True, exist_ok=True)
                torch.save(r.pop("slim"), out)
        new["accuracy"] = rows
    for part, model_set in (("latency", "trained"), ("ceiling", "ceiling")):
        if part in args.parts:
            new[part] = {
                name: {regime: latency_over_processes(name, args, runtime, env, model_set)
                       for regime, (runtime, env) in REGIMES.items()}
                for name in args.models
            }  # fmt: skip
    if "ceiling-accuracy" in args.parts:
        new["ceiling_accuracy"] = ceiling_accuracy(args)
    runs = {"runs": args.runs, "rounds": args.rounds, "processes": args.processes,
            "threads": torch.get_num_threads()}  # fmt: skip
    # every part has run: read, merge and write under a lock, so that runs of other seeds or
    # models side by side keep each other's rows
    with open(RESULTS / ".structured.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        merge(payload, new, args, runs)
        write_results("structured", payload, md_tables(payload), echo=True)


def merge(
    payload: dict[str, Any], new: dict[str, Any], args: argparse.Namespace, runs: dict[str, int]
) -> None:
    """Put this run's parts into ``payload``; rows of other seeds, models and libraries stay."""
    payload["environment"] = environment()
    if "discovery" in new:
        payload["discovery"] = new["discovery"]
    if "accuracy" in new:
        payload["accuracy"] = _replace_rows(payload.get("accuracy", []), new["accuracy"], "library")
        payload["accuracy_args"] = {"epochs": args.epochs, "train_subset": args.train_subset,
                                    "target": args.target, "flops_removed": args.flops_removed}  # fmt: skip
    if "latency" in new:
        payload["latency"], payload["latency_args"] = new["latency"], runs
    if "ceiling" in new:  # per model: a run for one model keeps the other's rows
        payload["ceiling"] = payload.get("ceiling", {}) | new["ceiling"]
        payload["ceiling_args"] = runs
    if "ceiling_accuracy" in new:
        payload["ceiling_accuracy"] = _replace_rows(
            payload.get("ceiling_accuracy", []), new["ceiling_accuracy"], "architecture"
        )


def _replace_rows(
    old: list[dict[str, Any]], new: list[dict[str, Any]], what: str
) -> list[dict[str, Any]]:
    """``old`` rows without those ``new`` replaces (same model, seed and ``what``), then ``new``."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["model"], r.get("seed", 0), r[what]

    done = {key(r) for r in new}
    return [r for r in old if key(r) not in done] + new


if __name__ == "__main__":
    main()
