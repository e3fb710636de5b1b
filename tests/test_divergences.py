import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmdistill.divergences import DIVERGENCES, divergence_per_position, validate_divergence

NAMES = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl"]
# Non-default values, so the tests also catch parameters that are not passed through.
PARAMS = {"beta": 0.3, "skew_alpha": 0.2, "akl_mu": 0.4}


# ---------------------------------------------------------------- references (float64, probability space)


def ref_kl(a, b):
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def ref_akl_weights(p, q, mu):
    """(head weight, tail weight) per row, by walking the sorted teacher probabilities."""
    weights = []
    for p_row, q_row in zip(p.tolist(), q.tolist()):
        cumulative, head_gap, tail_gap = 0.0, 0.0, 0.0
        for p_i, q_i in sorted(zip(p_row, q_row)):
            cumulative += p_i
            if cumulative <= mu:
                tail_gap += abs(p_i - q_i)
            else:
                head_gap += abs(p_i - q_i)
        total = head_gap + tail_gap
        weights.append((head_gap / total, tail_gap / total) if total > 0 else (0.0, 0.0))
    return torch.tensor(weights, dtype=torch.float64).unbind(-1)


def ref_divergence(p, q, name, beta, skew_alpha, akl_mu):
    if name == "fkl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if name == "skl":
        return ref_kl(p, skew_alpha * p + (1 - skew_alpha) * q)
    if name == "srkl":
        return ref_kl(q, (1 - skew_alpha) * p + skew_alpha * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":
        head_weight, tail_weight = ref_akl_weights(p, q, akl_mu)
        return head_weight * ref_kl(p, q) + tail_weight * ref_kl(q, p)
    raise AssertionError(name)


def reference(teacher_logits, student_logits, name, temperature=1.0, **params):
    """Reference value [N] and gradient of its sum w.r.t. the student logits, in float64."""
    params = {**PARAMS, **params}
    student = student_logits.detach().double().requires_grad_(True)
    p = torch.softmax(teacher_logits.detach().double() / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    value = ref_divergence(p, q, name, **params)
    value.sum().backward()
    return value.detach(), student.grad


def ours(teacher_logits, student_logits, name, temperature=1.0, **params):
    """Our value [N] and gradient of its sum w.r.t. the student logits."""
    params = {**PARAMS, **params}
    student = student_logits.detach().clone().requires_grad_(True)
    value = divergence_per_position(teacher_logits, student, name, temperature, **params)
    value.sum().backward()
    return value.detach(), student.grad


def random_logits(n, v, scale=3.0, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, v, generator=generator) * scale
    student = torch.randn(n, v, generator=generator) * scale
    return teacher.to(dtype), student.to(dtype)


def test_registry_has_exactly_the_documented_names():
    assert list(DIVERGENCES) == NAMES


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("vocab", [2, 37, 256])
def test_value_and_gradient_match_reference(name, temperature, vocab):
    teacher, student = random_logits(6, vocab, seed=vocab)
    value, grad = ours(teacher, student, name, temperature)
    ref_value, ref_grad = reference(teacher, student, name, temperature)
    assert value.shape == (6,) and value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_fp32_matching_upcast_reference(name, dtype):
    teacher, student = random_logits(5, 37, seed=1, dtype=dtype)
    value, grad = ours(teacher, student, name, temperature=2.0)
    ref_value, ref_grad = reference(teacher, student, name, temperature=2.0)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-5)
    # The gradient comes back in the input dtype, so it carries that dtype's rounding.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_selected_rows_sum_to_reference_sum_over_those_rows(name):
    teacher, student = random_logits(10, 37, seed=2)
    selected = torch.tensor([True, False, False, True, True, False, True, False, True, True])
    value, _ = ours(teacher[selected], student[selected], name)
    ref_value, _ = reference(teacher, student, name)
    torch.testing.assert_close(value.sum().double(), ref_value[selected].sum(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- -inf (masked vocabulary) logits

MASKED_COLUMNS = [1, 4, 7]
# Which divergences are +inf when only one model gives an entry zero probability.
INFINITE = {"teacher_only": {"rkl", "akl"}, "both": set(), "student_only": {"fkl", "akl"}}


def masked_logits(where):
    teacher, student = random_logits(4, 11, seed=3)
    if where in ("teacher_only", "both"):
        teacher[:, MASKED_COLUMNS] = float("-inf")
    if where in ("student_only", "both"):
        student[:, MASKED_COLUMNS] = float("-inf")
    return teacher, student


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", ["teacher_only", "both", "student_only"])
def test_minus_inf_logits_give_no_nan(name, where):
    teacher, student = masked_logits(where)
    value, grad = ours(teacher, student, name)
    assert not value.isnan().any()
    if name in INFINITE[where]:
        assert (value == math.inf).all()
        return
    ref_value, _ = reference(teacher, student, name)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    assert grad.isfinite().all()
    if where != "teacher_only":
        assert (grad[:, MASKED_COLUMNS] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_with_masked_entries_in_both_models_match_reference_without_them(name):
    teacher, student = masked_logits("both")
    kept = [column for column in range(teacher.shape[1]) if column not in MASKED_COLUMNS]
    _, grad = ours(teacher, student, name)
    _, ref_grad = reference(teacher[:, kept], student[:, kept], name)
    torch.testing.assert_close(grad[:, kept].double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(NAMES) - INFINITE["teacher_only"]))
def test_gradients_with_teacher_only_masked_entries_match_reference(name):
    teacher, student = masked_logits("teacher_only")
    _, grad = ours(teacher, student, name)
    _, ref_grad = reference(teacher, student, name)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- special cases


@pytest.mark.parametrize(("beta", "equivalent"), [(0.0, "fkl"), (1.0, "rkl")])
def test_jsd_endpoints_are_exactly_fkl_and_rkl(beta, equivalent):
    teacher, student = random_logits(4, 37, seed=4)
    jsd = divergence_per_position(teacher, student, "jsd", beta=beta)
    assert torch.equal(jsd, divergence_per_position(teacher, student, equivalent))


@pytest.mark.parametrize("name", ["skl", "srkl"])
def test_skew_kl_stays_finite_where_naive_mixture_underflows(name):
    # Gaps of ~1e4 in the logits make every probability but one per row exactly 0 in fp32.
    teacher, student = random_logits(4, 9, scale=1e4, seed=5)
    alpha = PARAMS["skew_alpha"]
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    if name == "skl":
        naive = (p * (p.log() - (alpha * p + (1 - alpha) * q).log())).sum(-1)
    else:
        naive = (q * (q.log() - ((1 - alpha) * p + alpha * q).log())).sum(-1)
    assert not naive.isfinite().all()

    value, grad = ours(teacher, student, name)
    log_p, log_q = torch.log_softmax(teacher.double(), -1), torch.log_softmax(student.double(), -1)
    if name == "skl":
        log_weight, log_mixture = log_p, torch.logaddexp(math.log(alpha) + log_p, math.log(1 - alpha) + log_q)
    else:
        log_weight, log_mixture = log_q, torch.logaddexp(math.log(1 - alpha) + log_p, math.log(alpha) + log_q)
    ref_value = (log_weight.exp() * (log_weight - log_mixture)).sum(-1)
    assert value.isfinite().all() and grad.isfinite().all()
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("p", "q", "akl_mu", "head_weight"),
    [
        # p ascending 0.1, 0.2 | 0.3, 0.4 with gaps 0, 0.1 | 0.2, 0.3: tail gap 0.1, head gap 0.5.
        ([0.3, 0.1, 0.4, 0.2], [0.1, 0.1, 0.7, 0.1], 0.5, 5 / 6),
        # Only p = 0.1 (gap 0) is in the tail, so all weight goes to the head.
        ([0.3, 0.1, 0.4, 0.2], [0.1, 0.1, 0.7, 0.1], 0.25, 1.0),
        # Cumulative p hits mu exactly (0.25, 0.5 | 1.0, all exact in fp32): "<=" puts both
        # 0.25 entries (gaps 0, 0.375) in the tail; the head gap is 0.375.
        ([0.25, 0.25, 0.5], [0.25, 0.625, 0.125], 0.5, 0.5),
    ],
)
def test_akl_hand_computed_example(p, q, akl_mu, head_weight):
    fkl = sum(p_i * math.log(p_i / q_i) for p_i, q_i in zip(p, q))
    rkl = sum(q_i * math.log(q_i / p_i) for p_i, q_i in zip(p, q))
    expected = head_weight * fkl + (1 - head_weight) * rkl
    teacher, student = torch.tensor([p]).log(), torch.tensor([q]).log()
    value = divergence_per_position(teacher, student, "akl", akl_mu=akl_mu)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_akl_drops_an_infinite_kl_whose_weight_is_zero():
    # The student rules out a tail entry (fkl = inf) but matches the head exactly, so the
    # head weight is 0 and akl is the finite rkl = 0.2 * log(0.2 / 0.1).
    teacher = torch.tensor([[0.1, 0.1, 0.8]]).log()
    student = torch.tensor([[0.0, 0.2, 0.8]]).log()
    value, grad = ours(teacher, student, "akl", akl_mu=0.5)
    assert value.item() == pytest.approx(0.2 * math.log(2), rel=1e-5)
    assert grad.isfinite().all()


def test_akl_gradient_is_that_of_the_weighted_sum_with_detached_weights():
    teacher, student = random_logits(6, 37, seed=6)
    mu = PARAMS["akl_mu"]
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    head_weight, tail_weight = (weight.float() for weight in ref_akl_weights(p, q, mu))

    student_for_akl = student.clone().requires_grad_(True)
    divergence_per_position(teacher, student_for_akl, "akl", akl_mu=mu).sum().backward()
    student_for_sum = student.clone().requires_grad_(True)
    fkl = divergence_per_position(teacher, student_for_sum, "fkl")
    rkl = divergence_per_position(teacher, student_for_sum, "rkl")
    (head_weight * fkl + tail_weight * rkl).sum().backward()
    torch.testing.assert_close(student_for_akl.grad, student_for_sum.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_student_equals_teacher(name):
    teacher, _ = random_logits(5, 37, seed=7)
    value = divergence_per_position(teacher, teacher.clone(), name, **PARAMS)
    assert (value >= -1e-6).all() and (value <= 1e-6).all()


def test_tvd_is_between_zero_and_one():
    teacher, student = random_logits(50, 37, scale=20.0, seed=8)
    value = divergence_per_position(teacher, student, "tvd")
    assert (value >= 0).all() and (value <= 1 + 1e-6).all()
    assert value.max() > 0.9  # the large scale makes some rows nearly disjoint


# ---------------------------------------------------------------- validation


def test_unknown_name_lists_the_valid_ones():
    message = "unknown divergence 'kll': choose one of fkl, rkl, jsd, skl, srkl, tvd, akl"
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_divergence("kll")
    teacher, student = random_logits(2, 5)
    with pytest.raises(ValueError, match=re.escape(message)):
        divergence_per_position(teacher, student, "kll")


@pytest.mark.parametrize(
    ("bad_params", "message"),
    [
        ({"beta": 1.5}, "beta must be in [0, 1]"),
        ({"beta": -0.1}, "beta must be in [0, 1]"),
        ({"beta": math.nan}, "beta must be in [0, 1]"),
        ({"skew_alpha": 1.1}, "skew_alpha must be in [0, 1]"),
        ({"skew_alpha": -1e-3}, "skew_alpha must be in [0, 1]"),
        ({"akl_mu": 0.0}, "akl_mu must be in (0, 1)"),
        ({"akl_mu": 1.0}, "akl_mu must be in (0, 1)"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
    ],
)
def test_invalid_params_raise_with_parameter_and_range(bad_params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_divergence("fkl", **bad_params)
    teacher, student = random_logits(2, 5)
    with pytest.raises(ValueError, match=re.escape(message)):
        divergence_per_position(teacher, student, "fkl", **bad_params)


def test_boundary_params_are_valid():
    validate_divergence("jsd", beta=0.0, skew_alpha=0.0, akl_mu=0.5, temperature=1e-3)
    validate_divergence("jsd", beta=1.0, skew_alpha=1.0, akl_mu=0.99, temperature=100.0)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        divergence_per_position(torch.zeros(2, 5), torch.zeros(2, 6))


# ---------------------------------------------------------------- property test


@st.composite
def logit_pairs(draw):
    rows, vocab = draw(st.integers(1, 3)), draw(st.integers(2, 12))
    finite = st.floats(-30.0, 30.0, allow_nan=False, allow_infinity=False, width=32)
    values = draw(st.lists(finite, min_size=2 * rows * vocab, max_size=2 * rows * vocab))
    teacher, student = torch.tensor(values).view(2, rows, vocab)
    return teacher, student


@settings(max_examples=30, deadline=None)
@given(
    logits=logit_pairs(),
    temperature=st.floats(0.25, 4.0),
    beta=st.floats(0.0, 1.0),
    skew_alpha=st.floats(0.0, 1.0),
    akl_mu=st.floats(0.01, 0.99),
)
def test_all_divergences_finite_and_nonnegative(logits, temperature, beta, skew_alpha, akl_mu):
    teacher, student = logits
    for name in NAMES:
        value = divergence_per_position(
            teacher, student, name, temperature, beta=beta, skew_alpha=skew_alpha, akl_mu=akl_mu
        )
        assert value.isfinite().all(), name
        assert (value >= -1e-5).all(), name
