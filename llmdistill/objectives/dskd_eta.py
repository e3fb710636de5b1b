"""DSKD with exact token alignment (METHODS §3.2): dual-space KD between models with different vocabularies,
over the position pairs that predict the same text after the same text."""

from __future__ import annotations

from ..losses import top1_from_hidden
from ..models import LMHead
from .cross_batch import CrossTokenizerBatch
from .cross_common import alignment_metrics, teacher_to_student_ids
from .dskd import AlignedPairs, DualSpaceKD, positions_per_item_over_ranks
from .output import ObjectiveOutput


class DualSpaceKDWithETA(DualSpaceKD):
    """As DSKD, restricted to aligned pairs (j, i) whose teacher top-1 at j has a student token (the label): the
    student-space row of student position i is t2s(h_T[j]) with that label; the teacher-space row of j is s2t(h_S[i]),
    compared with z_T[j]. A pair without a label leaves both spaces. Projectors start on the shared C.

    Means as DSKDv2's criterions/dual_space_kd_v2_with_exact_token_alignment.py: L_ce_ts and L_kd_st over the labelled
    pairs (its stu_align_token_num, and the teacher positions s2t_hiddens_align fills), L_kd_ts over the agreeing ones,
    always masked (its --t2s-agreement threshold defaults to 1.0); here each count is summed over the data-parallel
    ranks, where the official code divides per rank's micro-batch.
    """

    cross_tokenizer = True

    def __init__(self, config, student, teacher, bridge):
        super().__init__(config, student, teacher, version="v2", bridge=bridge)
        student_head, teacher_head = LMHead.of(student), LMHead.of(teacher)
        self.teacher_to_student = teacher_to_student_ids(
            bridge, teacher_head.weight.shape[0], student_head.weight.shape[0], student_head.weight.device
        )

    def __call__(self, batch: CrossTokenizerBatch, ce_weight, kd_weight) -> ObjectiveOutput:
        teacher_index, student_index = batch.aligned.unbind(1)
        student, teacher_hidden = batch.student, batch.teacher.hidden[teacher_index]
        teacher_top1 = top1_from_hidden(teacher_hidden, batch.teacher.head, chunk_size=self.chunk_size)
        targets = self.teacher_to_student[teacher_top1]
        labelled = targets >= 0
        per_pair = positions_per_item_over_ranks(len(student.rows), labelled.sum().float())
        pairs = AlignedPairs(student_index[labelled], per_pair)
        output = self.dual_space(
            student.hidden, student.head, student.targets, teacher_hidden[labelled], batch.teacher.head, ce_weight,
            kd_weight, agreement_mask=True, pairs=pairs, targets=targets[labelled],
        )
        return output._replace(metrics=output.metrics | alignment_metrics(batch))
