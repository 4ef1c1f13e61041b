"""save_compressed writes what compressed-tensors reads: models compressed by prunekit, saved,
then read by the library itself (its checkpoint dequantizer, and transformers loading the
directory into a model) must give back prunekit's weights bit for bit; the sparse layouts are
checked against the library's bitmask helpers and config classes. Also: GPT-2's Conv1D layers
written dense, the bad inputs refused with nothing written, and the sizes on disk."""

import copy
import json
import logging
import math
import warnings

import benchmarks.torchvision_shim  # noqa: F401  (before compressed_tensors imports transformers)
import pytest
import torch
import transformers
from compressed_tensors.config import SparsityCompressionConfig
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils import unpack_bitmasks
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import prunekit
from prunekit.export import FORMATS, load_compressed, save_compressed

from .tiny import compressed, gpt2, llama, tokens


def _assert_same(state: dict, model: nn.Module) -> None:
    """Every tensor of ``model`` equal to ``state``'s (bit for bit, up to the sign of zero)."""
    expected = model.state_dict()
    assert sorted(state) == sorted(expected)
    bad = [k for k, v in expected.items() if not torch.equal(state[k].to(v.dtype), v)]
    assert bad == [], bad


def _with_transformers(directory, model: nn.Module) -> dict:
    """The directory loaded by transformers (compressed-tensors decompressing the weights)."""
    with warnings.catch_warnings():  # "the quantization_config from the model will be used"
        warnings.simplefilter("ignore", UserWarning)
        loaded = type(model).from_pretrained(
            directory, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
        )
    state = loaded.state_dict()
    return {k: state[k] for k in model.state_dict()}


QUANTIZED = [
    ("gptq", {"bits": 4}),  # per channel, asymmetric: a packed zero point
    ("gptq", {"bits": 4, "group_size": 16}),
    ("gptq", {"bits": 4, "group_size": 16, "sym": True, "act_order": True}),
    ("gptq", {"bits": 3, "group_size": 16, "sym": True}),  # codes straddle int32 words
    ("gptq", {"bits": 4, "group_size": 48}),  # 32-input layers: one grid per row, own group
    ("rtn", {"bits": 8}),
    ("sparsegpt", {"sparsity": 0.5, "bits": 4}),  # joint: the zeros kept in the codes
]


@pytest.mark.parametrize(("method", "config"), QUANTIZED)
def test_pack_quantized_reads_back_bit_exact_in_compressed_tensors(method, config, tmp_path):
    model, report = compressed("llama", method, **config)
    saved = save_compressed(model, report, tmp_path / "m")
    assert saved.format == "pack-quantized" and len(saved.layers) == 14 and saved.dense == {}
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in tensors and tensors[f"{q}.weight_packed"].dtype == torch.int32
    assert (f"{q}.weight_zero_point" in tensors) != config.get("sym", False)
    qconfig = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qconfig)
    weights = next(g for g in parsed.config_groups.values() if g.targets == ["Linear"]).weights
    assert weights.num_bits == config["bits"]
    assert weights.symmetric == config.get("sym", False)
    assert weights.strategy == ("channel" if "group_size" not in config else "group")
    assert parsed.ignore == ["lm_head", "model.embed_tokens"]
    # the library's own model-free dequantizer, then transformers loading the directory
    dequantizer = CompressedTensorsDequantizer(tmp_path / "m", dtype=torch.float32)
    _assert_same(dequantizer.validate(tensors), model)
    _assert_same(_with_transformers(tmp_path / "m", model), model)
    _assert_same(load_compressed(tmp_path / "m"), model)


def test_layers_with_fewer_inputs_than_the_group_get_a_per_channel_group_by_name(tmp_path):
    model, report = compressed("llama", "gptq", bits=4, group_size=48)
    save_compressed(model, report, tmp_path / "m")
    groups = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"][
        "config_groups"
    ]
    assert groups["group_0"]["weights"]["strategy"] == "channel"
    assert len(groups["group_0"]["targets"]) == 12  # q, k, v, o, gate, up: 32 inputs
    assert "model.layers.0.mlp.down_proj" not in groups["group_0"]["targets"]
    assert groups["group_1"]["targets"] == ["Linear"]  # down_proj: 48 inputs, one group of 48
    assert groups["group_1"]["weights"]["strategy"] == "group"


@pytest.mark.parametrize(("method", "config"), [("rtn", {"bits": 8}), QUANTIZED[1]])
def test_int_quantized_reads_back_bit_exact_through_transformers(method, config, tmp_path):
    model, report = compressed("llama", method, **config)
    save_compressed(model, report, tmp_path / "m", format="int-quantized")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.weight"].dtype == torch.int8
    assert tensors[f"{q}.weight_zero_point"].dtype == torch.int8
    assert tensors[f"{q}.weight_zero_point"].shape == report.grids[f"{q}.weight"][0].zero.shape
    _assert_same(_with_transformers(tmp_path / "m", model), model)
    _assert_same(load_compressed(tmp_path / "m"), model)


def test_a_half_precision_model_keeps_its_float32_scales_exact(tmp_path):
    """prunekit computes a bfloat16 model's grids in float32: the scales are stored so, and
    compressed-tensors' dequantizer, which computes in the stored scale's dtype, gives back the
    bfloat16 weights exactly."""
    model = llama(torch.bfloat16)
    report = prunekit.compress(model, tokens(), "gptq", bits=4, group_size=16)
    save_compressed(model, report, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    dequantizer = CompressedTensorsDequantizer(tmp_path / "m", dtype=torch.bfloat16)
    _assert_same(dequantizer.process(tensors), model)
    _assert_same(load_compressed(tmp_path / "m"), model)


def _reference_bitmask_decode(tensors: dict, module: str) -> torch.Tensor:
    """The sparse layouts decoded with compressed-tensors' own bitmask helper (the library's
    sparse compressors were removed in its 0.15; this helper and the config classes remain)."""
    shape = tensors[f"{module}.shape"].flatten().tolist()
    mask = unpack_bitmasks(tensors[f"{module}.bitmask"], shape)
    dense = torch.zeros(shape, dtype=tensors[f"{module}.compressed"].dtype)
    dense[mask] = tensors[f"{module}.compressed"].flatten()
    return dense


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparse_bitmask_layouts_decode_with_the_library_helpers(pattern, tmp_path):
    model, report = compressed("llama", "sparsegpt", sparsity=0.5, pattern=pattern)
    saved = save_compressed(model, report, tmp_path / "m")
    fmt = "sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask"
    assert saved.format == fmt and len(saved.layers) == 14
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    for name in saved.layers:
        m = name.removesuffix(".weight")
        rows, cols = model.get_submodule(m).weight.shape
        assert name not in tensors
        assert tensors[f"{m}.bitmask"].dtype == torch.uint8
        assert tensors[f"{m}.bitmask"].shape == (rows, math.ceil(cols / 8))
        assert tensors[f"{m}.shape"].dtype == torch.int64
        if fmt == "sparse-bitmask":
            assert tensors[f"{m}.shape"].shape == (2,)
            counts = (model.get_submodule(m).weight != 0).sum(1)
            assert torch.equal(tensors[f"{m}.row_offsets"], torch.cumsum(counts, 0) - counts)
        else:
            assert tensors[f"{m}.shape"].shape == (2, 1)
            assert tensors[f"{m}.compressed"].shape == (rows, cols // 2)
        assert torch.equal(_reference_bitmask_decode(tensors, m), model.get_submodule(m).weight)
    qconfig = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert set(qconfig) == {"quant_method", "version", "sparsity_config"}
    sparsity = SparsityCompressionConfig.load_from_registry(fmt, **qconfig["sparsity_config"])
    assert sparsity.sparsity_structure == ("2:4" if pattern == "2:4" else "unstructured")
    assert sparsity.global_sparsity == pytest.approx(0.5, abs=0.01)
    assert sparsity.ignore == ["lm_head", "model.embed_tokens"]
    _assert_same(load_compressed(tmp_path / "m"), model)


def test_dense_is_a_plain_checkpoint_transformers_loads(tmp_path):
    model, report = compressed("llama", "sparsegpt", sparsity=0.5)
    saved = save_compressed(model, report, tmp_path / "m", format="dense")
    assert saved.format == "dense" and saved.layers == []
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    _assert_same(loaded.state_dict(), model)


def test_gpt2_conv1d_layers_are_written_dense_and_say_why(tmp_path, caplog):
    """GPT-2's Conv1D weights are stored (in, out): they stay dense (a compressed-tensors
    reader would load them into a Linear's (out, in) layout); the tied head is stored once."""
    model, report = compressed("gpt2", "sparsegpt", sparsity=0.5)
    with caplog.at_level(logging.INFO, logger="prunekit.export.compressed_tensors"):
        saved = save_compressed(model, report, tmp_path / "m", format="sparse-bitmask")
    assert saved.format == "dense" and saved.layers == []  # nothing left to compress
    assert sorted(saved.dense) == sorted(r.name for r in report.layers) and len(saved.dense) == 8
    assert all("Conv1D" in why for why in saved.dense.values())
    assert "8 compressed layers written dense" in caplog.text
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    _assert_same(loaded.state_dict(), model)
    state = load_compressed(tmp_path / "m")
    assert state["lm_head.weight"] is state["transformer.wte.weight"]  # the tie restored
    _assert_same(state, model)


def test_a_model_mixing_linear_and_conv1d_compresses_the_linear_only(tmp_path):
    """No Hugging Face config: config.json holds the quantization_config alone, and the library
    dequantizes the Linear and leaves the Conv1D (in its ignore list) as stored."""
    conv1d = transformers.pytorch_utils.Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), conv1d(8, 32))
    report = prunekit.compress(model, [torch.randn(64, 16)], "gptq", bits=4, group_size=8)
    assert sorted(report.grids) == ["0.weight", "2.weight"]
    saved = save_compressed(model, report, tmp_path / "m")
    assert saved.layers == ["0.weight"] and list(saved.dense) == ["2.weight"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert list(config) == ["quantization_config"]
    assert config["quantization_config"]["ignore"] == ["2"]
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    assert tensors["2.weight"].shape == (32, 8)  # as stored, (in, out)
    dequantizer = CompressedTensorsDequantizer(tmp_path / "m", dtype=torch.float32)
    _assert_same(dequantizer.validate(tensors), model)
    _assert_same(load_compressed(tmp_path / "m"), model)


def test_the_sizes_on_disk_are_returned_and_much_smaller_than_dense(tmp_path):
    """Bytes per compressed layer (from the file's own tensors) against its float32 weight:
    4-bit codes are an eighth of it plus the grids, a 50% bitmask a half plus a bit per weight."""
    model, report = compressed("llama", "gptq", bits=4)
    saved = save_compressed(model, report, tmp_path / "q")
    assert saved.files == {p.name: p.stat().st_size for p in (tmp_path / "q").iterdir()}
    assert saved.total_bytes == sum(saved.files.values())
    sparse_model, sparse_report = compressed("llama", "sparsegpt", sparsity=0.5)
    save_compressed(sparse_model, sparse_report, tmp_path / "s")
    dense = save_compressed(model, report, tmp_path / "d", format="dense")
    assert saved.files["model.safetensors"] < dense.files["model.safetensors"]

    def layer_bytes(directory, module):
        with safe_open(directory / "model.safetensors", framework="pt") as f:
            return sum(
                f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                for k in f.keys()  # noqa: SIM118
                if k.startswith(f"{module}.")
            )

    m = "model.layers.0.mlp.down_proj"  # (32, 48)
    assert layer_bytes(tmp_path / "d", m) == 32 * 48 * 4
    # codes 32·48·4 bits, scales 32·4 B, zero points 4 bits each in 4 words, shape 2·8 B
    assert layer_bytes(tmp_path / "q", m) == 32 * 48 // 2 + 32 * 4 + 4 * 4 + 16
    w = sparse_model.get_submodule(m).weight
    nnz = int((w != 0).sum())
    # values, bitmask (6 bytes a row), row offsets, shape
    assert nnz == 32 * 24 and layer_bytes(tmp_path / "s", m) == nnz * 4 + 32 * 6 + 32 * 8 + 16


def test_an_existing_directory_is_refused_unless_overwrite(tmp_path):
    model, report = compressed("llama", "gptq", bits=4)
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"already exists.*overwrite=True"):
        save_compressed(model, report, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    saved = save_compressed(model, report, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(saved.files)  # replaced, all of it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging left behind


@pytest.mark.parametrize(
    ("method", "config", "fmt", "message"),
    [
        ("sparsegpt", {"sparsity": 0.5}, "pack-quantized", "holds none"),
        ("sparsegpt", {"sparsity": 0.5}, "int-quantized", "holds none"),
        ("gptq", {"bits": 4}, "sparse-bitmask", "no layout for sparse and quantized"),
        ("sparsegpt", {"sparsity": 0.5, "bits": 4}, "sparse-24-bitmask", "no layout for sparse"),
        ("sparsegpt", {"sparsity": 0.5}, "sparse-24-bitmask", r"q_proj.weight: .* more than 2"),
        ("sparsegpt", {"sparsity": 0.5}, "marlin-24", "unknown format"),
    ],
)
def test_a_format_the_report_cannot_give_is_refused_with_nothing_written(
    method, config, fmt, message, tmp_path
):
    model, report = compressed("llama", method, **config)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        save_compressed(model, report, tmp_path / "m", format=fmt)
    assert list(tmp_path.iterdir()) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_weights_changed_after_compression_or_another_model_are_refused(tmp_path):
    model, report = compressed("llama", "gptq", bits=4, group_size=16)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight is no longer what"):
        save_compressed(changed, report, tmp_path / "m")
    with pytest.raises(ValueError, match="pass the model it was made for"):
        save_compressed(gpt2(), report, tmp_path / "m")
    nothing = prunekit.CompressionReport(method="sparsegpt", config={})
    with pytest.raises(ValueError, match="nothing to store compressed"):
        save_compressed(model, nothing, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_no_directory_and_an_old_one_intact(tmp_path, monkeypatch):
    from prunekit.export import directory

    model, report = compressed("llama", "gptq", bits=4)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    original = directory.write_atomic

    def fail_on_config(path, write):
        if path.name == "config.json":
            raise OSError("disk full")
        original(path, write)

    monkeypatch.setattr(directory, "write_atomic", fail_on_config)
    for target, overwrite in (("new", False), ("old", True)):
        with pytest.raises(OSError, match="disk full"):
            save_compressed(model, report, tmp_path / target, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["keep.txt"]


def test_the_model_and_its_config_are_unchanged(tmp_path):
    model, report = compressed("llama", "gptq", bits=4)
    before = copy.deepcopy(model.state_dict())
    config = model.config.to_dict()
    save_compressed(model, report, tmp_path / "m")
    assert model.config.to_dict() == config and not hasattr(model.config, "quantization_config")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_every_format_is_listed():
    assert FORMATS == (
        "pack-quantized",
        "int-quantized",
        "sparse-bitmask",
        "sparse-24-bitmask",
        "dense",
    )
