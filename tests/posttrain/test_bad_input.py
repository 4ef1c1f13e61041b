"""Bad input to ``prunekit.compress``: each is refused with one line that names the culprit (the
calibration item, the layer, the parameter, the module) and says what to do, and the model is
left bitwise as it was."""

import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit.config import ConfigError
from prunekit.posttrain import HessianError, available_compressors
from prunekit.posttrain.methods import get_compressor
from tests.helpers import MLP


class Overflow(nn.Module):
    """Finite in, inf out: the layer after it receives a non-finite activation."""

    def forward(self, x):
        return x * 1e38 * 1e38


def _batches(n=3, shape=(8, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _config(method):
    """The smallest valid config of a registered method."""
    cls = get_compressor(method)
    kw = {"sparsity": 0.5} if cls.config_class.prunes else {"bits": 4}
    if cls.global_method:
        kw["ngrads"] = 4
    return kw


def _raw(value):
    """A state-dict value as comparable raw data: a tensor's bytes (NaN equals itself, -0.0
    differs from 0.0), a quantized tensor's integers and grid, a tuple's parts."""
    if isinstance(value, torch.Tensor):
        if value.is_quantized:
            return (_raw(value.int_repr()), value.q_scale(), value.q_zero_point())
        return value.detach().contiguous().view(-1).view(torch.uint8).tolist()
    if isinstance(value, tuple | list):
        return tuple(_raw(v) for v in value)
    return repr(value)


def _bits(model):
    return {k: _raw(v) for k, v in model.state_dict().items()}


def _refused(model, calibration, error, match, method="sparsegpt", **kw):
    """``compress`` raises ``error`` with a one-line message matching ``match``; the model is
    bitwise unchanged. Returns the message."""
    before = _bits(model)
    with pytest.raises(error, match=match) as info:
        prunekit.compress(model, calibration, method, **(kw or _config(method)))
    message = str(info.value)
    assert "\n" not in message, message
    after = _bits(model)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k] == before[k], k
    return message


# --- 1. non-finite calibration, every method ----------------------------------------------------


@pytest.mark.parametrize("method", available_compressors())
def test_nan_in_a_calibration_item_is_refused_by_every_method_naming_the_item(method):
    batches = _batches()
    batches[1][0, 3] = float("nan")
    _refused(
        MLP(), batches, ConfigError, r"calibration item 1: input 0 .* 1 NaN value; drop", method
    )


@pytest.mark.parametrize("method", available_compressors())
def test_inf_in_a_calibration_item_is_refused_by_every_method_naming_layer_and_item(method):
    batches = _batches()
    batches[2][4, 0] = float("inf")
    _refused(
        MLP(),
        batches,
        HessianError,
        r"fc1\.weight: its input on calibration item 2 holds 1 non-finite value .* item holds "
        r"inf in input 0: drop or clean that batch",
        method,
    )


@pytest.mark.parametrize("method", available_compressors())
def test_a_non_finite_activation_inside_the_model_is_refused_by_every_method(method):
    """The items are finite; the model makes an inf that the next target receives."""
    model = nn.Sequential(nn.Linear(12, 16), Overflow(), nn.Linear(16, 4))
    _refused(
        model,
        _batches(),
        HessianError,
        r"2\.weight: its input on calibration item 0 .* the item itself is finite, so the model "
        r"overflows before this layer",
        method,
    )


def test_nan_in_a_keyword_input_names_it():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 4)

        def forward(self, x, mask):
            return self.fc(x * mask)

    items = [{"x": b, "mask": torch.ones(8, 1)} for b in _batches()]
    items[0]["mask"][5] = float("nan")
    _refused(Masked(), items, ConfigError, r"calibration item 0: input 'mask' of shape \(8, 1\)")


def test_an_additive_minus_inf_mask_that_never_reaches_a_layer_is_accepted():
    """-inf is a legitimate value of an additive attention mask: only NaN is refused up front,
    an inf only where a target layer receives it."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 12)

        def forward(self, x, mask):
            return self.fc(torch.softmax(x + mask, dim=-1))

    model = Attention()
    mask = torch.zeros(8, 12)
    mask[:, 6:] = float("-inf")
    report = prunekit.compress(model, [(b, mask) for b in _batches()], "wanda", sparsity=0.5)
    assert report.layer("fc").sparsity == 0.5
    assert torch.isfinite(model.fc.weight).all()


def test_a_hessian_that_overflows_on_finite_inputs_is_refused_by_methods_without_an_inverse():
    _refused(
        MLP(),
        [torch.full((8, 12), 1e20)],
        HessianError,
        r"fc1\.weight: its Hessian 2XᵀX/n overflowed .* scale the calibration inputs down",
        "wanda",
        sparsity=0.5,
    )


# --- 2. non-finite weights ----------------------------------------------------------------------


@pytest.mark.parametrize("method", available_compressors())
def test_non_finite_weights_are_a_broken_model_reported_before_any_forward(method):
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0, :2] = float("nan")
        model.fc1.weight[3, 5] = float("-inf")
        model.fc3.bias[0] = float("inf")
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    _refused(
        model,
        _batches(),
        ConfigError,
        r"^weight of layer fc1 has 3 non-finite values \(NaN or inf\) \(and 1 more parameters: "
        r"fc3\.bias\); the model is broken, not the calibration",
        method,
    )
    assert not calls  # checked up front: not a single forward ran


# --- 3. one batch instead of an iterable of batches ---------------------------------------------


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        (torch.randn(8, 12), r"iterable of batches, got a single tensor of shape \(8, 12\).*\[x\]"),
        ({"x": torch.randn(8, 12)}, r"iterable of batches, got a single mapping.*\[batch\]"),
        (None, r"iterable of batches .*got NoneType"),
        (3, r"iterable of batches .*got int"),
        ("batches.pt", r"iterable of batches of model inputs, got a str"),
        ([], r"calibration set is empty"),
        (iter([]), r"calibration set is empty \(an exhausted iterator is empty too\)"),
    ],
)
def test_a_calibration_set_that_is_not_an_iterable_of_batches_is_refused(calibration, match):
    _refused(MLP(), calibration, ConfigError, match)


# --- 4. items the model cannot consume ----------------------------------------------------------


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "mfac"])
@pytest.mark.parametrize("bad", [0, 1])
def test_an_item_of_another_shape_is_refused_naming_the_item_and_shapes(method, bad):
    items = _batches(4)
    items[bad] = torch.randn(8, 100)
    _refused(
        MLP(),
        items,
        ConfigError,
        rf"^calibration item {bad} \(input 0: \(8, 100\) float32\) cannot be run through the "
        r"model: .*(12 features|mat1 and mat2 shapes cannot be multiplied)",
        method,
    )


@pytest.mark.parametrize(
    ("item", "match"),
    [
        (torch.randint(0, 5, (8, 12)), r"\(8, 12\) int64\) .*RuntimeError: .*same dtype"),
        (torch.randn(8, 12).double(), r"\(8, 12\) float64\) .*RuntimeError: .*same dtype"),
        ({"y": torch.randn(8, 12)}, r"input 'y'.*TypeError: .*unexpected keyword argument 'y'"),
        (
            (torch.randn(8, 12), torch.zeros(8, dtype=torch.long)),
            r"TypeError: .*positional.*pass \[x for x, _ in loader\]",
        ),
    ],
)
@pytest.mark.parametrize("sequential", [True, False])
def test_an_item_the_model_cannot_consume_is_refused_naming_the_item(item, match, sequential):
    items = _batches()
    items[1] = item
    _refused(
        MLP(),
        items,
        ConfigError,
        r"^calibration item 1 .*" + match,
        sparsity=0.5,
        sequential=sequential,
    )


class FixedBatch(nn.Module):
    """Takes batches of 8 only, which it checks only after its first layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x).reshape(8, 16))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_an_item_refused_after_a_layer_was_compressed_leaves_the_model_as_it_was(method):
    """fc1 is compressed on both items before item 1 fails on the way to fc2: fc1 is restored."""
    _refused(
        FixedBatch(),
        [torch.randn(8, 12), torch.randn(4, 12)],
        ConfigError,
        r"^calibration item 1 \(input 0: \(4, 12\) float32\) cannot be run through the model: "
        r"RuntimeError: shape '\[8, 16\]' is invalid",
        method,
    )


def test_a_convolution_input_of_the_wrong_channels_is_refused_naming_the_item_and_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    items = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)]
    _refused(model, items, ConfigError, r"^calibration item 1 \(input 0: \(2, 5, 8, 8\).*0\.weight")


def test_an_item_of_an_unsupported_type_names_its_index():
    _refused(
        MLP(), [torch.randn(8, 12), 3.0], TypeError, r"^calibration item 1: a calibration item"
    )


def test_items_of_different_lengths_or_sizes_that_the_model_takes_are_accepted():
    """Sequences of different lengths and images of different sizes are valid calibration."""
    report = prunekit.compress(MLP(), [torch.randn(4, 5, 12), torch.randn(4, 7, 12)], sparsity=0.5)
    assert len(report.layers) == 3
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    report = prunekit.compress(
        conv, [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 11, 9)], sparsity=0.5
    )
    assert len(report.layers) == 2


def test_batches_of_size_zero_are_refused_naming_the_layer():
    _refused(MLP(), [torch.randn(0, 12)], ConfigError, r"^fc1\.weight: .*no input samples", "wanda")


# --- 5. already quantized models ----------------------------------------------------------------


def test_a_dynamically_quantized_model_is_refused_naming_a_module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic's deprecation notice
        model = torch.ao.quantization.quantize_dynamic(MLP(), {nn.Linear}, dtype=torch.qint8)
    _refused(
        model,
        _batches(),
        ConfigError,
        r"^the model is already quantized: fc1 is a quantized Linear \(torch\.ao\.nn\.quantized.*"
        r"compress the float model before quantizing it$",
    )


def test_an_integer_weight_is_refused_as_already_quantized():
    model = MLP()
    model.fc2.weight = nn.Parameter(torch.zeros(8, 16, dtype=torch.int8), requires_grad=False)
    _refused(
        model, _batches(), ConfigError, r"^fc2\.weight has dtype torch\.int8.*already quantized"
    )


# --- 6. the rest --------------------------------------------------------------------------------


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(ConfigError, match=r"^model must be a torch\.nn\.Module, got function$"):
        prunekit.compress(lambda x: x, _batches(), sparsity=0.5)


@pytest.mark.parametrize("method", [None, ["sparsegpt"], "sparse-gpt"])
def test_an_unknown_method_is_a_config_error(method):
    _refused(
        MLP(),
        _batches(),
        ConfigError,
        r"unknown post-training method .*available: ",
        method,
        sparsity=0.5,
    )


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.zeros(8, dtype=torch.long), r"labels must be a sequence of tensors.*\[y\]"),
        ([torch.zeros(8, dtype=torch.long)] * 2, r"labels: 2 tensors for 3 calibration items"),
        ([torch.zeros(8)] * 3, r"labels\[0\] must be a tensor of class indices.*float32"),
        (
            [torch.zeros(8, dtype=torch.long)] * 2 + [torch.zeros(7, dtype=torch.long)],
            r"labels\[2\] has shape \(7,\) but calibration item 2 has batch size 8",
        ),
        ([torch.full((8,), 9)] * 3, r"labels hold class 9 but the model's logits have 4 classes"),
    ],
)
def test_mfac_labels_that_do_not_fit_the_calibration_are_refused(labels, match):
    _refused(MLP(), _batches(), ConfigError, match, "mfac", sparsity=0.5, ngrads=3, labels=labels)


def test_labels_for_a_layer_wise_method_are_a_config_error():
    _refused(
        MLP(),
        _batches(),
        ConfigError,
        r"labels are used by method='mfac' only",
        "wanda",
        sparsity=0.5,
        labels=[torch.zeros(8, dtype=torch.long)] * 3,
    )
