"""The command line: run the chosen parts, merge their rows into ``structured.json`` (under a
lock) and write ``structured.md``."""

from __future__ import annotations

import argparse
import fcntl
import json
from pathlib import Path
from typing import Any

import torch

from . import __doc__ as package_doc
from .accuracy import accuracy_runs
from .ceiling import ceiling_accuracy
from .discovery import discovery
from .latency import MODEL_SETS, REGIMES, RUNNERS, latency_over_processes, latency_rows
from .shared import MODELS, SLIM_DIR, load_oto, load_tp
from .tables import md_tables
from common import RESULTS, environment, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=(package_doc or "").splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["discovery", "latency"],
        choices=["discovery", "accuracy", "latency", "ceiling", "ceiling-accuracy"],
    )
    parser.add_argument("--models", nargs="+", default=["resnet20", "vgg_bn"], choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=10000)
    parser.add_argument(
        "--libraries",
        nargs="+",
        default=["dense", "prunekit", "oto", "tp"],
        choices=["dense", "prunekit", "oto", "tp"],
        help="accuracy: which to train",
    )
    parser.add_argument(
        "--channel-multiple",
        type=int,
        default=1,
        help="HESSO keeps layer widths multiples of this (a separate prunekit row)",
    )
    parser.add_argument(
        "--empty-branches",
        action="store_true",
        help="HESSO may remove whole residual branches (structured.emptiable)",
    )
    parser.add_argument(
        "--max-layer-fraction",
        type=float,
        default=None,
        help="HESSO's cap on the share of a layer's channels removed (default 0.7)",
    )
    parser.add_argument(
        "--cost-power",
        type=float,
        default=None,
        help="HESSO ranks by importance / cost**power (default 0.5)",
    )
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
        default=Path(__file__).resolve().parents[3] / "shared" / "peers" / "oto_shim.py",
    )
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="run nothing: rewrite structured.md from the saved structured.json",
    )
    args = parser.parse_args()
    if args.tables_only:
        payload = json.loads((RESULTS / "structured.json").read_text())
        (RESULTS / "structured.md").write_text(md_tables(payload))
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.latency_worker is not None:  # one process of latency_over_processes: JSON rows out
        rows = latency_rows(
            MODEL_SETS[args.model_set](args.latency_worker),
            args.runs,
            args.rounds,
            RUNNERS[args.runtime],
        )
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
                name: {
                    regime: latency_over_processes(name, args, runtime, env, model_set)
                    for regime, (runtime, env) in REGIMES.items()
                }
                for name in args.models
            }
    if "ceiling-accuracy" in args.parts:
        new["ceiling_accuracy"] = ceiling_accuracy(args)
    runs = {
        "runs": args.runs,
        "rounds": args.rounds,
        "processes": args.processes,
        "threads": torch.get_num_threads(),
    }
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
        payload["accuracy_args"] = {
            "epochs": args.epochs,
            "train_subset": args.train_subset,
            "target": args.target,
            "flops_removed": args.flops_removed,
        }
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
