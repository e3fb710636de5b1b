"""Loading teacher and student models and tokenizers, and turning gathered hidden states into logits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A fast tokenizer (offsets are needed for alignment) with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {name_or_path!r} is a slow (Python) tokenizer without character offsets: provide a "
            "tokenizer.json (e.g. `AutoTokenizer.from_pretrained(path, use_fast=True).save_pretrained(path)` "
            "with the `tokenizers` package installed)."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no eos_token: set one in its tokenizer_config.json.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Inference only: eval mode (no dropout) and no parameter takes gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def last_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, T, d], through the (possibly wrapped) model's forward, skipping the head."""
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1, use_cache=False
    )
    return outputs.hidden_states[-1]


def supervised_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, supervised: torch.Tensor, head_owner=None
) -> torch.Tensor:
    """Logits [N, V] at the N positions that predict a supervised token (`supervised`: [B, T-1] mask).

    Hidden states are gathered before the head, so no [B, T, V] tensor is built. `head_owner` is the unwrapped
    model when `model` is a DDP/FSDP wrapper whose forward must still be the one called.
    """
    hidden = last_hidden_states(model, input_ids, attention_mask)[:, :-1][supervised]
    return logits_from_hidden(head_owner or model, hidden)


def logits_from_hidden(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own LM head on already-gathered hidden states, with final-logit soft-capping where it has one."""
    logits = model.get_output_embeddings()(hidden)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
