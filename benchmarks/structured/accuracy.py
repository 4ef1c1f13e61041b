"""Part 2: MNIST accuracy, parameters and MACs of the slim models, every library through the same
training loop: dense, prunekit HESSO, only-train-once's HESSO, Torch-Pruning prune + fine-tune."""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import torch
from torch import nn

from prunekit.core import count_macs, count_params
from prunekit.data import BatchIterator, load_mnist
from prunekit.models import build_model
from prunekit.structured import HESSO, find_groups, flops_target, slim

from .shared import MODELS, PRUNE_END, PRUNE_START, SHAPE, accuracy, train_loop


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
            rows.append(
                {
                    "model": name,
                    "seed": args.seed,
                    "library": "dense",
                    "accuracy": accuracy(dense, data),
                    "params": params0,
                    "macs": macs0,
                    "seconds": time.perf_counter() - t,
                }
            )
            print(rows[-1], flush=True)
        if "prunekit" not in args.libraries:
            continue  # the peers are matched to prunekit's result

        torch.manual_seed(args.seed)
        model = build_model(name, SHAPE, 10, **kwargs)
        groups = find_groups(model, x1)
        cost: dict[str, Any] = {}
        if args.flops_removed is not None:  # HESSO's target in FLOPs: groups priced by their MACs
            optional = {
                "max_layer_fraction": args.max_layer_fraction,
                "cost_power": args.cost_power,
            }
            cost = flops_target(
                model,
                groups,
                x1,
                args.flops_removed,
                remove_branches=args.empty_branches,
                **{k: v for k, v in optional.items() if v is not None},
            )
            cost["channel_multiple"] = args.channel_multiple
        start, pruning = round(PRUNE_START * steps), round((PRUNE_END - PRUNE_START) * steps)
        opt = HESSO(
            model.parameters(),
            groups,
            target_group_sparsity=args.target,
            start_step=start,
            pruning_steps=pruning,
            periods=min(10, max(1, pruning)),
            **cost,
            **hp,
        )
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
        rows.append(
            {
                "model": name,
                "seed": args.seed,
                "library": label,
                "slim_name": stem,
                "accuracy": accuracy(small, data),
                "group_sparsity": target,
                "params": count_params(small),
                "macs": count_macs(small, x1),
                "seconds": time.perf_counter() - t,
                "slim": small,
            }
        )
        print({k: v for k, v in rows[-1].items() if k != "slim"}, flush=True)
        target_macs = rows[-1]["macs"]

        if oto_cls is not None and "oto" in args.libraries:
            torch.manual_seed(args.seed)
            model = build_model(name, SHAPE, 10, **kwargs)
            try:
                oto = oto_cls(model=model, dummy_input=x1)
                opt = oto.hesso(
                    variant="sgd",
                    lr=hp["lr"],
                    weight_decay=hp["weight_decay"],
                    first_momentum=0.9,
                    target_group_sparsity=target,
                    start_pruning_step=start,
                    pruning_steps=pruning,
                    pruning_periods=min(10, max(1, pruning)),
                )
                t = time.perf_counter()
                train_loop(model, opt, data, args.epochs, seed=args.seed)
                with tempfile.TemporaryDirectory() as d:
                    oto.construct_subnet(out_dir=d)
                    cm = torch.load(oto.compressed_model_path, weights_only=False)
                rows.append(
                    {
                        "model": name,
                        "seed": args.seed,
                        "library": "only-train-once HESSO",
                        "accuracy": accuracy(cm, data),
                        "params": count_params(cm),
                        "macs": count_macs(cm, x1),
                        "seconds": time.perf_counter() - t,
                        "slim": cm,
                    }
                )
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
            rows.append(
                {
                    "model": name,
                    "seed": args.seed,
                    "library": "torch-pruning (magnitude, prune + fine-tune)",
                    "accuracy": accuracy(pruned, data),
                    "params": count_params(pruned),
                    "macs": count_macs(pruned, x1),
                    "seconds": time.perf_counter() - t,
                    "pruning_ratio": ratio,
                    "slim": pruned,
                }
            )
            print({k: v for k, v in rows[-1].items() if k != "slim"}, flush=True)
    return rows


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
