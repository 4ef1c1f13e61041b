"""The names before issue 19's renames answer for one release, each with a DeprecationWarning, and
do what the new names do."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import prunekit
from prunekit.structured import DHSPG, HESSO, find_groups


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_old_module_of_the_post_training_pipeline_is_callable_and_warns():
    """``prunekit.posttrain.compress`` was both a module and the function; importing the old
    module must not turn ``prunekit.posttrain.compress(...)`` into an error."""
    _run(
        "import warnings, torch\n"
        "from torch import nn\n"
        "import prunekit.posttrain as pt\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from prunekit.posttrain.compress import compress\n"
        "assert any('prunekit.posttrain.pipeline' in str(w.message) for w in caught), caught\n"
        "from prunekit.posttrain.pipeline import compress as new\n"
        "assert compress is new\n"
        "model = nn.Sequential(nn.Linear(8, 8))\n"
        "pt.compress(model, [torch.randn(4, 8)], 'magnitude', sparsity=0.5)\n"
        "assert (model[0].weight == 0).float().mean().item() == 0.5\n"
    )


def test_the_old_module_of_the_gradient_method_registry_warns():
    _run(
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from prunekit.distributed.compress import compress_gradients\n"
        "from prunekit.distributed.registry import compress_gradients as new\n"
        "assert compress_gradients is new\n"
        "assert any(issubclass(w.category, DeprecationWarning) for w in caught), caught\n"
    )


def _groups() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    return model, find_groups(model, torch.randn(2, 6))


def test_hesso_old_argument_names_mean_the_new_ones():
    model, groups = _groups()
    new = HESSO(model.parameters(), groups, lr=0.1, start_step=3, end_step=13, periods=2,
                group_costs=[1.0] * 12, cost_removed=0.25)  # fmt: skip
    with pytest.warns(DeprecationWarning, match="pruning_steps=...\\) is deprecated"):
        old = HESSO(model.parameters(), groups, lr=0.1, start_step=3, pruning_steps=10,
                    periods=2, group_costs=[1.0] * 12, cost_target=0.25)  # fmt: skip
    assert (old.start_step, old.period_len, old.cost_removed) == (3, 5, 0.25)
    assert (new.start_step, new.period_len, new.cost_removed) == (3, 5, 0.25)


def test_dhspg_old_argument_name_means_the_new_one():
    model, groups = _groups()
    with pytest.warns(DeprecationWarning, match="use end_step"):
        old = DHSPG(model.parameters(), groups, lr=0.1, start_step=2, project_end=9)
    assert old.end_step == 9
    with pytest.raises(TypeError, match="needs end_step"):
        DHSPG(model.parameters(), groups, lr=0.1, start_step=2)


def test_every_registry_has_the_available_verb():
    assert prunekit.methods.available_methods() == prunekit.available()["methods"]
    assert prunekit.distributed.available_gradient_methods() == prunekit.available()["distributed"]
