"""Vanilla token-level KD: the divergence between teacher and student distributions over one vocabulary."""

from __future__ import annotations

import torch

from ..losses import distill_loss_from_hidden
from ..models import LMHead
from .output import ObjectiveOutput


class VanillaKD:
    """D(teacher ‖ student) from each model's own head, plus CE on the gold tokens, in one chunked pass.

    Same-tokenizer models whose heads have different padded row counts (Qwen2.5-7B: 152,064, 1.5B: 151,936)
    are compared over the ids both heads have; `vocab.shared_vocab_size` checks that this is safe.
    """

    cross_tokenizer = False
    projectors = None

    def __init__(self, config, student=None, teacher=None, bridge=None):
        self.divergence_params = config.divergence_params()
        self.kd_scale = config.kd_scale
        self.chunk_size = config.loss_chunk_size

    def __call__(
        self,
        student_hidden: torch.Tensor,
        student_head: LMHead,
        teacher_hidden: torch.Tensor,
        teacher_head: LMHead,
        labels: torch.Tensor,
        ce_weight: float,
        kd_weight: float,
        on_policy: bool = False,
    ) -> ObjectiveOutput:
        """`on_policy` (KD on generated responses) changes nothing here: the same divergence at every position."""
        sums = distill_loss_from_hidden(
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
        return ObjectiveOutput(sums.loss, sums.ce, sums.kd, {"top1_agreement": 100 * sums.top1_agreements / sums.count})
