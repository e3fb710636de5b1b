"""Vanilla token-level KD: the divergence between teacher and student distributions over one vocabulary."""

from __future__ import annotations

import torch

from ..losses import LossSums, distill_loss_from_hidden
from ..models import LMHead


class VanillaKD:
    """D(teacher ‖ student) from each model's own head, plus CE on the gold tokens, in one chunked pass.

    Same-tokenizer models whose heads have different padded row counts (Qwen2.5-7B: 152,064, 1.5B: 151,936)
    are compared over the ids both heads have; `vocab.shared_vocab_size` checks that this is safe.
    """

    def __init__(self, divergence_params: dict, temperature_squared: bool = False, chunk_size: int | None = None):
        self.divergence_params = divergence_params
        self.kd_scale = divergence_params["temperature"] ** 2 if temperature_squared else 1.0
        self.chunk_size = chunk_size

    def __call__(
        self,
        student_hidden: torch.Tensor,
        student_head: LMHead,
        teacher_hidden: torch.Tensor,
        teacher_head: LMHead,
        labels: torch.Tensor,
        ce_weight: float,
        kd_weight: float,
    ) -> LossSums:
        return distill_loss_from_hidden(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            labels,
            ce_weight=ce_weight,
            kd_weight=kd_weight * self.kd_scale,
            chunk_size=self.chunk_size,
            **self.divergence_params,
        )
