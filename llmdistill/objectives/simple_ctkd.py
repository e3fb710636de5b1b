"""simple_ctkd (METHODS §3.4): KD at ETA-aligned positions over the shared vocabulary C only, both distributions
renormalised over C, plus CE on the gold tokens."""

from __future__ import annotations

from ..losses import distill_loss_from_hidden
from ..models import LMHead
from .cross_batch import CrossTokenizerBatch
from .cross_common import alignment_metrics, gold_cross_entropy, head_rows, shared_vocabulary
from .output import ObjectiveOutput


class SharedVocabularyKD:
    cross_tokenizer = True
    projectors = None

    def __init__(self, config, student, teacher, bridge):
        self.divergence_params = config.divergence_params()
        self.kd_scale = config.kd_scale
        self.chunk_size = config.loss_chunk_size
        self.teacher_ids, self.student_ids = shared_vocabulary(bridge, LMHead.of(student), LMHead.of(teacher))

    def __call__(self, batch: CrossTokenizerBatch, ce_weight, kd_weight) -> ObjectiveOutput:
        teacher_index, student_index = batch.aligned.unbind(1)
        kd = distill_loss_from_hidden(
            batch.student.hidden[student_index], head_rows(batch.student.head, self.student_ids),
            batch.teacher.hidden[teacher_index], head_rows(batch.teacher.head, self.teacher_ids),
            kd_weight=kd_weight * self.kd_scale, chunk_size=self.chunk_size, **self.divergence_params,
        )
        gold = gold_cross_entropy(batch.student, ce_weight, self.chunk_size)
        agreement = 100 * kd.top1_agreements / max(len(student_index), 1)
        metrics = alignment_metrics(batch) | {"top1_agreement": agreement}
        return ObjectiveOutput(kd.loss + gold.loss, gold.ce, kd.kd, metrics)
