"""Part 3: CPU latency of the dense and slim models at batch 1 and 64, in fresh processes, in three
regimes (PyTorch eager with glibc's allocator, with its mmap threshold pinned, onnxruntime)."""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.core import count_macs, count_params
from prunekit.models import build_model
from prunekit.structured import find_groups, slim

from .ceiling import ceiling_models
from .shared import BENCHMARKS, ENTRY, MODELS, SHAPE, SLIM_DIR, zero_random_groups

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


def latency_rows(
    models: dict[str, nn.Module],
    runs: int,
    rounds: int = 5,
    runner: Callable[[nn.Module, int], Runner] = torch_runner,
) -> list[dict[str, Any]]:
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
    "PyTorch eager, allocator without page faults": (
        "torch",
        {
            "MALLOC_MMAP_THRESHOLD_": "4294967295",
            "MALLOC_TRIM_THRESHOLD_": "4294967295",
        },
    ),
    "onnxruntime 1.32 (exported slim models)": ("onnxruntime", {}),
}


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
        cmd = [
            *ENTRY,
            "--latency-worker",
            name,
            "--runtime",
            runtime,
            "--runs",
            str(args.runs),
            "--rounds",
            str(args.rounds),
            "--model-set",
            model_set,
        ]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(
            cmd,
            cwd=BENCHMARKS,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
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
