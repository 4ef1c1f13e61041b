"""load_compressed reads what compressed-tensors writes: a tiny Llama quantized and saved the way
llm-compressor saves it (the library's own compressor, save_pretrained, update_config) loads
into prunekit bit for bit equal to the library's own decompression; sparse directories in the
library's bitmask layout load too; damaged or unsupported directories are refused with one
CheckpointError line."""

import json
import shutil

import benchmarks.torchvision_shim  # noqa: F401  (before compressed_tensors imports transformers)
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.quantization import (
    QuantizationConfig,
    apply_quantization_config,
)
from compressed_tensors.utils import pack_bitmasks
from safetensors.torch import load_file, save_file

from prunekit.export import load_compressed, save_compressed
from prunekit.serialization import CheckpointError

from .tiny import compressed, llama


def _set_minmax_qparams(module: torch.nn.Module) -> None:
    """Min-max scale and zero point in compressed-tensors' signed convention (codes in
    [-2^(b-1), 2^(b-1) - 1]), as an observer would set them before compression."""
    args = module.quantization_scheme.weights
    qmin, qmax = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
    w = module.weight.detach()
    groups = {
        "tensor": w.reshape(1, 1, -1),
        "channel": w.unsqueeze(1),
        "group": w.reshape(w.shape[0], -1, args.group_size or 1),
    }[args.strategy]
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    if args.symmetric:
        scale, zp = torch.maximum(-lo, hi) / ((qmax - qmin) / 2), torch.zeros_like(lo)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))


def _saved_by_the_library(directory, weights: dict, fmt: str | None = None) -> dict:
    """Quantize and save a tiny Llama with compressed-tensors (llm-compressor's save path);
    returns the state dict the library decompresses the model to."""
    model = llama()
    scheme = {"targets": ["Linear"], "weights": weights} | ({"format": fmt} if fmt else {})
    qconfig = QuantizationConfig.model_validate(
        {
            "config_groups": {"group_0": scheme},
            "ignore": ["lm_head"],
            "quantization_status": "frozen",
        }
    )
    apply_quantization_config(model, qconfig, show_progress=False)
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            _set_minmax_qparams(module)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    compressor.decompress_model(model)
    qparams = ("weight_scale", "weight_zero_point", "weight_shape")
    return {k: v for k, v in model.state_dict().items() if not k.endswith(qparams)}


@pytest.mark.parametrize(
    ("weights", "fmt"),
    [
        ({"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": False}, None),
        ({"num_bits": 4, "strategy": "channel", "symmetric": True}, None),
        ({"num_bits": 3, "strategy": "group", "group_size": 16, "symmetric": False}, None),
        ({"num_bits": 8, "strategy": "tensor", "symmetric": False}, None),  # zp not packed
        ({"num_bits": 8, "strategy": "channel", "symmetric": False}, "int-quantized"),
    ],
)
def test_a_checkpoint_the_library_wrote_loads_bit_exact(weights, fmt, tmp_path):
    expected = _saved_by_the_library(tmp_path / "m", weights, fmt)
    written = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert written["format"] == (fmt or "pack-quantized")
    state = load_compressed(tmp_path / "m")
    assert sorted(state) == sorted(expected)
    assert [k for k, v in expected.items() if not torch.equal(state[k], v)] == []
    llama().load_state_dict(state)  # strict: exactly the model's tensors


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask"])
def test_a_sparse_directory_in_the_library_layout_loads(fmt, tmp_path):
    """The layout built from the library's own bitmask packing and config class (its sparse
    compressors are gone since compressed-tensors 0.15)."""
    model, _ = compressed("llama", "sparsegpt", sparsity=0.5, pattern="2:4")
    tensors = {}
    for name, w in model.state_dict().items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            tensors[name] = w.contiguous()
            continue
        m, mask = name.removesuffix(".weight"), w != 0
        tensors[f"{m}.bitmask"] = pack_bitmasks(mask)
        if fmt == "sparse-bitmask":
            counts = mask.sum(1)
            tensors[f"{m}.shape"] = torch.tensor(list(w.shape))
            tensors[f"{m}.compressed"] = w[mask]
            tensors[f"{m}.row_offsets"] = torch.cumsum(counts, 0) - counts
        else:
            tensors[f"{m}.shape"] = torch.tensor(list(w.shape)).reshape(-1, 1)
            tensors[f"{m}.compressed"] = w[mask].reshape(w.shape[0], -1)
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    sparsity = SparsityCompressionConfig.load_from_registry(fmt, ignore=["lm_head"])
    config = {"quantization_config": {"quant_method": "compressed-tensors",
                                      "sparsity_config": sparsity.model_dump()}}  # fmt: skip
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    state = load_compressed(tmp_path / "m")
    expected = model.state_dict()
    assert sorted(state) == sorted(expected)
    assert [k for k, v in expected.items() if not torch.equal(state[k], v)] == []


def _damage(directory, change_config=None, change_tensors=None) -> None:
    if change_config:
        path = directory / "config.json"
        path.write_text(json.dumps(change_config(json.loads(path.read_text()))))
    if change_tensors:
        tensors = load_file(directory / "model.safetensors")
        change_tensors(tensors)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _set(d: dict, path: str, value) -> dict:
    *keys, last = path.split(".")
    inner = d
    for k in keys:
        inner = inner[k]
    inner[last] = value
    return d


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("source", "config_change", "tensor_change", "message"),
    [
        ("q", None, lambda t: t.pop(f"{Q}.weight_shape"), "q_proj: weight_shape missing"),
        ("q", None, lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"][:, :-1]}),
         "words per row cannot hold"),
        ("q", lambda c: _set(c, "quantization_config.config_groups.group_0.weights.symmetric",
                             True), None, "symmetric scheme with a zero point"),
        ("q", lambda c: _set(c, "quantization_config.config_groups.group_0.input_activations",
                             {"num_bits": 8}), None, "quantizes activations"),
        ("q", lambda c: _set(c, "quantization_config.config_groups.group_0.format",
                             "float-quantized"), None, "not an integer format"),
        ("q", lambda c: _set(c, "quantization_config.sparsity_config", {"format": "sparse-bitmask"}),
         None, "stacked on quantization"),
        ("q", lambda c: _set(c, "quantization_config.quant_method", "gptq"), None,
         "'gptq' is not 'compressed-tensors'"),
        ("s", None, lambda t: t[f"{Q}.bitmask"].__setitem__((0, 0), t[f"{Q}.bitmask"][0, 0] ^ 1),
         "bits set"),
        ("s", None, lambda t: t[f"{Q}.row_offsets"].add_(1), "row_offsets do not match"),
        ("s", lambda c: _set(c, "quantization_config.sparsity_config.format", "marlin-24"), None,
         "'marlin-24' is not read"),
    ],
)  # fmt: skip
def test_a_damaged_or_unsupported_directory_is_one_checkpoint_error(
    source, config_change, tensor_change, message, tmp_path
):
    model, report = (
        compressed("llama", "gptq", bits=4, group_size=16)
        if source == "q"
        else compressed("llama", "sparsegpt", sparsity=0.5)
    )
    save_compressed(model, report, tmp_path / "m")
    _damage(tmp_path / "m", config_change, tensor_change)
    with pytest.raises(CheckpointError, match=message):
        load_compressed(tmp_path / "m")


def test_a_layer_named_in_a_group_takes_that_group_whatever_the_order(tmp_path):
    """compressed-tensors' precedence: an exact name before a class target ("Linear"), not the
    order of the groups (the 32-input layers of groups of 48 have a per-channel group)."""
    model, report = compressed("llama", "gptq", bits=4, group_size=48)
    save_compressed(model, report, tmp_path / "m")

    def swap(config):
        groups = config["quantization_config"]["config_groups"]
        config["quantization_config"]["config_groups"] = {
            "group_0": groups["group_1"], "group_1": groups["group_0"]
        }  # fmt: skip
        return config

    _damage(tmp_path / "m", swap)
    groups = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert groups["config_groups"]["group_0"]["targets"] == ["Linear"]
    state = load_compressed(tmp_path / "m")
    expected = model.state_dict()
    assert [k for k, v in expected.items() if not torch.equal(state[k], v)] == []


def test_a_missing_directory_config_or_weights_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_compressed(tmp_path / "nothing")
    model, report = compressed("llama", "gptq", bits=4)
    save_compressed(model, report, tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds neither model\.safetensors"):
        load_compressed(tmp_path / "no-weights")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json does not exist"):
        load_compressed(tmp_path / "m")
