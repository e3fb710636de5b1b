"""Generation on two ranks whose responses end at different steps, run by the distributed runner scripts after
training: rank 0's response ends after its first token, rank 1's runs to NEW_TOKENS. With sharded models (FSDP2,
ZeRO-3) every forward pass gathers parameters from all ranks, so without lock-step generation rank 1 would wait
forever for rank 0. The response lengths are written to OUTPUT_DIR/generated_rank{rank}.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmdistill.rollout import Intervention, Sampling, rollout
from llmdistill.sources import left_padded_prompts

NEW_TOKENS = 6


def generate_unevenly(student, teacher, prompt_batch: dict, pad_token_id: int, rank: int, output_dir: Path) -> None:
    """`prompt_batch`: one collated row whose prompt both models continue greedily."""
    ids, mask = left_padded_prompts(prompt_batch["input_ids"], prompt_batch["labels"], pad_token_id)
    with torch.no_grad():
        first = int(student(input_ids=ids, attention_mask=mask).logits[0, -1].argmax())
    eos = first if rank == 0 else -1  # rank 0's first token ends its response; rank 1's response never ends
    greedy = Sampling(NEW_TOKENS, temperature=0)
    produced = rollout(student, teacher, ids, mask, Intervention("student"), greedy, eos, pad_token_id)
    (output_dir / f"generated_rank{rank}.json").write_text(json.dumps(produced.response_mask.sum(1).tolist()))
