"""ULD, Universal Logit Distillation (METHODS §3.4): the k-th response position of the student is paired with the
teacher's k-th; the KD value there compares the two distributions sorted by probability, so no token map is needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import default_chunk_size
from .cross_batch import CrossTokenizerBatch, Positions
from .cross_common import alignment_metrics, kd_at_pairs_with_gold_ce
from .output import ObjectiveOutput


def sorted_probability_distance(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float):
    """Σ_k |p_(k) − q_(k)| per position: both distributions sorted descending, the shorter zero-padded."""
    p = torch.softmax(teacher_logits.float() / temperature, -1).sort(-1, descending=True).values
    q = torch.softmax(student_logits.float() / temperature, -1).sort(-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p, q = F.pad(p, (0, width - p.shape[-1])), F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def positional_pairs(teacher: Positions, student: Positions) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) flat indices of the k-th response position of each row, for k below both lengths."""
    stride = len(teacher.rows) + len(student.rows)  # above any rank: (row, rank) ↔ row * stride + rank
    student_keys = student.rows * stride + student.ranks()
    teacher_keys = teacher.rows * stride + teacher.ranks()
    found = torch.searchsorted(student_keys, teacher_keys).clamp_max(len(student_keys) - 1)
    matched = student_keys[found] == teacher_keys
    return torch.nonzero(matched).squeeze(1), found[matched]


class UniversalLogitKD:
    cross_tokenizer = True
    projectors = None

    def __init__(self, config, student, teacher, bridge=None):
        self.temperature = config.temperature
        self.kd_scale = config.kd_scale
        self.chunk_size = config.loss_chunk_size

    def __call__(self, batch: CrossTokenizerBatch, ce_weight, kd_weight) -> ObjectiveOutput:
        student, teacher = batch.student, batch.teacher
        teacher_index, student_index = positional_pairs(teacher, student)

        def distance(student_logits, teacher_hidden):
            return sorted_probability_distance(teacher.head.logits(teacher_hidden), student_logits, self.temperature).sum()

        vocab = max(student.head.weight.shape[0], teacher.head.weight.shape[0])
        loss, ce, kd = kd_at_pairs_with_gold_ce(
            student, student_index, teacher.hidden[teacher_index], distance, None, ce_weight,
            kd_weight * self.kd_scale, self.chunk_size or default_chunk_size(vocab, student.hidden.device),
        )
        return ObjectiveOutput(loss, ce, kd, alignment_metrics(batch))
