"""Sampled-token on-policy distillation (objective `opd`): values and gradients against the plain per-token formulas,
and a run end to end on the student's own samples."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from llmdistill.models import LMHead
from llmdistill.objectives.opd import SampledTokenOPD

from conftest import assert_same_loss_and_gradients

N, D_STUDENT, D_TEACHER, VOCAB = 11, 6, 8, 23


def plain_opd(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens, estimator, temperature):
    """(KD term, its value) from full logits over the ids both heads have, token by token: the estimator's value
    with the surrogate's gradient."""
    rows = min(len(student_weight), len(teacher_weight))
    log_q = (student_hidden @ student_weight[:rows].T / temperature).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    log_p = (teacher_hidden @ teacher_weight[:rows].T / temperature).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    if estimator == "k1":
        k1 = (log_q - log_p).sum()
        surrogate = ((log_q - log_p).detach() * log_q).sum()
        return k1.detach() + surrogate - surrogate.detach(), k1
    k3 = (torch.exp(log_p - log_q) - 1 - (log_p - log_q)).sum()  # differentiated through log q as a whole
    return k3, k3


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_opd_equals_the_plain_per_token_formula(estimator, chunk_size):
    generator = torch.Generator().manual_seed(0)
    student_weight = torch.randn(VOCAB + 2, D_STUDENT, generator=generator).requires_grad_()  # padded head
    teacher_weight = torch.randn(VOCAB, D_TEACHER, generator=generator)
    student_hidden = torch.randn(N, D_STUDENT, generator=generator).requires_grad_()
    teacher_hidden = torch.randn(N, D_TEACHER, generator=generator)
    tokens = torch.randint(0, VOCAB, (N,), generator=generator)
    config = SimpleNamespace(opd_estimator=estimator, generation_temperature=0.7, loss_chunk_size=chunk_size)
    output = SampledTokenOPD(config)(
        student_hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight), tokens, ce_weight=0.0,
        kd_weight=0.25, on_policy=True,
    )
    surrogate, value = plain_opd(student_hidden, student_weight, teacher_hidden, teacher_weight, tokens, estimator,
                                 0.7)
    torch.testing.assert_close(output.kd, value.detach(), rtol=1e-5, atol=1e-6)
    assert_same_loss_and_gradients(output.loss, 0.25 * surrogate, [student_hidden, student_weight])


def test_the_k1_update_is_the_reverse_kl_gradient_in_expectation():
    """Over every token a position can sample, weighted by its probability, the k1 surrogate's gradient is exactly
    ∇ KL(q ‖ p): the policy gradient OPD follows."""
    generator = torch.Generator().manual_seed(1)
    student_weight = torch.randn(VOCAB, D_STUDENT, generator=generator).requires_grad_()
    teacher_weight = torch.randn(VOCAB, D_TEACHER, generator=generator)
    hidden = torch.randn(1, D_STUDENT, generator=generator)
    teacher_hidden = torch.randn(1, D_TEACHER, generator=generator)
    q = (hidden @ student_weight.T).softmax(-1)[0].detach()
    config = SimpleNamespace(opd_estimator="k1", generation_temperature=1.0, loss_chunk_size=None)
    expected_gradient = sum(
        q[token] * torch.autograd.grad(SampledTokenOPD(config)(
            hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight), torch.tensor([token]), 0.0, 1.0,
        ).loss, student_weight)[0]
        for token in range(VOCAB)
    )
    log_q = (hidden @ student_weight.T).log_softmax(-1)
    log_p = (teacher_hidden @ teacher_weight.T).log_softmax(-1)
    reverse_kl = (log_q.exp() * (log_q - log_p)).sum()
    torch.testing.assert_close(expected_gradient, torch.autograd.grad(reverse_kl, student_weight)[0], rtol=1e-4,
                               atol=1e-6)


def test_opd_trains_on_the_students_own_samples(tmp_path, tokenizer, examples):
    from test_sources import make_trainer

    trainer = make_trainer(tmp_path, tokenizer, examples, objective="opd", source="student", max_new_tokens=8,
                           max_steps=2, logging_steps=1, learning_rate=1e-3, opd_estimator="k3")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    for logged in trainer.state.log_history[:2]:
        assert math.isfinite(logged["kd"]) and logged["kd"] >= 0  # k3 is never negative
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
