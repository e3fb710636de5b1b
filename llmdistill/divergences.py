"""Per-position divergences D(teacher ‖ student) between next-token distributions.

Every function in ``DIVERGENCES`` takes fp32 log-probabilities ``[..., V]`` of the
teacher (p) and the student (q) and returns one value per position ``[...]``.
Vocabulary entries may be masked out with -inf logits; values and gradients stay
NaN-free wherever the divergence is mathematically finite.
"""

import inspect
import math
from collections.abc import Callable

import torch

_NEG_INF = float("-inf")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ p (log p − log q), with 0 · anything = 0."""
    p = log_p.exp()
    # Where p == 0 the difference can be -inf - (-inf) = NaN; masked_fill (unlike
    # torch.where) also sends a zero gradient, so the NaN never reaches backward.
    log_ratio = (log_p - log_q).masked_fill(p == 0, 0.0)
    return (p * log_ratio).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w · p + (1 − w) · q), computed in log space so it cannot underflow."""
    if weight_p == 0.0:
        return log_q
    if weight_p == 1.0:
        return log_p
    # logaddexp's gradient is NaN where both inputs are -inf. Such entries have
    # p = q = 0, so no KL term reads them: making one input finite is enough.
    both_zero = (log_p == _NEG_INF) & (log_q == _NEG_INF)
    log_q = log_q.masked_fill(both_zero, 0.0)
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log(1.0 - weight_p))


def _weighted(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight · value, taking 0 · inf as 0 (a KL term with zero weight drops out)."""
    return (weight * value).masked_fill(weight == 0, 0.0)


def forward_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    return _kl(teacher_logprobs, student_logprobs)


def reverse_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    return _kl(student_logprobs, teacher_logprobs)


def jensen_shannon(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q; β=0 is fkl and β=1 is rkl."""
    if beta == 0.0:
        return forward_kl(teacher_logprobs, student_logprobs)
    if beta == 1.0:
        return reverse_kl(teacher_logprobs, student_logprobs)
    log_mixture = _log_mixture(teacher_logprobs, student_logprobs, beta)
    return beta * _kl(teacher_logprobs, log_mixture) + (1.0 - beta) * _kl(student_logprobs, log_mixture)


def skew_forward_kl(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, skew_alpha: float = 0.1
) -> torch.Tensor:
    """KL(p ‖ α·p + (1−α)·q)."""
    log_mixture = _log_mixture(teacher_logprobs, student_logprobs, skew_alpha)
    return _kl(teacher_logprobs, log_mixture)


def skew_reverse_kl(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, skew_alpha: float = 0.1
) -> torch.Tensor:
    """KL(q ‖ (1−α)·p + α·q)."""
    log_mixture = _log_mixture(teacher_logprobs, student_logprobs, 1.0 - skew_alpha)
    return _kl(student_logprobs, log_mixture)


def total_variation(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


def _adaptive_kl_weights(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, akl_mu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (head weight, tail weight) of adaptive KL; both 0 when p == q."""
    with torch.no_grad():
        p_ascending, order = teacher_logprobs.exp().sort(dim=-1, stable=True)
        q_in_same_order = student_logprobs.exp().gather(-1, order)
        gap = (p_ascending - q_in_same_order).abs()
        in_tail = p_ascending.cumsum(-1) <= akl_mu
        tail_gap = gap.masked_fill(~in_tail, 0.0).sum(-1)
        head_gap = gap.masked_fill(in_tail, 0.0).sum(-1)
        total_gap = (head_gap + tail_gap).clamp_min(torch.finfo(gap.dtype).tiny)
        return head_gap / total_gap, tail_gap / total_gap


def adaptive_kl(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, akl_mu: float = 0.5
) -> torch.Tensor:
    """Head-gap-weighted fkl plus tail-gap-weighted rkl (weights carry no gradient)."""
    head_weight, tail_weight = _adaptive_kl_weights(teacher_logprobs, student_logprobs, akl_mu)
    return _weighted(head_weight, forward_kl(teacher_logprobs, student_logprobs)) + _weighted(
        tail_weight, reverse_kl(teacher_logprobs, student_logprobs)
    )


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jensen_shannon,
    "skl": skew_forward_kl,
    "srkl": skew_reverse_kl,
    "tvd": total_variation,
    "akl": adaptive_kl,
}
# Names other tools and papers use, for the suggestion on an unknown divergence.
DIVERGENCE_ALIASES = {
    "kl": "fkl", "forward_kl": "fkl", "reverse_kl": "rkl", "js": "jsd", "generalized_jsd": "jsd", "sfkl": "skl",
    "skew_kl": "skl", "skew_forward_kl": "skl", "skew_rkl": "srkl", "skew_reverse_kl": "srkl", "tv": "tvd",
    "adaptive_kl": "akl",
}


def validate_divergence(
    name: str = "fkl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    akl_mu: float = 0.5,
    temperature: float = 1.0,
) -> None:
    """Raise ValueError for an unknown name or an out-of-range parameter.

    All parameters are checked whichever divergence is named, so a bad value in a
    config fails early even if it is unused.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}: choose one of {', '.join(DIVERGENCES)}")
    # Written as positive range checks so that NaN fails them too.
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew_alpha <= 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1], got {skew_alpha}")
    if not 0.0 < akl_mu < 1.0:
        raise ValueError(f"akl_mu must be in (0, 1), got {akl_mu}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def divergence_per_position(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    name: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    akl_mu: float = 0.5,
) -> torch.Tensor:
    """D(teacher ‖ student) at each position: ``[N, V]`` logits of any float dtype -> ``[N]`` fp32."""
    validate_divergence(name, beta, skew_alpha, akl_mu, temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits and student_logits must have the same shape, "
            f"got {tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    teacher_logprobs = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_logprobs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return divergence_from_logprobs(teacher_logprobs, student_logprobs, name, beta, skew_alpha, akl_mu)


def divergence_from_logprobs(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    name: str = "fkl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    akl_mu: float = 0.5,
) -> torch.Tensor:
    """The named divergence per position, passing it only the parameters it takes (inputs are not validated)."""
    divergence = DIVERGENCES[name]
    params = {"beta": beta, "skew_alpha": skew_alpha, "akl_mu": akl_mu}
    accepted = inspect.signature(divergence).parameters
    relevant = {key: value for key, value in params.items() if key in accepted}
    return divergence(teacher_logprobs, student_logprobs, **relevant)
