"""Dual-space KD (DSKD, METHODS §2): project hidden states so that both distributions of each pair come out of
the same head. Student space: teacher states through P_ts and the (frozen-for-this-term) student head. Teacher
space: student states through P_st and the teacher head."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import sum_over_ranks
from ..losses import distill_loss_from_hidden, top1_from_hidden
from ..models import LMHead
from .cross_common import shared_vocabulary
from .output import ObjectiveOutput

SPACES = ("both", "student", "teacher")
S2T_MODES = ("closed_form", "learned")


def least_squares_map(source_rows: torch.Tensor, target_rows: torch.Tensor) -> torch.Tensor:
    """X minimising ‖source_rows · X − target_rows‖ (rows: vocabulary ids), i.e. pinv(source_rows) · target_rows.

    Computed as pinv(AᵀA) · AᵀB with the Gram matrices in float64, so no [V, d] pseudo-inverse is stored.
    """
    source, target = source_rows.detach().double(), target_rows.detach().double()
    return (torch.linalg.pinv(source.T @ source) @ (source.T @ target)).float()


class DualSpaceProjectors(nn.Module):
    """t2s maps teacher states [.., D] into the student space [.., d]; s2t maps student states into the teacher's.

    v2: both ideal-initialised on the shared vocabulary C, no bias. t2s = P_tsᵀ = pinv(W_S[C]) · W_T[C] (head rows as
    stored: [V, width]); s2t either closed form (P_stᵀ = pinv(W_T[C]) · W_S[C], recomputed whenever the student
    head changes, no gradient) or learned (initialised to that value). v1: random-init Linear layers with bias.
    `shared` is C: a row count (the leading ids of one vocabulary) or matched (teacher ids, student ids).
    """

    def __init__(self, student_head: LMHead, teacher_head: LMHead, shared, version: str, s2t: str):
        super().__init__()
        student_width, teacher_width = student_head.weight.shape[1], teacher_head.weight.shape[1]
        self.version, self.s2t_mode = version, s2t
        self.teacher_ids, self.student_ids = (slice(shared), slice(shared)) if isinstance(shared, int) else shared
        v1 = version == "v1"
        self.t2s = nn.Linear(teacher_width, student_width, bias=v1)
        self.s2t = nn.Linear(student_width, teacher_width, bias=v1)
        self._closed_form_key = None
        if v1:
            return
        teacher_rows = teacher_head.weight[self.teacher_ids]
        with torch.no_grad():
            self.t2s.weight.copy_(least_squares_map(student_head.weight[self.student_ids], teacher_rows))
        # pinv(W_T[C]) = pinv(W_T[C]ᵀ W_T[C]) · W_T[C]ᵀ: keep the small [D, D] factor; the teacher never changes.
        teacher = teacher_rows.detach().double()
        self.register_buffer("teacher_gram_pinv", torch.linalg.pinv(teacher.T @ teacher).float(), persistent=False)
        if s2t == "closed_form":  # derived from the heads, not learned: a buffer, which no optimizer or sharding holds
            weight = self.s2t.weight.detach()
            del self.s2t.weight
            self.s2t.register_buffer("weight", weight)
        self._set_closed_form_s2t(student_head.weight, teacher_head.weight)

    def head_changed(self) -> None:
        """Called after each optimizer step: fused optimizers update the head without bumping its version counter."""
        self._closed_form_key = None

    def refresh_s2t(self, student_weight: torch.Tensor, teacher_weight: torch.Tensor) -> None:
        """Recompute the closed-form s2t if the student head changed since (`head_changed`, or an in-place update
        that bumped its version)."""
        if self.version == "v2" and self.s2t_mode == "closed_form":
            if (student_weight.data_ptr(), student_weight._version) != self._closed_form_key:
                self._set_closed_form_s2t(student_weight, teacher_weight)

    @torch.no_grad()
    def _set_closed_form_s2t(self, student_weight: torch.Tensor, teacher_weight: torch.Tensor) -> None:
        teacher_rows, student_rows = teacher_weight[self.teacher_ids], student_weight[self.student_ids]
        cross = teacher_rows.float().T @ student_rows.float()  # W_T[C]ᵀ W_S[C]: [D, d]
        self.s2t.weight.copy_(self.teacher_gram_pinv @ cross)
        self._closed_form_key = (student_weight.data_ptr(), student_weight._version)

    def to_student_space(self, teacher_hidden: torch.Tensor) -> torch.Tensor:
        return self.t2s(teacher_hidden.to(self.t2s.weight.dtype))

    def to_teacher_space(self, student_hidden: torch.Tensor) -> torch.Tensor:
        return self.s2t(student_hidden.to(self.s2t.weight.dtype))


class DualSpaceKD:
    """KD = L_kd_ts + L_ce_ts + L_kd_st (METHODS §2); per-micro-batch means, returned as sums over its N positions
    (× N) so that the trainer's division by the step's token count gives each term's mean.

    * student space: Z_ts = t2s(H_T) · stopgrad(W_S); ŷ = the teacher's own top-1 (v2) or the gold token (v1);
      L_ce_ts = CE(Z_ts, ŷ) trains t2s only; a = [argmax Z_ts = ŷ]; L_kd_ts = Σ_a D(stopgrad Z_ts ‖ z_S) / Σ a.
    * teacher space: Z_st = s2t(H_S) · W_T (teacher head frozen); L_kd_st = Σ D(z_T ‖ Z_st) / N (v1: always fkl).
    """

    cross_tokenizer = False

    def __init__(self, config, student, teacher, version: str = "v2", bridge=None):
        self.version = version
        self.divergence_params = config.divergence_params()
        self.kd_scale = config.kd_scale
        self.chunk_size = config.loss_chunk_size
        self.spaces = config.dskd_spaces
        student_head, teacher_head = LMHead.of(student), LMHead.of(teacher)
        self.shared_rows = min(student_head.weight.shape[0], teacher_head.weight.shape[0])
        shared = shared_vocabulary(bridge, student_head, teacher_head) if self.cross_tokenizer else self.shared_rows
        self.projectors = DualSpaceProjectors(
            student_head, teacher_head, shared, version, config.dskd_s2t
        ).to(student_head.weight.device)

    def __call__(self, student_hidden, student_head, teacher_hidden, teacher_head, labels, ce_weight, kd_weight):
        teacher_head = _first_rows(teacher_head, self.shared_rows)
        return self.dual_space(student_hidden, student_head, labels, teacher_hidden, teacher_head, ce_weight, kd_weight)

    def dual_space(
        self, student_hidden, student_head, labels, teacher_hidden, teacher_head, ce_weight, kd_weight,
        student_index=None, teacher_to_student=None,
    ) -> ObjectiveOutput:
        """Both spaces over the teacher states `teacher_hidden` [K, D] paired with the student positions
        `student_index` [K] (all N in order when None); `teacher_to_student` maps teacher top-1 ids to student ids
        (-1: no student token, that pair leaves the student space). Gold CE covers all N student positions."""
        n = student_hidden.shape[0]
        paired_student = student_hidden if student_index is None else student_hidden[student_index]
        kd_weight = kd_weight * self.kd_scale
        terms, metrics, loss, teacher_top1 = {}, {}, 0.0, None
        if self.spaces != "student":
            teacher_space = self._teacher_space(paired_student, student_head, teacher_hidden, teacher_head, kd_weight)
            loss = loss + teacher_space.loss
            terms["kd_st"] = teacher_space.kd
            metrics["s2t_agreement"] = 100 * teacher_space.top1_agreements / max(len(paired_student), 1)
            teacher_top1 = teacher_space.teacher_top1
        if self.spaces == "teacher":
            gold = distill_loss_from_hidden(
                student_hidden, student_head, labels=labels, ce_weight=ce_weight, chunk_size=self.chunk_size
            )
            return dual_space_output(loss + gold.loss, gold.ce, terms, metrics, n)
        if self.version == "v1":
            targets = labels if student_index is None else labels[student_index]
        else:
            if teacher_top1 is None:
                teacher_top1 = top1_from_hidden(teacher_hidden, teacher_head, chunk_size=self.chunk_size)
            targets = teacher_top1 if teacher_to_student is None else teacher_to_student[teacher_top1]
        projected = self.projectors.to_student_space(teacher_hidden)
        space_loss, gold_ce, student_terms, accuracy = student_space_terms(
            student_hidden, student_head, projected, labels, targets, student_index, ce_weight, kd_weight,
            self.divergence_params, self.chunk_size,
        )
        metrics["t2s_accuracy"] = accuracy
        return dual_space_output(loss + space_loss, gold_ce, terms | student_terms, metrics, n)

    def _teacher_space(self, student_hidden, student_head, teacher_hidden, teacher_head, kd_weight):
        """Σ D(z_T ‖ s2t(H_S) · W_T): the student states read by the frozen teacher head."""
        self.projectors.refresh_s2t(student_head.weight, teacher_head.weight)
        params = self.divergence_params | ({"divergence": "fkl"} if self.version == "v1" else {})
        return distill_loss_from_hidden(
            self.projectors.to_teacher_space(student_hidden), teacher_head, teacher_hidden, teacher_head,
            kd_weight=kd_weight, chunk_size=self.chunk_size, **params,
        )


def student_space_terms(
    student_hidden, student_head, projected, labels, targets, student_index, ce_weight, kd_weight, divergence_params,
    chunk_size,
):
    """(loss, gold CE sum, {kd_ts, ce_ts} as sums, t2s accuracy in %) of the student-space terms, with the gold CE of
    the student fused into the same pass over its logits.

    `projected` [K, d]: teacher-derived rows for the student positions `student_index` [K] (all N in order when
    None), read by the student head without gradient into it; `targets` [K]: their labels (with `student_index`,
    -1 = leave the pair out).
    """
    n = student_hidden.shape[0]
    if student_index is not None:  # pairs across vocabularies: a teacher top-1 may have no student token
        has_target = targets >= 0
        projected, targets, student_index = projected[has_target], targets[has_target], student_index[has_target]
    fixed_head = student_head.detached()
    projected_ce = distill_loss_from_hidden(
        projected, fixed_head, labels=targets, ce_weight=kd_weight, chunk_size=chunk_size
    )
    agreement = (projected_ce.student_top1 == targets).float()
    agreeing = agreement.sum()
    # L_kd_ts is a mean over the agreeing positions of all ranks' micro-batches, like the other terms' token counts
    all_positions, all_agreeing = sum_over_ranks(torch.stack([agreement.new_tensor(n), agreeing]))
    per_agreeing = all_positions / all_agreeing.clamp_min(1)
    rows, weights = projected.detach(), agreement
    if student_index is not None:
        rows = projected.new_zeros(n, projected.shape[1]).index_copy_(0, student_index, rows)
        weights = agreement.new_zeros(n).index_copy_(0, student_index, agreement)
    student_space = distill_loss_from_hidden(
        student_hidden, student_head, rows, fixed_head, labels,
        ce_weight=ce_weight, kd_weight=kd_weight * per_agreeing, kd_position_weights=weights,
        chunk_size=chunk_size, **divergence_params,
    )
    terms = {"kd_ts": student_space.kd * per_agreeing, "ce_ts": projected_ce.ce}
    accuracy = 100 * agreeing / max(len(targets), 1)
    return projected_ce.loss + student_space.loss, student_space.ce, terms, accuracy


def dual_space_output(loss, ce_sum, terms: dict, metrics: dict, n: int) -> ObjectiveOutput:
    kd_sum = sum(terms.values())
    per_token = {name: value / n for name, value in terms.items()}
    return ObjectiveOutput(loss, ce_sum, kd_sum, per_token | metrics)


def _first_rows(head: LMHead, rows: int) -> LMHead:
    bias = None if head.bias is None else head.bias[:rows]
    return LMHead(head.weight[:rows], bias, head.softcap)
