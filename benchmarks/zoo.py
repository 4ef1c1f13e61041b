"""prunekit's structured pruning on every torchvision classifier, side by side with Torch-Pruning.

For each of the 80 classification models of torchvision 0.28
(``torchvision.models.list_models(module=torchvision.models)``), random init (``torch.manual_seed(0)``;
parameters torchvision initialises to exactly zero — ViT's head, biases — are drawn too, as in
``tests/structured/test_zoo.py``, so no output is trivially zero; ConvNeXt's ``layer_scale``, 1e-6 at
init, is set to 1, else its blocks move the output by ~1e-6 and no exactness check could see a wrong
slim), 1000 classes, 2 images:

* **prunekit** — ``find_groups(model, x)`` (timed: *discovery s*); a seeded random 30% of the
  prunable groups is zeroed; ``slim(model, x, groups)`` (timed: *slim s*, which includes slim's own
  float64 check of the outputs). The slim model's output is compared with the masked model's in
  float32, eval mode: *max rel diff* = ``max |slim − masked| / max |masked|``; *exact* means slim's
  float64 check passed (it raises :class:`~prunekit.structured.SlimError` otherwise) and the float32
  relative difference is at most ``1e-4``. The same relative change between the masked and the
  dense output (*zeroing effect*) says how much the check can see: a row where zeroing moved the
  output by under 1% is flagged as a weak check. Also the prunable share — prunable groups / all groups
  except the 1000 logits (groups that reach the model output, unprunable in any library), and the
  share of parameter elements that belong to at least one prunable group — with the three most
  frequent reasons a group is unprunable, and the parameters left / original.
* **Torch-Pruning 1.6.1** — ``tp.pruner.MetaPruner`` with ``MagnitudeImportance(p=2)`` at
  ``pruning_ratio=0.3``, the classifier ignored, ``num_heads`` given for every
  ``nn.MultiheadAttention`` (timed: *TP graph s*, the pruner's construction, which builds its
  ``DependencyGraph``); ``pruner.step()``; parameters left; whether the pruned model still runs
  and returns ``(2, 1000)``; an exception's last line if it crashed. Torch-Pruning's result is not
  checked for exactness (it prunes by magnitude, nothing is zeroed first); on ConvNeXt it prunes
  the LayerNorm residual stream, which prunekit keeps.

Inputs: 64×64, except 224×224 for ViT, Swin (v1 and v2) and MaxViT (fixed patch grids and windows),
96×96 for Inception v3 (it needs at least 75); ``aux_logits=False`` for GoogLeNet and Inception v3.

Each model runs in a fresh subprocess on one thread (the machine is shared), with a per-model
timeout; a failure in either library is a row with the error, never a crash of the script. Models
whose working set is estimated above ``--max-gb`` (6 × their float32 weights: the model, the slim
copy, float64 copies for the check, Torch-Pruning's copy) are skipped and listed; with the 4 GB
default these are convnext_large, regnet_y_128gf, vit_h_14, vit_l_16 and vit_l_32, run on this
24 GB machine with ``--models ... --max-gb 17 --worker-gb 20 --timeout 1500``. Rows accumulate in
``results/zoo.json``: a recorded model is skipped unless ``--rerun``.

Timing: discovery and Torch-Pruning's construction are each the fastest of three runs, after one
warm-up forward of the model, so neither pays the process's first-call costs for the other.

Cost (2 shared cores, one thread, measured): the whole run of the 75 models under 4 GB took about
30 min: CNNs 2–20 s each, Swin (v1, v2) and MaxViT 2–5 min each, nearly all of it Torch-Pruning
growing until the 8 GB cap stops it (MemoryError); prunekit needs 3–10 s there. Run it with
``--max-minutes`` in pieces if needed; rows accumulate.

Usage: ``python benchmarks/zoo.py [--models resnet18 ...] [--rerun] [--max-minutes M]
[--timeout S] [--max-gb G] [--worker-gb G] [--tables-only]``
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import math
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

from common import RESULTS, environment, write_results

NAME = "zoo"
FRACTION = 0.3
TIMING_KEYS = ("discovery_s", "tp_graph_s", "tp_dependency_graph_s")
TIMING_REPEATS = 3  # discovery and Torch-Pruning's graph: the fastest of three runs
DRAWS = 20  # random selections whose parameters left are averaged (one is slimmed)
CLASSES = 1000
BATCH = 2
REL_TOL = 1e-4
WEAK_EFFECT = 1e-2  # zeroing changed the output by less: the exactness check proves little
OUTPUT_REASON = "reaches the model output"  # the logits: not counted in the prunable share
WORKSET_FACTOR = 6  # estimated peak memory / float32 weight bytes
log = logging.getLogger("zoo")
T = TypeVar("T")


def _torchvision_models() -> Any:
    import torchvision_shim  # noqa: F401  (before torchvision)

    return importlib.import_module("torchvision.models")


def input_side(name: str) -> int:
    if name.startswith(("vit_", "swin_", "maxvit_")):
        return 224
    if name == "inception_v3":
        return 96
    return 64


def builder_kwargs(name: str) -> dict[str, Any]:
    return {"aux_logits": False} if name in ("googlenet", "inception_v3") else {}


def num_params_meta(models: Any, name: str) -> int:
    """Parameter count from the weights' metadata (nothing is downloaded or built)."""
    return int(models.get_model_weights(name).DEFAULT.meta["num_params"])


def build(models: Any, name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = models.get_model(name, weights=None, num_classes=CLASSES, **builder_kwargs(name))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("layer_scale"):  # ConvNeXt's 1e-6: the blocks would barely count
                p.fill_(1.0)
            elif not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    side = input_side(name)
    x = torch.randn(BATCH, 3, side, side, generator=gen)
    with torch.no_grad():
        model.eval()(x)  # warm: the first forward of a process selects its kernels
    return model, x


def timed(
    fn: Callable[[], T], repeats: int = TIMING_REPEATS, budget: float = 20.0
) -> tuple[float, T]:
    """The fastest of ``repeats`` calls of ``fn`` (fewer if one takes over ``budget`` seconds) and
    the last result: the first call in a process pays one-time costs (kernel selection, lazy
    imports) that the library timed second would not."""
    best, result = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
        if best > budget:
            break
    return best, cast(T, result)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prunable_param_share(model: nn.Module, groups: list[Any]) -> float:
    """Share of parameter elements that lie in at least one prunable group's slices.

    A group covers whole slices along one axis of a tensor, so with ``c_a`` indices of axis ``a``
    covered (union over the prunable groups), ``Π_a (n_a − c_a) · Π_other n`` elements are left
    uncovered."""
    params = dict(model.named_parameters())
    covered: dict[str, dict[int, set[int]]] = {}
    for g in groups:
        if not g.prunable:
            continue
        for (tensor, axis), idx in g.slices().items():
            if tensor in params:
                covered.setdefault(tensor, {}).setdefault(axis, set()).update(idx)
    inside = 0
    for tensor, axes in covered.items():
        shape = params[tensor].shape
        uncovered = 1
        for a, n in enumerate(shape):
            uncovered *= n - len(axes.get(a, ()))
        inside += params[tensor].numel() - uncovered
    return inside / count(model)


def params_left_of_draws(
    model: nn.Module, prunable: list[Any], draws: list[list[int]]
) -> list[float]:
    """Parameters left / original after zeroing each draw of prunable groups, from the groups'
    slices alone (no slim): a tensor with ``r_a`` indices of axis ``a`` removed keeps
    ``Π_a (n_a − r_a)`` elements. Checked against ``slim`` on the draw that is slimmed."""
    params = dict(model.named_parameters())
    covers = [
        [(t, axis, idx) for (t, axis), idx in g.slices().items() if t in params] for g in prunable
    ]
    total = count(model)
    out = []
    for draw in draws:
        removed: dict[str, dict[int, set[int]]] = {}
        for i in draw:
            for t, axis, idx in covers[i]:
                removed.setdefault(t, {}).setdefault(axis, set()).update(idx)
        gone = 0
        for t, axes in removed.items():
            kept = 1
            for a, n in enumerate(params[t].shape):
                kept *= n - len(axes.get(a, ()))
            gone += params[t].numel() - kept
        out.append(1 - gone / total)
    return out


def last_line(exc: BaseException) -> str:
    lines = [ln for ln in traceback.format_exception_only(type(exc), exc) if ln.strip()]
    text = lines[-1].strip() if lines else type(exc).__name__
    return text.splitlines()[-1][:300]


def run_prunekit(models: Any, name: str, row: dict[str, Any]) -> None:
    from prunekit.structured import SlimError, find_groups, slim

    model, x = build(models, name)
    row["params"] = count(model)
    row["discovery_s"], groups = timed(lambda: find_groups(model, x))
    prunable = [g for g in groups if g.prunable]
    row["groups"], row["prunable_groups"] = len(groups), len(prunable)
    output = sum(g.reason == OUTPUT_REASON for g in groups)
    row["output_groups"] = output
    row["prunable_share"] = len(prunable) / max(1, len(groups) - output)
    reasons = Counter(
        re.sub(r"^[\w.]+: ", "", g.reason)
        for g in groups
        if g.reason is not None and g.reason != OUTPUT_REASON
    )
    row["unprunable_reasons"] = dict(reasons.most_common(3))
    row["prunable_param_share"] = prunable_param_share(model, groups)
    with torch.no_grad():
        dense = model(x)
    gen = torch.Generator().manual_seed(2)
    draws = [
        torch.randperm(len(prunable), generator=gen)[: int(FRACTION * len(prunable))].tolist()
        for _ in range(DRAWS)
    ]
    left = params_left_of_draws(model, prunable, draws)
    row["params_left_draws"] = left
    row["params_left_mean"] = sum(left) / len(left)
    chosen = draws[0]  # the draw that is slimmed
    for i in chosen:
        prunable[i].zero_()
    row["zeroed_groups"] = len(chosen)
    checked = True
    t = time.perf_counter()
    try:
        small = slim(model, x, groups)
    except SlimError as exc:
        row["slim_error"] = last_line(exc)
        checked = False
        small = slim(model, x, groups, check=False)
    row["slim_s"] = time.perf_counter() - t
    small.eval()
    with torch.no_grad():
        ref, got = model(x), small(x)
    scale = float(ref.abs().max())
    row["max_rel_diff"] = float((got - ref).abs().max()) / scale if scale > 0 else float("nan")
    row["exact"] = checked and row["max_rel_diff"] <= REL_TOL
    # what zeroing did to the output: a check is only as strong as this is large
    row["zeroing_effect"] = float((ref - dense).abs().max()) / scale if scale > 0 else float("nan")
    row["params_left"] = count(small) / row["params"]
    row["params_left_formula_ok"] = abs(row["params_left"] - left[0]) < 1e-12


def time_torch_pruning(tp: Any, model: nn.Module, x: torch.Tensor, row: dict[str, Any]) -> Any:
    """Torch-Pruning's ``DependencyGraph`` alone and its ``MetaPruner`` construction (graph and all
    groups), timed; the pruner is returned."""
    heads = [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == CLASSES)
    ]
    outs = heads[-1:]  # the classifier (a 1×1 conv in SqueezeNet)
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    row["tp_dependency_graph_s"], _ = timed(
        lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x)
    )
    row["tp_graph_s"], pruner = timed(
        lambda: tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=FRACTION,
            ignored_layers=outs,
            num_heads=num_heads,
        )
    )
    return pruner


def run_timing(models: Any, name: str, row: dict[str, Any]) -> None:
    """Timings only (``--timing-only``): discovery and Torch-Pruning's construction, as in a full
    run, on a fresh model each."""
    import torch_pruning as tp

    from prunekit.structured import find_groups

    model, x = build(models, name)
    row["discovery_s"], _ = timed(lambda: find_groups(model, x))
    model, x = build(models, name)
    time_torch_pruning(tp, model, x, row)


def run_torch_pruning(models: Any, name: str, row: dict[str, Any]) -> None:
    import torch_pruning as tp

    model, x = build(models, name)
    before = count(model)
    stage = "graph"
    try:
        pruner = time_torch_pruning(tp, model, x, row)
        stage = "prune"
        t = time.perf_counter()
        pruner.step()
        row["tp_prune_s"] = time.perf_counter() - t
    except Exception as exc:
        raise RuntimeError(f"{stage}: {last_line(exc)}") from exc
    row["tp_params_left"] = count(model) / before
    try:
        with torch.no_grad():
            y = model(x)
        row["tp_output_ok"] = tuple(y.shape) == (BATCH, CLASSES)
        if not row["tp_output_ok"]:
            row["tp_error"] = f"output shape {tuple(y.shape)}"
    except Exception as exc:  # a pruned model that no longer runs is a result, not a crash
        row["tp_output_ok"] = False
        row["tp_error"] = f"pruned forward: {last_line(exc)}"


def worker(name: str, out: Path, max_gb: float, timing_only: bool = False) -> None:
    """One model, both libraries; the row goes to ``out`` as JSON (written after each part).

    The process's data segment is capped at ``max_gb`` (``RLIMIT_DATA``: heap and anonymous
    mappings, where tensors live), so a library that runs away with memory fails with an
    allocation error in its own row instead of exhausting the shared machine."""
    limit = int(max_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    models = _torchvision_models()
    row: dict[str, Any] = {"model": name, "input": input_side(name), "kwargs": builder_kwargs(name)}
    start = time.perf_counter()
    parts: tuple[tuple[str, Callable[[Any, str, dict[str, Any]], None], str], ...] = (
        (("timing", run_timing, "error"),)
        if timing_only
        else (("prunekit", run_prunekit, "error"), ("torch-pruning", run_torch_pruning, "tp_error"))
    )
    for part, fn, key in parts:
        try:
            fn(models, name, row)
        except Exception as exc:  # recorded in the row
            row[key] = last_line(exc).removeprefix("RuntimeError: ")
            log.warning("%s %s: %s", name, part, traceback.format_exc())
        row["seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(row))


def run_one(
    name: str, timeout: float, worker_gb: float, timing_only: bool = False
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--out", str(out)]
        cmd += ["--worker-gb", str(worker_gb)] + (["--timing-only"] if timing_only else [])
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
            failure = None if proc.returncode == 0 else f"worker exit {proc.returncode}"
            if proc.returncode != 0:
                log.warning("%s stderr:\n%s", name, proc.stderr[-3000:])
        except subprocess.TimeoutExpired:
            failure = f"timeout after {timeout:.0f} s"
        row = json.loads(out.read_text()) if out.exists() else {"model": name}
    if failure is not None:  # a partial row keeps what finished
        prunekit_done = "params_left" in row or "error" in row
        row["tp_error" if prunekit_done else "error"] = f"killed: {failure}"
        row["seconds"] = time.perf_counter() - start
        row.setdefault("input", input_side(name))
    return row


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def note(row: dict[str, Any]) -> str:
    parts = []
    if "skipped" in row:
        parts.append(f"skipped: {row['skipped']}")
    if "error" in row:
        parts.append(f"prunekit failed: {row['error']}")
    if "slim_error" in row:
        parts.append(f"prunekit slim check: {row['slim_error']}")
    if row.get("zeroing_effect", 1.0) < WEAK_EFFECT:
        parts.append(
            f"weak check: zeroing moved the output by only {row['zeroing_effect']:.1e} (relative)"
        )
    if row.get("tp_error"):
        parts.append(f"TP: {row['tp_error']}")
    if row["model"].startswith("convnext"):
        parts.append("TP prunes the LayerNorm stream (prunekit keeps it)")
    if row.get("unprunable_reasons"):
        parts.append(
            "unprunable: " + ", ".join(f"{k} ×{v}" for k, v in row["unprunable_reasons"].items())
        )
    if row.get("kwargs"):
        parts.append(", ".join(f"{k}={v}" for k, v in row["kwargs"].items()))
    return "; ".join(parts).replace("|", "\\|")


def speed_ratio(row: dict[str, Any], tp_key: str = "tp_graph_s") -> float | None:
    """prunekit's discovery time / Torch-Pruning's (same process, same input)."""
    ours, theirs = row.get("discovery_s"), row.get(tp_key)
    return ours / theirs if ours is not None and theirs else None


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | input | exact | max rel diff | prunable groups | params in prunable groups "
        f"| params left (prunekit, mean of {DRAWS}) | params left (Torch-Pruning) "
        "| discovery s | TP graph + groups s | discovery / TP | TP dependency graph s | slim s "
        "| note |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        groups = (
            f"{r['prunable_groups']}/{r['groups'] - r.get('output_groups', 0)} "
            f"({r['prunable_share']:.0%})"
            if "groups" in r
            else "—"
        )
        exact = "—" if "exact" not in r else ("yes" if r["exact"] else "**NO**")
        tp_left = _fmt(r.get("tp_params_left"), ".3f")
        if "tp_params_left" in r and not r.get("tp_output_ok", False):
            tp_left += " (broken)"
        left = _fmt(r.get("params_left_mean", r.get("params_left")), ".3f")
        if "params_left_draws" in r:
            left += f" ({min(r['params_left_draws']):.3f}–{max(r['params_left_draws']):.3f})"
        ratio = speed_ratio(r)
        lines.append(
            f"| {r['model']} | {r.get('input', '—')} | {exact} | {_fmt(r.get('max_rel_diff'), '.1e')} "
            f"| {groups} | {_fmt(r.get('prunable_param_share'), '.0%')} | {left} | {tp_left} "
            f"| {_fmt(r.get('discovery_s'), '.2f')} | {_fmt(r.get('tp_graph_s'), '.2f')} "
            f"| {_fmt(ratio, '.2f')} | {_fmt(r.get('tp_dependency_graph_s'), '.2f')} "
            f"| {_fmt(r.get('slim_s'), '.1f')} | {note(r)} |"
        )
    return head + "\n".join(lines) + "\n"


def speed_summary(rows: list[dict[str, Any]]) -> str:
    both = [r for r in rows if speed_ratio(r) is not None]
    if not both:
        return ""
    ratios = sorted(speed_ratio(r) or 0.0 for r in both)
    graph = [speed_ratio(r, "tp_dependency_graph_s") for r in both]
    graph_ratios = sorted(g for g in graph if g is not None)
    slower = sorted(both, key=lambda r: speed_ratio(r) or 0.0)[-3:]
    slowest = ", ".join(f"{r['model']} {speed_ratio(r):.2f}" for r in reversed(slower))
    return (
        f"Discovery speed, on the {len(both)} models where both libraries ran (one process per "
        "model, back to back): prunekit's `find_groups` took at most the time of Torch-Pruning's "
        f"`MetaPruner` construction (its DependencyGraph plus the enumeration of all its groups, "
        f"the same work) on {sum(x <= 1 for x in ratios)}, within 1.2× on "
        f"{sum(x <= 1.2 for x in ratios)}; median ratio {ratios[len(ratios) // 2]:.2f}, "
        f"slowest {slowest}. "
        "Against `DependencyGraph.build_dependency` alone (no groups): at most its time on "
        f"{sum(x <= 1 for x in graph_ratios)}, median ratio "
        f"{graph_ratios[len(graph_ratios) // 2]:.2f}.\n\n"
    )


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    done = [r for r in rows if "skipped" not in r]
    exact = sum(bool(r.get("exact")) for r in done)
    tp_ok = sum(bool(r.get("tp_output_ok")) for r in done)
    timed_rows = sum("timing" in r for r in done)
    folded = (
        ", ".join(
            f"{r['model']} ({(r['params_left_draws'][0] - r['params_left']) * r['params']:.0f} fewer)"
            for r in done
            if "params_left_draws" in r and not r.get("params_left_formula_ok", True)
        )
        or "none"
    )
    return (
        "# prunekit structured pruning on the torchvision classifiers, with Torch-Pruning\n\n"
        f"Random init, 2 images (side in *input*), 1000 classes, eval mode. prunekit: a seeded "
        f"random {FRACTION:.0%} of the prunable groups zeroed, then `slim`; *exact*: slim's float64 "
        f"check passed and `max |slim − masked| / max |masked|` ≤ {REL_TOL:g} in float32. "
        f"*params left (prunekit)*: mean (range) over {DRAWS} random draws of {FRACTION:.0%} of the "
        "prunable groups, computed from the groups' slices; on the draw that is slimmed it equals "
        "the slim model's count except where slim folds a layer left without channels into a "
        f"constant (its biases become a buffer): {folded}. "
        f"Torch-Pruning {env.get('torch_pruning', '?')}: `MetaPruner` + `MagnitudeImportance(p=2)` "
        f"at ratio {FRACTION}, classifier ignored; *(broken)* = the pruned model no longer runs or "
        "returns another shape; not checked for exactness. *prunable groups*: prunable / all except the "
        f"{CLASSES} logits (which reach the output); *params in prunable groups*: share of the "
        "parameter elements in at least one prunable group. *discovery s*: `find_groups` (trace, "
        "shapes, every channel group); *slim s*: `slim` including its float64 check; *TP graph + "
        "groups s*: `MetaPruner(...)` construction, which builds the DependencyGraph and enumerates "
        "all groups; *TP dependency graph s*: `DependencyGraph().build_dependency` alone. One "
        "thread, one subprocess per model"
        + (
            f"; the timing columns of {timed_rows} models come from a separate `--timing-only` run "
            "on a quiet machine (same protocol, nothing else running)"
            if timed_rows
            else ""
        )
        + ".\n\n"
        f"{len(done)} models run: prunekit exact on {exact}, Torch-Pruning's pruned model valid on "
        f"{tp_ok}.\n\n"
        + speed_summary(done)
        + table(rows)
        + "\nEnvironment: "
        + ", ".join(f"{k} {v}" for k, v in env.items())
        + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="default: every torchvision classifier")
    p.add_argument("--rerun", action="store_true", help="run models already recorded again")
    p.add_argument("--max-minutes", type=float, default=None, help="start no model after this")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    p.add_argument(
        "--worker-gb", type=float, default=8.0, help="memory cap of each model's process"
    )
    p.add_argument("--max-gb", type=float, default=4.0, help="skip larger estimated working sets")
    p.add_argument(
        "--tables-only", action="store_true", help="run nothing: rewrite zoo.md from zoo.json"
    )
    p.add_argument(
        "--timing-only",
        action="store_true",
        help="time discovery and Torch-Pruning's construction again on recorded models where both "
        "ran (run it on a quiet machine); only the timing columns change",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.worker_gb, args.timing_only)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    models = _torchvision_models()
    names = list(models.list_models(module=models))
    unknown = sorted(set(args.models or ()) - set(names))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; valid: {names}")
    todo = args.models or names
    path = RESULTS / f"{NAME}.json"
    rows = {r["model"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    if (args.tables_only or args.timing_only) and not rows:
        raise SystemExit(f"{path} has no rows yet: run the benchmark first")
    if args.tables_only:
        payload = json.loads(path.read_text())
        write_results(NAME, payload, markdown(payload["rows"], payload["environment"]))
        return
    env = environment()
    env["torchvision"] = importlib.metadata.version("torchvision")
    env["torch_pruning"] = importlib.metadata.version("torch-pruning")
    start = time.perf_counter()
    if args.timing_only:
        for name in todo:
            row = rows.get(name, {})
            if row.get("discovery_s") is None or row.get("tp_graph_s") is None:
                continue
            log.info("%s (timing) ...", name)
            timing = run_one(name, args.timeout, args.worker_gb, timing_only=True)
            if "error" in timing:
                log.warning("%s: %s", name, timing["error"])
                continue
            row.update({k: timing[k] for k in TIMING_KEYS})
            row["timing"] = "timing-only run"
            ordered = [rows[n] for n in names if n in rows]
            write_results(NAME, {"environment": env, "rows": ordered}, markdown(ordered, env))
        return
    for name in todo:
        if name in rows and not args.rerun:
            continue
        if args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes:
            log.info("--max-minutes reached; %s and later left for another run", name)
            break
        gb = WORKSET_FACTOR * 4 * num_params_meta(models, name) / 2**30
        if gb > args.max_gb:
            row = {"model": name, "input": input_side(name), "skipped": f"~{gb:.1f} GB > --max-gb"}
        else:
            log.info("%s ...", name)
            row = run_one(name, args.timeout, args.worker_gb)
        rows[name] = row
        log.info("%s", row)
        ordered = [rows[n] for n in names if n in rows]
        write_results(NAME, {"environment": env, "rows": ordered}, markdown(ordered, env))
    log.info("%s", table([rows[n] for n in todo if n in rows]))


if __name__ == "__main__":
    main()
