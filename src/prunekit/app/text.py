"""Hugging Face causal language models from a local folder, plain text as token sequences, and
perplexity.

* :func:`load_pretrained` reads a model folder offline (``from_pretrained`` with
  ``local_files_only``): its ``config.json``, its weights and its tokenizer; every way of being wrong
  is one line naming the folder and what is missing.
* :func:`token_sequences` tokenises a text file with the model's tokenizer and packs the tokens
  into sequences of ``seq_len`` (the text is one stream: no padding, so no pad token is needed), as
  the reference code evaluates language models.
* :func:`perplexity` is ``exp`` of the mean next-token cross-entropy over every predicted token of
  those sequences.

``transformers`` is imported here only, when a function needs it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.config import ConfigError

__all__ = ["Pretrained", "load_pretrained", "perplexity", "sample_sequences", "token_sequences"]

#: the files a model folder needs (one of the weight files)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass
class Pretrained:
    """A causal language model and its tokenizer, read from ``path``."""

    path: Path
    model: nn.Module
    tokenizer: Any

    @property
    def max_length(self) -> int | None:
        """The longest sequence the model takes (``max_position_embeddings``), if it says."""
        config = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "a Hugging Face model folder needs the transformers package: pip install 'prunekit[hf]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # loading bars are not prunekit's output
    return transformers


def load_pretrained(path: str | Path, device: torch.device | None = None) -> Pretrained:
    """The causal LM and tokenizer saved in folder ``path`` (offline), in evaluation mode.

    Raises:
        ConfigError: the folder is missing, has no ``config.json`` or no weights file, holds a
            model that is not a causal language model, or no tokenizer.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model folder {folder} has no config.json (a Hugging Face model folder)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            f"model folder {folder} has no weights ({', '.join(WEIGHT_FILES)}): save the model "
            "with save_pretrained"
        )
    tf = _transformers()
    try:
        if "quantization_config" in json.loads((folder / "config.json").read_text("utf-8")):
            model = _load_compressed(tf, folder)
        else:
            model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model folder {folder}: not a causal language model ({first})") from None
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model folder {folder} has no usable tokenizer ({first})") from None
    if device is not None:
        model = model.to(device)
    return Pretrained(folder, model.eval(), tokenizer)


def _load_compressed(tf: Any, folder: Path) -> nn.Module:
    """A compressed-tensors folder as a dense model: the architecture from its config, the
    weights decompressed exactly by :func:`prunekit.export.load_compressed`."""
    from prunekit.export import load_compressed

    config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = tf.AutoModelForCausalLM.from_config(config)
    state = load_compressed(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names of parameters shared with an earlier name (tied weights)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.setdefault(id(tensor), name)
    return tied


def token_sequences(tokenizer: Any, path: str | Path, seq_len: int, what: str) -> Tensor:
    """The text file ``path`` tokenised and packed into ``(n, seq_len)`` token ids (the tail that
    does not fill a sequence is dropped).

    Raises:
        ConfigError: the file is missing or not UTF-8 text, or too short for one sequence
            (``what`` names the option in the message).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what}: {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: {file} cannot be read as UTF-8 text ({exc})") from None
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // seq_len
    if n < 1:
        raise ConfigError(
            f"{what}: {file} holds {ids.numel()} tokens, fewer than one sequence of "
            f"{seq_len}; give a longer text or a shorter seq_len"
        )
    return ids[: n * seq_len].reshape(n, seq_len).clone()


def sample_sequences(sequences: Tensor, samples: int, seed: int) -> Tensor:
    """``samples`` of ``sequences`` drawn without replacement (all of them when there are fewer),
    seeded."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(sequences.shape[0], generator=g)[:samples]
    return sequences[order.sort().values]


@torch.no_grad()
def perplexity(model: nn.Module, sequences: Tensor, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token cross-entropy over every predicted token of ``sequences``
    (``(n, seq_len)`` token ids; ``seq_len − 1`` predictions each).

    Raises:
        ConfigError: the loss is not finite (the model produces NaN or inf).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, sequences.shape[0], batch_size):
        ids = sequences[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    mean = total / count
    if not math.isfinite(mean):
        raise ConfigError(f"the model's loss is {mean} on the evaluation text: not a finite number")
    return math.exp(mean)
