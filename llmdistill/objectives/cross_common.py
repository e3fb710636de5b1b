"""Pieces the cross-tokenizer objectives share: the shared vocabulary and id map on the heads, restricted heads, the
gold CE, the logged alignment metrics."""

from __future__ import annotations

import torch

from ..losses import LossSums, distill_loss_from_hidden
from ..models import LMHead
from .cross_batch import CrossTokenizerBatch, Positions


def head_rows(head: LMHead, ids: torch.Tensor) -> LMHead:
    """The head restricted to vocabulary `ids` (in that order); gradients flow back to the selected rows."""
    bias = None if head.bias is None else head.bias[ids]
    return LMHead(head.weight[ids], bias, head.softcap)


def gold_cross_entropy(student: Positions, weight, chunk_size: int | None) -> LossSums:
    """CE of the student on the gold tokens at all its supervised positions, weighted (chunked, no [N, V])."""
    return distill_loss_from_hidden(
        student.hidden, student.head, labels=student.targets, ce_weight=weight, chunk_size=chunk_size
    )


def shared_vocabulary(bridge, student_head: LMHead, teacher_head: LMHead) -> tuple[torch.Tensor, torch.Tensor]:
    """The bridge's shared vocabulary C, restricted to ids both heads have rows for, on the heads' device."""
    teacher_ids, student_ids = bridge.shared_teacher_ids, bridge.shared_student_ids
    has_rows = (teacher_ids < teacher_head.weight.shape[0]) & (student_ids < student_head.weight.shape[0])
    device = student_head.weight.device
    return teacher_ids[has_rows].to(device), student_ids[has_rows].to(device)


def teacher_to_student_ids(bridge, teacher_rows: int, student_rows: int, device) -> torch.Tensor:
    """[teacher_rows] student id with the same text as each teacher id; -1 where none (or no student head row)."""
    mapping = bridge.teacher_to_student_map(teacher_rows).to(device)
    return torch.where(mapping < student_rows, mapping, -1)


def alignment_metrics(batch: CrossTokenizerBatch) -> dict[str, torch.Tensor]:
    return {"aligned_fraction": batch.aligned_fraction}
