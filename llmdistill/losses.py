"""Memory-bounded distillation losses: both LM heads and the divergence applied chunk by chunk over positions.

Callers gather the hidden states of the N supervised positions first, so no [B, T, V] tensor exists. Each
chunk of positions then gets its logits, its loss terms and, when gradients are needed, the gradient of its
weighted loss with respect to its student logits, folded at once into the gradients of the student hidden
states and head. Backward only scales those stored gradients: no logits are recomputed, and the extra
memory is O(chunk_size × V) plus one buffer the size of the student head (which its `.grad` needs anyway).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .divergences import divergence_from_logprobs, validate_divergence
from .models import LMHead

# Default chunking: as many positions as keep one chunk's [chunk, V] fp32 logits within a budget of elements, a
# multiple of 16 in [MIN_DEFAULT_CHUNK, MAX_DEFAULT_CHUNK]. A chunk holds a few such buffers at once (five for JSD).
# Every chunk streams the whole head ([V, d], and its gradient) through memory about three times, so a chunk needs
# enough positions for its matmuls to outweigh that: at V = 152k, N = 4,096 on 2 CPU cores (fkl, forward + backward)
# 32 positions per chunk took 65.8 s, 128 took 43.9 s and 512 40.5 s, for 0.64, 0.93 and 2.1 GB of extra memory
# (benchmarks/loss_memory.py). Hence at least 128 positions; within that, CPU buffers stay near glibc's 32 MiB mmap
# ceiling (fewer fresh mappings per chunk) and accelerators, whose caching allocators reuse blocks, take 64 MiB.
CHUNK_ELEMENTS = {"cpu": 2**22, "accelerator": 2**24}
MIN_DEFAULT_CHUNK, MAX_DEFAULT_CHUNK = 128, 512
COMPILE_ENV = "LLMDISTILL_COMPILE"  # "0" runs the fkl/CE chunk terms eagerly on CUDA too


class LossSums(NamedTuple):
    """Sums over the N positions of one call. Only `loss` carries gradients."""

    loss: torch.Tensor  # kd_weight · kd + ce_weight · ce
    kd: torch.Tensor  # Σ w · D(teacher ‖ student), w the KD position weights (1 by default); 0 without a teacher
    ce: torch.Tensor  # Σ CE(student, labels); 0 without labels
    top1_agreements: torch.Tensor  # positions where student_top1 == teacher_top1; 0 without a teacher
    count: int  # N
    student_top1: torch.Tensor  # [N] argmax of the student logits over the ids KD compares (all rows without a teacher)
    teacher_top1: torch.Tensor | None  # [N] argmax of the teacher logits over those ids; None without a teacher


@dataclass(frozen=True)
class _Spec:
    """Everything about a call that is not a tensor autograd must route gradients to."""

    divergence: str
    divergence_params: dict
    temperature: float
    kd_weight: float | torch.Tensor
    ce_weight: float | torch.Tensor
    chunk_size: int
    shared_rows: int  # KD compares the first min(V_T, V_S) ids (padded heads of one tokenizer)
    student_softcap: float | None
    teacher: LMHead | None

    def chunk_terms(self, device: torch.device):
        """The per-chunk loss terms: compiled on CUDA for fkl (the elementwise passes over [chunk, V] fuse), eager
        otherwise (torch.compile on CPU needs a C++ toolchain; the other divergences take their gradient by autograd,
        which does not compile)."""
        compile_wanted = os.environ.get(COMPILE_ENV, "1") != "0"
        return _compiled_terms() if compile_wanted and device.type == "cuda" and self.divergence == "fkl" else _terms


def kd_loss_from_hidden(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor | LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor | LMHead,
    divergence: str = "fkl",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    **divergence_params,
) -> tuple[torch.Tensor, int]:
    """(Σ over positions of D(teacher ‖ student), N) without ever building [N, V] logits.

    `*_hidden` are `[N, d]` / `[N, D]` hidden states of the supervised positions; `*_head` an LM head weight
    `[V, d]` / `[V, D]` or an `LMHead` (bias, soft-capping). Heads with different row counts are compared over
    the first min(V_T, V_S) ids. Gradients reach the student hidden states and head, never the teacher.
    `divergence_params`: `beta` (jsd), `skew_alpha` (skl, srkl), `akl_mu` (akl).
    """
    sums = distill_loss_from_hidden(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        divergence=divergence,
        temperature=temperature,
        chunk_size=chunk_size,
        **divergence_params,
    )
    return sums.loss, sums.count


def distill_loss_from_hidden(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor | LMHead,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | LMHead | None = None,
    labels: torch.Tensor | None = None,
    *,
    kd_weight: float | torch.Tensor = 1.0,
    ce_weight: float | torch.Tensor = 1.0,
    kd_position_weights: torch.Tensor | None = None,
    divergence: str = "fkl",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    **divergence_params,
) -> LossSums:
    """KD against the teacher and/or CE against `labels` ([N] ids, -100 ignored), fused in one chunked pass.

    The student's logits are computed once per chunk for both terms. CE uses all student rows at temperature 1;
    KD uses temperature `temperature` over the ids both heads have, each position's divergence multiplied by
    `kd_position_weights` ([N], no gradient) when given. The weights may be tensors (no host sync needed).
    """
    student_head, teacher_head = _as_head(student_head), _as_head(teacher_head)
    spec = _spec(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, kd_weight, ce_weight, divergence,
        temperature, chunk_size, divergence_params,
    )
    if kd_position_weights is not None and kd_position_weights.shape != (student_hidden.shape[0],):
        raise ValueError(
            f"kd_position_weights must be [N] = [{student_hidden.shape[0]}], got {tuple(kd_position_weights.shape)}."
        )
    trainable = (student_hidden, student_head.weight, student_head.bias)
    others = (teacher_hidden, labels, kd_position_weights)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in trainable):
        loss, kd, ce, student_top1, teacher_top1 = _ChunkedLoss.apply(spec, *trainable, *others)
    else:
        kd, ce, student_top1, teacher_top1, _ = _run_chunks(spec, *trainable, *others, needs_grad=(False,) * 3)
        loss = kd_weight * kd + ce_weight * ce
    if teacher_hidden is None:
        agreements, teacher_top1 = kd.new_zeros(()), None
    else:
        agreements = (student_top1 == teacher_top1).sum().to(kd.dtype)
    return LossSums(loss, kd, ce, agreements, student_hidden.shape[0], student_top1, teacher_top1)


@torch.no_grad()
def top1_from_hidden(hidden: torch.Tensor, head: torch.Tensor | LMHead, rows: int | None = None, chunk_size=None):
    """[N] argmax over the first `rows` ids (all by default) of `head` applied to `hidden`, chunk by chunk."""
    head = _as_head(head)
    chunk_size = chunk_size or default_chunk_size(head.weight.shape[0], head.weight.device)
    return torch.cat(
        [head.logits(hidden[start : start + chunk_size], rows).argmax(-1) for start in range(0, len(hidden), chunk_size)]
        or [torch.empty(0, dtype=torch.long, device=hidden.device)]
    )


def chunk_sum_with_gradients(terms, *rows: torch.Tensor, params: list[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Σ over chunks of positions of `terms(*chunk_rows)` (a scalar per chunk), for losses without a closed-form
    gradient here (ULD, MinED, OPD); `params` are the trainable tensors `terms` reads besides its rows (the student
    head). Each chunk's gradients with respect to its rows and `params` are taken as soon as its value is, so memory
    holds one chunk's [chunk, V] activations at a time and nothing is recomputed in backward (recomputing, as
    activation checkpointing does, ran every chunk's head products and sorts twice). The returned sum carries
    those gradients into the caller's graph through a linear surrogate, Σ g · x − stopgrad(Σ g · x), whose
    gradient with respect to each x is its stored g."""
    if not torch.is_grad_enabled():
        return sum((terms(*chunk) for chunk in _chunks(rows, chunk_size)), rows[0].new_zeros((), dtype=torch.float32))
    trainable_rows = [index for index, tensor in enumerate(rows) if tensor.requires_grad]
    trainable_params = [p for p in params if p.requires_grad]
    inputs = [rows[index] for index in trainable_rows] + trainable_params
    grads = [torch.zeros_like(tensor, dtype=torch.promote_types(tensor.dtype, torch.float32)) for tensor in inputs]
    total = rows[0].new_zeros((), dtype=torch.float32)
    for start, chunk in zip(range(0, len(rows[0]), chunk_size), _chunks(rows, chunk_size)):
        chunk = [tensor.detach().requires_grad_(tensor.requires_grad) for tensor in chunk]
        value = terms(*chunk)
        if value.requires_grad:
            found = torch.autograd.grad(value, [chunk[i] for i in trainable_rows] + trainable_params, allow_unused=True)
            for index, grad in enumerate(found):
                if grad is not None and index < len(trainable_rows):
                    grads[index][start : start + len(grad)] += grad
                elif grad is not None:
                    grads[index] += grad
        total = total + value.detach().float()
    surrogate = sum(
        (torch.dot(grad.to(tensor.dtype).reshape(-1), tensor.reshape(-1)) for grad, tensor in zip(grads, inputs)),
        total.new_zeros(()),
    )
    return total + (surrogate - surrogate.detach())


def _chunks(rows, chunk_size: int):
    for start in range(0, len(rows[0]), chunk_size):
        yield [tensor[start : start + chunk_size] for tensor in rows]


def _as_head(head: torch.Tensor | LMHead | None) -> LMHead | None:
    return LMHead(head) if isinstance(head, torch.Tensor) else head


def _spec(student_hidden, student_head, teacher_hidden, teacher_head, labels, kd_weight, ce_weight, divergence,
          temperature, chunk_size, divergence_params) -> _Spec:
    _check_inputs(student_hidden, student_head, teacher_hidden, teacher_head, labels)
    unknown = set(divergence_params) - {"beta", "skew_alpha", "akl_mu"}
    if unknown:
        raise TypeError(f"unknown divergence parameter(s) {sorted(unknown)}: use beta, skew_alpha or akl_mu.")
    validate_divergence(divergence, temperature=temperature, **divergence_params)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}.")
    vocab = student_head.weight.shape[0]
    shared_rows = vocab if teacher_head is None else min(vocab, teacher_head.weight.shape[0])
    return _Spec(
        divergence, divergence_params, temperature, kd_weight, ce_weight,
        chunk_size or default_chunk_size(vocab, student_head.weight.device), shared_rows, student_head.softcap, teacher_head,
    )


def default_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Positions per chunk for logits of `vocab_size` ids on `device` (see CHUNK_ELEMENTS)."""
    budget = CHUNK_ELEMENTS["cpu" if torch.device(device).type == "cpu" else "accelerator"]
    return min(MAX_DEFAULT_CHUNK, max(MIN_DEFAULT_CHUNK, budget // vocab_size // 16 * 16))


def _check_inputs(student_hidden, student_head, teacher_hidden, teacher_head, labels) -> None:
    if student_hidden.dim() != 2 or student_hidden.shape[1] != student_head.weight.shape[1]:
        raise ValueError(
            f"student_hidden must be [N, d] with d = the student head's width {student_head.weight.shape[1]}, "
            f"got {tuple(student_hidden.shape)}: gather the supervised positions before calling."
        )
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("pass teacher_hidden and teacher_head together, or neither (CE only).")
    if teacher_hidden is None and labels is None:
        raise ValueError("nothing to compute: pass a teacher (teacher_hidden, teacher_head), labels, or both.")
    n = student_hidden.shape[0]
    if teacher_hidden is not None and (
        teacher_hidden.dim() != 2 or teacher_hidden.shape != (n, teacher_head.weight.shape[1])
    ):
        raise ValueError(
            f"teacher_hidden must be [N, D] = [{n}, {teacher_head.weight.shape[1]}] (one row per student row), "
            f"got {tuple(teacher_hidden.shape)}."
        )
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}] token ids, got {tuple(labels.shape)}.")


class _ChunkedLoss(torch.autograd.Function):
    """Computes the gradients during forward, chunk by chunk; backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, spec, student_hidden, student_weight, student_bias, teacher_hidden, labels, kd_position_weights):
        kd, ce, student_top1, teacher_top1, grads = _run_chunks(
            spec, student_hidden, student_weight, student_bias, teacher_hidden, labels, kd_position_weights,
            ctx.needs_input_grad[1:4],
        )
        # Kept on ctx rather than saved for backward so that backward can scale them in place: a second copy of
        # the head's gradient would be the largest tensor of the whole loss.
        ctx.grads = grads
        ctx.mark_non_differentiable(kd, ce, student_top1, teacher_top1)
        return spec.kd_weight * kd + spec.ce_weight * ce, kd, ce, student_top1, teacher_top1

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if ctx.grads is None:
            raise RuntimeError(
                "backward ran twice through one chunked distillation loss (retain_graph=True): compute the loss again "
                "for a second backward."
            )
        grads, ctx.grads = ctx.grads, None
        scaled = (None if grad is None else grad.mul_(grad_loss.to(grad.dtype)) for grad in grads)
        return (None, *scaled, None, None, None)


def _run_chunks(
    spec, student_hidden, student_weight, student_bias, teacher_hidden, labels, kd_position_weights, needs_grad
):
    """(kd, ce, student top-1 [N], teacher top-1 [N] (empty without a teacher), (grad hidden, grad weight, grad
    bias)); a gradient is None where not needed."""
    dtype = torch.promote_types(student_weight.dtype, torch.float32)
    device = student_hidden.device
    kd, ce = torch.zeros((), dtype=dtype, device=device), torch.zeros((), dtype=dtype, device=device)
    n = student_hidden.shape[0]
    student_top1 = torch.empty(n, dtype=torch.long, device=device)
    teacher_top1 = torch.empty(0 if teacher_hidden is None else n, dtype=torch.long, device=device)
    want_hidden, want_weight, want_bias = needs_grad
    # Accumulated in at least fp32 whatever the head's dtype: many chunks add into every row.
    grad_weight = torch.zeros_like(student_weight, dtype=dtype) if want_weight else None
    grad_bias = torch.zeros_like(student_bias, dtype=dtype) if want_bias else None
    grad_hidden = torch.empty_like(student_hidden) if want_hidden else None
    student = LMHead(student_weight, student_bias, spec.student_softcap)
    # As tensors, so that a compiled chunk function does not recompile for every new weight (e.g. 1 / token count).
    weights = [torch.as_tensor(weight, dtype=dtype, device=device) for weight in (spec.kd_weight, spec.ce_weight)]
    for start in range(0, student_hidden.shape[0], spec.chunk_size):
        rows = slice(start, start + spec.chunk_size)
        hidden = student_hidden[rows]
        chunk_kd, chunk_ce, student_top1[rows], chunk_teacher_top1, grad_logits = _chunk(
            spec,
            student,
            hidden,
            *(None if tensor is None else tensor[rows] for tensor in (teacher_hidden, labels, kd_position_weights)),
            any(needs_grad),
            weights,
        )
        kd += chunk_kd
        ce += chunk_ce
        if chunk_teacher_top1 is not None:
            teacher_top1[rows] = chunk_teacher_top1
        if want_hidden:
            grad_hidden[rows] = grad_logits.to(student_weight.dtype) @ student_weight
        if want_weight:
            _accumulate_weight_gradient(grad_weight, grad_logits, hidden.detach().to(student_weight.dtype))
        if want_bias:
            grad_bias += grad_logits.sum(0)
    grads = (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(student_weight.dtype),
        None if grad_bias is None else grad_bias.to(student_bias.dtype),
    )
    return kd, ce, student_top1, teacher_top1, grads


def _accumulate_weight_gradient(grad_weight, grad_logits, hidden) -> None:
    """grad_weight += grad_logitsᵀ · hidden. A half-precision head multiplies in its own dtype (tensor cores, not an
    fp32 matmul) and adds the product into the fp32 accumulator."""
    if hidden.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad_logits.T, hidden)
    else:
        grad_weight += grad_logits.to(hidden.dtype).T @ hidden


def _chunk(
    spec: _Spec, student: LMHead, student_hidden, teacher_hidden, labels, kd_position_weights, needs_grad, weights
):
    """One chunk's (kd, ce, student top-1, teacher top-1 or None, gradient of the weighted loss w.r.t. the
    student's pre-cap logits or None)."""
    with torch.no_grad():
        # Logits in the heads' dtype; the terms upcast them per chunk (never the whole [N, V] tensor).
        student_logits = student.linear(student_hidden.detach())
        teacher_logits = None
        if spec.teacher is not None:
            teacher_logits = spec.teacher.linear(teacher_hidden.detach(), spec.shared_rows)
        return spec.chunk_terms(student_logits.device)(
            student_logits,
            teacher_logits,
            labels,
            kd_position_weights,
            *weights,
            spec.temperature,
            spec.student_softcap,
            None if spec.teacher is None else spec.teacher.softcap,
            needs_grad,
            spec.divergence,
            spec.divergence_params,
        )


def _terms(
    student_logits, teacher_logits, labels, kd_position_weights, kd_weight, ce_weight, temperature: float,
    student_softcap, teacher_softcap, needs_grad: bool, divergence: str = "fkl", divergence_params: dict | None = None,
):
    """(kd, ce, student top-1, teacher top-1 or None, gradient of kd_weight·kd + ce_weight·ce w.r.t. the pre-cap
    student logits or None)."""
    logits = LMHead.cap_logits(_at_least_fp32(student_logits), student_softcap)
    kd = ce = logits.new_zeros(())
    student_top1, teacher_top1, grad = logits.argmax(-1), None, None
    if teacher_logits is not None:
        teacher_logits = LMHead.cap_logits(_at_least_fp32(teacher_logits), teacher_softcap)
        shared = logits[:, : teacher_logits.shape[1]]
        student_top1, teacher_top1 = shared.argmax(-1), teacher_logits.argmax(-1)
        kd, grad = _kd_and_gradient(
            teacher_logits, shared, temperature, kd_weight, needs_grad, divergence, divergence_params or {},
            kd_position_weights,
        )
        del teacher_logits
    if labels is not None:
        ce, ce_grad = _cross_entropy_and_gradient(logits, labels, ce_weight, needs_grad)
        if grad is not None:
            ce_grad[:, : grad.shape[1]] += grad
        grad = ce_grad
    if needs_grad:
        if grad.shape[1] < logits.shape[1]:  # KD only, student head padded past the teacher's
            grad = F.pad(grad, (0, logits.shape[1] - grad.shape[1]))
        if student_softcap is not None:  # d/dx c·tanh(x/c) = 1 − tanh²(x/c)
            grad.mul_(1 - (logits / student_softcap).square())
    return kd, ce, student_top1, teacher_top1, grad


@functools.cache
def _compiled_terms():
    compiled = torch.compile(_terms)

    def terms(*args):
        try:
            return compiled(*args)
        except Exception as error:  # compiler failures come in many types (BackendCompilerFailed, ImportError, ...)
            raise RuntimeError(
                f"the compiled loss failed ({type(error).__name__}); set {COMPILE_ENV}=0 to run it eagerly."
            ) from error

    return terms


def _kd_and_gradient(teacher_logits, student_logits, temperature, weight, needs_grad, divergence, params, rows):
    """Σ rows · D(teacher ‖ student) over the chunk (`rows`: per-position weights or None for 1) and weight × its
    gradient w.r.t. `student_logits` (or None)."""
    beta = params.get("beta", 0.5)
    if divergence == "fkl" or (divergence == "jsd" and beta == 0.0):
        return _forward_kl_and_gradient(teacher_logits, student_logits, temperature, weight, needs_grad, rows)
    if divergence == "rkl" or (divergence == "jsd" and beta == 1.0):
        return _reverse_kl_and_gradient(teacher_logits, student_logits, temperature, weight, needs_grad, rows)
    if divergence == "jsd":
        return _jsd_and_gradient(teacher_logits, student_logits, temperature, weight, needs_grad, rows, beta)
    leaf = student_logits.detach().requires_grad_(needs_grad)
    with torch.enable_grad():
        per_position = divergence_from_logprobs(
            _log_softmax(teacher_logits, temperature), _log_softmax(leaf, temperature), divergence, **params
        )
        kd = per_position.sum() if rows is None else (per_position * rows).sum()
    grad = torch.autograd.grad(kd, leaf)[0].mul_(weight) if needs_grad else None
    return kd.detach(), grad


def _forward_kl_and_gradient(teacher_logits, student_logits, temperature, weight, needs_grad: bool, rows):
    """Σ rows · KL(p ‖ q) and weight × rows × (q − p) / τ, its gradient w.r.t. the student logits, reusing buffers
    in place (`teacher_logits` among them: it holds the teacher's log-probabilities afterwards).

    The default divergence gets this closed form because autograd would keep about twice as many [chunk, V]
    buffers alive and make more passes over them.
    """
    teacher_logprobs = _log_softmax_(teacher_logits, temperature)
    student_logprobs = _log_softmax(student_logits, temperature)
    p = teacher_logprobs.exp()
    # p · log(p/q) is 0 where p = 0, which also covers -inf − (-inf) on masked vocabulary entries.
    log_ratio = teacher_logprobs.sub_(student_logprobs).masked_fill_(p == 0, 0.0)
    grad = None
    if needs_grad:
        scale = weight / temperature if rows is None else (weight / temperature) * rows.unsqueeze(1)
        grad = student_logprobs.exp_().sub_(p).mul_(scale)
    per_position = p.mul_(log_ratio).sum(-1)
    return (per_position.sum() if rows is None else (per_position * rows).sum()), grad


def _reverse_kl_and_gradient(teacher_logits, student_logits, temperature, weight, needs_grad: bool, rows):
    """Σ rows · KL(q ‖ p) and weight × rows × q ⊙ (log(q/p) − KL(q ‖ p)) / τ, its gradient w.r.t. the student
    logits, in place as for fkl."""
    teacher_logprobs = _log_softmax_(teacher_logits, temperature)
    log_ratio = _log_softmax(student_logits, temperature)  # log q, then log(q/p)
    q = log_ratio.exp()
    log_ratio.sub_(teacher_logprobs).masked_fill_(q == 0, 0.0)
    del teacher_logprobs
    per_position = (q * log_ratio).sum(-1)
    grad = _softmax_gradient(q, log_ratio, per_position, weight / temperature, rows) if needs_grad else None
    return _weighted_sum(per_position, rows), grad


def _jsd_and_gradient(teacher_logits, student_logits, temperature, weight, needs_grad: bool, rows, beta: float):
    """Generalized JSD for 0 < β < 1: Σ rows · (β·KL(p ‖ m) + (1−β)·KL(q ‖ m)), m = β·p + (1−β)·q, and its
    gradient w.r.t. the student logits, weight × rows × (1−β)/τ · q ⊙ (log(q/m) − KL(q ‖ m)) (the m-terms of
    ∂/∂q cancel: ∂JSD/∂q_i = (1−β)·log(q_i/m_i)). Half the [chunk, V] buffers and passes of autograd."""
    log_p = _log_softmax_(teacher_logits, temperature)
    log_q = _log_softmax(student_logits, temperature)
    log_m = log_q + math.log(1.0 - beta)
    torch.logaddexp(log_p + math.log(beta), log_m, out=log_m)
    p = log_p.exp()
    p_terms = log_p.sub_(log_m).masked_fill_(p == 0, 0.0).mul_(p).sum(-1)  # KL(p ‖ m) per position
    del p, log_p  # before q exists: one [chunk, V] buffer fewer at the peak
    q = log_q.exp()
    log_q_over_m = log_q.sub_(log_m).masked_fill_(q == 0, 0.0)
    del log_m
    q_terms = (q * log_q_over_m).sum(-1)  # KL(q ‖ m)
    per_position = beta * p_terms + (1.0 - beta) * q_terms
    grad = None
    if needs_grad:
        grad = _softmax_gradient(q, log_q_over_m, q_terms, (1.0 - beta) * weight / temperature, rows)
    return _weighted_sum(per_position, rows), grad


def _softmax_gradient(q, log_ratio, expected, scale, rows):
    """scale × rows × q ⊙ (log_ratio − expected): the gradient w.r.t. the logits z of Σ q·log_ratio whose
    ∂/∂q is log_ratio (+ a constant), through q = softmax(z/τ) (τ inside `scale`); written into `log_ratio`."""
    scale = scale if rows is None else scale * rows.unsqueeze(1)
    return log_ratio.sub_(expected.unsqueeze(1)).mul_(q).mul_(scale)


def _weighted_sum(per_position, rows):
    return per_position.sum() if rows is None else (per_position * rows).sum()


def _cross_entropy_and_gradient(logits, labels, weight: float, needs_grad: bool):
    """Σ CE over rows whose label is not -100, and weight × its gradient (softmax − one-hot; 0 on ignored rows)."""
    counted = labels != IGNORE_INDEX
    targets = labels.masked_fill(~counted, 0).unsqueeze(1)
    log_normaliser = torch.logsumexp(logits, dim=-1)
    ce = torch.where(counted, log_normaliser - logits.gather(1, targets).squeeze(1), 0.0).sum()
    grad = None
    if needs_grad:
        grad = (logits - log_normaliser.unsqueeze(1)).exp_()
        grad.scatter_add_(1, targets, torch.full_like(targets, -1.0, dtype=grad.dtype))
        grad.mul_((counted * weight).unsqueeze(1).to(grad.dtype))
    return ce, grad


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _log_softmax_(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / τ) written into `logits` (one [chunk, V] buffer fewer than the out-of-place one)."""
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
