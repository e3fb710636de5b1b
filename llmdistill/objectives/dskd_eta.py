"""DSKD with exact token alignment (METHODS §3.2): dual-space KD between models with different vocabularies,
over the position pairs that predict the same text after the same text."""

from __future__ import annotations

from ..models import LMHead
from .cross_batch import CrossTokenizerBatch
from .cross_common import alignment_metrics, teacher_to_student_ids
from .dskd import DualSpaceKD
from .output import ObjectiveOutput


class DualSpaceKDWithETA(DualSpaceKD):
    """As DSKD, restricted to aligned pairs (j, i): the student-space row of student position i is t2s(h_T[j]), its
    label the teacher's top-1 at j mapped to the student id with the same text (pairs without one leave the student
    space); the teacher-space row of j is s2t(h_S[i]), compared with z_T[j]. Projectors start on the shared C."""

    cross_tokenizer = True

    def __init__(self, config, student, teacher, bridge):
        super().__init__(config, student, teacher, version="v2", bridge=bridge)
        student_head, teacher_head = LMHead.of(student), LMHead.of(teacher)
        self.teacher_to_student = teacher_to_student_ids(
            bridge, teacher_head.weight.shape[0], student_head.weight.shape[0], student_head.weight.device
        )

    def __call__(self, batch: CrossTokenizerBatch, ce_weight, kd_weight) -> ObjectiveOutput:
        teacher_index, student_index = batch.aligned.unbind(1)
        student = batch.student
        output = self.dual_space(
            student.hidden, student.head, student.targets, batch.teacher.hidden[teacher_index], batch.teacher.head,
            ce_weight, kd_weight, student_index=student_index, teacher_to_student=self.teacher_to_student,
        )
        return output._replace(metrics=output.metrics | alignment_metrics(batch))
