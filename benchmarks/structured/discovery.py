"""Part 1: time to find the groups / dependency graph, and exactness of the slim model (70% of the
groups zeroed at random, the slim output against the zeroed model's)."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from prunekit.core import count_params
from prunekit.models import build_model
from prunekit.structured import find_groups, slim

from .shared import MODELS, SHAPE, zero_random_groups


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
