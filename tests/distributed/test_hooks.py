"""The compression hooks inside real DDP process groups (gloo, 2 and 3 ranks, one spawn each).

One worker runs every check and returns plain data; the tests compare it with values computed
here: the true mean of the per-rank gradients, the bytes of the tensors actually handed to the
collectives (recorded by wrapping ``torch.distributed``'s functions) and the closed-form sizes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import pickle
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from prunekit.config import ConfigError
from prunekit.distributed import (
    QSGDState,
    TopKState,
    available_gradient_methods,
    compress_gradients,
    get_gradient_method,
    run_workers,
    topk_hook,
)

N = 2000  # entries of the fixed gradient vector
T_SHORT, T_LONG = 25, 400
S, D = 16, 512
CONVERGENCE = [
    ("qsgd", "allgather"),
    ("qsgd", "allreduce"),
    ("qsgd", "reduce_scatter"),
    ("natural", "allgather"),
    ("natural", "reduce_scatter"),
]
TOPK_SIZES = [3000, 500, 2000, 1000, 700]


def rank_gradient(rank: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g) * (rank + 1)


class Linear1(nn.Module):
    """One parameter vector ``p``; the loss ``(p·g).sum()`` has gradient ``g``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(n))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return (self.p * g).sum()


class ManyVectors(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(n)) for n in sizes])

    def forward(self, gs: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * g).sum() for p, g in zip(self.ps, gs, strict=True))  # type: ignore[return-value]


# -- recording the collectives ----------------------------------------------------------------
RECORDS: list[tuple[str, int, int]] = []
_WRAPPED = ("all_gather_single", "all_reduce", "all_to_all_single")


def _install_recorder() -> None:
    for name in _WRAPPED:
        original = getattr(dist, name)

        @functools.wraps(original)
        def wrapper(*args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
            tensor = args[1] if _name != "all_reduce" else args[0]
            group = kw.get("group")
            RECORDS.append(
                (_name, tensor.numel() * tensor.element_size(), dist.get_world_size(group))
            )
            if _name == "all_gather_single" and SENT is not None:
                SENT.append(tensor.clone())
            return _original(*args, **kw)

        setattr(dist, name, wrapper)


SENT: list[torch.Tensor] | None = None


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))


def _grads(model: nn.Module) -> list[np.ndarray]:
    return [p.grad.detach().numpy().copy() for p in model.parameters()]  # type: ignore[union-attr]


# -- the checks, run in every rank -----------------------------------------------------------
def _check_none(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ref, hooked = DDP(_mlp()), DDP(_mlp())
    state = compress_gradients(hooked, "none")
    torch.manual_seed(rank)
    for _ in range(2):
        x = torch.randn(16, 12)
        for m in (ref, hooked):
            m.zero_grad()
            m(x).pow(2).sum().backward()
        out.setdefault("plain", []).append((_grads(ref.module), _grads(hooked.module)))
    # no_sync accumulation, then a synced step
    for m in (ref, hooked):
        m.zero_grad()
    xs = [torch.randn(8, 12) for _ in range(3)]
    calls = state.calls
    for m in (ref, hooked):
        with m.no_sync():
            for x in xs[:2]:
                m(x).pow(2).sum().backward()
        m(xs[2]).pow(2).sum().backward()
    out["no_sync"] = (_grads(ref.module), _grads(hooked.module))
    out["no_sync_calls"] = state.calls - calls
    out["none_bytes"] = (state.bytes_sent, state.bytes_dense)
    return out


def _check_convergence(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    g = rank_gradient(rank)
    for method, mode in CONVERGENCE:
        if method == "qsgd" and mode == "allreduce" and world * S > 127:
            continue
        model = DDP(Linear1(N))
        cfg: dict[str, Any] = {"mode": mode, "seed": 7}
        if method == "qsgd":
            cfg |= {"levels": S, "bucket_size": D}
        state = compress_gradients(model, method, **cfg)
        RECORDS.clear()
        total = torch.zeros(N, dtype=torch.float64)
        digests, means = [], {}
        for t in range(1, T_LONG + 1):
            model.zero_grad()
            model(g).backward()
            grad = model.module.p.grad
            total += grad.double()
            digests.append(_digest(grad))
            if t in (T_SHORT, T_LONG):
                means[t] = (total / t).numpy()
        out[f"{method}/{mode}"] = {
            "means": means,
            "digests": digests,
            "records": list(RECORDS),
            "bytes_sent": state.bytes_sent,
            "bytes_dense": state.bytes_dense,
            "mode": state.mode,
        }
    for method in ("qsgd", "natural"):
        out[f"auto/{method}"] = compress_gradients(DDP(Linear1(8)), method).mode
    try:
        QSGDState(levels=64, mode="allreduce")
    except ConfigError as exc:
        out["forced_allreduce_error"] = str(exc)
    return out


def _check_topk(rank: int, world: int) -> dict[str, Any]:
    global SENT
    model = DDP(ManyVectors(TOPK_SIZES), bucket_cap_mb=0.01)  # ~2600 floats per bucket
    names = {id(p): name for name, p in model.module.named_parameters()}
    state = compress_gradients(model, "topk", ratio=0.05)
    expected: dict[str, torch.Tensor] = {}  # this test's own residual bookkeeping
    layouts, violations, steps = [], [], 5

    def spy(st, bucket):  # type: ignore[no-untyped-def]  (DDP rejects string annotations)
        buf = bucket.buffer().clone()
        layout = [(names[id(p)], p.numel()) for p in bucket.parameters()]
        layouts[-1].append(layout)
        acc = buf.clone()
        offset = 0
        for name, size in layout:  # gradient + previous residual, with this test's residuals
            if name in expected:
                acc[offset : offset + size] += expected[name]
            offset += size
        SENT.clear()  # type: ignore[union-attr]
        fut = topk_hook(st, bucket)
        msg = SENT[0]  # type: ignore[index]
        k = msg.numel() // 2
        idx, vals = msg[:k].long(), msg[k:].view(torch.float32)
        if not torch.equal(vals, acc[idx]):
            violations.append("sent values != (gradient + residual)[indices]")
        rest = acc.clone()
        rest[idx] = 0
        offset = 0
        for name, size in layout:
            expected[name] = rest[offset : offset + size].clone()
            if not torch.equal(st.residuals[name].reshape(-1), expected[name]):
                violations.append(f"residual of {name}")
            offset += size
        if k != math.ceil(0.05 * buf.numel()):
            violations.append(f"k={k} for {buf.numel()} entries")
        return fut

    SENT = []
    # `model` runs topk_hook as compress_gradients registered it; a twin runs it through the spy
    spied = DDP(ManyVectors(TOPK_SIZES), bucket_cap_mb=0.01)
    spy_state = TopKState(ratio=0.05, module=spied.module)
    names.update({id(p): name for name, p in spied.module.named_parameters()})
    spied.register_comm_hook(spy_state, spy)
    for t in range(steps):
        gs = [rank_gradient(rank + 10 * t, n) for n in TOPK_SIZES]
        layouts.append([])
        for m in (model, spied):
            m.zero_grad()
            m(gs).backward()
    out: dict[str, Any] = {"violations": violations, "layouts": layouts}
    out["same_as_spied"] = all(
        torch.equal(a.grad, b.grad) for a, b in zip(model.module.ps, spied.module.ps, strict=True)
    )
    # resume: a pickled state and a state_dict copy continue exactly like the original. Top-k is
    # per bucket, so all three continue on fresh twins (same first-iteration bucket layout).
    blob = pickle.dumps(state)
    sd = state.state_dict()
    gs = [rank_gradient(rank + 1000, n) for n in TOPK_SIZES]
    runs = []
    for kind in ("original", "pickle", "state_dict"):
        fresh = DDP(ManyVectors(TOPK_SIZES), bucket_cap_mb=0.01)
        if kind == "original":
            restored = state
            restored.bind(fresh.module)
        elif kind == "pickle":
            restored = pickle.loads(blob)
            restored.bind(fresh.module)
        else:
            restored = TopKState(ratio=0.05, module=fresh.module)
            restored.load_state_dict(sd)
        fresh.register_comm_hook(restored, topk_hook)
        runs.append((fresh, restored))
    SENT = None
    residuals_before = {k: v.clone() for k, v in state.residuals.items()}
    for m, _ in runs:
        m.zero_grad()
        m(gs).backward()
    (ref, ref_state), copies = runs[0], runs[1:]
    out["resume"] = [
        all(torch.equal(a.grad, b.grad) for a, b in zip(ref.module.ps, m.module.ps, strict=True))
        and set(ref_state.residuals) == set(st.residuals)
        and all(torch.equal(ref_state.residuals[k], st.residuals[k]) for k in st.residuals)
        for m, st in copies
    ]
    out["residuals_changed"] = any(
        not torch.equal(residuals_before[k], state.residuals[k]) for k in residuals_before
    )
    return out


def _check_resume_qsgd(rank: int, world: int) -> dict[str, Any]:
    g = rank_gradient(rank)
    a = DDP(Linear1(N))
    sa = compress_gradients(a, "qsgd", mode="allgather")
    for _ in range(3):
        a.zero_grad()
        a(g).backward()
    b = DDP(Linear1(N))
    sb = QSGDState(mode="allgather", seed=99)
    sb.load_state_dict(sa.state_dict())
    b.register_comm_hook(sb, get_gradient_method("qsgd").hook)
    for m in (a, b):
        m.zero_grad()
        m(g).backward()
    return {
        "resumed_equal": torch.equal(a.module.p.grad, b.module.p.grad),
        "counters": (sa.calls, sb.calls, sa.bytes_sent == sb.bytes_sent),
    }


def _check_registry_and_training(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in available_gradient_methods():  # every registered codec, registered by hand
        entry = get_gradient_method(name)
        model = DDP(_mlp())
        state = entry.state_class()
        model.register_comm_hook(state, entry.hook)
        torch.manual_seed(rank)
        model(torch.randn(4, 12)).pow(2).sum().backward()
        again = pickle.loads(pickle.dumps(state))
        out[f"registry/{name}"] = (
            [_digest(p.grad) for p in model.module.parameters()],
            type(again) is type(state) and again.calls == state.calls,
        )
    # a short data-parallel training run with QSGD, each rank on its own data
    model = DDP(_mlp(seed=3))
    compress_gradients(model, "qsgd", levels=4, bucket_size=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w_true = torch.randn(12, 3, generator=torch.Generator().manual_seed(50)) / 3
    torch.manual_seed(50 + rank)  # each rank its own inputs
    losses = []
    for _ in range(30):
        x = torch.randn(32, 12)
        loss = (model(x) - x @ w_true).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    out["weights"] = [_digest(p) for p in model.module.parameters()]
    out["losses"] = losses
    return out


def worker(rank: int, world: int) -> dict[str, Any]:
    _install_recorder()
    out: dict[str, Any] = {}
    for check in (
        _check_none,
        _check_convergence,
        _check_topk,
        _check_resume_qsgd,
        _check_registry_and_training,
    ):
        out.update(check(rank, world))
    return out


@pytest.fixture(scope="module", params=[2, 3])
def results(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, run_workers(worker, world, timeout=240)


# -- the tests --------------------------------------------------------------------------------
def test_none_is_bitwise_ddp_and_no_sync_works(results: Any) -> None:
    _world, res = results
    for r in res:
        for ref, hooked in r["plain"] + [r["no_sync"]]:
            assert all(np.array_equal(a, b) for a, b in zip(ref, hooked, strict=True))
        assert r["no_sync_calls"] == 1  # one bucket, hook skipped under no_sync
        sent, dense = r["none_bytes"]
        assert sent == dense > 0


def _ring(op: str, nbytes: int, world: int) -> float:
    if op == "all_reduce":
        return 2 * (world - 1) / world * nbytes
    if op == "all_gather_single":
        return (world - 1) * nbytes
    return (world - 1) / world * nbytes  # all_to_all_single, equal splits


def _closed_form(method: str, mode: str, world: int) -> float:
    """Bytes one rank sends per call for the N-entry bucket, from the papers' formats, plus the
    all-reduced float32 flag "this rank's bucket is non-finite" (in every mode)."""
    return _payload(method, mode, world) + 2 * (world - 1) / world * 4


def _payload(method: str, mode: str, world: int) -> float:
    qsgd = lambda n: 4 * math.ceil(n / D) + math.ceil(n * math.ceil(math.log2(2 * S + 1)) / 8)  # noqa: E731
    natural = lambda n: math.ceil(9 * n / 8)  # noqa: E731
    if mode == "allgather":
        return (world - 1) * (qsgd(N) if method == "qsgd" else natural(N))
    if mode == "allreduce":
        return 2 * (world - 1) / world * (4 * math.ceil(N / D) + N)
    if method == "qsgd":
        return 2 * (world - 1) * qsgd(math.ceil(N / (world * D)) * D)
    return 2 * (world - 1) * natural(math.ceil(N / world))


def test_unbiased_convergence_identical_ranks_and_bytes(results: Any) -> None:
    world, res = results
    mu = torch.stack([rank_gradient(r) for r in range(world)]).double().mean(0).numpy()
    ran = 0
    for method, mode in CONVERGENCE:
        key = f"{method}/{mode}"
        if key not in res[0]:
            assert method == "qsgd" and mode == "allreduce" and world * S > 127
            continue
        ran += 1
        runs = [r[key] for r in res]
        assert all(run["digests"] == runs[0]["digests"] for run in runs), key  # bitwise equal
        assert runs[0]["mode"] == mode
        err = {t: float(np.linalg.norm(runs[0]["means"][t] - mu)) for t in (T_SHORT, T_LONG)}
        shrink = err[T_SHORT] / err[T_LONG]  # 1/√T: sqrt(400/25) = 4
        assert 2.8 < shrink < 5.7, (key, err)
        for run in runs:
            recorded = sum(_ring(op, nb, w) for op, nb, w in run["records"])
            assert {w for _, _, w in run["records"]} == {world}
            assert run["bytes_sent"] == pytest.approx(recorded, rel=1e-12)
            assert run["bytes_sent"] == pytest.approx(T_LONG * _closed_form(method, mode, world))
            assert run["bytes_dense"] == pytest.approx(T_LONG * 2 * (world - 1) / world * 4 * N)
    assert ran == len(CONVERGENCE) - (world * S > 127)


def test_auto_mode(results: Any) -> None:
    world, res = results
    n = 64 * world * D  # large bucket: no mode pads
    qsgd = lambda m: 4 * math.ceil(m / D) + math.ceil(m * 6 / 8)  # noqa: E731
    costs = {
        "allgather": (world - 1) * qsgd(n),
        "reduce_scatter": 2 * (world - 1) * qsgd(n // world),
        "allreduce": 2 * (world - 1) / world * (4 * n / D + n),
    }
    want = "allgather" if world == 2 else min(costs, key=costs.__getitem__)
    assert res[0]["auto/qsgd"] == want
    nat = {
        "allgather": (world - 1) * 9 * n / 8,
        "reduce_scatter": 2 * (world - 1) * 9 * n / 8 / world,
    }
    assert res[0]["auto/natural"] == ("allgather" if world == 2 else min(nat, key=nat.__getitem__))
    assert "127" in res[0]["forced_allreduce_error"]


def test_topk_error_feedback_rebuild_and_resume(results: Any) -> None:
    _world, res = results
    for r in res:
        assert r["violations"] == []
        layouts = r["layouts"]
        assert len(layouts[1]) >= 2  # several buckets ...
        assert layouts[0] != layouts[1]  # ... re-formed after the first iteration
        assert r["same_as_spied"]
        assert r["resume"] == [True, True]
        assert r["residuals_changed"]


def test_qsgd_resume_from_state_dict(results: Any) -> None:
    _, res = results
    for r in res:
        assert r["resumed_equal"]
        assert r["counters"] == (4, 4, True)


def test_registry_hooks_and_training_keep_replicas_identical(results: Any) -> None:
    _, res = results
    names = [k for k in res[0] if k.startswith("registry/")]
    assert sorted(n.split("/", 1)[1] for n in names) == available_gradient_methods()
    for key in [*names, "weights"]:
        assert all(r[key] == res[0][key] for r in res), key
    for key in names:
        assert res[0][key][1]  # picklable, counters kept
    losses = res[0]["losses"]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_config_validation() -> None:
    assert available_gradient_methods() == ["natural", "none", "qsgd", "topk"]
    with pytest.raises(ConfigError, match="bucket_size, levels, mode, seed"):
        compress_gradients(None, "qsgd", level=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="levels must be an integer >= 1"):
        compress_gradients(None, "qsgd", levels=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mode must be one of auto, allgather, reduce_scatter"):
        compress_gradients(None, "natural", mode="allreduce")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"ratio must be in \(0, 1\]"):
        compress_gradients(None, "topk", ratio=0.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="available: natural, none, qsgd, topk"):
        compress_gradients(None, "powersgd")  # type: ignore[arg-type]
