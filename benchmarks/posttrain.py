"""Post-training compression (issue 10): one-shot pruning / quantization of trained networks.

Part ``mnist``: LeNet-300-100, LeNet-5-Caffe and ResNet-20, trained dense on MNIST by
``prunekit train`` (recipes ``recipes/lenet300/dense.yaml``, ``recipes/lenet5/dense.yaml``,
``recipes/posttrain/resnet20_dense.yaml``), then compressed one-shot from 1024 training images by
every registered method: pruning at 50/70/80/90% and 2:4, quantization at 4 and 3 bits, and 50% +
4 bits jointly. Test accuracy with no fine-tuning, and after one epoch of sparse fine-tuning
(``method="constant"``: the zeros stay zero).

Part ``minilm`` (needs ``requirements-bench.txt``): all-MiniLM-L6-v2 pruned to 50% and 2:4 and
quantized to 4 bits by prunekit (magnitude, Wanda, SparseGPT, GPTQ) and by llm-compressor 0.14
(SparseGPTModifier, GPTQModifier) in the same process on the same calibration sentences; fidelity
of the sentence embeddings on 1000 held-out sentences of the Lee corpus (see ``minilm.py``).

Results accumulate in ``benchmarks/results/posttrain.{json,md,png}``: a row already recorded is
not run again, so the benchmark can be filled in over several sittings (``--max-minutes``).

Usage::

    python benchmarks/posttrain.py --part mnist                         # ~1 h on 2 cores
    python benchmarks/posttrain.py --part mnist --models lenet300 --methods sparsegpt obc
    python benchmarks/posttrain.py --part minilm                        # ~10 min
    python benchmarks/posttrain.py --part minilm-timing --threads 2     # quiet machine: ~5 min
    python benchmarks/posttrain.py --table-only
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prunekit
from prunekit.app import (
    CalibrationSpec,
    FinetuneSpec,
    calibration_batches,
    evaluate,
    load_data,
    load_recipe,
    sparse_finetune,
    train,
)
from prunekit.models import build_model

from common import RESULTS, environment, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULT_NAME = "posttrain"
DENSE_RECIPES = {
    "lenet300": "recipes/lenet300/dense.yaml",
    "lenet5": "recipes/lenet5/dense.yaml",
    "resnet20": "recipes/posttrain/resnet20_dense.yaml",
}
ORDER = {name: i for i, name in enumerate(DENSE_RECIPES)}
PRUNERS = ["magnitude", "wanda", "sparsegpt", "obc", "mfac"]
QUANTIZERS = ["rtn", "gptq", "obq"]
SPARSITIES = [0.5, 0.7, 0.8, 0.9]
BITS = [4, 3]
CALIBRATION = 1024
#: ResNet-20 fine-tunes only these settings by default (an epoch costs ~4 min on 2 cores)
RESNET_FINETUNE = {("magnitude", "70%"), ("sparsegpt", "70%"), ("magnitude", "2:4"),
                   ("sparsegpt", "2:4"), ("magnitude", "80%"), ("sparsegpt", "80%")}  # fmt: skip


def settings(methods: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(method, label, compress kwargs)`` for every point of the MNIST part."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for m in methods:
        if m in PRUNERS:
            out += [(m, f"{round(100 * s)}%", {"sparsity": s}) for s in SPARSITIES]
            if m != "mfac":  # M-FAC prunes globally, without N:M
                out.append((m, "2:4", {"pattern": "2:4"}))
        if m in QUANTIZERS:
            out += [(m, f"{b} bits", {"bits": b}) for b in BITS]
        if m in ("sparsegpt", "magnitude"):  # joint; magnitude = prune then round-to-nearest
            out.append((m, "50% + 4 bits", {"sparsity": 0.5, "bits": 4}))
    return out


def load_results() -> list[dict[str, Any]]:
    path = RESULTS / f"{RESULT_NAME}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def row_key(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["part"], r.get("model", r.get("library", "")), r["method"], r["setting"])


def _replaced_parts(rows: list[dict[str, Any]]) -> set[str]:
    """Parts whose rows are rewritten as a whole (the timing runs)."""
    return {r["part"] for r in rows if r["part"] == "minilm-timing"}


def save(rows: list[dict[str, Any]]) -> None:
    """Merge ``rows`` into the results file (under a lock: several parts may run at once)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f".{RESULT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mine = {row_key(r) for r in rows}
        replaced = _replaced_parts(rows)
        merged = [
            r for r in load_results() if row_key(r) not in mine and r["part"] not in replaced
        ] + rows
        merged.sort(key=lambda r: (r["part"] != "mnist", ORDER.get(r.get("model", ""), 9)))
        payload = {"environment": environment(), "rows": merged}
        write_results(RESULT_NAME, payload, tables(merged))
        plot(merged, RESULTS / f"{RESULT_NAME}.png")


def dense_model(name: str) -> tuple[nn.Module, Any, float]:
    """The dense model trained by ``prunekit train`` (trained once, reused), its data and accuracy."""
    recipe = load_recipe(ROOT / DENSE_RECIPES[name])
    out = ROOT / "runs" / f"{name}-dense"  # where the recipes in recipes/posttrain/ look
    if not (out / "model.pt").exists():
        logging.info("training dense %s into %s", name, out)
        train(recipe, out, progress=False, device="cpu")
    data = load_data(recipe.data, recipe.seed)
    assert recipe.model.name is not None
    model = build_model(
        recipe.model.name, data.input_shape, data.num_classes, **recipe.model.kwargs
    )
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    model.eval()
    return model, data, evaluate(model, data.x_test, data.y_test)


def finetune_one_epoch(model: nn.Module, data: Any, lr: float = 0.01) -> float:
    """One epoch of SGD with the compressed zeros fixed (``method="constant"``); test accuracy."""
    sparse_finetune(model, data, FinetuneSpec(epochs=1, lr=lr), torch.device("cpu"), seed=1)
    return evaluate(model, data.x_test, data.y_test)


def run_mnist(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    done = {(r["model"], r["method"], r["setting"]) for r in rows if r.get("part") == "mnist"}
    deadline = time.monotonic() + 60 * args.max_minutes
    spec = CalibrationSpec(samples=CALIBRATION)
    for name in args.models:
        dense, data, dense_acc = dense_model(name)
        cal = calibration_batches(
            data, CALIBRATION, spec.batch_size, spec.seed, torch.device("cpu")
        )
        xs, ys = [x for x, _ in cal], [y for _, y in cal]
        for method, label, kw in settings(args.methods):
            if (name, method, label) in done:
                continue
            if time.monotonic() > deadline:
                logging.warning("--max-minutes reached; rerun to continue")
                return
            model = copy.deepcopy(dense)
            extra: dict[str, Any] = {}
            if method == "mfac":
                extra = {"labels": ys, "ngrads": 64}
            t0 = time.perf_counter()
            report = prunekit.compress(model, xs, method, **kw, **extra)
            seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "part": "mnist",
                "model": name,
                "method": method,
                "setting": label,
                "sparsity": prunekit.sparsity_report(model)["global_sparsity"],
                "bits": kw.get("bits"),
                "dense_accuracy": dense_acc,
                "accuracy": evaluate(model, data.x_test, data.y_test),
                "seconds": seconds,
                "mean_rel_error": sum(r.rel_error for r in report.layers) / len(report.layers),
                "threads": torch.get_num_threads(),
            }
            want_ft = kw.get("bits") is None and (
                name != "resnet20" or args.finetune_all or (method, label) in RESNET_FINETUNE
            )
            if want_ft:
                t0 = time.perf_counter()
                row["finetuned_accuracy"] = finetune_one_epoch(model, data)
                row["finetune_seconds"] = time.perf_counter() - t0
            rows.append(row)
            logging.info("%s", json.dumps(row))
            save(rows)


def run_minilm(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    import minilm

    if "minilm" in args.part:
        minilm.benchmark(rows, save, force=args.force)
    if "minilm-timing" in args.part:
        minilm.timing(rows, save)


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.2f}" if pct else f"{v:.1f}"


def tables(rows: list[dict[str, Any]]) -> str:
    out = ["# Post-training compression (issue 10)", ""]
    mnist = [r for r in rows if r.get("part") == "mnist"]
    if mnist:
        out += [
            "## MNIST: test accuracy (%) after one-shot compression, no fine-tuning "
            "(→ after 1 epoch of sparse fine-tuning)",
            "",
            "1024 calibration images from the training split; every Linear/Conv layer compressed "
            "(2:4 leaves layers with fewer than 4 input channels dense); ResNet-20's batch-norm "
            "statistics re-estimated on the calibration images after every compressed layer "
            "(`recalibrate_batchnorm`, the default). Fine-tuning: one epoch of SGD with the zeros "
            'fixed (`method="constant"`); ResNet-20 only for the settings shown with an arrow. '
            "`python benchmarks/posttrain.py --part mnist`.",
            "",
        ]
        for model in dict.fromkeys(r["model"] for r in mnist):
            mrows = [r for r in mnist if r["model"] == model]
            labels = list(dict.fromkeys(r["setting"] for r in mrows))
            known = PRUNERS + QUANTIZERS
            methods = sorted(dict.fromkeys(r["method"] for r in mrows), key=known.index)
            out += [
                f"### {model} (dense {_fmt(mrows[0]['dense_accuracy'])}%)",
                "",
                "| method | " + " | ".join(labels) + " |",
                "|---|" + "---:|" * len(labels),
            ]
            for m in methods:
                cells = []
                for lab in labels:
                    r = next((r for r in mrows if r["method"] == m and r["setting"] == lab), None)
                    if r is None:
                        cells.append("")
                        continue
                    cell = _fmt(r["accuracy"])
                    if "finetuned_accuracy" in r:
                        cell += f" → {_fmt(r['finetuned_accuracy'])}"
                    cells.append(cell)
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            secs = {m: sum(r["seconds"] for r in mrows if r["method"] == m) /
                    max(1, sum(1 for r in mrows if r["method"] == m)) for m in methods}  # fmt: skip
            out += ["", "Mean compression time per setting (s): "
                    + ", ".join(f"{m} {s:.1f}" for m, s in secs.items()), ""]  # fmt: skip
    lm = [r for r in rows if r.get("part") == "minilm"]
    if lm:
        import minilm

        out += minilm.table(lm)
    lm_time = [r for r in rows if r.get("part") == "minilm-timing"]
    if lm_time:
        import minilm

        out += minilm.timing_table(lm_time)
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    mnist = [r for r in rows if r.get("part") == "mnist" and r["bits"] is None]
    models = list(dict.fromkeys(r["model"] for r in mnist))
    if not models:
        return
    fig = Figure(figsize=(4.2 * len(models), 3.6))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        for m in PRUNERS:
            pts = sorted(
                (r["sparsity"], 100 * (1 - r["accuracy"]))
                for r in mnist
                if r["model"] == model and r["method"] == m and r["setting"].endswith("%")
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        ax.axhline(100 * (1 - next(r for r in mnist if r["model"] == model)["dense_accuracy"]),
                   color="grey", ls=":", label="dense")  # fmt: skip
        ax.set_title(f"{model}: one-shot, no fine-tuning")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test error (%), log scale")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part", choices=["mnist", "minilm", "minilm-timing"], nargs="+", default=["mnist"]
    )
    parser.add_argument(
        "--models", nargs="+", default=list(DENSE_RECIPES), choices=list(DENSE_RECIPES)
    )
    parser.add_argument("--methods", nargs="+", default=PRUNERS + QUANTIZERS)
    parser.add_argument("--finetune-all", action="store_true", help="fine-tune every ResNet-20 row")
    parser.add_argument("--max-minutes", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="rerun rows already recorded")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    rows = load_results()
    if args.table_only:
        save(rows)
        return
    if "mnist" in args.part:
        if args.force:
            rows = [
                r
                for r in rows
                if not (
                    r.get("part") == "mnist"
                    and r["model"] in args.models
                    and r["method"] in args.methods
                )
            ]
        run_mnist(args, rows)
    if "minilm" in args.part or "minilm-timing" in args.part:
        run_minilm(args, rows)
    save(rows)


if __name__ == "__main__":
    main()
