"""CMA, cross-model attention (METHODS §3.3, DSKD v1's cross-tokenizer path): each student position attends over
the teacher's response positions of the same row, matching on input and target token embeddings, so no alignment
or token map is needed. The attended teacher states give the student-space logits; the transposed attention
gives the teacher-space ones. Losses as DSKD v1: gold labels in the student space, forward KL in the teacher's."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..losses import distill_loss_from_hidden
from .cross_batch import CrossTokenizerBatch
from .cross_common import alignment_metrics
from .dskd import dual_space_output, student_space_terms
from .output import ObjectiveOutput


class CrossModelAttention(nn.Module):
    """query: Linear(2d → 2D) over [E_S(x); E_S(y)]; t2s: Linear(D → d); s2t: Linear(d → D)."""

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        self.query = nn.Linear(2 * student_width, 2 * teacher_width)
        self.t2s = nn.Linear(teacher_width, student_width)
        self.s2t = nn.Linear(student_width, teacher_width)

    def scores(self, student_index_embeds, teacher_index_embeds, student_rows, teacher_rows) -> torch.Tensor:
        """[N, M] attention logits; positions of different batch rows never attend to each other."""
        query = self.query(student_index_embeds.to(self.query.weight.dtype))
        keys = _standardised(teacher_index_embeds).to(query.dtype)
        scores = query @ keys.T / math.sqrt(keys.shape[-1])
        return scores.masked_fill(student_rows[:, None] != teacher_rows[None, :], torch.finfo(scores.dtype).min)


class CrossModelAttentionKD:
    """KD = L_kd_ts + L_ce_ts + L_kd_st over the N student and M teacher response positions of the batch.

    * student space: Z_ts = (attended t2s values) · stopgrad(W_S); L_ce_ts = Σ CE(Z_ts, gold) / N trains the query and
      t2s; L_kd_ts = Σ D(stopgrad Z_ts ‖ z_S) over the positions where argmax Z_ts is the gold token, divided by all
      N (not by the agreeing count), as the official CMA code (DSKD's criterions/
      dual_space_kd_with_cross_model_attention.py: `t2s_kd_loss * pad_mask * t2s_acc_mask`, summed, over N).
    * teacher space: Z_st = (attended s2t values) · W_T (frozen); L_kd_st = Σ fkl(z_T ‖ Z_st) over the M teacher
      positions, divided by the student's N.
    """

    cross_tokenizer = True

    def __init__(self, config, student, teacher, bridge=None):
        self.divergence_params = config.divergence_params()
        self.kd_scale = config.kd_scale
        self.chunk_size = config.loss_chunk_size
        self.student_embeddings = student.get_input_embeddings()
        self.teacher_embeddings = teacher.get_input_embeddings()
        student_width = student.get_output_embeddings().weight.shape[1]
        teacher_width = teacher.get_output_embeddings().weight.shape[1]
        device = student.get_output_embeddings().weight.device
        self.projectors = CrossModelAttention(student_width, teacher_width).to(device)

    def __call__(self, batch: CrossTokenizerBatch, ce_weight, kd_weight) -> ObjectiveOutput:
        student, teacher = batch.student, batch.teacher
        kd_weight = kd_weight * self.kd_scale
        scores = self.projectors.scores(
            self._index_embeds(self.student_embeddings, student), self._index_embeds(self.teacher_embeddings, teacher),
            student.rows, teacher.rows,
        )
        teacher_target_embeds = self.teacher_embeddings(teacher.targets).detach()
        values = self.projectors.t2s(
            (_standardised(teacher.hidden) + _standardised(teacher_target_embeds)).to(self.projectors.t2s.weight.dtype)
        )
        attended_teacher = torch.softmax(scores.float(), -1).to(values.dtype) @ values  # [N, d]
        space_loss, gold_ce, terms, accuracy = student_space_terms(
            student.hidden, student.head, attended_teacher, student.targets, student.targets, ce_weight, kd_weight,
            self.divergence_params, self.chunk_size, agreement_mask=True, mean_over_agreeing=False,
        )
        student_values = self.projectors.s2t(student.hidden.to(self.projectors.s2t.weight.dtype))
        attended_student = torch.softmax(scores.T.float(), -1).to(student_values.dtype) @ student_values  # [M, D]
        frozen_teacher = teacher.head.detached()
        teacher_space = distill_loss_from_hidden(
            attended_student, frozen_teacher, teacher.hidden, frozen_teacher, kd_weight=kd_weight,
            chunk_size=self.chunk_size, **(self.divergence_params | {"divergence": "fkl"}),
        )
        terms["kd_st"] = teacher_space.kd
        metrics = alignment_metrics(batch) | {
            "t2s_accuracy": accuracy, "s2t_agreement": 100 * teacher_space.top1_agreements / len(teacher.rows)
        }
        return dual_space_output(space_loss + teacher_space.loss, gold_ce, terms, metrics, len(student.rows))

    @staticmethod
    def _index_embeds(embeddings: nn.Module, positions) -> torch.Tensor:
        """[E(x); E(y)]: the embeddings of the token read and of the token predicted, without gradient."""
        return torch.cat([embeddings(positions.inputs), embeddings(positions.targets)], dim=-1).detach()


def _standardised(values: torch.Tensor) -> torch.Tensor:
    return values / values.float().std().clamp_min(1e-6).to(values.dtype)
