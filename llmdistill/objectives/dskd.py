"""Dual-space KD (DSKD, METHODS §2): project hidden states so that both distributions of each pair come out of
the same head. Student space: teacher states through P_ts and the (frozen-for-this-term) student head. Teacher
space: student states through P_st and the teacher head."""

from __future__ import annotations

from typing import NamedTuple

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


class AlignedPairs(NamedTuple):
    """Teacher rows paired with student positions (ETA), over which L_ce_ts and L_kd_st are means."""

    student_index: torch.Tensor  # [K] the student position of each pair
    scale: torch.Tensor  # N / K over all ranks: a sum over the pairs that the trainer divides by N becomes their mean


class DualSpaceKD:
    """KD = L_kd_ts + L_ce_ts + L_kd_st (METHODS §2); per-micro-batch means, returned as sums over its N positions
    (× N) so that the trainer's division by the step's token count gives each term's mean.

    * student space: Z_ts = t2s(H_T) · stopgrad(W_S); L_ce_ts = Σ CE(Z_ts, ŷ) / N trains t2s only.
      v2 (DSKDv2's criterions/dual_space_kd_v2.py): ŷ = the teacher's own top-1. Off-policy, L_kd_ts =
      Σ_a D(stopgrad Z_ts ‖ z_S) / Σ a over the agreeing positions a = [argmax Z_ts = ŷ] (the official code masks
      while the batch's agreement rate is ≤ --t2s-agreement, whose default 1.0 means always); on generated sequences
      (`on_policy`) L_kd_ts = Σ D / N over all positions with no mask, as its compute_on_policy_dual_space_kd_loss.
      v1 (DSKD's criterions/dual_space_kd.py): ŷ = the gold token; L_kd_ts = Σ D / N over all positions, no mask.
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

    def __call__(self, student_hidden, student_head, teacher_hidden, teacher_head, labels, ce_weight, kd_weight,
                 on_policy: bool = False):
        teacher_head = _first_rows(teacher_head, self.shared_rows)
        agreement_mask = self.version == "v2" and not on_policy
        return self.dual_space(
            student_hidden, student_head, labels, teacher_hidden, teacher_head, ce_weight, kd_weight, agreement_mask
        )

    def dual_space(
        self, student_hidden, student_head, labels, teacher_hidden, teacher_head, ce_weight, kd_weight,
        agreement_mask: bool, pairs: AlignedPairs | None = None, targets: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Both spaces over the teacher states `teacher_hidden` [K, D]: one per student position (all N in order), or
        one per pair of `pairs`, labelled `targets` [K] (student ids), with L_ce_ts and L_kd_st means over the pairs.
        L_kd_ts is a mean over the agreeing rows with `agreement_mask`. Gold CE covers all N student positions."""
        n = student_hidden.shape[0]
        paired_student = student_hidden if pairs is None else student_hidden[pairs.student_index]
        kd_weight = kd_weight * self.kd_scale
        terms, metrics, loss = {}, {}, 0.0
        if self.spaces != "student":
            pair_scale = 1.0 if pairs is None else pairs.scale
            teacher_space = self._teacher_space(
                paired_student, student_head, teacher_hidden, teacher_head, kd_weight * pair_scale
            )
            loss = loss + teacher_space.loss
            terms["kd_st"] = teacher_space.kd * pair_scale
            metrics["s2t_agreement"] = 100 * teacher_space.top1_agreements / max(len(paired_student), 1)
            if targets is None and self.version == "v2":
                targets = teacher_space.teacher_top1
        if self.spaces == "teacher":
            gold = distill_loss_from_hidden(
                student_hidden, student_head, labels=labels, ce_weight=ce_weight, chunk_size=self.chunk_size
            )
            return dual_space_output(loss + gold.loss, gold.ce, terms, metrics, n)
        if targets is None:
            targets = labels if self.version == "v1" else top1_from_hidden(
                teacher_hidden, teacher_head, chunk_size=self.chunk_size
            )
        projected = self.projectors.to_student_space(teacher_hidden)
        space_loss, gold_ce, student_terms, accuracy = student_space_terms(
            student_hidden, student_head, projected, labels, targets, ce_weight, kd_weight, self.divergence_params,
            self.chunk_size, agreement_mask, pairs,
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
    student_hidden, student_head, projected, labels, targets, ce_weight, kd_weight, divergence_params, chunk_size,
    agreement_mask: bool, pairs: AlignedPairs | None = None, mean_over_agreeing: bool = True,
):
    """(loss, gold CE sum, {kd_ts, ce_ts} as sums, t2s accuracy in %) of the student-space terms, with the gold CE of
    the student fused into the same pass over its logits.

    `projected` [K, d]: teacher-derived rows, one per student position (all N in order) or one per pair of `pairs`,
    read by the student head without gradient into it; `targets` [K]: their labels. L_ce_ts sums over the rows (a mean
    over the pairs with `pairs`). L_kd_ts is a mean over the agreeing rows with `agreement_mask` (a sum over them, left
    to the caller's division by N, when not `mean_over_agreeing`), else a sum over all rows.
    """
    n = student_hidden.shape[0]
    fixed_head = student_head.detached()
    pair_scale = 1.0 if pairs is None else pairs.scale
    projected_ce = distill_loss_from_hidden(
        projected, fixed_head, labels=targets, ce_weight=kd_weight * pair_scale, chunk_size=chunk_size
    )
    agreement = (projected_ce.student_top1 == targets).float()
    agreeing = agreement.sum()
    per_agreeing = positions_per_item_over_ranks(n, agreeing)  # all-reduced masking or not: ranks stay in step
    kd_ts_scale = per_agreeing if agreement_mask and mean_over_agreeing else 1.0
    rows, weights = projected.detach(), agreement if agreement_mask else torch.ones_like(agreement)
    if pairs is not None:
        rows = projected.new_zeros(n, projected.shape[1]).index_copy_(0, pairs.student_index, rows)
        weights = agreement.new_zeros(n).index_copy_(0, pairs.student_index, weights)
    student_space = distill_loss_from_hidden(
        student_hidden, student_head, rows, fixed_head, labels,
        ce_weight=ce_weight, kd_weight=kd_weight * kd_ts_scale, kd_position_weights=weights,
        chunk_size=chunk_size, **divergence_params,
    )
    terms = {"kd_ts": student_space.kd * kd_ts_scale, "ce_ts": projected_ce.ce * pair_scale}
    accuracy = 100 * agreeing / max(len(targets), 1)
    return projected_ce.loss + student_space.loss, student_space.ce, terms, accuracy


def positions_per_item_over_ranks(n: int, count: torch.Tensor) -> torch.Tensor:
    """N / count with both summed over the ranks' current micro-batches (count at least 1): the factor that turns a
    sum over `count` items, which the trainer divides by the token count, into their mean, as if one process had the
    whole batch. Every rank must call this the same number of times."""
    all_positions, all_counted = sum_over_ranks(torch.stack([count.new_tensor(n), count]))
    return all_positions / all_counted.clamp_min(1)


def dual_space_output(loss, ce_sum, terms: dict, metrics: dict, n: int) -> ObjectiveOutput:
    kd_sum = sum(terms.values())
    per_token = {name: value / n for name, value in terms.items()}
    return ObjectiveOutput(loss, ce_sum, kd_sum, per_token | metrics)


def _first_rows(head: LMHead, rows: int) -> LMHead:
    bias = None if head.bias is None else head.bias[:rows]
    return LMHead(head.weight[:rows], bias, head.softcap)
