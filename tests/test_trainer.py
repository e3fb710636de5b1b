"""DistillTrainer: the loss against a plain full-logit reference, step-wide normalisation, saving, bad input."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.config import CONFIG_FILENAME
from llmdistill.data import DistillCollator

from conftest import tiny_gpt2, tiny_llama


def as_rows(examples):
    return datasets.Dataset.from_list([{"prompt": e["prompt"], "output": e["response"]} for e in examples])


def make_trainer(tmp_path, tokenizer, examples, teacher=None, student=None, eval_examples=None, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1, learning_rate=1.0,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True,
        seed=7, disable_tqdm=True,
    )
    options.update(overrides)
    config = DistillConfig(**options)
    return DistillTrainer(
        model=student if student is not None else tiny_llama(len(tokenizer), seed=1),
        teacher=teacher if teacher is not None else tiny_gpt2(len(tokenizer)),
        args=config, train_dataset=as_rows(examples), eval_dataset=as_rows(eval_examples) if eval_examples else None,
        processing_class=tokenizer, teacher_processing_class=tokenizer,
    )


def reference_loss(student, teacher, batch, alpha, vocab):
    """(1-α)·mean CE + α·mean KL(p‖q) from full [B, T, V] logits, written the obvious way."""
    logits_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        logits_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(logits_s[mask], targets[mask])
    p = logits_t[mask][:, :vocab].float().softmax(-1)
    log_q = logits_s[mask][:, :vocab].float().log_softmax(-1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    return (1 - alpha) * ce + alpha * kl


def first_batch(trainer, size):
    collate = DistillCollator(trainer.processing_class.pad_token_id)
    return collate([trainer.train_dataset[i] for i in range(size)])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_equals_full_logit_reference(tmp_path, tokenizer, examples, alpha):
    teacher = tiny_gpt2(len(tokenizer))
    trainer = make_trainer(tmp_path, tokenizer, examples, teacher=teacher, alpha_kd=alpha)
    assert (trainer.teacher is None) == (alpha == 0.0), "alpha_kd=0 trains without loading a teacher"
    batch = first_batch(trainer, 6)
    ours = trainer.compute_loss(trainer.model, batch)
    expected = reference_loss(trainer.model, teacher, batch, alpha, len(tokenizer))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_sft_trains_on_the_full_cross_entropy_whatever_alpha_kd_says(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, objective="sft", alpha_kd=0.5)
    batch = first_batch(trainer, 6)
    expected = reference_loss(trainer.model, tiny_gpt2(len(tokenizer)), batch, 0.0, len(tokenizer))
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["fkl", "srkl"])
def test_tiny_loss_chunks_give_the_same_loss_and_gradients(tmp_path, tokenizer, examples, divergence):
    whole = make_trainer(tmp_path / "a", tokenizer, examples, divergence=divergence)
    chunked = make_trainer(tmp_path / "b", tokenizer, examples, divergence=divergence, loss_chunk_size=3)
    assert chunked.objective.chunk_size == 3
    batch = first_batch(whole, 6)
    losses = [trainer.compute_loss(trainer.model, batch) for trainer in (whole, chunked)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for loss in losses:
        loss.backward()
    for mine, theirs in zip(whole.model.parameters(), chunked.model.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_padded_teacher_vocabulary_compares_shared_ids(tmp_path, tokenizer, examples):
    teacher = tiny_gpt2(len(tokenizer) + 7)  # same tokenizer, head padded to more rows
    trainer = make_trainer(tmp_path, tokenizer, examples, teacher=teacher)
    batch = first_batch(trainer, 4)
    expected = reference_loss(trainer.model, teacher, batch, 0.5, len(tokenizer))
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)


def test_one_batch_of_8_equals_four_accumulated_micro_batches_of_2(tmp_path, tokenizer, examples):
    """Loss and gradients do not depend on how the optimizer step's batch is split."""
    whole = make_trainer(tmp_path / "a", tokenizer, examples)
    batch = first_batch(whole, 8)
    lengths = (batch["labels"] != -100).sum(1)
    assert len(set(lengths.tolist())) > 2, "the test needs uneven response lengths"
    whole.compute_loss(whole.model, batch).backward()
    expected = {n: p.grad.clone() for n, p in whole.model.named_parameters()}

    split = make_trainer(tmp_path / "b", tokenizer, examples)
    total_tokens = (batch["labels"][:, 1:] != -100).sum()
    losses = []
    for start in range(0, 8, 2):
        micro = {k: v[start : start + 2] for k, v in batch.items()}
        loss = split.compute_loss(split.model, micro, num_items_in_batch=total_tokens)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(sum(losses), whole.compute_loss(whole.model, batch).detach(), rtol=1e-5, atol=1e-6)
    for name, parameter in split.model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_steps_match_with_gradient_accumulation(tmp_path, tokenizer, examples):
    """Through Trainer.train: batch 8 × 1 and batch 2 × 4 accumulation give the same logged loss and weights."""
    runs = []
    for name, batch_size, accumulation in (("whole", 8, 1), ("split", 2, 4)):
        trainer = make_trainer(
            tmp_path / name, tokenizer, examples, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
        )
        trainer.train()
        runs.append((trainer.state.log_history[0]["loss"], dict(trainer.model.named_parameters())))
    (loss_a, weights_a), (loss_b, weights_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_teacher_is_frozen_and_outside_the_optimizer(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples)
    trainer.train()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in trainer.teacher.parameters()}


def test_batch_without_supervised_tokens_is_an_error_not_a_zero_loss(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples)
    batch = first_batch(trainer, 2)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no supervised"):
        trainer.compute_loss(trainer.model, batch)


def test_different_tokenizers_are_refused_for_vanilla_kd(tmp_path, tokenizer, examples):
    from llmdistill.quickstart.tokenizer import train_tokenizer

    other = train_tokenizer([e["response"] for e in examples], vocab_size=280)
    config = DistillConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    rows = as_rows(examples)
    with pytest.raises(ValueError, match="cross-tokenizer objective"):
        DistillTrainer(
            model=tiny_llama(len(tokenizer)), teacher=tiny_gpt2(len(other)), args=config, train_dataset=rows,
            processing_class=tokenizer, teacher_processing_class=other,
        )


def test_saved_student_is_a_plain_hf_folder_that_generates(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, learning_rate=1e-3)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, parameter in trainer.model.named_parameters():
        torch.testing.assert_close(reloaded.get_parameter(name), parameter)
    prompt = tokenizer(examples[0]["prompt"], return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    saved = DistillConfig.from_yaml(out / CONFIG_FILENAME)
    assert saved.alpha_kd == trainer.args.alpha_kd and saved.divergence == trainer.args.divergence


def test_sft_objective_needs_no_teacher(tmp_path, tokenizer, examples):
    config = DistillConfig(output_dir=str(tmp_path), objective="sft", max_steps=1, report_to=[], use_cpu=True)
    trainer = DistillTrainer(
        model=tiny_llama(len(tokenizer)), args=config, train_dataset=as_rows(examples), processing_class=tokenizer
    )
    assert trainer.teacher is None
    trainer.train()
    assert "kd" not in trainer.state.log_history[0]


def test_evaluate_reports_loss_and_terms(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, eval_examples=examples[:8])
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and metrics["eval_ce"] > 0 and metrics["eval_kd"] >= 0


def test_models_and_tokenizers_load_from_folders_as_in_the_readme(tmp_path, model_dirs, examples):
    teacher_dir, student_dir = model_dirs
    config = DistillConfig(output_dir=str(tmp_path / "out"), divergence="rkl", max_steps=1, report_to=[], use_cpu=True)
    trainer = DistillTrainer(
        student=str(student_dir), teacher=str(teacher_dir), args=config, train_dataset=as_rows(examples)
    )
    assert trainer.model.config.model_type == "llama" and trainer.teacher.config.model_type == "gpt2"
    trainer.train()
    assert trainer.state.log_history[0]["kd"] > 0


def test_bf16_mixed_precision_training_with_bf16_models(tmp_path, tokenizer, examples):
    """accelerate's bf16 mode hands back fp32 hidden states from bf16 models; the heads must still apply."""
    trainer = make_trainer(
        tmp_path, tokenizer, examples, teacher=tiny_gpt2(len(tokenizer)).bfloat16(),
        student=tiny_llama(len(tokenizer), seed=1).bfloat16(), bf16=True, max_steps=2, learning_rate=1e-3,
        optim="adamw_torch",
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) and entry["loss"] > 0 for entry in logged)
    assert all(math.isfinite(entry["kd"]) and 0 <= entry["top1_agreement"] <= 100 for entry in logged)


@pytest.mark.parametrize("objective", ["vanilla", "dskd"])
def test_temperature_squared_scaling_multiplies_the_kd_term(tmp_path, tokenizer, examples, objective):
    options = dict(objective=objective, alpha_kd=1.0, temperature=2.0)
    plain = make_trainer(tmp_path / "a", tokenizer, examples, **options)
    scaled = make_trainer(tmp_path / "b", tokenizer, examples, scale_kd_by_temperature_squared=True, **options)
    batch = first_batch(plain, 6)
    torch.testing.assert_close(
        scaled.compute_loss(scaled.model, batch), 4.0 * plain.compute_loss(plain.model, batch), rtol=1e-5, atol=1e-7
    )
