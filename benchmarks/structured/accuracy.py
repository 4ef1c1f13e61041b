"""Part 2: MNIST accuracy, parameters and MACs of the slim models, every library through the same
training loop: dense, prunekit HESSO, only-train-once's HESSO, Torch-Pruning prune + fine-tune."""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunekit.core import count_macs, count_params
from prunekit.data import BatchIterator, load_mnist
from prunekit.models import build_model
from prunekit.structured import HESSO, find_groups, flops_target, slim

from .shared import HP, MODELS, PRUNE_END, PRUNE_START, SHAPE, accuracy, train_loop


@dataclass(frozen=True)
class Setting:
    """What every library's run shares: the options, the data, the example input, the steps."""

    args: argparse.Namespace
    data: Any
    x1: torch.Tensor
    steps: int


@dataclass(frozen=True)
class Schedule:
    """HESSO's pruning steps (both libraries): from ``PRUNE_START`` to ``PRUNE_END`` of training."""

    start: int
    pruning: int

    @classmethod
    def of(cls, steps: int) -> Schedule:
        return cls(round(PRUNE_START * steps), round((PRUNE_END - PRUNE_START) * steps))

    @property
    def periods(self) -> int:
        return min(10, max(1, self.pruning))


def accuracy_runs(oto_cls: Any, tp: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    setting = prepare(args)
    rows = []
    for name in args.models:
        if "dense" in args.libraries:
            rows.append(reported(dense_row(setting, name)))
        if "prunekit" not in args.libraries:
            continue  # the peers are matched to prunekit's result
        ours = reported(prunekit_row(setting, name))
        rows.append(ours)
        # only-train-once has no FLOPs target: it gets the group sparsity prunekit reached
        if oto_cls is not None and "oto" in args.libraries:
            rows.append(reported(oto_row(oto_cls, setting, name, ours["group_sparsity"])))
        if tp is not None and "tp" in args.libraries:
            rows.append(reported(tp_row(tp, setting, name, target_macs=ours["macs"])))
    return rows


def prepare(args: argparse.Namespace) -> Setting:
    data = load_mnist().subset(args.train_subset, None)
    x1 = torch.randn(1, *SHAPE)
    steps = args.epochs * len(BatchIterator(data.x_train, data.y_train, 128))
    return Setting(args, data, x1, steps)


def reported(row: dict[str, Any]) -> dict[str, Any]:
    """``row``, printed without its slim model."""
    print({k: v for k, v in row.items() if k != "slim"}, flush=True)
    return row


def fresh_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, SHAPE, 10, **MODELS[name])


def dense_row(s: Setting, name: str) -> dict[str, Any]:
    """The dense model through the training loop."""
    args = s.args
    dense = fresh_model(name, args.seed)
    macs0, params0 = count_macs(dense, s.x1), count_params(dense)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    train_loop(
        dense, torch.optim.SGD(dense.parameters(), **HP), s.data, args.epochs, seed=args.seed
    )
    return {
        "model": name,
        "seed": args.seed,
        "library": "dense",
        "accuracy": accuracy(dense, s.data),
        "params": params0,
        "macs": macs0,
        "seconds": time.perf_counter() - t,
    }


def hesso_cost(model: nn.Module, groups: Any, s: Setting) -> dict[str, Any]:
    """HESSO's options for a target in FLOPs (groups priced by their MACs); none for --target."""
    args = s.args
    if args.flops_removed is None:
        return {}
    optional = {"max_layer_fraction": args.max_layer_fraction, "cost_power": args.cost_power}
    cost = flops_target(
        model,
        groups,
        s.x1,
        args.flops_removed,
        remove_branches=args.empty_branches,
        **{k: v for k, v in optional.items() if v is not None},
    )
    cost["channel_multiple"] = args.channel_multiple
    return cost


def prunekit_label(args: argparse.Namespace) -> tuple[str, str]:
    """The row's library label and the file stem of its slim model, naming the variant's options."""
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
    return label, stem


def prunekit_row(s: Setting, name: str) -> dict[str, Any]:
    """prunekit HESSO through the training loop, then ``slim``; ``group_sparsity`` is the one
    reached under a FLOPs target, else ``--target``."""
    args = s.args
    model = fresh_model(name, args.seed)
    groups = find_groups(model, s.x1)
    cost = hesso_cost(model, groups, s)
    schedule = Schedule.of(s.steps)
    opt = HESSO(
        model.parameters(),
        groups,
        target_group_sparsity=args.target,
        start_step=schedule.start,
        pruning_steps=schedule.pruning,
        periods=schedule.periods,
        **cost,
        **HP,
    )
    t = time.perf_counter()
    train_loop(model, opt, s.data, args.epochs, seed=args.seed)
    small = slim(model, s.x1, groups)
    target = opt.group_sparsity() if args.flops_removed is not None else args.target
    label, stem = prunekit_label(args)
    return {
        "model": name,
        "seed": args.seed,
        "library": label,
        "slim_name": stem,
        "accuracy": accuracy(small, s.data),
        "group_sparsity": target,
        "params": count_params(small),
        "macs": count_macs(small, s.x1),
        "seconds": time.perf_counter() - t,
        "slim": small,
    }


def oto_row(oto_cls: Any, s: Setting, name: str, target: float) -> dict[str, Any]:
    """only-train-once's HESSO with the same schedule to group sparsity ``target``, then its
    subnet; an error is a row."""
    args = s.args
    schedule = Schedule.of(s.steps)
    model = fresh_model(name, args.seed)
    library = "only-train-once HESSO"
    try:
        oto = oto_cls(model=model, dummy_input=s.x1)
        opt = oto.hesso(
            variant="sgd",
            lr=HP["lr"],
            weight_decay=HP["weight_decay"],
            first_momentum=0.9,
            target_group_sparsity=target,
            start_pruning_step=schedule.start,
            pruning_steps=schedule.pruning,
            pruning_periods=schedule.periods,
        )
        t = time.perf_counter()
        train_loop(model, opt, s.data, args.epochs, seed=args.seed)
        with tempfile.TemporaryDirectory() as d:
            oto.construct_subnet(out_dir=d)
            cm = torch.load(oto.compressed_model_path, weights_only=False)
        return {
            "model": name,
            "seed": args.seed,
            "library": library,
            "accuracy": accuracy(cm, s.data),
            "params": count_params(cm),
            "macs": count_macs(cm, s.x1),
            "seconds": time.perf_counter() - t,
            "slim": cm,
        }
    except Exception as exc:
        return {
            "model": name,
            "seed": args.seed,
            "library": library,
            "error": f"{type(exc).__name__}: {exc}"[:200],
        }


def tp_row(tp: Any, s: Setting, name: str, target_macs: int) -> dict[str, Any]:
    """Torch-Pruning: half the epochs dense, magnitude pruning to ``target_macs``, then the other
    half fine-tuning (one cosine over the whole budget)."""
    args = s.args
    model = fresh_model(name, args.seed)
    t = time.perf_counter()
    half = max(1, args.epochs // 2)
    opt = torch.optim.SGD(model.parameters(), **HP)
    train_loop(model, opt, s.data, half, total_epochs=args.epochs, seed=args.seed)
    ratio = tp_ratio_for_macs(tp, model, s.x1, target_macs)
    pruned = tp_prune(tp, copy.deepcopy(model), s.x1, ratio)
    opt = torch.optim.SGD(pruned.parameters(), **HP)
    train_loop(
        pruned,
        opt,
        s.data,
        args.epochs - half,
        start_epoch=half,
        total_epochs=args.epochs,
        seed=args.seed,
    )
    return {
        "model": name,
        "seed": args.seed,
        "library": "torch-pruning (magnitude, prune + fine-tune)",
        "accuracy": accuracy(pruned, s.data),
        "params": count_params(pruned),
        "macs": count_macs(pruned, s.x1),
        "seconds": time.perf_counter() - t,
        "pruning_ratio": ratio,
        "slim": pruned,
    }


def tp_prune(tp: Any, model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # TP needs it named
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[classifier],
    )
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
