"""Tiny Hugging Face decoder LMs, their calibration tokens and compressed copies, for the export
tests (the settings of tests/posttrain/test_decoder_lms.py)."""

import functools

import benchmarks.torchvision_shim  # noqa: F401  (before transformers imports torchvision)
import torch
import transformers
from torch import nn

import prunekit

transformers.logging.set_verbosity_error()


def llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def tokens(n: int = 4, length: int = 12, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (1, length), generator=g) for _ in range(n)]


@functools.cache
def _compressed(build: str, method: str, items: tuple) -> tuple[nn.Module, object]:
    model = {"llama": llama, "gpt2": gpt2}[build]()
    report = prunekit.compress(model, tokens(), method, **dict(items))
    return model, report


def compressed(build: str, method: str, **config) -> tuple[nn.Module, object]:
    """``build()`` compressed with ``prunekit.compress(method, **config)``, computed once per
    session (the tests never change the model: saving must not)."""
    return _compressed(build, method, tuple(sorted(config.items())))
