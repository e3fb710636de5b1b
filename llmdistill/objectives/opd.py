"""Sampled-token on-policy distillation (OPD): a policy-gradient update on the tokens the student sampled, with the
teacher's log-probability of each token as the reward.

For each response token y_t, both models' log-probabilities at the rollout temperature τ (the teacher is scored at
the temperature the student sampled at): log q_t = log softmax(z_S/τ)[y_t], log p_t = log softmax(z_T/τ)[y_t]. The
per-token advantage is A_t = log p_t − log q_t, so the KD term is

    k1:  Σ_t sg(log q_t − log p_t) · log q_t          gradient Σ_t k1_t ∇log q_t, unbiased for ∇ KL(q ‖ p)
    k3:  Σ_t sg(1 − r_t) · log q_t,  r_t = p_t / q_t   the gradient of Σ_t k3_t, k3_t = r_t − 1 − log r_t

(sg: no gradient). k1 is the reverse-KL policy gradient of the OPD recipe; k3 is the low-variance KL estimator
differentiated as a loss, whose gradient is unbiased for ∇ KL(p ‖ q) instead
(E_q[(1 − p/q) ∇log q] = −Σ p ∇log q).
The KD term's value is the estimator's, Σ_t k1_t or Σ_t k3_t (both unbiased for KL(q ‖ p) on student samples), and
its gradient the surrogate's above. Only the student's head rows both heads have are compared.
"""

from __future__ import annotations

import torch

from ..losses import chunk_sum_with_gradients, default_chunk_size, distill_loss_from_hidden
from ..models import LMHead
from .output import ObjectiveOutput

ESTIMATORS = ("k1", "k3")


class SampledTokenOPD:
    cross_tokenizer = False
    projectors = None

    def __init__(self, config, student=None, teacher=None, bridge=None):
        self.estimator = config.opd_estimator
        self.temperature = config.generation_temperature or 1.0  # greedy rollouts: the models' own distributions
        self.chunk_size = config.loss_chunk_size

    def __call__(self, student_hidden: torch.Tensor, student_head: LMHead, teacher_hidden: torch.Tensor,
                 teacher_head: LMHead, labels: torch.Tensor, ce_weight, kd_weight, on_policy: bool = False
                 ) -> ObjectiveOutput:
        """`labels` are the sampled tokens on generated responses (`on_policy`); on other batches (a mixed source's
        dataset draws, replays) the same estimator runs on their tokens, an off-policy estimate."""
        rows = min(student_head.weight.shape[0], teacher_head.weight.shape[0])
        chunk = self.chunk_size or default_chunk_size(rows, student_hidden.device)
        with torch.no_grad():
            teacher_logprobs = torch.cat([
                self._token_logprobs(teacher_hidden[part], teacher_head, labels[part], rows)
                for part in (slice(start, start + chunk) for start in range(0, len(labels), chunk))
            ])

        def chunk_kd(hidden, tokens, teacher_logprob):
            """Σ over the chunk of the estimator's value, with the surrogate's gradient (see the module docstring)."""
            log_q = self._token_logprobs(hidden, student_head, tokens, rows)
            values, weights = self.token_terms(log_q.detach() - teacher_logprob)
            surrogate = (weights * log_q).sum()
            return values.sum() + (surrogate - surrogate.detach())

        kd = chunk_sum_with_gradients(
            chunk_kd, student_hidden, labels, teacher_logprobs, params=student_head.params(), chunk_size=chunk
        )
        loss, ce = kd_weight * kd, kd.new_zeros(())
        if not _is_zero(ce_weight):  # gold batches: CE on the dataset's responses, as every objective adds it
            sums = distill_loss_from_hidden(student_hidden, student_head, labels=labels, ce_weight=ce_weight,
                                            chunk_size=self.chunk_size)
            loss, ce = loss + sums.loss, sums.ce
        return ObjectiveOutput(loss, ce, kd.detach(), {})

    def token_terms(self, log_ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From log q − log p per token (= k1), (the estimator's value, the weight of log q_t in the surrogate)."""
        if self.estimator == "k1":
            return log_ratio, log_ratio
        ratio = torch.exp(-log_ratio)  # r = p / q
        return ratio - 1 + log_ratio, 1 - ratio

    def _token_logprobs(self, hidden: torch.Tensor, head: LMHead, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        """[n] log softmax(head(hidden) / τ)[tokens] over the first `rows` ids."""
        logits = head.logits(hidden, rows).float() / self.temperature
        return logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def _is_zero(weight) -> bool:
    return not torch.is_tensor(weight) and weight == 0
