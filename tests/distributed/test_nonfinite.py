"""A NaN/Inf gradient on one rank under every compression hook (2 gloo ranks, one spawn).

Rank 1 poisons its gradient at one step (a NaN in one parameter, an Inf in another; each parameter
has its own DDP bucket, and a third, clean bucket is exchanged first). The contract checked
for every codec and summation mode: no rank raises; every rank gets the poisoned buckets as NaN,
identically; ``skipped_steps`` counts the step once and one warning is logged; the codec state
(top-k residuals, generator) is what it was before the step; and the next step's averaged gradient
is bitwise the one a run without the poisoned step computes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from prunekit.config import ConfigError
from prunekit.distributed import (
    NoneState,
    available_gradient_methods,
    compress_gradients,
    none_hook,
    run_workers,
)

SIZES = [300, 300, 300]
CAP_MB = 0.0005  # one bucket per parameter once DDP has rebuilt its buckets (after step 0)
POISONED = 1  # the step at which rank 1's gradient of ps[0] holds a NaN and of ps[1] an Inf
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "qsgd/allgather": ("qsgd", {"mode": "allgather", "levels": 4, "bucket_size": 64}),
    "qsgd/allreduce": ("qsgd", {"mode": "allreduce", "levels": 4, "bucket_size": 64}),
    "qsgd/reduce_scatter": ("qsgd", {"mode": "reduce_scatter", "levels": 4, "bucket_size": 64}),
    "natural/allgather": ("natural", {"mode": "allgather"}),
    "natural/reduce_scatter": ("natural", {"mode": "reduce_scatter"}),
    "topk": ("topk", {"ratio": 0.1}),
}


class Vectors(nn.Module):
    """Parameter vectors ``p_i``; the loss ``Σ (p_i·g_i).sum()`` has gradients ``g_i``."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in sizes])

    def forward(self, gs: list[Tensor]) -> Tensor:
        return torch.stack([(p * g).sum() for p, g in zip(self.ps, gs, strict=True)]).sum()


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _gradients(rank: int, step: int, poison: bool) -> list[Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    gs = [torch.randn(n, generator=g) for n in SIZES]
    if poison and step == POISONED and rank == 1:
        gs[0][7] = math.nan
        gs[1][3] = math.inf
    return gs


def _codec_state(state: Any) -> dict[str, Any]:
    sd = state.state_dict()
    return {"generator": sd["generator"], "residuals": sd.get("residuals", {})}


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    gens = (a["generator"] is None and b["generator"] is None) or (
        a["generator"] is not None
        and b["generator"] is not None
        and torch.equal(a["generator"], b["generator"])
    )
    res_a, res_b = a["residuals"], b["residuals"]
    return gens and set(res_a) == set(res_b) and all(torch.equal(res_a[k], res_b[k]) for k in res_a)


def _train(method: str, cfg: dict[str, Any], rank: int, steps: list[int], poison: bool) -> Any:
    """Train ``steps``; per step the gradients, counters and whether the codec state moved."""
    model = DDP(Vectors(SIZES), bucket_cap_mb=CAP_MB)
    state = compress_gradients(model, method, **cfg)
    out: dict[str, Any] = {
        "grads": [],
        "skipped": [],
        "last": [],
        "buckets": [],
        "mode": state.mode,
    }
    for t in steps:
        before = _codec_state(state)
        calls = state.calls
        model.zero_grad()
        model(_gradients(rank, t, poison)).backward()
        out["grads"].append([p.grad.clone() for p in model.module.ps])  # type: ignore[union-attr]
        out["skipped"].append(state.skipped_steps)
        out["last"].append(state.last_step_skipped)
        out["buckets"].append(state.calls - calls)
        if t == POISONED:
            out["state_kept"] = _same_state(before, _codec_state(state))
    return out, state


def _round_trip(state: Any) -> tuple[Any, Any, Any]:
    """``skipped_steps`` as saved, as restored, and restored from a dict saved without it."""
    sd = state.state_dict()
    restored, legacy = type(state)(), type(state)()
    restored.load_state_dict(sd)
    try:
        legacy.load_state_dict({k: v for k, v in sd.items() if k != "skipped_steps"})
    except Exception as exc:  # reported to the parent
        return sd.get("skipped_steps"), restored.skipped_steps, repr(exc)
    return sd.get("skipped_steps"), restored.skipped_steps, legacy.skipped_steps


def _check_poisoned(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    counter = _Count()
    logging.getLogger("prunekit.distributed").addHandler(counter)
    for key, (method, cfg) in CASES.items():
        counter.count = 0
        run, state = _train(method, cfg, rank, [0, POISONED, 2], poison=True)
        run["warnings"] = counter.count
        ref, _ = _train(method, cfg, rank, [0, 2], poison=False)  # no poisoned step at all
        run["reference"] = ref["grads"][-1]
        run["state_dict"] = _round_trip(state)
        out[key] = run
    return out


def _check_overflow(rank: int, world: int) -> dict[str, Any]:
    """Finite gradients that overflow float32 inside the exchange: no rank raises, ranks agree."""
    out: dict[str, Any] = {}
    for key, value, ranks in (
        ("natural/reduce_scatter", 3e38, (0, 1)),  # slice sums overflow between the two stages
        ("qsgd/reduce_scatter", 1e20, (1,)),  # chunk norms overflow: not encodable, flagged
    ):
        method, cfg = CASES[key]
        model = DDP(Vectors(SIZES[:1]))
        state = compress_gradients(model, method, **cfg)
        g = _gradients(rank, 0, poison=False)[0]
        if rank in ranks:
            g[0] = value
        model([g]).backward()
        out[key] = (model.module.ps[0].grad.clone(), state.skipped_steps)  # type: ignore[union-attr]
    return out


def _check_single_rank(rank: int, world: int) -> dict[str, Any]:
    """Each rank alone in its own group (mode ``none``): the same contract without a collective."""
    solo = [dist.new_group([r]) for r in range(world)][rank]
    out: dict[str, Any] = {}
    for method, cfg in (("qsgd", {}), ("topk", {"ratio": 0.1})):
        model = DDP(Vectors(SIZES), bucket_cap_mb=CAP_MB, process_group=solo)
        state = compress_gradients(model, method, process_group=solo, **cfg)
        grads = []
        for t in range(3):
            model.zero_grad()
            model(_gradients(rank, t, poison=True)).backward()
            grads.append([p.grad.clone() for p in model.module.ps])  # type: ignore[union-attr]
        out[method] = (state.mode, state.skipped_steps, grads)
    return out


def _check_registration(rank: int, world: int) -> dict[str, str]:
    out: dict[str, str] = {}
    twice = DDP(Vectors(SIZES))
    compress_gradients(twice, "qsgd")
    by_hand = DDP(Vectors(SIZES))
    by_hand.register_comm_hook(NoneState(), none_hook)
    for key, model in (("twice", twice), ("by_hand", by_hand)):
        try:
            compress_gradients(model, "topk")
        except Exception as exc:  # reported to the parent
            out[key] = f"{type(exc).__name__}: {exc}"
    return out


def worker(rank: int, world: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for check in (_check_poisoned, _check_overflow, _check_single_rank, _check_registration):
        out[check.__name__] = check(rank, world)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_workers(worker, 2, timeout=120)


def _all_nan(t: Tensor) -> bool:
    return bool(t.isnan().all())


def test_every_codec_and_mode_is_covered() -> None:
    assert sorted({method for method, _ in CASES.values()}) == available_gradient_methods()


@pytest.mark.parametrize("key", list(CASES))
def test_a_poisoned_step_is_nan_on_every_rank_and_counted_once(results: Any, key: str) -> None:
    runs = [r["_check_poisoned"][key] for r in results]
    for run in runs:
        assert run["mode"] == CASES[key][1].get(
            "mode", "allreduce" if key == "none" else "allgather"
        )
        assert run["buckets"][1:] == [len(SIZES)] * 2  # one bucket per parameter after step 0
        nan_step = run["grads"][POISONED]
        assert _all_nan(nan_step[0]) and _all_nan(nan_step[1])  # the poisoned buckets, whole
        assert bool(torch.isfinite(nan_step[2]).all())  # exchanged before them, as usual
        assert run["skipped"] == [0, 1, 1]  # once for the step, though two buckets were bad
        assert run["last"] == [False, True, False]
        assert run["warnings"] == 1
    for a, b in zip(runs[0]["grads"][POISONED], runs[1]["grads"][POISONED], strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())  # the same gradients on both ranks


@pytest.mark.parametrize("key", list(CASES))
def test_a_skipped_step_leaves_no_trace_in_the_codec_state(results: Any, key: str) -> None:
    for r in results:
        run = r["_check_poisoned"][key]
        assert run["state_kept"]  # residuals and generator as before the step
        after = run["grads"][-1]
        assert all(bool(torch.isfinite(g).all()) for g in after)
        # the step after the skipped one is the step a run without it takes, bitwise
        assert all(torch.equal(a, b) for a, b in zip(after, run["reference"], strict=True))
    ours = [r["_check_poisoned"][key]["grads"][-1] for r in results]
    assert all(torch.equal(a, b) for a, b in zip(ours[0], ours[1], strict=True))


def test_skipped_steps_is_saved_and_older_state_dicts_still_load(results: Any) -> None:
    for r in results:
        for key in CASES:
            assert r["_check_poisoned"][key]["state_dict"] == (1, 1, 0), key


def test_overflow_inside_the_exchange_raises_on_no_rank(results: Any) -> None:
    natural = [r["_check_overflow"]["natural/reduce_scatter"] for r in results]
    qsgd = [r["_check_overflow"]["qsgd/reduce_scatter"] for r in results]
    assert torch.equal(natural[0][0], natural[1][0])
    assert float(natural[0][0][0]) == 2.0**126  # 2¹²⁷ + 2¹²⁷ saturated to 2¹²⁷, over 2 ranks
    assert [n[1] for n in natural] == [0, 0]
    assert all(_all_nan(g) and skipped == 1 for g, skipped in qsgd)


def test_a_single_rank_applies_the_same_contract(results: Any) -> None:
    for rank, r in enumerate(results):
        for method in ("qsgd", "topk"):
            mode, skipped, grads = r["_check_single_rank"][method]
            assert mode == "none"
            assert skipped == rank  # only rank 1 poisons its gradients
            for t, step in enumerate(grads):
                bad = rank == 1 and t == POISONED
                assert [_all_nan(g) for g in step] == [bad, bad, False]
                assert all(bool(torch.isfinite(g).all()) for g in step) is not bad


def test_compress_gradients_wants_one_ddp_model_and_one_hook(results: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"needs a torch\.nn\.parallel\.DistributedDataParallel"
    ) as e:
        compress_gradients(nn.Linear(2, 2), "qsgd")  # type: ignore[arg-type]
    assert "\n" not in str(e.value) and "got Linear" in str(e.value)
    for r in results:
        messages = r["_check_registration"]
        assert set(messages) == {"twice", "by_hand"}
        for message in messages.values():
            assert message.startswith("ConfigError: ") and "\n" not in message
            assert "already has a communication hook" in message
