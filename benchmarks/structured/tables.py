"""The markdown of ``benchmarks/results/structured.md``, from the saved JSON."""

from __future__ import annotations

from typing import Any


def md_tables(payload: dict[str, Any]) -> str:
    """Every part present in ``payload`` (the saved JSON) as markdown tables."""
    md = ["# Structured pruning: prunekit vs only-train-once 3.0.1 vs Torch-Pruning 1.6.1", ""]
    if "discovery" in payload:
        md += [
            "## Group discovery and exactness (70% of groups zeroed at random, then slimmed)",
            "",
            "| model | prunekit groups | prunekit find (s) | prunekit max diff | OTO find (s) | OTO max diff | TP graph (s) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in payload["discovery"]:
            oto_diff = r.get("oto_error", f"{r.get('oto_max_diff', float('nan')):.1e}")
            md.append(
                f"| {r['model']} | {r['prunekit_groups']} | {r['prunekit_find_s']:.3f} | {r['prunekit_max_diff']:.1e} | "
                f"{r.get('oto_find_s', float('nan')):.3f} | {oto_diff} | {r.get('tp_graph_s', float('nan')):.3f} |"
            )
        md.append("")
    if "accuracy" in payload:
        a = payload["accuracy_args"]
        rows = payload["accuracy"]
        goal = (
            f"prunekit HESSO targets {100 * a['flops_removed']:.0f}% of the MACs, only-train-once the group sparsity it reached"
            if a.get("flops_removed")
            else f"target group sparsity {a['target']}"
        )
        md += [
            f"## MNIST accuracy ({a['epochs']} epochs on {a['train_subset']} images, {goal}; Torch-Pruning matched to prunekit's MACs)",
            "",
            "| model | seed | library | accuracy | Δ vs dense (points) | params | MACs | FLOPs removed | train s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        base = {(r["model"], r.get("seed", 0)): r for r in rows if r["library"] == "dense"}
        for r in sorted(rows, key=lambda r: (r["model"], r.get("seed", 0))):
            if "error" in r:
                md.append(
                    f"| {r['model']} | {r.get('seed', 0)} | {r['library']} | error: {r['error']} | | | | | |"
                )
                continue
            b = base[r["model"], r.get("seed", 0)]
            removed = 1 - r["macs"] / b["macs"]
            md.append(
                f"| {r['model']} | {r.get('seed', 0)} | {r['library']} | {100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - b['accuracy']):+.2f} | "
                f"{r['params']:,} | {r['macs']:,} | {100 * removed:.1f}% | {r['seconds']:.0f} |"
            )
        md.append("")
    la = payload.get("latency_args", {})
    for name, regimes in payload.get("latency", {}).items():
        for regime, rows in regimes.items():
            md += [
                f"## CPU latency: {name}, {regime} (medians over {la['processes']} fresh processes; in each, {la['rounds']} rounds of {la['runs'] // la['rounds']} runs, order rotated, speed-ups are medians of per-round ratios; {la['threads']} threads)",
                "",
                "| model | params | MACs | FLOPs factor | ms b=1 | speed-up b=1 | ms b=64 | speed-up b=64 | speed-up / FLOPs factor (b=64) | range over processes |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                md.append(
                    f"| {r['model']} | {r['params']:,} | {r['macs']:,} | {r['flops_factor']:.2f}× | {r['ms_b1']:.2f} | "
                    f"{r['speedup_b1']:.2f}× | {r['ms_b64']:.2f} | {r['speedup_b64']:.2f}× | {r['speedup_over_flops_b64']:.2f} | "
                    f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f} |"
                )
            md.append("")
    ca = payload.get("ceiling_args", {})
    for name, regimes in payload.get("ceiling", {}).items():
        labels = list(regimes)
        md += [
            f"## Latency ceiling: {name}, hand-picked slim architectures (random weights; speed-up / FLOPs factor at b=64, median and range over {ca['processes']} fresh processes)",
            "",
            "| architecture | MACs removed | " + " | ".join(labels) + " |",
            "|---|---:|" + "---:|" * len(labels),
        ]
        for i, r in enumerate(regimes[labels[0]]):
            cells = [
                f"{regimes[k][i]['speedup_over_flops_b64']:.2f} ({regimes[k][i]['ratio_min']:.2f}–{regimes[k][i]['ratio_max']:.2f})"
                for k in labels
            ]
            md.append(
                f"| {r['model']} | {100 * (1 - 1 / r['flops_factor']):.1f}% | "
                + " | ".join(cells)
                + " |"
            )
        md.append("")
    if payload.get("ceiling_accuracy"):
        dense = {
            (r["model"], r.get("seed", 0)): r["accuracy"]
            for r in payload.get("accuracy", [])
            if r["library"] == "dense"
        }
        md += [
            "## Ceiling architectures trained from scratch (dense loop and budget; Δ against the dense model of the same seed)",
            "",
            "| model | seed | architecture | MACs removed | accuracy | Δ vs dense (points) |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for r in sorted(payload["ceiling_accuracy"], key=lambda r: (r["model"], r["seed"])):
            d = dense.get((r["model"], r["seed"]))
            delta = f"{100 * (r['accuracy'] - d):+.2f}" if d is not None else ""
            md.append(
                f"| {r['model']} | {r['seed']} | {r['architecture']} | {100 * r['macs_removed']:.1f}% | {100 * r['accuracy']:.2f}% | {delta} |"
            )
        md.append("")
    return "\n".join(md)
