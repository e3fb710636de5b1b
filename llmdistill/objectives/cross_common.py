"""Pieces the cross-tokenizer objectives share: the shared vocabulary and id map on the heads, restricted heads, the
gold CE (alone, or in one pass with a KD term at paired positions), the logged alignment metrics."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..losses import LossSums, chunk_sum_with_gradients, distill_loss_from_hidden
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


def kd_at_pairs_with_gold_ce(
    student: Positions,
    student_index: torch.Tensor,
    teacher_hidden: torch.Tensor,
    kd_at_pair: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    kd_elsewhere: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    ce_weight,
    kd_factor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, Σ CE, Σ KD): kd_factor · KD + ce_weight · CE over the student's positions, its head run once per
    position for both terms (CE on the gold token at temperature 1 everywhere). KD is `kd_at_pair(student_logits,
    teacher_hidden)` at the student positions `student_index` (paired with the rows of `teacher_hidden`) and
    `kd_elsewhere(student_logits, gold)` at the others (none when it is None); each returns a chunk's sum."""
    sums = []  # (KD, CE) of every chunk, without gradients

    def terms(student_hidden, gold, *teacher_rows):
        logits = student.head.logits(student_hidden)
        ce = F.cross_entropy(logits.float(), gold, reduction="sum")
        if teacher_rows:
            kd = kd_at_pair(logits, teacher_rows[0])
        else:
            kd = kd_elsewhere(logits, gold) if kd_elsewhere is not None else ce.new_zeros(())
        sums.append((kd.detach(), ce.detach()))
        return kd_factor * kd + ce_weight * ce

    elsewhere = torch.ones_like(student.targets, dtype=torch.bool).index_fill_(0, student_index, False)
    params = student.head.params()
    loss = chunk_sum_with_gradients(
        terms, student.hidden[student_index], student.targets[student_index], teacher_hidden, params=params,
        chunk_size=chunk_size,
    ) + chunk_sum_with_gradients(
        terms, student.hidden[elsewhere], student.targets[elsewhere], params=params, chunk_size=chunk_size
    )
    zero = loss.new_zeros(())
    kd, ce = (sum(parts, zero) for parts in zip(*sums)) if sums else (zero, zero)
    return loss, ce, kd


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
