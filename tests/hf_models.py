"""Tiny Hugging Face decoder LMs (built from configs: nothing is downloaded) and calibration tokens,
shared by the tests of decoder-LM compression and of the compressed-tensors export.

Importing this module imports ``transformers`` (after the torchvision shim it needs with the CPU
torch); a test module imports it after ``pytest.importorskip("transformers")``.
"""

import benchmarks.torchvision_shim  # noqa: F401  (before transformers imports torchvision)
import torch
import transformers
from torch import nn

transformers.logging.set_verbosity_error()


def llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-block Llama with grouped-query attention and an untied head."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def gpt2(tie: bool = True) -> nn.Module:
    """A 2-block GPT-2 (Conv1D layers), its head tied to the embedding or not."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=16, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def tokens(n: int = 4, length: int = 12, seed: int = 1) -> list[torch.Tensor]:
    """``n`` items of ``(1, length)`` random token ids in ``[1, 97)``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (1, length), generator=g) for _ in range(n)]
