"""Vanilla token-level KD: the divergence between teacher and student distributions over one vocabulary."""

from __future__ import annotations

import torch

from ..divergences import divergence_per_position


class VanillaKD:
    """Sum over supervised positions of D(teacher || student), over the first `shared_vocab_size` ids.

    Same-tokenizer models whose heads have different padded row counts (Qwen2.5-7B: 152,064, 1.5B: 151,936)
    are compared on the ids both heads have; `vocab.shared_vocab_size` checks that this is safe.
    """

    def __init__(self, divergence_params: dict, shared_vocab_size: int, temperature_squared: bool = False):
        self.divergence_params = divergence_params
        self.shared_vocab_size = shared_vocab_size
        self.scale = divergence_params["temperature"] ** 2 if temperature_squared else 1.0

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        vocab = self.shared_vocab_size
        per_position = divergence_per_position(
            teacher_logits[:, :vocab], student_logits[:, :vocab], **self.divergence_params
        )
        return per_position.sum() * self.scale
