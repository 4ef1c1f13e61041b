"""``method="constant"``: the zeros a model has (e.g. after one-shot compression) survive
fine-tuning with any optimizer; everything else trains."""

import pytest
import torch

import prunekit
from tests.helpers import mlp, run, toy_data


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_fine_tuning_keeps_exactly_the_compressed_zeros(opt_name):
    model = mlp()
    x, _ = toy_data()
    prunekit.compress(model, [x[:128], x[128:]], "sparsegpt", sparsity=0.6)
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters() if p.dim() == 2}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if opt_name == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    )
    pruner = prunekit.sparsify(model, opt, method="constant")
    run(model, opt, pruner, 30)
    pruner.finalize()
    for n, p in model.named_parameters():
        if n in zeros:
            assert torch.equal(p == 0, zeros[n]), n  # same support: no zero revived, none added
            assert not torch.equal(p, before[n]), n  # the kept weights did train
    assert prunekit.sparsity_report(model)["global_sparsity"] == pytest.approx(0.6, abs=0.01)


def test_sparsity_tops_up_by_magnitude_keeping_existing_zeros():
    model = mlp()
    w = model[0].weight if isinstance(model, torch.nn.Sequential) else next(model.parameters())
    with torch.no_grad():
        w.view(-1)[:10] = 0.0
    pruner = prunekit.sparsify(model, None, method="constant", sparsity=0.5)
    assert (w.view(-1)[:10] == 0).all()
    assert pruner.current_sparsity() == pytest.approx(0.5, abs=0.005)
