"""MinED (METHODS §3.4): positions paired 1-to-1 by the minimum-edit-distance warping between the two token
sequences learn the teacher's distribution re-indexed into the student vocabulary; every other position learns a
one-hot on its gold token. The divergence is forward KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import default_chunk_size
from ..models import LMHead
from .cross_batch import CrossTokenizerBatch
from .cross_common import alignment_metrics, kd_at_pairs_with_gold_ce, teacher_to_student_ids
from .output import ObjectiveOutput


class MinEditDistanceKD:
    cross_tokenizer = True
    projectors = None

    def __init__(self, config, student, teacher, bridge):
        self.temperature = config.temperature
        self.kd_scale = config.kd_scale
        self.chunk_size = config.loss_chunk_size
        student_head, teacher_head = LMHead.of(student), LMHead.of(teacher)
        self.student_rows = student_head.weight.shape[0]
        mapping = teacher_to_student_ids(
            bridge, teacher_head.weight.shape[0], self.student_rows, student_head.weight.device
        )
        self.teacher_to_student = mapping
        self.mapped_teacher_ids = torch.nonzero(mapping >= 0).squeeze(1)

    def __call__(self, batch: CrossTokenizerBatch, ce_weight, kd_weight) -> ObjectiveOutput:
        student, teacher = batch.student, batch.teacher
        teacher_index, student_index = batch.mined.unbind(1)
        # "Whose tokens map through the vocabulary map": the paired teacher token has the student token's text.
        maps = self.teacher_to_student[teacher.targets[teacher_index]] == student.targets[student_index]
        teacher_index, student_index = teacher_index[maps], student_index[maps]
        chunk = self.chunk_size or default_chunk_size(max(self.student_rows, len(self.teacher_to_student)), student.hidden.device)

        def reindexed_kl(student_logits, teacher_hidden):
            teacher_probs = torch.softmax(teacher.head.logits(teacher_hidden).float() / self.temperature, -1)
            target = teacher_probs.new_zeros(len(teacher_probs), self.student_rows).index_add_(
                1, self.teacher_to_student[self.mapped_teacher_ids], teacher_probs[:, self.mapped_teacher_ids]
            )
            target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
            log_q = torch.log_softmax(student_logits.float() / self.temperature, -1)
            return (torch.xlogy(target, target) - target * log_q).sum()

        def one_hot_kl(student_logits, gold):
            return F.cross_entropy(student_logits.float() / self.temperature, gold, reduction="sum")

        loss, ce, kd = kd_at_pairs_with_gold_ce(
            student, student_index, teacher.hidden[teacher_index], reindexed_kl, one_hot_kl, ce_weight,
            kd_weight * self.kd_scale, chunk,
        )
        fraction = len(student_index) / max(len(student.targets), 1)
        metrics = alignment_metrics(batch) | {"mined_fraction": torch.tensor(fraction)}
        return ObjectiveOutput(loss, ce, kd, metrics)
