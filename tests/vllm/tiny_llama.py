"""Tiny random Hugging Face Llama models for checkpoint and vLLM tests (no network).

Shapes are chosen for QTIP's format: every matrix dim a multiple of 32 with a Hadamard transform
(192 = 12 * 16 exercises a non-power-of-two hadK), and TP=2 slices still multiples of 32.
NOTE: this directory must never get an ``__init__.py``: ``tests/`` is on sys.path during the
run and a regular package named ``vllm`` here would shadow the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=128, head_dim=32)
# TP=2 needs every per-rank slice a multiple of 32: 2 kv heads of 32
TINY_TP = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, head_dim=32)


def make_tiny_llama(path: str | Path, *, seed: int = 0, bias: bool = False, init_std: float = 0.1, **overrides) -> Path:
    """Save a random LlamaForCausalLM (float32 safetensors) to ``path``; returns the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**TINY, **overrides}
    cfg = LlamaConfig(
        **shape, max_position_embeddings=256, attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], torch_dtype="float32", initializer_range=init_std,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if bias:  # HF initializes biases to zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, init_std)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path
