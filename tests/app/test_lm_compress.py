"""``prunekit compress --model DIR --calibration TEXT --eval TEXT`` and ``prunekit evaluate`` on a
Hugging Face language model folder, as a user runs them (in process: the CLI's ``main``)."""

import json
import math
from pathlib import Path

import benchmarks.torchvision_shim  # noqa: F401  (before transformers imports torchvision)
import pytest
import torch

from prunekit.app.text import load_pretrained, perplexity, token_sequences
from prunekit.cli.main import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _text(words: int, seed: int) -> str:
    """Offline text: the standard library's own source, a slice chosen by ``seed``."""
    import inspect
    import json as json_module
    import pathlib as pathlib_module

    source = inspect.getsource(json_module.decoder) + inspect.getsource(pathlib_module)
    tokens = source.split()
    start = (seed * 997) % max(1, len(tokens) - words)
    return " ".join(tokens[start : start + words])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Llama with a word-level tokenizer (no pad token) trained on the text, saved."""
    root = tmp_path_factory.mktemp("lm")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]"])
    tok.train_from_iterator([_text(3000, 0)], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert tokenizer.pad_token is None
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "train.txt").write_text(_text(2000, 1), encoding="utf-8")
    (root / "test.txt").write_text(_text(600, 2), encoding="utf-8")
    return root


def _argv(folder: Path, out: Path) -> list[str]:
    return [
        "compress", "--model", str(folder / "model"), "--calibration", str(folder / "train.txt"),
        "--eval", str(folder / "test.txt"), "--method", "sparsegpt", "--sparsity", "0.5",
        "--samples", "8", "--seq-len", "32", "--out", str(out), "--quiet",
    ]  # fmt: skip


def _compress(folder: Path, out: Path, *extra: str) -> int:
    return main([*_argv(folder, out), *extra])


def test_compress_a_model_folder_from_text_and_evaluate_the_output(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _compress(folder, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["input_perplexity"]) and math.isfinite(metrics["perplexity"])
    assert metrics["input_perplexity"] != metrics["perplexity"]
    assert metrics["calibration_sequences"] == 8 and metrics["seq_len"] == 32
    assert metrics["global_sparsity"] == pytest.approx(0.5)
    assert "lm_head.weight" in metrics["report"]["skipped"]  # left by default
    assert metrics["report"]["config"]["mask_scope"] == "block"  # a decoder LM's default
    assert "perplexity" in (out / "report.md").read_text()
    # the output folder is a model folder: it loads, holds the compressed weights, and
    # `prunekit evaluate` on it gives the perplexity the run measured
    done = load_pretrained(out / "model")
    w = done.model.model.layers[0].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5)
    capsys.readouterr()
    args = ["evaluate", "--model", str(out / "model"), "--eval", str(folder / "test.txt")]
    assert main([*args, "--seq-len", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    # the same command again: the complete run is recognised, nothing rewritten
    mtime = (out / "metrics.json").stat().st_mtime_ns
    assert _compress(folder, out) == 0
    assert (out / "metrics.json").stat().st_mtime_ns == mtime


def test_perplexity_is_the_exponential_of_the_mean_next_token_loss(folder):
    """By hand, token by token, for one sequence."""
    pretrained = load_pretrained(folder / "model")
    seqs = token_sequences(pretrained.tokenizer, folder / "test.txt", 16, "eval")[:2]
    nll = []
    with torch.no_grad():
        for s in seqs:
            logits = pretrained.model(input_ids=s[None]).logits[0]
            logp = torch.log_softmax(logits.double(), -1)
            nll += [-float(logp[i, s[i + 1]]) for i in range(15)]
    expected = math.exp(sum(nll) / len(nll))
    assert perplexity(pretrained.model, seqs, batch_size=1) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no-config", "has no config.json"),
        ("no-weights", "has no weights"),
        ("short-text", "fewer than one sequence of 32"),
        ("missing-text", "does not exist"),
        ("bad-method", "unknown post-training method 'nope'"),
        ("quantize-only", "rtn quantizes only: sparsity/pattern/overrides are not allowed"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(folder, tmp_path, capsys, change, message):
    src = tmp_path / "copy"
    (src / "model").mkdir(parents=True)
    for f in (folder / "model").iterdir():
        (src / "model" / f.name).write_bytes(f.read_bytes())
    for name in ("train.txt", "test.txt"):
        (src / name).write_text((folder / name).read_text())
    extra: list[str] = []
    if change == "no-config":
        (src / "model" / "config.json").unlink()
    elif change == "no-weights":
        (src / "model" / "model.safetensors").unlink()
    elif change == "short-text":
        (src / "train.txt").write_text("def f ( x ) :")
    elif change == "missing-text":
        (src / "train.txt").unlink()
    elif change == "quantize-only":
        extra = ["--method", "rtn"]  # with --sparsity 0.5: a method that does not fit the ask
    else:
        extra = ["--method", "nope"]
    before = {f.name: f.read_bytes() for f in (src / "model").iterdir()}
    out = tmp_path / "run"
    assert _compress(src, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))
    assert {f.name: f.read_bytes() for f in (src / "model").iterdir()} == before


def test_a_quantized_model_is_written_in_the_compressed_tensors_layout(folder, tmp_path, capsys):
    """GPTQ 4-bit: model/ holds the compressed-tensors pack-quantized layout (a
    quantization_config, int32-packed codes), smaller than the dense folder, and `prunekit
    evaluate` on it decompresses it exactly: the perplexity the run measured."""
    out = tmp_path / "gptq"
    args = ["--method", "gptq", "--bits", "4", "--group-size", "16"]
    argv = [a for a in _argv(folder, out) if a not in ("--sparsity", "0.5")]
    assert main([*argv, *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert "model.layers.0.mlp.down_proj.weight" in metrics["export"]["layers"]
    assert metrics["export"]["total_bytes"] < sum(
        f.stat().st_size for f in (folder / "model").glob("*.safetensors")
    )
    capsys.readouterr()
    evaluate = ["evaluate", "--model", str(out / "model"), "--eval", str(folder / "test.txt")]
    assert main([*evaluate, "--seq-len", "32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-6)


def test_sparsegpt_on_a_language_model_defaults_to_the_block_mask_unless_told():
    from prunekit.app.compress_recipe import compress_recipe_from_dict

    base = {"model": {"pretrained": "m"}, "calibration": {"text": "t.txt"}}
    recipe = compress_recipe_from_dict(
        {**base, "compress": {"method": "sparsegpt", "sparsity": 0.5}}
    )
    assert recipe.compress["mask_scope"] == "block"
    explicit = {"method": "sparsegpt", "sparsity": 0.5, "mask_scope": "row"}
    assert compress_recipe_from_dict({**base, "compress": explicit}).compress["mask_scope"] == "row"
    wanda = compress_recipe_from_dict({**base, "compress": {"method": "wanda", "sparsity": 0.5}})
    assert "mask_scope" not in wanda.compress
