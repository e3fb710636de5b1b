"""The quickstart's models: small Llama-style decoders (tied embeddings) over one of its tokenizers."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

MAX_POSITIONS = 512


def tiny_llama(tokenizer, shape: tuple[int, int, int], seed: int) -> LlamaForCausalLM:
    """A randomly initialised model of `shape` (hidden size, layers, attention heads), drawn from `seed`."""
    hidden, layers, heads = shape
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)
