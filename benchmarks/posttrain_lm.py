"""Decoder language models (issue 20): prunekit next to llm-compressor 0.14, one process, the same
calibration sequences.

Five small decoder families built from ``transformers`` configs (nothing is downloaded): Llama
(grouped-query attention), OPT, GPT-2 (its layers are transformers' ``Conv1D``), Qwen2 and Mistral
(sliding-window attention, window shorter than the sequences). The text ships with the
interpreter: the Python standard library's top-level modules (``sysconfig`` ``stdlib`` folder,
``*.py``; the generated ``_sysconfigdata*`` left out), every 8th file in name order held out for
evaluation. A byte-level BPE tokenizer (``tokenizers``) is trained on the training files, then each
model from scratch for a few hundred steps; tokenizer, token streams and dense models are cached
under ``runs/posttrain_lm/`` (gitignored), so a rerun skips training.

Then per family, on the same calibration sequences (one per batch, no padding) and in the same
process: held-out perplexity (:func:`prunekit.app.text.perplexity`, ``exp`` of the mean
next-token NLL over packed sequences) and wall time of every compression, prunekit and
llm-compressor configured alike (see :func:`llmcompressor_modifier`): SparseGPT 50/70% (prunekit
also with ``mask_scope="block"``, llm-compressor's mask selection), SparseGPT 2:4, Wanda 50%, GPTQ
4-bit per channel and 4-bit groups of 64 with act-order (symmetric grids: llm-compressor's W4A16
grids), and prunekit-only rows (magnitude 50%, OBC 50%, OBQ 4-bit, GPTQ with its default
sweep-time group grids).

Usage::

    python benchmarks/posttrain_lm.py          # all: ~8 min, +~20 min the first time (training)
    python benchmarks/posttrain_lm.py --families gpt2 opt --methods sparsegpt50 gptq4
    python benchmarks/posttrain_lm.py --quick  # smoke run (1-2 min), prints, writes nothing
    python benchmarks/posttrain_lm.py --table-only  # rewrite .md and .png from the .json

Rows of a partial run replace the same rows of ``benchmarks/results/posttrain_lm.json`` and keep
the others (all rows are dropped when the setup -- sizes, steps, calibration -- changed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import io
import json
import logging
import math
import os
import platform
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import prunekit
from prunekit.app.text import perplexity, sample_sequences

from common import RESULTS, environment, write_results

log = logging.getLogger("posttrain_lm")

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "posttrain_lm"
RESULT_NAME = "posttrain_lm"
EOS = "<|endoftext|>"
HELD_OUT_EVERY = 8  # every 8th standard-library file (name order) is held out for evaluation
PPL_TOLERANCE = 1e-3  # the perplexity goal: prunekit <= llm-compressor * (1 + 0.1%)
TRAIN_THREADS = 2  # training is not timed against anything
CALIBRATION_TOLERANCE = 1e-4  # relative; float32 round-off is ~1e-7


@dataclass(frozen=True)
class Setup:
    """Everything that decides the dense models, the calibration and the evaluation."""

    vocab: int = 4096
    hidden: int = 128
    heads: int = 4
    ffn: int = 512
    seq_len: int = 128
    steps: int = 300
    batch: int = 16
    lr: float = 2e-3
    seed: int = 0
    n_calibration: int = 128
    n_eval: int = 256


QUICK = Setup(steps=60, n_calibration=32, n_eval=64)


@dataclass(frozen=True)
class Family:
    name: str
    layers: int
    block: str  # the decoder block class: llm-compressor's sequential target
    note: str


FAMILIES = {
    f.name: f
    for f in [
        Family("llama", 4, "LlamaDecoderLayer", "GQA: 4 query / 2 key-value heads, SwiGLU"),
        Family("opt", 3, "OPTDecoderLayer", "learned positions, ReLU FFN, tied embeddings"),
        Family("gpt2", 3, "GPT2Block", "Conv1D layers (weight stored in × out), tied embeddings"),
        Family("qwen2", 2, "Qwen2DecoderLayer", "GQA 4 / 2, biases on q/k/v"),
        Family("mistral", 2, "MistralDecoderLayer", "GQA 4 / 2, sliding window 64 < 128 tokens"),
    ]
}


@dataclass(frozen=True)
class Setting:
    """One compression: prunekit's kwargs, and llm-compressor's counterpart (``None``: prunekit
    only; ``same_as``: compared with the llm-compressor run of that setting)."""

    key: str
    method: str
    label: str
    prunekit: dict[str, Any]
    llmc: dict[str, Any] | None = None
    same_as: str | None = None


G64 = {"bits": 4, "group_size": 64, "act_order": True, "sym": True}
SETTINGS = [
    Setting("magnitude50", "magnitude", "50%", {"sparsity": 0.5}),
    Setting("wanda50", "wanda", "50%", {"sparsity": 0.5}, {"kind": "wanda", "sparsity": 0.5}),
    Setting("sparsegpt50", "sparsegpt", "50%", {"sparsity": 0.5},
            {"kind": "sparsegpt", "sparsity": 0.5}),
    Setting("sparsegpt50-block", "sparsegpt", "50%, mask_scope=block",
            {"sparsity": 0.5, "mask_scope": "block"}, same_as="sparsegpt50"),
    Setting("sparsegpt70", "sparsegpt", "70%", {"sparsity": 0.7},
            {"kind": "sparsegpt", "sparsity": 0.7}),
    Setting("sparsegpt70-block", "sparsegpt", "70%, mask_scope=block",
            {"sparsity": 0.7, "mask_scope": "block"}, same_as="sparsegpt70"),
    Setting("sparsegpt24", "sparsegpt", "2:4", {"pattern": "2:4"},
            {"kind": "sparsegpt", "sparsity": 0.5, "mask_structure": "2:4"}),
    Setting("gptq4", "gptq", "4-bit per channel, sym", {"bits": 4, "sym": True},
            {"kind": "gptq", "strategy": "channel"}),
    Setting("gptq4-g64", "gptq", "4-bit g64 act-order, sym, static groups",
            {**G64, "static_groups": True}, {"kind": "gptq", "strategy": "group"}),
    Setting("gptq4-g64-sweep", "gptq", "4-bit g64 act-order, sym, groups at sweep", G64,
            same_as="gptq4-g64"),
    Setting("obc50", "obc", "50%", {"sparsity": 0.5}),
    Setting("obq4", "obq", "4-bit per channel, sym", {"bits": 4, "sym": True}),
]  # fmt: skip
SETTING = {s.key: s for s in SETTINGS}
QUICK_METHODS = ["sparsegpt50", "gptq4"]


# --- text and tokenizer ------------------------------------------------------------------------


def _transformers() -> Any:
    import torchvision_shim  # noqa: F401  (before transformers: torchvision's C ops)

    transformers = importlib.import_module("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """The standard library's top-level modules: ``(training files, held-out files)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_sysconfigdata"))
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [f for f in files if f not in held], held


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def corpus(setup: Setup) -> tuple[Any, Tensor, Tensor, dict[str, Any]]:
    """Tokenizer (a ``PreTrainedTokenizerFast``), training and held-out token streams (each file
    followed by ``<|endoftext|>``), and a description of the text; cached under ``CACHE``."""
    tf = _transformers()
    train_files, eval_files = stdlib_files()
    info = {
        "source": f"Python {platform.python_version()} standard library, top-level *.py",
        "stdlib": sysconfig.get_paths()["stdlib"],
        "train_files": len(train_files),
        "train_bytes": sum(f.stat().st_size for f in train_files),
        "eval_files": [f.name for f in eval_files],
        "eval_bytes": sum(f.stat().st_size for f in eval_files),
        "vocab": setup.vocab,
    }
    folder = CACHE / f"tokenizer-{_digest(info)}"
    if not (folder / "tokens.pt").exists():
        from tokenizers import ByteLevelBPETokenizer

        start = time.perf_counter()
        bpe = ByteLevelBPETokenizer()
        bpe.train([str(f) for f in train_files], vocab_size=setup.vocab, min_frequency=2,
                  special_tokens=[EOS], show_progress=False)  # fmt: skip
        tok = tf.PreTrainedTokenizerFast(
            tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS
        )
        eos = tok.convert_tokens_to_ids(EOS)

        def stream(files: list[Path]) -> Tensor:
            texts = [f.read_text(encoding="utf-8") for f in files]
            ids = [[*e.ids, eos] for e in bpe.encode_batch(texts)]
            return torch.tensor([i for seq in ids for i in seq], dtype=torch.int64)

        tokens = {"train": stream(train_files), "eval": stream(eval_files)}
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(folder)
        torch.save(tokens, folder / "tokens.pt")
        log.info("tokenizer and token streams: %.1f s", time.perf_counter() - start)
    tok = tf.PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    tokens = torch.load(folder / "tokens.pt")
    info["train_tokens"] = int(tokens["train"].numel())
    info["eval_tokens"] = int(tokens["eval"].numel())
    return tok, tokens["train"], tokens["eval"], info


def pack(ids: Tensor, seq_len: int) -> Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


# --- models ------------------------------------------------------------------------------------


def model_config(family: Family, setup: Setup, eos: int) -> Any:
    tf = _transformers()
    common = {"vocab_size": setup.vocab, "bos_token_id": eos, "eos_token_id": eos}
    size = {"hidden_size": setup.hidden, "num_hidden_layers": family.layers,
            "num_attention_heads": setup.heads, "max_position_embeddings": 2 * setup.seq_len}  # fmt: skip
    gqa = {**size, "intermediate_size": setup.ffn, "num_key_value_heads": setup.heads // 2}
    if family.name == "llama":
        return tf.LlamaConfig(**gqa, **common)
    if family.name == "qwen2":
        return tf.Qwen2Config(**gqa, **common)
    if family.name == "mistral":
        return tf.MistralConfig(**gqa, sliding_window=setup.seq_len // 2, **common)
    if family.name == "opt":
        return tf.OPTConfig(**size, ffn_dim=setup.ffn, word_embed_proj_dim=setup.hidden,
                            dropout=0.0, attention_dropout=0.0, **common)  # fmt: skip
    if family.name == "gpt2":
        return tf.GPT2Config(
            n_embd=setup.hidden, n_layer=family.layers, n_head=setup.heads, n_inner=setup.ffn,
            n_positions=2 * setup.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **common,
        )  # fmt: skip
    raise ValueError(f"unknown family {family.name!r}")


def dense_model(
    family: Family, setup: Setup, tok: Any, train_ids: Tensor
) -> tuple[nn.Module, dict[str, Any]]:
    """The family's model trained from scratch on the training stream (cached), in eval mode,
    loaded from its folder (llm-compressor reads the config from ``name_or_path``)."""
    tf = _transformers()
    eos = tok.convert_tokens_to_ids(EOS)
    spec = {"family": asdict(family), "setup": asdict(setup), "tokenizer": len(tok),
            "train_tokens": int(train_ids.numel())}  # fmt: skip
    folder = CACHE / f"{family.name}-{_digest(spec)}"
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        log.info("training dense %s into %s", family.name, folder)
        torch.manual_seed(setup.seed)
        model = tf.AutoModelForCausalLM.from_config(model_config(family, setup, eos))
        info = train(model, train_ids, setup)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        meta_path.write_text(json.dumps({"spec": spec, **info}, indent=2))
    info = json.loads(meta_path.read_text())
    model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    info = {k: v for k, v in info.items() if k != "spec"}
    info["params"] = sum(p.numel() for p in model.parameters())
    info["block_params"] = sum(p.numel() for p in blocks(model).parameters())
    return model, info


def train(model: nn.Module, ids: Tensor, setup: Setup) -> dict[str, Any]:
    """AdamW on random windows of the stream, linear warm-up then cosine decay to 10%."""
    warmup = max(1, setup.steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (setup.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    g = torch.Generator().manual_seed(setup.seed)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    start, losses = time.perf_counter(), []
    for step in range(setup.steps):
        starts = torch.randint(0, ids.numel() - setup.seq_len, (setup.batch,), generator=g)
        x = torch.stack([ids[s : s + setup.seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == setup.steps - 1:
            log.info("  step %d: loss %.3f (%.0f s)", step, losses[-1], time.perf_counter() - start)
    model.eval()
    torch.set_num_threads(threads)
    last = losses[-max(1, setup.steps // 10) :]
    return {"train_loss": sum(last) / len(last), "train_seconds": time.perf_counter() - start}


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of a causal LM of the five families."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"no decoder block list in {type(model).__name__}")


def block_weights(model: nn.Module) -> dict[str, Tensor]:
    """``(d_out, d_in)`` weights of the Linear / Conv1D layers inside the blocks (what both
    libraries compress), by parameter name."""
    tf = _transformers()
    prefix = next(n for n, m in model.named_modules() if m is blocks(model))
    out = {}
    for name, m in blocks(model).named_modules():
        if isinstance(m, nn.Linear):
            out[f"{prefix}.{name}.weight"] = m.weight.detach()
        elif isinstance(m, tf.pytorch_utils.Conv1D):
            out[f"{prefix}.{name}.weight"] = m.weight.detach().T
    return out


@torch.no_grad()
def weight_report(model: nn.Module, dense: nn.Module, group: int = 64) -> dict[str, Any]:
    """Zeros, distinct values per row and per group of ``group`` inputs, share of changed weights
    in the blocks' layers, and whether any parameter outside them changed."""
    W, D = block_weights(model), block_weights(dense)
    zeros = total = changed = 0
    per_row = per_group = 0
    for name, w in W.items():
        zeros += int((w == 0).sum())
        total += w.numel()
        changed += int((w != D[name]).sum())
        per_row = max(per_row, max(int(torch.unique(r).numel()) for r in w))
        g = w.reshape(w.shape[0], -1, group) if w.shape[1] % group == 0 else w[:, None]
        per_group = max(per_group, max(int(torch.unique(x).numel()) for x in g.flatten(0, 1)))
    dense_params = dict(dense.named_parameters())
    outside = [n for n, p in model.named_parameters()
               if n not in W and not torch.equal(p, dense_params[n])]  # fmt: skip
    return {"sparsity": zeros / total, "changed": changed / total,
            "max_distinct_per_row": per_row, "max_distinct_per_group": per_group,
            "outside_changed": outside}  # fmt: skip


# --- the two libraries ---------------------------------------------------------------------------


#: the attention output projection of a block, by family (its input is the attention's output)
ATTENTION_OUTPUT = ("self_attn.o_proj", "self_attn.out_proj", "attn.c_proj")


def attention_output(model: nn.Module) -> nn.Module:
    """The first block's attention output projection."""
    return next(m for n, m in blocks(model)[0].named_modules() if n in ATTENTION_OUTPUT)


@contextlib.contextmanager
def first_input(module: nn.Module) -> Iterator[list[Tensor]]:
    """Records the first input ``module`` is called on (its first sequence)."""
    seen: list[Tensor] = []

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        if not seen:
            seen.append(args[0].detach()[0].clone())

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def closest_input(module: nn.Module, reference: Tensor) -> Iterator[list[float]]:
    """The smallest ``max|x − reference| / max|reference|`` over every input sequence ``x``
    that ``module`` is called on (a library that feeds it the model's own activations of that
    sequence reaches float round-off; calls on other data, such as tracing, are far off)."""
    best = [math.inf]
    scale = float(reference.abs().max())

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(x, Tensor) and x.shape[-2:] == reference.shape and x.device.type == "cpu":
            d = (x.detach().reshape(-1, *reference.shape) - reference).abs().amax((1, 2))
            best[0] = min(best[0], float(d.min()) / scale)

    handle = module.register_forward_pre_hook(hook)
    try:
        yield best
    finally:
        handle.remove()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_prunekit(
    dense: nn.Module, cal: Tensor, setting: Setting, reference: Tensor
) -> tuple[nn.Module, float, dict[str, Any]]:
    model = copy.deepcopy(dense)
    items = [{"input_ids": s[None]} for s in cal]
    with closest_input(attention_output(model), reference) as seen:
        start = time.perf_counter()
        report = prunekit.compress(model, items, setting.method, progress=False, **setting.prunekit)
        seconds = time.perf_counter() - start
    return model, seconds, {"layers": len(report.layers), "calibration_delta": _finite(seen[0])}


def llmcompressor_modifier(spec: dict[str, Any]) -> Any:
    """llm-compressor 0.14 modifier matching prunekit's setting.

    Common: the Linear layers (``targets=["Linear"]``, its default) minus ``lm_head`` (its
    SparseGPT/Wanda/GPTQ defaults prune or quantize ``lm_head``, the tied embedding of GPT-2/OPT:
    ``ignore=["re:.*lm_head"]`` leaves it as prunekit does), ``dampening_frac=0.01`` (of
    ``mean(diag H)``), ``block_size=128``. SparseGPT: mask per block of 128 columns (its only
    choice). GPTQ: 4-bit integer weights, symmetric (its W4A16 scheme's grid) min-max from the
    weights before the sweep (observer ``memoryless_minmax``); ``channel``: one grid per output,
    natural column order (``actorder=None``); ``group``: groups of 64 with ``actorder="static"``
    (columns by decreasing ``H_jj``, group grids computed up front).
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    # a plain "lm_head" does not leave it to SparseGPT/Wanda: they match ignore against
    # "lm_head." (target name + "." + "" for the Linear itself); the regex does
    targets, ignore = ["Linear"], ["re:.*lm_head"]
    kind = spec["kind"]
    if kind == "wanda":
        return WandaPruningModifier(sparsity=spec["sparsity"], targets=targets, ignore=ignore)
    if kind == "sparsegpt":
        return SparseGPTModifier(
            sparsity=spec["sparsity"], mask_structure=spec.get("mask_structure", "0:0"),
            targets=targets, ignore=ignore, dampening_frac=0.01, block_size=128,
        )  # fmt: skip
    if kind == "gptq":
        group = spec["strategy"] == "group"
        weights = QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy=spec["strategy"],
            group_size=64 if group else None, observer="memoryless_minmax",
        )  # fmt: skip
        scheme = QuantizationScheme(targets=targets, weights=weights)
        return GPTQModifier(
            config_groups={"group_0": scheme}, ignore=ignore, dampening_frac=0.01, block_size=128,
            actorder="static" if group else None,
        )  # fmt: skip
    raise ValueError(f"unknown llm-compressor kind {kind!r}")


def run_llmcompressor(
    dense: nn.Module,
    tok: Any,
    cal: Tensor,
    family: Family,
    spec: dict[str, Any],
    reference: Tensor,
) -> tuple[nn.Module, float, dict[str, Any]]:
    """llm-compressor's ``oneshot`` (sequential pipeline, one decoder block at a time) on a copy
    of ``dense``; its dense-equivalent weights are copied into another plain copy, returned."""
    from datasets import Dataset
    from llmcompressor import oneshot

    work = copy.deepcopy(dense)
    dataset = Dataset.from_dict({"input_ids": cal.tolist()})
    modifier = llmcompressor_modifier(spec)
    stderr = io.StringIO()  # its progress bars
    hook = closest_input(attention_output(work), reference)
    with contextlib.redirect_stderr(stderr), hook as seen:
        start = time.perf_counter()
        oneshot(
            model=work, processor=tok, dataset=dataset, recipe=modifier,
            num_calibration_samples=len(cal), shuffle_calibration_samples=False, batch_size=1,
            max_seq_length=cal.shape[1], pipeline="sequential", sequential_targets=[family.block],
        )  # fmt: skip
        seconds = time.perf_counter() - start
    log.debug("llm-compressor's stderr:\n%s", stderr.getvalue())
    model = copy.deepcopy(dense)
    compressed = dict(work.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(compressed[name])
    return model, seconds, {"calibration_delta": _finite(seen[0])}


def _quiet_llmcompressor() -> None:
    import llmcompressor  # noqa: F401  (configures its logger on import)
    from loguru import logger

    logger.disable("llmcompressor")
    logger.disable("compressed_tensors")


# --- the benchmark -------------------------------------------------------------------------------


def measure(
    family: Family,
    setting: Setting,
    library: str,
    data: tuple[Any, Tensor, Tensor],
    dense: nn.Module,
    repeats: int,
) -> dict[str, Any]:
    """One row: the compression run ``repeats`` times (the fastest time kept; the first run's
    model evaluated: both libraries are deterministic), its perplexity and weight report."""
    tok, cal, ev, reference = data
    row: dict[str, Any] = {
        "family": family.name, "key": setting.key, "method": setting.method,
        "setting": setting.label, "library": library,
        "bits": setting.prunekit.get("bits"), "group_size": setting.prunekit.get("group_size"),
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    times: list[float] = []
    try:
        for _ in range(repeats):
            if library == "prunekit":
                out = run_prunekit(dense, cal, setting, reference)
            else:
                assert setting.llmc is not None
                out = run_llmcompressor(dense, tok, cal, family, setting.llmc, reference)
            times.append(out[1])
            if len(times) == 1:
                model, extra = out[0], out[2]
    except Exception as exc:  # a library's failure is a result: recorded, not raised
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.update(status="error", error=f"{type(exc).__name__}: {msg}", perplexity=None,
                   seconds=None)  # fmt: skip
        log.info("%s %s %s: %s", family.name, setting.key, library, row["error"])
        return row
    rep = weight_report(model, dense)
    try:
        ppl = perplexity(model, ev)
    except prunekit.ConfigError:
        ppl = math.inf
    status = "no-op" if rep["changed"] == 0 else "ok"
    row.update(status=status, perplexity=ppl, seconds=min(times), all_seconds=times, **rep,
               **extra)  # fmt: skip
    log.info("%s %s %s: ppl %.3f, %s s, sparsity %.3f%s", family.name, setting.key, library,
             ppl, " / ".join(f"{t:.1f}" for t in times), rep["sparsity"],
             "" if status == "ok" else f" ({status})")  # fmt: skip
    return row


def run_family(
    family: Family,
    setup: Setup,
    settings: list[Setting],
    tok: Any,
    train_ids: Tensor,
    eval_ids: Tensor,
    save: Any,
    repeats: int,
) -> None:
    log.info("== %s", family.name)
    dense, info = dense_model(family, setup, tok, train_ids)
    cal = sample_sequences(pack(train_ids, setup.seq_len), setup.n_calibration, setup.seed)
    ev = sample_sequences(pack(eval_ids, setup.seq_len), setup.n_eval, setup.seed)
    ppl = perplexity(dense, ev)
    log.info("%s dense: ppl %.3f, %s", family.name, ppl, info)
    with torch.no_grad(), first_input(attention_output(dense)) as seen:
        dense(input_ids=cal[:1])
    save([{"family": family.name, "key": "dense", "method": "dense", "setting": "",
           "library": "dense", "perplexity": ppl, "layers": family.layers, "note": family.note,
           **info}])  # fmt: skip
    data = (tok, cal, ev, seen[0])
    for setting in settings:
        compared = setting.llmc is not None or setting.same_as is not None
        rows = [measure(family, setting, "prunekit", data, dense, repeats if compared else 1)]
        if setting.llmc is not None:
            rows.append(measure(family, setting, "llm-compressor", data, dense, repeats))
        save(rows)


# --- results -------------------------------------------------------------------------------------


def row_key(r: dict[str, Any]) -> tuple[str, str, str]:
    return r["family"], r["key"], r["library"]


def _order(r: dict[str, Any]) -> tuple[int, int, int]:
    keys = ["dense", *SETTING]
    return (list(FAMILIES).index(r["family"]), keys.index(r["key"]),
            ["dense", "prunekit", "llm-compressor"].index(r["library"]))  # fmt: skip


class Results:
    """Rows merged into ``benchmarks/results/posttrain_lm.json`` after every measurement (or
    only kept in memory for ``--quick``)."""

    def __init__(self, header: dict[str, Any], write: bool) -> None:
        self.header, self.write = header, write
        path = RESULTS / f"{RESULT_NAME}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        if old.get("setup") == header["setup"] and old.get("text") == header["text"]:
            self.rows = old["rows"]
        else:
            self.rows = []
            if old:
                log.warning("setup or text changed: the rows recorded before are dropped")

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        new = {row_key(r) for r in rows}
        self.rows = sorted([r for r in self.rows if row_key(r) not in new] + rows, key=_order)
        if self.write:
            self.flush()

    def flush(self) -> None:
        payload = {**self.header, "environment": environment(), "rows": self.rows}
        write_results(RESULT_NAME, payload, tables(payload))
        plot(self.rows, RESULTS / f"{RESULT_NAME}.png")


def _f(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    return "∞" if math.isinf(v) else f"{v:.{digits}f}"


def _pair(rows: list[dict[str, Any]], family: str, key: str) -> tuple[Any, Any]:
    mine = next((r for r in rows if row_key(r) == (family, key, "prunekit")), None)
    ref = SETTING[key].same_as or key
    theirs = next((r for r in rows if row_key(r) == (family, ref, "llm-compressor")), None)
    return mine, theirs


def goals(mine: dict[str, Any], theirs: dict[str, Any] | None) -> dict[str, bool | None]:
    """Perplexity within 0.1% of llm-compressor's or lower, time not above its time (``None``:
    nothing to compare with)."""
    if theirs is None or mine.get("perplexity") is None:
        return {"ppl": None, "time": None}
    if theirs.get("status") != "ok":  # llm-compressor failed or did nothing: no comparison
        return {"ppl": None, "time": None}
    return {"ppl": mine["perplexity"] <= theirs["perplexity"] * (1 + PPL_TOLERANCE),
            "time": mine["seconds"] <= theirs["seconds"]}  # fmt: skip


def _mark(v: bool | None) -> str:
    return "—" if v is None else ("yes" if v else "**no**")


def _theirs_cell(theirs: dict[str, Any] | None, same: bool) -> tuple[str, str, str]:
    if theirs is None:
        return "—", "—", "—"
    dag = "†" if same else ""
    if theirs["status"] == "error":
        return f"error{dag}", "—", "—"
    ppl = _f(theirs["perplexity"], 3) + (" (no-op)" if theirs["status"] == "no-op" else "")
    return ppl + dag, _f(theirs["seconds"], 1) + dag, f"{theirs['sparsity']:.3f}"


def tables(payload: dict[str, Any]) -> str:
    rows, setup, text = payload["rows"], payload["setup"], payload["text"]
    env = payload["environment"]
    out = [
        "# Decoder language models: prunekit vs llm-compressor 0.14 (issue 20)",
        "",
        f"**Text**: {text['source']} (`{text['stdlib']}`, `_sysconfigdata*` left out): "
        f"{text['train_files']} files ({text['train_bytes'] / 1e6:.2f} MB, "
        f"{text['train_tokens']:,} tokens) for the tokenizer, training and calibration; every "
        f"{HELD_OUT_EVERY}th file in name order held out for evaluation ("
        f"{len(text['eval_files'])} files, {text['eval_bytes'] / 1e6:.2f} MB, "
        f"{text['eval_tokens']:,} tokens: " + ", ".join(text["eval_files"]) + "). "
        f"Byte-level BPE of {setup['vocab']} tokens trained on the training files "
        "(`tokenizers`), each file followed by `<|endoftext|>`.",
        "",
        f"**Models**: built from `transformers` {payload['versions']['transformers']} configs "
        f"(nothing downloaded), hidden {setup['hidden']}, {setup['heads']} heads, FFN "
        f"{setup['ffn']}, vocabulary {setup['vocab']}, trained from scratch for "
        f"{setup['steps']} steps of {setup['batch']}×{setup['seq_len']} tokens (AdamW, lr "
        f"{setup['lr']}, warm-up then cosine), float32, cached in `runs/posttrain_lm/`.",
        "",
        f"**Compression**: {setup['n_calibration']} calibration sequences of {setup['seq_len']} "
        "tokens drawn from the training stream, one per batch, the same tensors for both "
        "libraries, in one process. Both compress the Linear (GPT-2: Conv1D) layers inside the "
        "decoder blocks, block by block (sequential: each block calibrated on the outputs of the "
        "compressed blocks before it; llm-compressor's `sequential` pipeline with the decoder "
        "layer class as `sequential_targets`), `lm_head` and embeddings left (llm-compressor "
        "needs `ignore=['re:.*lm_head']` for that: its SparseGPT, Wanda and GPTQ defaults "
        "compress `lm_head`, which in GPT-2 and OPT is the tied embedding, and SparseGPT/Wanda "
        "do not honour a plain `'lm_head'`), dampening 0.01 × mean diag H, "
        "block 128. prunekit's SparseGPT selects its mask per row (`mask_scope='row'`, the "
        "default) or per block of 128 columns (`'block'`, llm-compressor's only way). GPTQ grids "
        "symmetric in both (llm-compressor's W4A16 grid; prunekit `sym=True`), min-max of the "
        "weights before the sweep; groups of 64 with act-order: llm-compressor "
        "`actorder='static'` (group grids fixed up front), prunekit `act_order=True, "
        "static_groups=True`, and prunekit's default (a group's grid taken when the sweep "
        "reaches it) as a prunekit-only row. Magnitude, OBC and OBQ: prunekit only "
        "(llm-compressor has no OBC/OBQ).",
        "",
        f"**Measured**: held-out perplexity (`prunekit.app.text.perplexity`: exp of the mean "
        f"next-token NLL) on {setup['n_eval']} sequences of {setup['seq_len']} tokens "
        f"({setup['n_eval'] * (setup['seq_len'] - 1):,} predictions); wall time of "
        "`prunekit.compress` and of llm-compressor's `oneshot` (its data preparation and "
        f"tracing included), the fastest of {payload.get('repeats', 1)} runs each, the two "
        f"libraries back to back, {env['threads']} torch thread(s) on a {env['machine']} CPU "
        "shared with other work (timings are noisy; read the ratio; training used "
        f"{TRAIN_THREADS} threads), "
        f"llm-compressor {payload['versions']['llmcompressor']}, compressed-tensors "
        f"{payload['versions']['compressed_tensors']}, torch {env['torch']}, {env['date']}. "
        "`python benchmarks/posttrain_lm.py`.",
        "",
    ]
    dense = [r for r in rows if r["library"] == "dense"]
    if dense:
        out += [
            "| family | layers | notes | parameters (in blocks) | final training loss | "
            "training (s) | dense perplexity |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        out += [f"| {r['family']} | {r['layers']} | {r['note']} | {r['params']:,} "
                f"({r['block_params']:,}) | {r['train_loss']:.3f} | {r['train_seconds']:.0f} | "
                f"{r['perplexity']:.3f} |" for r in dense]  # fmt: skip
        out.append("")
    out += [
        "## Perplexity and time, row by row",
        "",
        "Goals (issue 20): perplexity ≤ llm-compressor's (within 0.1%), time ≤ its time. "
        "† = compared with llm-compressor's run of the row above it (the same llm-compressor "
        "setting). Sparsity = zeros / weights of the compressed layers (at 70% prunekit "
        "removes round(0.7·d_in) weights per row, 90 of 128 = 70.3%, llm-compressor thresholds "
        "at the int(0.7·n)-th score of each block, 70.0%).",
        "",
        "| family | method | setting | prunekit ppl | llm-compressor ppl | ppl ratio | prunekit s | "
        "llm-compressor s | time ratio | sparsity prunekit / llm-compressor | ppl goal | "
        "time goal |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        if r["library"] != "prunekit":
            continue
        mine, theirs = _pair(rows, r["family"], r["key"])
        same = SETTING[r["key"]].same_as is not None
        t_ppl, t_sec, t_sp = _theirs_cell(theirs, same)
        g = goals(mine, theirs)
        ok = theirs is not None and theirs["status"] == "ok" and mine["perplexity"] is not None
        ratio = _f(mine["perplexity"] / theirs["perplexity"], 4) if ok else "—"
        tratio = _f(mine["seconds"] / theirs["seconds"], 2) if ok else "—"
        mine_ppl = _f(mine["perplexity"], 3) if mine["status"] != "error" else mine["error"]
        out.append(
            f"| {r['family']} | {r['method']} | {r['setting']} | {mine_ppl} | {t_ppl} | {ratio} "
            f"| {_f(mine['seconds'], 1)} | {t_sec} | {tratio} | "
            f"{_f(mine.get('sparsity'), 3)} / {t_sp} | {_mark(g['ppl'])} | {_mark(g['time'])} |"
        )
    errors = [r for r in rows if r["library"] == "llm-compressor" and r["status"] != "ok"]
    if errors:
        out += ["", "llm-compressor runs that did not compress:", ""]
        out += [f"* {r['family']} {r['key']}: "
                + (r["error"] if r["status"] == "error" else
                   "no layer changed (no error, no warning; the model comes back dense)")
                for r in errors]  # fmt: skip
        if any(r["family"] == "gpt2" for r in errors):
            out += ["", "GPT-2 by hand, outside the table: `targets=['Conv1D']` does not help "
                    "either (SparseGPT/Wanda look inside a target only for Linear, Conv1d, Conv2d "
                    "and Conv3d: nothing changes; GPTQ raises the same ValueError); with "
                    "llm-compressor's default ignore list SparseGPT prunes only `lm_head`, i.e. "
                    "GPT-2's tied token embedding."]  # fmt: skip
    off = [r for r in rows if (r.get("calibration_delta") or 0) > CALIBRATION_TOLERANCE]
    if off:
        out += ["", "Runs calibrated on activations that are not the model's: no input the "
                "library fed the first block's attention output projection comes within "
                f"{CALIBRATION_TOLERANCE:g} (max |Δ| / max |x|) of what the model's own forward "
                "gives it on the first calibration sequence; closest:", ""]  # fmt: skip
        out += [f"* {r['family']} {r['key']} {r['library']}: {r['calibration_delta']:.3f}"
                for r in off]  # fmt: skip
        if any(r["family"] == "mistral" and r["library"] == "llm-compressor" for r in off):
            out += ["", "Checked by hand for Mistral (sliding window): what llm-compressor feeds "
                    "that layer equals, to float round-off, a forward of the model with the "
                    "attention mask of every layer replaced by zeros: its sequential pipeline "
                    "(eager attention, traced) calibrates Mistral with bidirectional attention, "
                    "neither causal nor windowed; its other families see the model's activations."]  # fmt: skip
    outside = [r for r in rows if r.get("outside_changed")]
    if outside:
        out += ["", "Runs that changed parameters outside the blocks' layers (not like for like):",
                ""]  # fmt: skip
        out += [f"* {r['family']} {r['key']} {r['library']}: {', '.join(r['outside_changed'])}"
                for r in outside]  # fmt: skip
    out += ["", *summary(rows), *mask_scope_table(rows)]
    return "\n".join(out) + "\n"


#: prunekit's settings that are not its default for a decoder LM: SparseGPT's row mask (the
#: library's default; `prunekit compress --model` uses the block mask, measured better here)
NOT_LM_DEFAULT = {"sparsegpt50", "sparsegpt70"}


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """The goals, counted on prunekit's decoder-LM defaults (the block-mask SparseGPT rows, not
    the row-mask ones)."""
    ppl, tim = [], []
    for r in rows:
        if r["library"] == "prunekit" and r["key"] not in NOT_LM_DEFAULT:
            g = goals(*_pair(rows, r["family"], r["key"]))
            tag = f"{r['family']} {r['key']}"
            if g["ppl"] is not None:
                ppl.append((tag, g["ppl"]))
            if g["time"] is not None:
                tim.append((tag, g["time"]))
    gpt2 = [r for r in rows if r["family"] == "gpt2" and r["library"] == "prunekit"]
    gpt2_ok = [r for r in gpt2 if r["status"] == "ok"
               and (r["sparsity"] >= 0.49 or (r["bits"] and r["max_distinct_per_group"]
                                              <= 2 ** r["bits"]))]  # fmt: skip
    out = [
        "## Goals",
        "",
        "Counted on prunekit's defaults for a decoder LM (`prunekit compress --model`): SparseGPT "
        "with the block mask (`mask_scope='block'`), the rows marked `mask_scope=block` above; the "
        "row-mask rows (the library's default, chosen on MiniLM) are shown but not counted.",
        "",
    ]
    for name, items in (("perplexity ≤ llm-compressor's (+0.1%)", ppl),
                        ("time ≤ llm-compressor's", tim)):  # fmt: skip
        missed = [t for t, ok in items if not ok]
        out.append(f"* {name}: met on {len(items) - len(missed)} of {len(items)} rows"
                   + (f"; missed: {', '.join(missed)}" if missed else ""))  # fmt: skip
    if gpt2:
        out.append(f"* GPT-2 (Conv1D) compressed by every prunekit method: {len(gpt2_ok)} of "
                   f"{len(gpt2)} settings reached their sparsity / grid")  # fmt: skip
    return [*out, ""]


def mask_scope_table(rows: list[dict[str, Any]]) -> list[str]:
    """SparseGPT's mask scope, row vs block, for the choice of prunekit's default (item 4)."""

    def ppl(family: str, key: str, library: str = "prunekit") -> float | None:
        r = next((r for r in rows if row_key(r) == (family, key, library)), None)
        return None if r is None or r["status"] != "ok" else r["perplexity"]

    out = [
        "## SparseGPT mask scope: row (prunekit's default) vs block (llm-compressor's)",
        "",
        "Held-out perplexity of prunekit's SparseGPT with `mask_scope='row'` (every row the same "
        "sparsity) and `'block'` (one threshold per block of 128 columns over all rows, as the "
        "reference code and llm-compressor); llm-compressor's own run for reference.",
        "",
        "| family | 50% row | 50% block | 50% llm-compressor | 70% row | 70% block | "
        "70% llm-compressor | lower at 50% | lower at 70% |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    wins = {"row": 0, "block": 0}
    for family in dict.fromkeys(r["family"] for r in rows):
        cells, better = [], []
        for s in ("50", "70"):
            row, block = ppl(family, f"sparsegpt{s}"), ppl(family, f"sparsegpt{s}-block")
            cells += [_f(row, 3), _f(block, 3),
                      _f(ppl(family, f"sparsegpt{s}", "llm-compressor"), 3)]  # fmt: skip
            if row is None or block is None:
                better.append("—")
            else:
                win = "row" if row <= block else "block"
                wins[win] += 1
                better.append(f"{win} ({100 * (max(row, block) / min(row, block) - 1):.1f}%)")
        if any(c != "—" for c in cells):
            out.append(f"| {family} | " + " | ".join(cells + better) + " |")
    out += ["", f"Lower perplexity: row on {wins['row']}, block on {wins['block']} of "
            f"{wins['row'] + wins['block']} comparisons."]  # fmt: skip
    minilm = _minilm_mask_scope()
    if minilm:
        out.append(minilm)
    return [*out, ""]


def _minilm_mask_scope() -> str:
    """The MiniLM measurement of ``posttrain.py`` (row vs block), when recorded."""
    path = RESULTS / "posttrain.json"
    if not path.exists():
        return ""
    rows = [r for r in json.loads(path.read_text())["rows"] if r.get("part") == "minilm"
            and r.get("library") == "prunekit" and r.get("method") == "sparsegpt"]  # fmt: skip
    cells = []
    for level in ("50%", "70%", "80%"):
        row = next((r for r in rows if r["setting"] == level), None)
        block = next((r for r in rows if r["setting"] == f"{level}, block mask"), None)
        if row and block:
            cells.append(f"{level}: row {row['mean_cosine']:.4f}, block {block['mean_cosine']:.4f}")
    if not cells:
        return ""
    return (
        "\nall-MiniLM-L6-v2 (`benchmarks/results/posttrain.md`, mean cosine of the sentence "
        f"embeddings to the dense ones, higher is better): {'; '.join(cells)}. The row mask wins "
        "there, the block mask on the decoder LMs: prunekit's library default is the row mask, "
        "`prunekit compress --model` (a causal LM) uses the block mask."
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Per family: perplexity increase over the dense model (%) of every setting, prunekit and
    llm-compressor side by side (the block-mask and sweep-group rows next to llm-compressor's run
    of the same setting)."""
    from matplotlib.figure import Figure

    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    if not families:
        return
    keys = [k for k in SETTING if any(r["key"] == k for r in rows)]
    fig = Figure(figsize=(max(7.0, 0.6 * len(keys) + 2), 2.3 * len(families) + 0.8))
    axes = fig.subplots(len(families), 1, squeeze=False, sharex=True)[:, 0]
    for ax, family in zip(axes, families, strict=True):
        dense = next((r for r in rows if row_key(r) == (family, "dense", "dense")), None)
        if dense is None:
            continue
        base = dense["perplexity"]
        for offset, library, color in ((-0.2, "prunekit", "tab:blue"),
                                       (0.2, "llm-compressor", "tab:orange")):  # fmt: skip
            for i, k in enumerate(keys):
                ref = k if library == "prunekit" else (SETTING[k].same_as or k)
                r = next((r for r in rows if row_key(r) == (family, ref, library)), None)
                if r is None:
                    continue
                if r["status"] != "ok" or not math.isfinite(r["perplexity"]):
                    ax.text(i + offset, 0, r["status"], rotation=90, ha="center", va="bottom",
                            fontsize=6, color=color)  # fmt: skip
                    continue
                ax.bar(i + offset, 100 * (r["perplexity"] / base - 1), width=0.4, color=color,
                       label=library)  # fmt: skip
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylabel(f"{family} (dense {base:.1f})\nperplexity +%", fontsize=7)
        ax.tick_params(labelsize=7)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))  # one entry per library
        ax.legend(uniq.values(), uniq.keys(), fontsize=6, loc="upper left")
    axes[-1].set_xticks(range(len(keys)))
    axes[-1].set_xticklabels(keys, rotation=30, ha="right", fontsize=7)
    axes[0].set_title("Held-out perplexity after one-shot compression, increase over dense",
                      fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p.replace("-", "_"): md.version(p) for p in
            ("transformers", "tokenizers", "llmcompressor", "compressed-tensors")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(SETTING), metavar="KEY",
                        help=f"settings ({', '.join(SETTING)}) or method names")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, choices=[1, 2])
    parser.add_argument("--quick", action="store_true",
                        help="llama, sparsegpt50 and gptq4, a short training; prints only")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of each compared setting (the fastest is kept)")  # fmt: skip
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("prunekit").setLevel(logging.WARNING)  # its per-layer report tables
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else Setup()
    if args.quick:
        args.families, args.methods, args.repeats = ["llama"], QUICK_METHODS, 1
    unknown = set(args.methods) - set(SETTING) - {s.method for s in SETTINGS}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {list(SETTING)}")
    settings = [s for s in SETTINGS if s.key in args.methods or s.method in args.methods]
    if args.table_only:
        payload = json.loads((RESULTS / f"{RESULT_NAME}.json").read_text())
        write_results(RESULT_NAME, payload, tables(payload))
        plot(payload["rows"], RESULTS / f"{RESULT_NAME}.png")
        return
    tok, train_ids, eval_ids, text = corpus(setup)
    _quiet_llmcompressor()
    header = {"setup": asdict(setup), "text": text, "versions": versions(),
              "repeats": args.repeats}  # fmt: skip
    results = Results(header, write=not args.quick)
    for name in args.families:
        run_family(FAMILIES[name], setup, settings, tok, train_ids, eval_ids, results,
                   args.repeats)  # fmt: skip
    if args.quick:
        print(tables({**header, "environment": environment(), "rows": results.rows}))


if __name__ == "__main__":
    main()
