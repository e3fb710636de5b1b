"""The chunked loss equals the plain full-logit computation (values and gradients) and never builds [N, V]."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmdistill.divergences import divergence_per_position
from llmdistill import losses
from llmdistill.losses import chunk_sum_with_gradients, default_chunk_size, distill_loss_from_hidden, kd_loss_from_hidden
from llmdistill.models import LMHead

from conftest import assert_same_loss_and_gradients

NAMES = ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl"]
PARAMS = {"beta": 0.3, "skew_alpha": 0.2, "akl_mu": 0.4}  # non-default, so dropped parameters are caught
N, D_STUDENT, D_TEACHER, VOCAB = 53, 24, 40, 211  # N prime, V prime: no chunk size divides either


def make_inputs(n=N, vocab_student=VOCAB, vocab_teacher=VOCAB, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    student_hidden = randn(n, D_STUDENT).requires_grad_()
    student_weight = (randn(vocab_student, D_STUDENT) / 2).requires_grad_()
    teacher_hidden = randn(n, D_TEACHER)
    teacher_weight = randn(vocab_teacher, D_TEACHER) / 2
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def full_logit_kd(student_hidden, student_head, teacher_hidden, teacher_head, name, temperature, **params):
    """The obvious computation: both [N, V] logit tensors, then the divergence per position, summed."""
    shared = min(student_head.weight.shape[0], teacher_head.weight.shape[0])
    student_logits = student_head.logits(student_hidden)[:, :shared]
    teacher_logits = teacher_head.logits(teacher_hidden)[:, :shared]
    return divergence_per_position(teacher_logits, student_logits, name, temperature, **params).sum()


def assert_relatively_close(ours, reference, rel=1e-5):
    """Largest deviation within `rel` of the reference's largest magnitude."""
    scale = reference.detach().abs().max().clamp_min(1e-30)
    error = (ours.detach() - reference.detach()).abs().max()
    assert error <= rel * scale, f"max error {error.item():.3g} > {rel} × {scale.item():.3g}"


def grads(value, tensors):
    return torch.autograd.grad(value, tensors)


def assert_same_gradients(ours, reference, tensors, rel=1e-5):
    for mine, theirs in zip(grads(ours, tensors), grads(reference, tensors), strict=True):
        assert torch.isfinite(mine).all()
        assert_relatively_close(mine, theirs, rel)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_loss_and_gradients_equal_the_full_logit_reference(name, temperature, chunk_size):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    ours, count = kd_loss_from_hidden(
        student_hidden, student_weight, teacher_hidden, teacher_weight, name, temperature, chunk_size, **PARAMS
    )
    reference = full_logit_kd(
        student_hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight), name, temperature, **PARAMS
    )
    assert count == N
    assert_relatively_close(ours, reference)
    assert_same_gradients(ours, reference, (student_hidden, student_weight))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])  # the closed forms: fkl at 0, rkl at 1, JSD between
def test_generalized_jsd_closed_form_equals_the_full_logit_reference_for_every_beta(beta):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    ours, _ = kd_loss_from_hidden(
        student_hidden, student_weight, teacher_hidden, teacher_weight, "jsd", 1.5, 7, beta=beta
    )
    reference = full_logit_kd(
        student_hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight), "jsd", 1.5, beta=beta
    )
    assert_relatively_close(ours, reference)
    assert_same_gradients(ours, reference, (student_hidden, student_weight))


@pytest.mark.parametrize("name", ["fkl", "skl"])  # a closed-form gradient and the autograd one
@pytest.mark.parametrize("extra_teacher_rows, extra_student_rows", [(9, 0), (0, 9)])
def test_padded_vocabulary_kd_alone_compares_the_shared_ids(name, extra_teacher_rows, extra_student_rows):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(
        vocab_student=VOCAB + extra_student_rows, vocab_teacher=VOCAB + extra_teacher_rows
    )
    ours, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, name, 2.0, 10)
    reference = full_logit_kd(
        student_hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight), name, 2.0
    )
    assert_relatively_close(ours, reference)
    assert_same_gradients(ours, reference, (student_hidden, student_weight))


@pytest.mark.parametrize("extra_teacher_rows, extra_student_rows", [(9, 0), (0, 9)])
def test_padded_vocabulary_compares_the_shared_ids_and_trains_all_student_rows_with_ce(
    extra_teacher_rows, extra_student_rows
):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(
        vocab_student=VOCAB + extra_student_rows, vocab_teacher=VOCAB + extra_teacher_rows
    )
    labels = torch.randint(0, VOCAB + extra_student_rows, (N,), generator=torch.Generator().manual_seed(1))
    sums = distill_loss_from_hidden(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kd_weight=0.3, ce_weight=0.7,
        chunk_size=10,
    )
    kd = full_logit_kd(student_hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight), "fkl", 1.0)
    ce = F.cross_entropy(student_hidden @ student_weight.T, labels, reduction="sum")
    reference = 0.3 * kd + 0.7 * ce
    assert_relatively_close(sums.loss, reference)
    assert_relatively_close(sums.kd, kd)
    assert_relatively_close(sums.ce, ce)
    assert_same_gradients(sums.loss, reference, (student_hidden, student_weight))


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_bias_and_soft_capping_heads_match_the_reference(name):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    student_bias = torch.randn(VOCAB).requires_grad_()
    student_head = LMHead(student_weight, student_bias, softcap=3.0)
    teacher_head = LMHead(teacher_weight, torch.randn(VOCAB), softcap=5.0)
    ours, _ = kd_loss_from_hidden(student_hidden, student_head, teacher_hidden, teacher_head, name, 2.0, 13)
    reference = full_logit_kd(student_hidden, student_head, teacher_hidden, teacher_head, name, 2.0)
    assert_relatively_close(ours, reference)
    assert_same_gradients(ours, reference, (student_hidden, student_weight, student_bias))


def test_custom_backward_matches_finite_differences_in_float64():
    """Directional derivatives <grad, v> against central differences, for hidden states and head together."""
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(
        n=6, vocab_student=11, vocab_teacher=11, dtype=torch.float64
    )
    labels = torch.tensor([0, 3, 10, 2, -100, 7])

    def loss(hidden, weight):
        return distill_loss_from_hidden(
            hidden, weight, teacher_hidden, teacher_weight, labels, divergence="srkl", temperature=1.5, chunk_size=4,
            ce_weight=0.5, skew_alpha=0.3,
        ).loss

    hidden_grad, weight_grad = grads(loss(student_hidden, student_weight), (student_hidden, student_weight))
    generator, step = torch.Generator().manual_seed(5), 1e-6
    for _ in range(5):
        v_hidden = torch.randn(student_hidden.shape, generator=generator, dtype=torch.float64)
        v_weight = torch.randn(student_weight.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            ahead = loss(student_hidden + step * v_hidden, student_weight + step * v_weight)
            behind = loss(student_hidden - step * v_hidden, student_weight - step * v_weight)
        numerical = (ahead - behind) / (2 * step)
        analytical = (hidden_grad * v_hidden).sum() + (weight_grad * v_weight).sum()
        assert analytical.item() == pytest.approx(numerical.item(), rel=1e-6, abs=1e-9)


def test_fused_ce_and_kd_equal_the_separate_terms_and_count_top1_agreements():
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    labels = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(2))
    sums = distill_loss_from_hidden(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kd_weight=0.25, ce_weight=0.75,
        divergence="akl", temperature=2.0, chunk_size=11, akl_mu=0.4,
    )
    student_logits, teacher_logits = student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T
    kd = divergence_per_position(teacher_logits, student_logits, "akl", 2.0, akl_mu=0.4).sum()
    ce = F.cross_entropy(student_logits, labels, reduction="sum")
    assert_relatively_close(sums.loss, 0.25 * kd + 0.75 * ce)
    assert_relatively_close(sums.kd, kd)
    assert_relatively_close(sums.ce, ce)
    assert sums.top1_agreements.item() == (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum().item()
    assert not sums.kd.requires_grad and not sums.ce.requires_grad


def test_ce_only_without_a_teacher():
    student_hidden, student_weight, _, _ = make_inputs()
    labels = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(3))
    sums = distill_loss_from_hidden(student_hidden, student_weight, labels=labels, chunk_size=8)
    reference = F.cross_entropy(student_hidden @ student_weight.T, labels, reduction="sum")
    assert_relatively_close(sums.loss, reference)
    assert sums.kd.item() == 0 and sums.top1_agreements.item() == 0


def test_no_gradient_reaches_the_teacher():
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    teacher_hidden.requires_grad_()
    teacher_weight.requires_grad_()
    loss, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size=9)
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    assert student_hidden.grad is not None and student_weight.grad is not None


def test_gradients_scale_with_the_upstream_gradient_and_accumulate():
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    loss, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size=9)
    (once,) = grads(loss, (student_weight,))
    loss, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size=9)
    (3.0 * loss).backward()
    loss, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size=9)
    (-1.0 * loss).backward()
    assert_relatively_close(student_weight.grad, 2.0 * once)


def test_no_grad_values_equal_the_training_values_and_build_no_graph():
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight, "tvd")
    with_grad, _ = kd_loss_from_hidden(*inputs, chunk_size=5)
    with torch.no_grad():
        without, _ = kd_loss_from_hidden(*inputs, chunk_size=5)
    assert not without.requires_grad
    assert without.item() == pytest.approx(with_grad.item(), rel=1e-6)


def test_bfloat16_heads_are_upcast_per_chunk_and_return_bfloat16_gradients():
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(dtype=torch.bfloat16)
    ours, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size=16)
    assert ours.dtype == torch.float32
    hidden_grad, weight_grad = grads(ours, (student_hidden, student_weight))
    assert hidden_grad.dtype == weight_grad.dtype == torch.bfloat16
    as_fp32 = [t.detach().float().requires_grad_() for t in (student_hidden, student_weight)]
    reference = full_logit_kd(
        as_fp32[0], LMHead(as_fp32[1]), teacher_hidden.float(), LMHead(teacher_weight.float()), "fkl", 1.0
    )
    assert ours.item() == pytest.approx(reference.item(), rel=2e-2)
    assert_relatively_close(weight_grad.float(), grads(reference, as_fp32)[1], rel=2e-2)


def test_fp32_hidden_states_with_a_bfloat16_head_get_fp32_gradients():
    """Under mixed precision accelerate returns fp32 hidden states from a bf16 model."""
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    student_weight = student_weight.detach().bfloat16().requires_grad_()
    ours, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight.bfloat16())
    hidden_grad, weight_grad = grads(ours, (student_hidden, student_weight))
    assert hidden_grad.dtype == torch.float32 and weight_grad.dtype == torch.bfloat16
    assert torch.isfinite(hidden_grad).all() and torch.isfinite(weight_grad).all()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns (views of the heads included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_tensor_larger_than_one_chunk_of_logits_or_the_head_is_built():
    n, vocab, chunk = 512, 1031, 32
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(n, vocab, vocab)
    labels = torch.randint(0, vocab, (n,))
    with LargestTensor() as recorder:
        sums = distill_loss_from_hidden(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence="jsd", chunk_size=chunk
        )
        sums.loss.backward()
    assert recorder.largest <= max(chunk * vocab, student_weight.numel(), teacher_weight.numel())
    assert recorder.largest < n * vocab / 4


def test_default_chunk_size_takes_at_least_128_positions_and_within_that_16_mib_on_cpu_and_64_mib_on_accelerators():
    assert default_chunk_size(151936, "cpu") == 128
    assert default_chunk_size(32000, "cpu") == 128
    assert default_chunk_size(16000, "cpu") == 256
    assert default_chunk_size(151936, "cuda") == 128
    assert default_chunk_size(32000, "cuda") == 512
    assert default_chunk_size(512, "cpu") == 512
    assert default_chunk_size(10**9, "cpu") == 128
    for vocab in (512, 16000, 32000, 128256, 262144):
        for device, budget in (("cpu", 2**22), ("cuda", 2**24)):
            size = default_chunk_size(vocab, device)
            assert size % 16 == 0 and (size * vocab <= budget or size == 128)


def test_a_failing_compiler_names_the_switch_that_runs_the_loss_eagerly(monkeypatch):
    def broken_compile(function):
        def run(*args):
            raise ImportError("no working triton")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    losses._compiled_terms.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="ImportError.*LLMDISTILL_COMPILE=0"):
            losses._compiled_terms()(torch.zeros(2, 3), None, None, 1.0, 1.0, 1.0, None, None, False)
    finally:
        losses._compiled_terms.cache_clear()


def test_the_environment_switch_turns_compilation_off(monkeypatch):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    spec = losses._spec(
        student_hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight), None, 1.0, 1.0, "fkl", 1.0,
        None, {},
    )
    cuda = torch.device("cuda")
    assert spec.chunk_terms(torch.device("cpu")) is losses._terms
    assert spec.chunk_terms(cuda) is not losses._terms
    monkeypatch.setenv("LLMDISTILL_COMPILE", "0")
    assert spec.chunk_terms(cuda) is losses._terms


def test_a_second_backward_through_one_loss_is_a_clear_error():
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    loss, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="compute the loss again"):
        loss.backward()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"student_hidden": torch.zeros(N, D_STUDENT + 1)}, "student_hidden must be"),
        ({"teacher_hidden": torch.zeros(N - 1, D_TEACHER)}, "teacher_hidden must be"),
        ({"teacher_hidden": None}, "together"),
        ({"chunk_size": 0}, "chunk_size must be"),
        ({"divergence": "kl"}, "unknown divergence"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"beta": 2.0}, "beta must be"),
        ({"gamma": 1.0}, "unknown divergence parameter"),
        ({"labels": torch.zeros(N + 1, dtype=torch.long)}, "labels must be"),
    ],
)
def test_bad_input_is_named(change, message):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    arguments = {
        "student_hidden": student_hidden,
        "student_head": student_weight,
        "teacher_hidden": teacher_hidden,
        "teacher_head": teacher_weight,
    } | change
    with pytest.raises((ValueError, TypeError), match=message):
        distill_loss_from_hidden(**arguments)


def test_nothing_to_compute_is_an_error():
    student_hidden, student_weight, _, _ = make_inputs()
    with pytest.raises(ValueError, match="nothing to compute"):
        distill_loss_from_hidden(student_hidden, student_weight)


@pytest.mark.parametrize("name", NAMES)
def test_masked_vocabulary_entries_give_finite_values_and_gradients(name):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    masked = torch.zeros(VOCAB)
    masked[[0, 5, 17, VOCAB - 1]] = float("-inf")
    student_head, teacher_head = LMHead(student_weight, masked), LMHead(teacher_weight, masked)
    labels = torch.randint(1, 5, (N,), generator=torch.Generator().manual_seed(4))
    sums = distill_loss_from_hidden(
        student_hidden, student_head, teacher_hidden, teacher_head, labels, divergence=name, chunk_size=12, **PARAMS
    )
    reference = full_logit_kd(student_hidden, student_head, teacher_hidden, teacher_head, name, 1.0, **PARAMS)
    reference = reference + F.cross_entropy(student_head.logits(student_hidden), labels, reduction="sum")
    assert torch.isfinite(sums.loss)
    assert_relatively_close(sums.loss, reference)
    assert_same_gradients(sums.loss, reference, (student_hidden, student_weight))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("name", ["fkl", "jsd"])  # fkl runs the torch.compile'd chunk terms on CUDA
def test_cuda_loss_and_gradients_equal_the_reference_for_changing_sizes_and_weights(name):
    for n, weight in ((N, 0.5), (N + 20, 0.25), (N - 7, 0.125)):  # new chunk shapes and weights: no stale compile
        student_hidden, student_weight, teacher_hidden, teacher_weight = (
            t.detach().cuda().requires_grad_(t.requires_grad) for t in make_inputs(n=n)
        )
        labels = torch.randint(0, VOCAB, (n,), device="cuda")
        sums = distill_loss_from_hidden(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kd_weight=weight,
            ce_weight=1 - weight, divergence=name, temperature=2.0, chunk_size=16,
        )
        kd = full_logit_kd(student_hidden, LMHead(student_weight), teacher_hidden, LMHead(teacher_weight), name, 2.0)
        ce = F.cross_entropy(student_hidden @ student_weight.T, labels, reduction="sum")
        reference = weight * kd + (1 - weight) * ce
        assert_relatively_close(sums.loss, reference)
        assert_same_gradients(sums.loss, reference, (student_hidden, student_weight))


@needs_cuda
def test_cuda_bfloat16_heads_stay_close_to_the_fp32_reference():
    student_hidden, student_weight, teacher_hidden, teacher_weight = (
        t.detach().cuda().bfloat16().requires_grad_(t.requires_grad) for t in make_inputs()
    )
    ours, _ = kd_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size=16)
    hidden_grad, weight_grad = grads(ours, (student_hidden, student_weight))
    assert weight_grad.dtype == torch.bfloat16
    as_fp32 = [t.detach().float().requires_grad_() for t in (student_hidden, student_weight)]
    reference = full_logit_kd(
        as_fp32[0], LMHead(as_fp32[1]), teacher_hidden.float(), LMHead(teacher_weight.float()), "fkl", 1.0
    )
    assert ours.item() == pytest.approx(reference.item(), rel=2e-2)
    assert_relatively_close(weight_grad.float(), grads(reference, as_fp32)[1], rel=2e-2)


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_kd_position_weights_weight_each_positions_divergence_and_tensor_weights_work(name):
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs()
    position_weights = (torch.arange(N) % 3 == 0).float() * 0.7  # a mask with a scale, as DSKD's agreement mask
    kd_weight = torch.tensor(0.4)
    sums = distill_loss_from_hidden(
        student_hidden, student_weight, teacher_hidden, teacher_weight, kd_weight=kd_weight,
        kd_position_weights=position_weights, divergence=name, temperature=2.0, chunk_size=10,
    )
    student_logits, teacher_logits = student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T
    per_position = divergence_per_position(teacher_logits, student_logits, name, 2.0)
    reference = 0.4 * (per_position * position_weights).sum()
    assert_relatively_close(sums.loss, reference)
    assert_same_gradients(sums.loss, reference, (student_hidden, student_weight))


def test_top1_outputs_are_the_argmaxes_of_both_models():
    student_hidden, student_weight, teacher_hidden, teacher_weight = make_inputs(vocab_teacher=VOCAB - 11)
    sums = distill_loss_from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_size=7)
    shared = VOCAB - 11
    assert torch.equal(sums.teacher_top1, (teacher_hidden @ teacher_weight.T).argmax(-1))
    assert torch.equal(sums.student_top1, (student_hidden @ student_weight[:shared].T).argmax(-1))
    labels = torch.zeros(N, dtype=torch.long)
    ce_only = distill_loss_from_hidden(student_hidden, student_weight, labels=labels, chunk_size=7)
    assert ce_only.teacher_top1 is None
    assert torch.equal(ce_only.student_top1, (student_hidden @ student_weight.T).argmax(-1))


def test_chunk_sum_with_gradients_equals_the_whole_sum_and_its_gradients():
    """Per-chunk gradients taken in forward (ULD, MinED, OPD) reach the rows and the head as autograd would."""
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, requires_grad=True)
    weight = torch.randn(40, 6, requires_grad=True)
    targets = torch.randn(11, 40).softmax(-1)

    def terms(rows, target):
        probs = torch.softmax(rows @ weight.T, -1).sort(-1, descending=True).values
        return (probs - target.sort(-1, descending=True).values).abs().sum()

    # rows that are not leaves (2 · hidden): the gradient must flow through them
    ours = 3 * chunk_sum_with_gradients(terms, 2 * hidden, targets, params=[weight], chunk_size=4)
    reference = 3 * terms(2 * hidden, targets)
    assert_same_loss_and_gradients(ours, reference, [hidden, weight])
