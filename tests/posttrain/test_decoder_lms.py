"""Post-training compression of Hugging Face decoder LMs as they come: GPT-2's transposed
``Conv1D`` layers, the blocks-only default targets, padding left out of the layer statistics, and
models whose weights mostly live in layers prunekit cannot compress."""

import copy
import logging

import pytest
import torch
from torch import nn

import prunekit
from prunekit.config import ConfigError
from prunekit.posttrain import pipeline

pytest.importorskip("transformers")
from tests.hf_models import gpt2 as _gpt2
from tests.hf_models import llama as _llama
from tests.hf_models import tokens as _tokens


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_conv1d_layers_are_compressed_as_transposed_linears(tie):
    """Every Conv1D of the blocks is compressed (weight stored (in, out): SparseGPT's rows are its
    columns, so each column ends exactly half zero), the head is left by default, tied or not."""
    model = _gpt2(tie)
    head = model.lm_head.weight.detach().clone()
    report = prunekit.compress(model, _tokens(4, 12, 1), "sparsegpt", sparsity=0.5)
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8
    assert [r.name for r in report.layers] == [f"{n}.weight" for n in conv1d]
    for name in conv1d:
        w = model.get_submodule(name).weight
        assert torch.equal((w == 0).sum(0), torch.full((w.shape[1],), w.shape[0] // 2)), name
    assert torch.equal(model.lm_head.weight, head)
    assert "lm_head.weight" in report.skipped or tie  # tied: the embedding's, not a target


def test_a_transposed_linear_reads_and_writes_its_matrix_transposed():
    """The view's matrix of a Conv1D is weight.T, and writing it back is exact (the weight of a
    layer with in != out: a reshape instead of a transpose would scramble it)."""
    from prunekit.posttrain.layers import view_of

    layer = _gpt2().transformer.h[0].attn.c_attn  # (32, 96)
    view = view_of(layer)
    assert view.d_in == 32 and view.matrices().shape == (1, 96, 32)
    assert torch.equal(view.matrices()[0], layer.weight.t())
    before = layer.weight.detach().clone()
    view.write_(view.matrices() * 2)
    assert torch.equal(layer.weight, before * 2)


def test_sparse_training_selects_conv1d_and_groups_nm_along_its_inputs():
    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = prunekit.sparsify(model, opt, "gmp", sparsity=0.5, pattern="2:4", total_steps=1,
                               start=0.0, end=0.0)  # fmt: skip
    names = [t.name for t in pruner.targets]
    assert "transformer.h.0.attn.c_attn.weight" in names
    pruner.step()
    w = model.transformer.h[0].mlp.c_fc.weight  # (in=32, out=128)
    groups = (w.t().reshape(128, 8, 4) != 0).sum(-1)  # 4 consecutive inputs of every output
    assert torch.equal(groups, torch.full_like(groups, 2))


def test_a_decoder_lm_keeps_its_head_and_embeddings_by_default():
    model = _llama()
    head = model.lm_head.weight.detach().clone()
    report = prunekit.compress(model, _tokens(3, 10, 2), "wanda", sparsity=0.5)
    assert (
        "lm_head.weight" in report.skipped
        and "outside the blocks" in report.skipped["lm_head.weight"]
    )
    assert torch.equal(model.lm_head.weight, head)
    assert len(report.layers) == 2 * 7  # q, k, v, o, gate, up, down per block
    model = _llama()
    report = prunekit.compress(
        model, _tokens(3, 10, 2), "wanda", sparsity=0.5, targets=["re:.*proj\\.weight", "lm_head"]
    )
    assert report.layers[-1].name == "lm_head.weight"  # asked for by name: compressed


def _unpadded_and_padded(seed_a: int, seed_b: int) -> tuple[list[dict], list[dict]]:
    """Two sequences of 12 and 7 tokens: as two unpadded items, and as one right-padded batch
    with its attention mask."""
    a, b = _tokens(1, 12, seed_a)[0], _tokens(1, 7, seed_b)[0]
    unpadded = [
        {"input_ids": a, "attention_mask": torch.ones_like(a)},
        {"input_ids": b, "attention_mask": torch.ones_like(b)},
    ]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, :7], mask[1, :7] = b[0], 1
    return unpadded, [{"input_ids": ids, "attention_mask": mask}]


def _hessians(monkeypatch, model, calibration, sequential) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    original = pipeline._compress_target

    def record(compressor, t, view, accs, grids):
        seen[t.name] = accs[0].hessian.clone()
        return original(compressor, t, view, accs, grids)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_compress_target", record)
        prunekit.compress(model, calibration, "sparsegpt", sparsity=0.5, sequential=sequential)
    return seen


@pytest.mark.parametrize("sequential", [False, True])
def test_padded_positions_do_not_enter_the_hessians(monkeypatch, sequential):
    """Two sequences of 12 and 7 tokens: one item each, unpadded, or one right-padded batch with
    its attention mask. The Hessians are the same (the 5 padding rows are not counted): every
    layer's when each sees the dense model (``sequential=False``, full forwards), the first
    block's when blocks are fed from the cached chain (later blocks see compressed blocks, whose
    masks may break near-ties differently)."""
    unpadded, padded = _unpadded_and_padded(3, 4)
    model = _llama()
    h_unpadded = _hessians(monkeypatch, copy.deepcopy(model), unpadded, sequential)
    h_padded = _hessians(monkeypatch, copy.deepcopy(model), padded, sequential)
    assert h_unpadded.keys() == h_padded.keys() and len(h_padded) == 14
    compared = [n for n in h_unpadded if not sequential or n.startswith("model.layers.0.")]
    for name in compared:
        torch.testing.assert_close(h_padded[name], h_unpadded[name], rtol=1e-4, atol=1e-6, msg=name)


class _Mixer(nn.Module):
    """A weight matrix in a layer type prunekit does not compress."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_weights_mostly_in_unsupported_layers_are_refused_not_passed_over():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _Mixer(16), _Mixer(16), nn.Linear(16, 2))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"_Mixer \(2\) hold 512 weights against 160"):
        prunekit.compress(model, [torch.randn(8, 8)], "sparsegpt", sparsity=0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_minority_of_unsupported_layers_is_reported_left_with_a_warning(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4), _Mixer(4))
    with caplog.at_level(logging.WARNING, logger="prunekit.posttrain.scope"):
        report = prunekit.compress(model, [torch.randn(8, 8)], "sparsegpt", sparsity=0.5)
    assert report.skipped == {"3": "layer type _Mixer is not compressed"}
    assert "_Mixer (1)" in caplog.text


def test_gpt2_integer_export_round_trips_its_conv1d_weights(tmp_path):
    """GPTQ on GPT-2 then the integer export: the Conv1D codes are of weight.T, and loading
    gives back every compressed weight exactly, in its (in, out) layout."""
    from prunekit.posttrain import load_quantized, save_quantized

    model = _gpt2()
    report = prunekit.compress(model, _tokens(4, 12, 5), "gptq", bits=4, group_size=16)
    assert "transformer.h.0.attn.c_attn.weight" in report.grids
    save_quantized(model, report, tmp_path / "q.pt")
    state = load_quantized(tmp_path / "q.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name


def test_padded_positions_do_not_enter_the_mfac_loss():
    """M-FAC's gradients come from the loss over the unpadded tokens only: two sequences as two
    unpadded items, or as one right-padded batch (split into one micro-batch per sequence), give
    the same pruned model."""
    unpadded, padded = _unpadded_and_padded(6, 7)
    kw = {"sparsity": 0.5, "ngrads": 2, "fisher_block": 16, "steps": 2}
    one, two = _llama(), _llama()
    prunekit.compress(one, unpadded, "mfac", **kw)
    prunekit.compress(two, padded, "mfac", **kw)
    for (name, p), q in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kw", [{"mask_scope": "block"}, {"pattern": "2:4"}, {"mask_scope": "row"}])
def test_gpt2_sparsegpt_every_mask_scope(kw):
    """The transposed matrix is contiguous: SparseGPT's block scope views it flat."""
    model = _gpt2()
    sparsity = {} if "pattern" in kw else {"sparsity": 0.5}
    report = prunekit.compress(model, _tokens(4, 12, 8), "sparsegpt", **sparsity, **kw)
    assert len(report.layers) == 8
    assert all(abs(r.sparsity - 0.5) < 1e-6 for r in report.layers)
