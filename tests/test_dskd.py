"""DSKD (METHODS §2): the ideal initialisation, gradient routing, the agreement mask (v2 off-policy only), and
equality with a plain full-logit reference written here from the formulas."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.data import DistillCollator
from llmdistill.divergences import divergence_per_position
from llmdistill.models import LMHead, eval_mode
from llmdistill.objectives.dskd import DualSpaceProjectors, least_squares_map
from llmdistill.rollout import Intervention, Sampling, rollout
from llmdistill.sources import left_padded_prompts, rollout_rows

from conftest import assert_same_loss_and_gradients, tiny_gpt2, tiny_llama


def as_rows(examples):
    return datasets.Dataset.from_list([{"prompt": e["prompt"], "output": e["response"]} for e in examples])


def make_trainer(tmp_path, tokenizer, examples, teacher=None, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"), objective="dskd", per_device_train_batch_size=8, max_steps=1,
        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=7, disable_tqdm=True,
    )
    options.update(overrides)
    return DistillTrainer(
        model=tiny_llama(len(tokenizer), seed=1), teacher=teacher or tiny_gpt2(len(tokenizer)),
        args=DistillConfig(**options), train_dataset=as_rows(examples), processing_class=tokenizer,
        teacher_processing_class=tokenizer,
    )


def first_batch(trainer, size=6):
    collate = DistillCollator(trainer.processing_class.pad_token_id)
    return collate([trainer.train_dataset[i] for i in range(size)])


def reference_dskd_sums(trainer, batch, on_policy=False):
    """(Σ CE, KD × N, N) from full logits, term by term as METHODS §2 writes them (v2 and v1): KD is the sum of the
    terms' means, times N. L_kd_ts is a mean over the agreeing positions (v2 off-policy), or Σ D / N over all of them
    with no agreement mask (v1, as DSKD's dual_space_kd.py; v2 on generated sequences, as DSKDv2's on-policy loss)."""
    args, projectors = trainer.args, trainer.projectors
    v1 = args.objective == "dskd_v1"
    supervised = batch["labels"][:, 1:] != -100
    labels = batch["labels"][:, 1:][supervised]
    n = len(labels)

    def hidden(model):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return out.hidden_states[-1][:, :-1][supervised]

    student_hidden = hidden(trainer.model)
    with torch.no_grad():
        teacher_hidden = hidden(trainer.teacher)
    student_weight = trainer.model.get_output_embeddings().weight
    teacher_weight = trainer.teacher.get_output_embeddings().weight
    shared = min(len(student_weight), len(teacher_weight))
    teacher_weight = teacher_weight[:shared]
    student_logits, teacher_logits = student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T
    tau, name = args.temperature, args.divergence
    kd = torch.zeros(())
    if args.dskd_spaces != "student":
        if args.dskd_s2t == "closed_form" and not v1:
            # P_st = W_S[:,C] · pinv(W_T[:,C]), from the current head, no gradient through it.
            s2t_weight = (torch.linalg.pinv(teacher_weight.double()) @ student_weight[:shared].double()).float()
            s2t = student_hidden @ s2t_weight.detach().T
        else:
            s2t = projectors.s2t(student_hidden)
        teacher_space = s2t @ teacher_weight.T
        kd = kd + divergence_per_position(teacher_logits, teacher_space, "fkl" if v1 else name, tau).sum()
    if args.dskd_spaces != "teacher":
        targets = labels if v1 else teacher_logits.argmax(-1)
        student_space = projectors.t2s(teacher_hidden) @ student_weight.detach().T
        per_position = divergence_per_position(student_space.detach(), student_logits, name, tau)
        if v1 or on_policy:
            kd_ts = per_position.sum()
        else:
            agree = student_space.argmax(-1) == targets
            kd_ts = (per_position * agree).sum() / agree.sum().clamp_min(1) * n
        kd = kd + kd_ts + F.cross_entropy(student_space, targets, reduction="sum")
    ce = F.cross_entropy(student_logits, labels, reduction="sum")
    return ce, kd, n


def reference_dskd(trainer, batch):
    """((1−α)·CE + α·KD) / N."""
    ce, kd, n = reference_dskd_sums(trainer, batch)
    return ((1 - trainer.args.alpha_kd) * ce + trainer.args.alpha_kd * kd) / n


def trainable(trainer):
    return [p for p in trainer.model.parameters()] + [p for p in trainer.projectors.parameters() if p.requires_grad]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"divergence": "jsd", "temperature": 2.0},
        {"dskd_s2t": "learned", "divergence": "rkl"},
        {"dskd_spaces": "student"},
        {"dskd_spaces": "teacher", "divergence": "srkl"},
        {"objective": "dskd_v1", "divergence": "tvd"},
    ],
)
def test_loss_and_gradients_equal_the_plain_reference(tmp_path, tokenizer, examples, overrides):
    trainer = make_trainer(tmp_path, tokenizer, examples, loss_chunk_size=5, **overrides)
    batch = first_batch(trainer)
    ours = trainer.compute_loss(trainer.model, batch)
    reference = reference_dskd(trainer, batch)
    assert_same_loss_and_gradients(ours, reference, trainable(trainer))


def test_on_generated_sequences_the_student_space_kd_is_not_masked(tmp_path, tokenizer, examples):
    """On-policy DSKD (DSKDv2's compute_on_policy_dual_space_kd_loss): L_kd_ts = Σ D / N over every generated
    position, no agreement mask; the step is (1 − α)·mean gold CE + α·KD on the responses the rollout (rerun here with
    the trainer's seed) wrote."""
    trainer = make_trainer(tmp_path, tokenizer, examples, source="student", max_new_tokens=8, alpha_kd=0.9)
    t2s = trainer.projectors.t2s.weight
    with torch.no_grad():  # off the ideal initialisation, where nearly every position agrees
        t2s.add_(torch.randn(t2s.shape, generator=torch.Generator().manual_seed(0)) * t2s.std())
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    batch = first_batch(trainer, 4)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)

    prompts = left_padded_prompts(batch["input_ids"], batch["labels"], pad)
    with eval_mode(trainer.model):
        produced = rollout(trainer.model, trainer.teacher, *prompts, Intervention("student"), Sampling(8), eos, pad,
                           torch.Generator().manual_seed(trainer.args.seed))
    generated = DistillCollator(pad)(rollout_rows(produced.sequences, produced.attention_mask, prompts[0].shape[1]))
    gold_ce, _, gold_tokens = reference_dskd_sums(trainer, batch)
    _, kd, generated_tokens = reference_dskd_sums(trainer, generated, on_policy=True)
    alpha = trainer.args.alpha_kd
    expected = (1 - alpha) * gold_ce / gold_tokens + alpha * kd / generated_tokens
    masked = (1 - alpha) * gold_ce / gold_tokens + alpha * reference_dskd_sums(trainer, generated)[1] / generated_tokens
    assert abs(masked.item() / expected.item() - 1) > 5e-4  # 5× the tolerance: the mask matters on these sequences
    assert_same_loss_and_gradients(loss, expected, trainable(trainer))


def test_padded_teacher_vocabulary_uses_the_shared_ids(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, teacher=tiny_gpt2(len(tokenizer) + 9))
    batch = first_batch(trainer)
    torch.testing.assert_close(
        trainer.compute_loss(trainer.model, batch), reference_dskd(trainer, batch), rtol=1e-4, atol=1e-6
    )


def test_gradients_reach_exactly_the_parameters_methods_names(tmp_path, tokenizer, examples):
    """P_ts only from L_ce_ts; the student from L_kd_ts, L_kd_st and CE; the teacher from nothing."""
    trainer = make_trainer(tmp_path, tokenizer, examples)
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, batch).backward()
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert not trainer.projectors.s2t.weight.requires_grad  # closed form: recomputed, never trained
    assert trainer.model.get_output_embeddings().weight.grad.abs().sum() > 0

    # t2s's gradient is that of α·L_ce_ts / N alone: the KD term sees the projected states detached.
    args = trainer.args
    supervised = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        out = trainer.teacher(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        teacher_hidden = out.hidden_states[-1][:, :-1][supervised]
    teacher_logits = teacher_hidden @ trainer.teacher.get_output_embeddings().weight.T
    student_weight = trainer.model.get_output_embeddings().weight.detach()
    t2s = trainer.projectors.t2s
    weight = t2s.weight.detach().clone().requires_grad_()
    ce_ts = F.cross_entropy(teacher_hidden @ weight.T @ student_weight.T, teacher_logits.argmax(-1), reduction="sum")
    (expected,) = torch.autograd.grad(args.alpha_kd * ce_ts / supervised.sum(), weight)
    torch.testing.assert_close(t2s.weight.grad, expected, rtol=1e-4, atol=1e-7)


def test_ideal_initialisation_solves_the_least_squares_problem():
    generator = torch.Generator().manual_seed(0)
    shared, student_width, teacher_width = 40, 12, 16
    student_rows = torch.randn(shared, student_width, generator=generator)  # W_S[:, C]ᵀ
    teacher_rows = torch.randn(shared, teacher_width, generator=generator)  # W_T[:, C]ᵀ
    hidden = torch.randn(30, teacher_width, generator=generator)
    t2s = least_squares_map(student_rows, teacher_rows)  # P_tsᵀ: [d, D]

    def residual(weight):
        return ((hidden @ weight.T @ student_rows.T) - hidden @ teacher_rows.T).norm()

    best = residual(t2s)
    for _ in range(5):
        assert residual(t2s + 1e-2 * torch.randn(t2s.shape, generator=generator)) > best
    expected = torch.linalg.lstsq(student_rows.double(), teacher_rows.double()).solution.float()
    torch.testing.assert_close(t2s, expected, rtol=1e-4, atol=1e-5)


def test_with_a_full_rank_student_head_on_the_shared_ids_the_teacher_logits_are_reproduced():
    generator = torch.Generator().manual_seed(1)
    shared, student_width, teacher_width = 20, 24, 16  # d ≥ D and |C| ≤ d: W_S[:, C] has full column rank
    student = LMHead(torch.randn(shared, student_width, generator=generator))
    teacher = LMHead(torch.randn(shared, teacher_width, generator=generator))
    projectors = DualSpaceProjectors(student, teacher, shared, "v2", "closed_form")
    hidden = torch.randn(7, teacher_width, generator=generator)
    with torch.no_grad():
        reproduced = projectors.to_student_space(hidden) @ student.weight.T
    torch.testing.assert_close(reproduced, hidden @ teacher.weight.T, rtol=1e-4, atol=1e-4)


def test_closed_form_s2t_is_recomputed_only_when_the_student_head_changes():
    generator = torch.Generator().manual_seed(2)
    student = LMHead(torch.randn(30, 8, generator=generator))
    teacher = LMHead(torch.randn(30, 6, generator=generator))
    projectors = DualSpaceProjectors(student, teacher, 30, "v2", "closed_form")
    expected = torch.linalg.pinv(teacher.weight.double()) @ student.weight.double()
    torch.testing.assert_close(projectors.s2t.weight, expected.float(), rtol=1e-4, atol=1e-5)
    version = projectors.s2t.weight._version
    projectors.refresh_s2t(student.weight, teacher.weight)  # another micro-batch, same head: nothing to do
    assert projectors.s2t.weight._version == version
    with torch.no_grad():
        student.weight.mul_(2.0)  # what an optimizer step does: an in-place update
    projectors.refresh_s2t(student.weight, teacher.weight)
    torch.testing.assert_close(projectors.s2t.weight, 2 * expected.float(), rtol=1e-4, atol=1e-5)


def test_training_recomputes_the_closed_form_s2t_after_every_step_of_a_fused_optimizer(tmp_path, tokenizer, examples):
    """The Trainer's default AdamW is fused, and a fused step leaves the head's version counter alone; the s2t used
    by step 2 must still come from the head that step 1 produced."""
    from transformers import TrainerCallback

    heads = []

    class KeepHead(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            heads.append(LMHead.of(model).weight.detach().clone())

    trainer = make_trainer(tmp_path, tokenizer, examples, max_steps=2)
    assert trainer.args.optim == "adamw_torch_fused"
    trainer.add_callback(KeepHead())
    trainer.train()
    expected = DualSpaceProjectors(LMHead(heads[0]), LMHead.of(trainer.teacher), len(tokenizer), "v2", "closed_form")
    torch.testing.assert_close(trainer.projectors.s2t.weight, expected.s2t.weight)


def test_agreement_mask_and_logged_terms(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, max_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logged:
        assert {"kd_ts", "ce_ts", "kd_st", "t2s_accuracy", "s2t_agreement", "ce", "kd"} <= set(entry)
        assert 0 <= entry["t2s_accuracy"] <= 100
        assert entry["kd"] == pytest.approx(entry["kd_ts"] + entry["ce_ts"] + entry["kd_st"], rel=1e-4)


def test_a_mask_that_agrees_nowhere_gives_zero_student_space_kd_not_nan(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, dskd_spaces="student")
    with torch.no_grad():
        trainer.projectors.t2s.weight.zero_()  # every projected state gives uniform logits: argmax 0 everywhere
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, reference_dskd(trainer, batch), rtol=1e-4, atol=1e-6)


def test_projectors_get_their_own_learning_rate_are_saved_and_restored_on_resume(tmp_path, tokenizer, examples):
    trainer = make_trainer(
        tmp_path, tokenizer, examples, dskd_s2t="learned", projector_learning_rate=3e-3, max_steps=2,
        save_strategy="steps", save_steps=1, lr_scheduler_type="constant",
    )
    trainer.train()
    groups = trainer.optimizer.param_groups
    projector_group = [group for group in groups if group.get("projectors")]
    assert len(projector_group) == 1 and projector_group[0]["lr"] == 3e-3
    assert {id(p) for p in projector_group[0]["params"]} == {id(p) for p in trainer.projectors.parameters()}
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "projectors.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"  # a plain HF model

    resumed = make_trainer(
        tmp_path, tokenizer, examples, dskd_s2t="learned", projector_learning_rate=3e-3, max_steps=2,
        lr_scheduler_type="constant",
    )
    resumed._load_from_checkpoint(str(out / "checkpoint-1"))
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoint-1" / "projectors.safetensors")
    for name, tensor in resumed.projectors.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])


def test_resuming_from_a_checkpoint_continues_with_the_saved_projectors(tmp_path, tokenizer, examples):
    options = dict(
        dskd_s2t="learned", max_steps=3, save_strategy="steps", save_steps=1, lr_scheduler_type="constant",
        optim="sgd", max_grad_norm=0.0,
    )
    uninterrupted = make_trainer(tmp_path / "a", tokenizer, examples, **options)
    uninterrupted.train()
    resumed = make_trainer(tmp_path / "b", tokenizer, examples, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    for name, tensor in uninterrupted.projectors.state_dict().items():
        torch.testing.assert_close(resumed.projectors.state_dict()[name], tensor, rtol=1e-5, atol=1e-7)
    for mine, theirs in zip(resumed.model.parameters(), uninterrupted.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
