"""Accuracy–compression frontier on MNIST next to the published points of METHODS.md §E.

Every registered method (and dense training) at several sparsities on LeNet-300-100 and LeNet-5-Caffe,
each trained from the shipped recipe ``recipes/<model>/<method>.yaml`` with ``pruning.sparsity`` set
per point. For every published (compression, error) point the table says whether at least one prunekit
run reaches at least that compression with at most that error.

Runs are resumable and incremental: a point already recorded in ``benchmarks/results/mnist_frontier.json``
(same model, method, sparsity and epochs) is not trained again; each run writes to
``runs/frontier/<model>/<method>-<sparsity>/e<epochs>-<recipe digest>`` and resumes from its checkpoint if interrupted.
So the frontier can be filled in over several sessions (``--max-minutes`` bounds one sitting).

Usage::

    python benchmarks/mnist_frontier.py                                 # everything (hours on 2 cores)
    python benchmarks/mnist_frontier.py --models lenet300 --methods dpf gmp --sparsities 0.98 0.99
    python benchmarks/mnist_frontier.py --table-only                    # rebuild tables from results
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from prunekit.app import DivergenceError, Recipe, load_data, load_recipe, train
from prunekit.methods import available_methods

from common import RESULTS, environment, write_results

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"lenet300": "lenet300_100", "lenet5": "lenet5_caffe"}
SPARSITIES = {
    "lenet300": [0.9, 0.92, 0.95, 0.96, 0.98, 0.986, 0.99],
    "lenet5": [0.9, 0.95, 0.98, 0.99, 0.992, 0.995, 0.9965],
}
# METHODS.md §E: (source, compression ×, test error %)
PUBLISHED: dict[str, list[tuple[str, float, float]]] = {
    "lenet300": [
        ("dense (Han et al. 2015)", 1.0, 1.64),
        ("Han et al. 2015, prune + retrain", 12.0, 1.59),
        ("DNS (Guo 2016)", 56.0, 1.99),
        ("Soft weight sharing (Ullrich 2017)", 23.0, 1.94),
        ("Sparse variational dropout (Molchanov 2017)", 68.0, 1.92),
        ("SNIP 95% (Lee 2019)", 20.0, 1.6),
        ("SNIP 98% (Lee 2019)", 50.0, 2.4),
        ("L-OBS 98.5% (Dong 2017, via SNIP)", 1 / 0.015, 2.0),
    ],
    "lenet5": [
        ("dense (Han et al. 2015)", 1.0, 0.80),
        ("Han et al. 2015, prune + retrain", 12.0, 0.77),
        ("DNS (Guo 2016)", 111.0, 0.91),
        ("Soft weight sharing (Ullrich 2017)", 200.0, 0.97),
        ("Sparse variational dropout (Molchanov 2017)", 280.0, 0.75),
        ("SNIP 98% (Lee 2019)", 50.0, 0.8),
        ("SNIP 99% (Lee 2019)", 100.0, 1.1),
        ("L-OBS 99% (Dong 2017, via SNIP)", 100.0, 2.1),
    ],
}
# A point whose loss becomes NaN with the recipe's learning rate is run once more with the learning
# rate times this factor (``prunekit train --set optimizer.lr=...``); both runs are recorded and the
# retry is marked in the tables.
RETRY_LR_FACTOR = 0.4
RESULT_NAME = "mnist_frontier"


def run_key(r: dict[str, Any]) -> tuple[str, str, float, int, str]:
    return (
        r["model"], r["method"], round(r["sparsity"], 6), r["epochs"], " ".join(r.get("overrides", []))
    )  # fmt: skip


def load_results() -> list[dict[str, Any]]:
    path = RESULTS / f"{RESULT_NAME}.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def save_merged(
    new_runs: dict[tuple[str, str, float, int, str], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Merge ``new_runs`` into the results file under a lock (several processes may run at once)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f".{RESULT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {run_key(r): r for r in load_results()}
        merged.update(new_runs)
        ordered = sorted(merged.values(), key=run_key)
        write_results(
            RESULT_NAME, {"environment": environment(), "runs": ordered}, frontier_tables(ordered)
        )
        fcntl.flock(lock, fcntl.LOCK_UN)
    return ordered


def point_recipe(
    model: str, method: str, sparsity: float, epochs: int | None, extra: list[str] | None = None
) -> Recipe:
    """The shipped recipe of ``model``/``method`` with this point's sparsity (epochs, overrides)."""
    overrides = [] if method == "dense" else [f"pruning.sparsity={sparsity}"]
    overrides += extra or []
    if epochs is not None:
        overrides.append(f"epochs={epochs}")
    return load_recipe(ROOT / "recipes" / model / f"{method}.yaml", overrides)


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha1(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def run_one(
    model: str,
    method: str,
    sparsity: float,
    recipe: Recipe,
    runs_dir: Path,
    data: Any,
    extra: list[str],
) -> dict[str, Any]:
    tag = "".join(f"-{o.split('.')[-1].replace('=', '')}" for o in extra)
    out = (
        runs_dir
        / model
        / (method if method == "dense" else f"{method}-{sparsity:g}{tag}")
        / f"e{recipe.epochs}-{recipe_digest(recipe)}"  # a changed recipe never resumes a stale run
    )
    metrics_path = out / "metrics.json"
    if metrics_path.exists():
        m = json.loads(metrics_path.read_text())
    else:
        try:
            m = train(recipe, out, progress=False, data=data)
        except DivergenceError as exc:  # NaN/inf or an exploded loss
            print(f"{model} {method} {sparsity:g}: diverged ({exc})", flush=True)
            return {
                "model": model, "method": method, "sparsity": sparsity, "epochs": recipe.epochs,
                "test_error": None, "compression": None, "diverged": True, "lr": recipe.optimizer.lr,
                **({"overrides": extra} if extra else {}),
            }  # fmt: skip
    return {
        "model": model,
        "method": method,
        "sparsity": 0.0 if method == "dense" else sparsity,
        "epochs": recipe.epochs,
        "test_error": m["test_error"],
        "global_sparsity": m["global_sparsity"],
        "compression": m["compression"],
        "wall_seconds": m["wall_seconds"],
        "device": m.get("device", "cpu"),
        **({"overrides": extra} if extra else {}),
        **(
            {"dense_pair_test_error": 100 * (1 - m["dense_pair_test_accuracy"])}
            if "dense_pair_test_accuracy" in m
            else {}
        ),
    }


def frontier_tables(runs: list[dict[str, Any]]) -> str:
    lines = [
        "# MNIST accuracy–compression frontier",
        "",
        "Compression = prunable weights / nonzero weights; error = test error (%) on the 10k MNIST test set, "
        "one seed. Reproduce a cell: `python benchmarks/mnist_frontier.py --models M --methods X --sparsities S` "
        "(recipes in `recipes/`).",
    ]
    for model in MODELS:
        mruns = [r for r in runs if r["model"] == model]
        if not mruns:
            continue
        sparsities = sorted({r["sparsity"] for r in mruns if r["method"] != "dense"})
        methods = sorted({r["method"] for r in mruns})
        lines += ["", f"## {MODELS[model]}", "", "Test error % (compression ×, epochs):", ""]
        lines.append("| method | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |")
        lines.append("|---|" + "---:|" * len(sparsities))
        for method in methods:
            cells = []
            for s in sparsities:
                hits = [
                    r
                    for r in mruns
                    if r["method"] == method and (r["sparsity"] == s or method == "dense")
                ]
                if method == "dense":
                    hits = [r for r in mruns if r["method"] == "dense"]
                cells.append(
                    "; ".join(
                        f"diverged (lr {r['lr']:g})"
                        if r.get("diverged")
                        else f"{r['test_error']:.2f} ({r['compression']:.0f}×, {r['epochs']}e"
                        + "".join(f", {o}" for o in r.get("overrides", []))
                        + ")"
                        for r in hits
                    )
                    or "—"
                )
                if method == "dense":
                    cells = [cells[0]] + [""] * (len(sparsities) - 1)
                    break
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Published points (METHODS.md §E) and the best prunekit run at ≥ that compression:",
            "",
        ]
        lines.append(
            "| published | compression | error | best prunekit at ≥ compression | beaten? |"
        )
        lines.append("|---|---:|---:|---|---|")
        for source, comp, err in PUBLISHED[model]:
            eligible = [
                r for r in mruns if not r.get("diverged") and r["compression"] >= comp * 0.999
            ]
            best = min(eligible, key=lambda r: r["test_error"], default=None)
            if best is None:
                lines.append(
                    f"| {source} | {comp:.0f}× | {err:.2f} | no run at this compression | not yet |"
                )
                continue
            beaten = best["test_error"] <= err
            lines.append(
                f"| {source} | {comp:.0f}× | {err:.2f} | {best['method']} {best['test_error']:.2f} @ "
                f"{best['compression']:.0f}× ({best['epochs']} epochs) | {'**yes**' if beaten else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in runs)]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mruns = [r for r in runs if r["model"] == model and not r.get("diverged")]
        for method in sorted({r["method"] for r in mruns}):
            pts = sorted(
                (r["compression"], r["test_error"]) for r in mruns if r["method"] == method
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        for source, comp, err in PUBLISHED[model]:
            ax.scatter([comp], [err], marker="*", s=120, color="black", zorder=5)
            ax.annotate(
                source.split(" (")[0],
                (comp, err),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("compression (×, log)")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{MODELS[model]} on MNIST (★ published)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=["dense", *available_methods()])
    parser.add_argument("--sparsities", nargs="+", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "frontier")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="stop starting new runs after this"
    )
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="train the selected points again (after a fix); the new results replace the recorded ones",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 when running two at once)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    runs = {run_key(r): r for r in load_results()}
    start = time.time()
    rerun: set[tuple[Any, ...]] = set()
    started = time.strftime("%Y%m%d-%H%M%S")  # --rerun trains in a fresh directory
    for model in [] if args.table_only else args.models:
        dense = load_recipe(ROOT / "recipes" / model / "dense.yaml")
        data = load_data(dense.data, dense.seed)
        for method in args.methods:
            for sparsity in [0.0] if method == "dense" else (args.sparsities or SPARSITIES[model]):
                if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
                    print("time budget reached; stopping")
                    break
                extra: list[str] = []
                while True:
                    recipe = point_recipe(model, method, sparsity, args.epochs, extra)
                    point = 0.0 if method == "dense" else sparsity
                    key = (model, method, round(point, 6), recipe.epochs, " ".join(extra))
                    r = runs.get(key)  # recorded in the committed results: not trained again
                    if r is None or (args.rerun and key not in rerun):
                        rerun.add(key)
                        runs_dir = (
                            args.runs_dir / "rerun" / started if args.rerun else args.runs_dir
                        )
                        r = run_one(model, method, sparsity, recipe, runs_dir, data, extra)
                        runs[run_key(r)] = r
                        save_merged({run_key(r): r})
                        if not r.get("diverged"):
                            print(
                                f"{model} {method} {sparsity:g}: error {r['test_error']:.2f}% at "
                                f"{r['compression']:.1f}× ({r['wall_seconds']:.0f}s)",
                                flush=True,
                            )
                    if not r.get("diverged") or extra:
                        break
                    extra = [f"optimizer.lr={recipe.optimizer.lr * RETRY_LR_FACTOR:g}"]
    ordered = save_merged({})
    plot(ordered, RESULTS / f"{RESULT_NAME}.png")


if __name__ == "__main__":
    main()
