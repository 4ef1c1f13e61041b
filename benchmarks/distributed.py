"""Data-parallel training with compressed gradients (issue 11): prunekit's DDP communication hooks
against DDP's own fp32 all-reduce and torch's hooks, side by side in the same runs.

LeNet-300-100 and ResNet-20 on MNIST, trained with ``DistributedDataParallel`` on 2 and 4 local
ranks (gloo over 127.0.0.1, one thread per rank), dense and with a sparse method (GMP), for each
communication hook:

* ``ddp`` — no hook: DDP's built-in fp32 all-reduce (the reference);
* prunekit ``none`` (the same all-reduce through our hook), ``qsgd`` (s=16 levels, d=512), ``natural``
  (power-of-two rounding, 9 bits), ``topk`` (1% with error feedback);
* torch's ``fp16_compress_hook``, ``powerSGD_hook`` (rank 2, vanilla all-reduce for the first 10
  steps) and ``quantization_pertensor_hook``.

Every run uses the same seed, the same global batch (128: each rank takes its share of every global
batch), the same schedule. Recorded per run: final test accuracy, bytes each rank sends per step (the
tensors handed to ``torch.distributed`` collectives, counted by wrapping them, times the ring factor:
all-reduce 2(W−1)/W, all-gather W−1, all-to-all (W−1)/W; DDP's own all-reduce of n fp32 values:
2(W−1)/W·4n), the ratio to fp32 all-reduce, seconds per step measured here, and the time per step a
real network would give: ``t_local + bytes / bandwidth`` at 1 and 10 Gbit/s, where ``t_local`` is the
measured step (compute, encoding, and the loopback exchange). The crossover bandwidth is the one below
which a hook beats DDP's all-reduce: ``(bytes_dense − bytes) / (t_local − t_local_ddp)``.

Buffers are not broadcast (``forward_sync_buffers=False``: each rank keeps its own batch-norm statistics,
rank 0's are evaluated), so the byte counts are the gradients' alone. With 4 ranks on 2 cores the
ranks share cores: compare seconds within one world size.

Results accumulate in ``benchmarks/results/distributed.{json,md,png}``; a configuration already
recorded is not run again (``--rerun`` replaces it).

Usage::

    python benchmarks/distributed.py                   # accuracy and bytes: ~1 h on 2 cores
    python benchmarks/distributed.py --part timing     # seconds per step: on a quiet machine
    python benchmarks/distributed.py --models lenet300 --worlds 2 --hooks ddp qsgd
    python benchmarks/distributed.py --table-only

Seconds per step come from ``--part timing`` (60 timed steps of the dense model per hook, run with
nothing else on the machine) where it was run; otherwise from the training run (marked *).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import prunekit
from prunekit.app import evaluate
from prunekit.data import load_dataset
from prunekit.distributed import compress_gradients, run_workers
from prunekit.models import build_model
from prunekit.schedules import cosine

from common import RESULTS, environment, write_results

RESULT_NAME = "distributed"
GBIT = 1e9 / 8  # bytes per second in 1 Gbit/s

#: hook name -> (owner, description)
HOOKS: dict[str, str] = {
    "ddp": "DDP's fp32 all-reduce (no hook)",
    "none": "prunekit none (fp32 all-reduce)",
    "qsgd": "prunekit QSGD s=16, d=512",
    "natural": "prunekit natural compression",
    "topk": "prunekit top-k 1% + error feedback",
    "torch-fp16": "torch fp16_compress_hook",
    "torch-powersgd": "torch PowerSGD rank 2",
    "torch-quant": "torch quantization_pertensor_hook",
}
OURS = {
    "none": {},
    "qsgd": {"levels": 16, "bucket_size": 512},
    "natural": {},
    "topk": {"ratio": 0.01},
}


@dataclass(frozen=True)
class ModelSpec:
    model: str
    epochs: int
    train_subset: int | None
    lr: float
    weight_decay: float
    sparse_method: str
    sparsity: float
    global_batch: int = 128
    seed: int = 0


MODELS = {
    "lenet300": ModelSpec("lenet300_100", 3, None, 0.05, 5e-4, "gmp", 0.9),
    "resnet20": ModelSpec("resnet20", 1, 12_800, 0.05, 1e-4, "gmp", 0.8),
}


class ByteCounter:
    """Wraps the ``torch.distributed`` collectives the hooks call and adds up, per rank, the bytes
    that cross the wire under ring algorithms."""

    NAMES = ("all_reduce", "all_gather", "all_gather_single", "all_to_all_single")

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.bytes = 0.0
        self._saved: dict[str, Any] = {}

    def _sent(self, name: str, args: tuple[Any, ...]) -> float:
        w = self.world_size
        if name == "all_reduce":
            return 2 * (w - 1) / w * args[0].numel() * args[0].element_size()
        if name == "all_gather":  # (output list, input)
            return (w - 1) * args[1].numel() * args[1].element_size()
        if name == "all_gather_single":  # (output, input)
            return (w - 1) * args[1].numel() * args[1].element_size()
        inp = args[1]  # all_to_all_single(output, input): the slices for the other ranks
        return (w - 1) / w * inp.numel() * inp.element_size()

    def install(self) -> None:
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapped(*args: Any, _name: str = name, _f: Any = original, **kw: Any) -> Any:
                self.bytes += self._sent(_name, args)
                return _f(*args, **kw)

            setattr(dist, name, wrapped)

    def remove(self) -> None:
        for name, f in self._saved.items():
            setattr(dist, name, f)


def _attach(ddp: DistributedDataParallel, hook: str) -> Any:
    from torch.distributed.algorithms.ddp_comm_hooks import (
        default_hooks,
        powerSGD_hook,
        quantization_hooks,
    )

    if hook == "ddp":
        return None
    if hook in OURS:
        return compress_gradients(ddp, method=hook, **OURS[hook])
    if hook == "torch-fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "torch-powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=10
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif hook == "torch-quant":
        ddp.register_comm_hook(None, quantization_hooks.quantization_pertensor_hook)
    else:
        raise ValueError(f"unknown hook {hook!r}; available: {', '.join(HOOKS)}")
    return None


def _worker(
    rank: int, world: int, spec: dict[str, Any], hook: str, sparse: bool, timing_steps: int = 0
) -> dict[str, Any]:
    """One rank's training run; with ``timing_steps`` only that many steps after 10 warm-up steps
    are run and timed (median), with no evaluation."""
    s = ModelSpec(**spec)
    torch.manual_seed(s.seed)
    data = load_dataset("mnist").subset(s.train_subset, None)
    model = build_model(s.model, tuple(data.x_train.shape[1:]), 10)
    opt = torch.optim.SGD(
        model.parameters(), lr=s.lr, momentum=0.9, weight_decay=s.weight_decay, nesterov=True
    )
    steps_per_epoch = len(data.x_train) // s.global_batch
    total = s.epochs * steps_per_epoch
    pruner = (
        prunekit.sparsify(model, opt, s.sparse_method, sparsity=s.sparsity, total_steps=total)
        if sparse
        else None
    )
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    n_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counter = ByteCounter(world)
    counter.install()
    state = _attach(ddp, hook)
    seconds, step, times = 0.0, 0, []
    stop = 10 + timing_steps if timing_steps else total
    try:
        for epoch in range(s.epochs):
            if step >= stop:
                break
            order = torch.randperm(
                len(data.x_train), generator=torch.Generator().manual_seed(s.seed * 1000 + epoch)
            )
            for i in range(steps_per_epoch):
                if step >= stop:
                    break
                idx = order[i * s.global_batch : (i + 1) * s.global_batch][rank::world]
                x, y = data.x_train[idx], data.y_train[idx]
                for g in opt.param_groups:
                    g["lr"] = s.lr * cosine(step, 1.0, total)
                t0 = time.perf_counter()
                loss = F.cross_entropy(ddp(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if pruner is not None:
                    pruner.step()
                seconds += time.perf_counter() - t0
                times.append(time.perf_counter() - t0)
                step += 1
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"loss {float(loss.detach())} at step {step}")
    finally:
        counter.remove()
    if timing_steps:
        return {"seconds_per_step": statistics.median(times[10:])}
    if pruner is not None:
        pruner.finalize()
    dense_per_step = 2 * (world - 1) / world * 4 * n_grad
    counted = counter.bytes / step if hook != "ddp" else dense_per_step
    out: dict[str, Any] = {
        "rank": rank,
        "steps": step,
        "seconds_per_step": seconds / step,
        "bytes_per_step": counted,
        "bytes_dense_per_step": dense_per_step,
        "sparsity": prunekit.sparsity_report(model)["global_sparsity"],
    }
    if state is not None:
        out["state_bytes_per_step"] = state.bytes_sent / step
        out["state_dense_per_step"] = state.bytes_dense / step
        out["mode"] = state.mode
    if rank == 0:
        out["test_accuracy"] = evaluate(model, data.x_test, data.y_test)
    return out


def _key(model: str, world: int, sparse: bool, hook: str) -> str:
    return f"{model}/W{world}/{'sparse' if sparse else 'dense'}/{hook}"


def run_one(model: str, world: int, sparse: bool, hook: str) -> dict[str, Any]:
    spec = MODELS[model]
    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "model": model,
        "world_size": world,
        "sparse": f"{spec.sparse_method} {spec.sparsity:.0%}" if sparse else "dense",
        "hook": hook,
        "hook_description": HOOKS[hook],
    }
    try:
        outs = run_workers(_worker, world, asdict(spec), hook, sparse, timeout=1800)
    except Exception as exc:  # a hook that fails on gloo is a result, not a crash
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        row["failed"] = (errors or lines)[-1][:300]
        logging.warning("%s failed: %s", _key(model, world, sparse, hook), row["failed"])
        return row
    row.update(
        test_accuracy=100 * outs[0]["test_accuracy"],
        sparsity=outs[0]["sparsity"],
        steps=outs[0]["steps"],
        train_seconds_per_step=max(o["seconds_per_step"] for o in outs),
        bytes_per_step=outs[0]["bytes_per_step"],
        bytes_dense_per_step=outs[0]["bytes_dense_per_step"],
        wall_seconds=time.perf_counter() - t0,
    )
    row["ratio"] = row["bytes_dense_per_step"] / row["bytes_per_step"]
    if "mode" in outs[0]:
        row["mode"] = outs[0]["mode"]
        row["state_bytes_per_step"] = outs[0]["state_bytes_per_step"]
    return row


def run_timing(model: str, world: int, hook: str, steps: int) -> dict[str, Any]:
    """Median seconds per step of the dense model with ``hook`` (for a quiet machine)."""
    try:
        outs = run_workers(_worker, world, asdict(MODELS[model]), hook, False, steps, timeout=1800)
    except Exception as exc:
        return {"failed": str(exc).strip().splitlines()[-1][:300]}
    return {"seconds_per_step": max(o["seconds_per_step"] for o in outs), "steps": steps}


def _timing_key(model: str, world: int, hook: str) -> str:
    return f"{model}/W{world}/{hook}"


def _derived(rows: dict[str, dict[str, Any]], timing: dict[str, dict[str, Any]]) -> None:
    """Accuracy change, modelled network time and crossover bandwidth against DDP's all-reduce.

    Seconds per step come from the quiet timing runs (``--part timing``) where recorded, else from
    the training run itself.
    """
    for row in rows.values():
        for derived in ("delta_accuracy", "crossover_gbit"):
            row.pop(derived, None)
        if "failed" in row:
            continue
        quiet = timing.get(_timing_key(row["model"], row["world_size"], row["hook"]), {})
        row["timed_quietly"] = "seconds_per_step" in quiet
        row["seconds_per_step"] = quiet.get("seconds_per_step", row["train_seconds_per_step"])
        ref = rows.get(_key(row["model"], row["world_size"], row["sparse"] != "dense", "ddp"), {})
        for gbit in (1, 10):
            row[f"seconds_per_step_{gbit}gbit"] = row["seconds_per_step"] + row[
                "bytes_per_step"
            ] / (gbit * GBIT)
        if "test_accuracy" not in ref or row["hook"] == "ddp":
            continue
        row["delta_accuracy"] = row["test_accuracy"] - ref["test_accuracy"]
        saved = ref["bytes_per_step"] - row["bytes_per_step"]
        extra = row["seconds_per_step"] - ref["seconds_per_step"]
        if saved <= 0:
            row["crossover_gbit"] = 0.0  # never wins on bytes
        elif extra <= 0:
            row["crossover_gbit"] = math.inf  # wins at any bandwidth
        else:
            row["crossover_gbit"] = saved / extra / GBIT


def _fmt_cross(v: float | None) -> str:
    if v is None:
        return "–"
    if v == math.inf:
        return "any"
    if v == 0.0:
        return "never"
    return f"{v:.2f}"


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Data-parallel training with compressed gradients",
        "",
        "`python benchmarks/distributed.py`; gloo on 127.0.0.1, one thread per rank, global batch 128.",
        "Δ acc: test accuracy minus DDP's fp32 all-reduce in the same configuration (same seed).",
        "bytes/step: what each rank sends per step under ring algorithms; ratio: fp32 all-reduce"
        " bytes / these bytes. t@1G / t@10G: measured step + bytes / bandwidth. Crossover:"
        " bandwidth (Gbit/s) below which the hook is faster than DDP's all-reduce.",
        "",
    ]
    for model, spec in MODELS.items():
        subset = [r for r in rows.values() if r["model"] == model]
        if not subset:
            continue
        data = f"{spec.train_subset or 50_000} training images, {spec.epochs} epoch(s)"
        lines += [
            f"## {model} ({data})",
            "",
            "| W | model | hook | mode | test acc (%) | Δ acc | bytes/step | ratio | s/step | t@1G | t@10G | crossover (Gbit/s) |",
            "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        order = list(HOOKS)
        for r in sorted(
            subset, key=lambda r: (r["world_size"], r["sparse"], order.index(r["hook"]))
        ):
            head = f"| {r['world_size']} | {r['sparse']} | {r['hook']} |"
            if "failed" in r:
                why = r["failed"].split("callback: ")[-1][:100]  # the innermost error
                lines.append(f"{head} – | failed: {why} | | | | | | | | |")
                continue
            delta = r.get("delta_accuracy")
            lines.append(
                f"{head} {r.get('mode', '–')} | {r['test_accuracy']:.2f} | "
                f"{'–' if delta is None else f'{delta:+.2f}'} | {r['bytes_per_step'] / 1e3:,.1f} kB | "
                f"{r['ratio']:.2f}× | {r['seconds_per_step'] * 1e3:.1f} ms{'' if r['timed_quietly'] else '*'} | "
                f"{r['seconds_per_step_1gbit'] * 1e3:.1f} ms | "
                f"{r['seconds_per_step_10gbit'] * 1e3:.1f} ms | {_fmt_cross(r.get('crossover_gbit'))} |"
            )
        lines.append("")
    lines += [
        "Failures are torch's hooks on gloo: `quantization_pertensor_hook` indexes a 0-dim tensor;",
        "`powerSGD_hook` on ResNet-20 (several DDP buckets) stops with gloo's \"Received data size",
        "doesn't match expected size ... collective mismatch\" on one rank (the other then reports the",
        "read error above); it issues its second all-reduce from a future callback, and the ranks'",
        "collective order then need not agree. prunekit's hooks issue at most one asynchronous",
        "collective per bucket.",
        "",
        "![accuracy against bytes](distributed.png)",
        "",
    ]
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models = [m for m in MODELS if any(r["model"] == m for r in rows.values())]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    markers = dict(zip(HOOKS, "os^vDP*X", strict=True))
    for ax, model in zip(axes[0], models, strict=True):
        for r in rows.values():
            if r["model"] != model or "failed" in r:
                continue
            color = {2: "tab:blue", 4: "tab:orange"}.get(r["world_size"], "tab:gray")
            ax.scatter(
                r["bytes_per_step"] / 1e3,
                r["test_accuracy"],
                marker=markers[r["hook"]],
                color=color,
                facecolors="none" if r["sparse"] != "dense" else color,
            )
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per rank per step (kB, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}: filled dense, hollow sparse; blue W=2, orange W=4")
        shown = {r["hook"] for r in rows.values() if r["model"] == model and "failed" not in r}
        handles = [
            Line2D([], [], marker=markers[h], color="black", linestyle="none", label=h)
            for h in HOOKS
            if h in shown
        ]
        ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{RESULT_NAME}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["accuracy", "timing"], default="accuracy")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=list(HOOKS))
    parser.add_argument("--variants", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--timing-steps", type=int, default=60)
    parser.add_argument("--rerun", action="store_true", help="run recorded configurations again")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--max-minutes", type=float, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = RESULTS / f"{RESULT_NAME}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    rows: dict[str, dict[str, Any]] = saved.get("rows", {})
    timing: dict[str, dict[str, Any]] = saved.get("timing", {})
    start = time.perf_counter()

    def save(echo: bool = False) -> None:
        _derived(rows, timing)
        payload = {"environment": environment(), "rows": rows, "timing": timing}
        write_results(RESULT_NAME, payload, markdown(rows), echo=echo)

    def out_of_time() -> bool:
        limit = args.max_minutes
        return limit is not None and time.perf_counter() - start > 60 * limit

    if not args.table_only:
        for model in args.models:
            for world in args.worlds:
                if args.part == "timing":
                    for hook in args.hooks:
                        key = _timing_key(model, world, hook)
                        if (key in timing and not args.rerun) or out_of_time():
                            continue
                        logging.info("timing %s", key)
                        timing[key] = run_timing(model, world, hook, args.timing_steps)
                        save()
                    continue
                for variant in args.variants:
                    for hook in ["ddp", *[h for h in args.hooks if h != "ddp"]]:
                        key = _key(model, world, variant == "sparse", hook)
                        if (key in rows and not args.rerun) or out_of_time():
                            continue
                        logging.info("running %s", key)
                        rows[key] = run_one(model, world, variant == "sparse", hook)
                        save()
    save(echo=True)
    plot(rows)


if __name__ == "__main__":
    main()
