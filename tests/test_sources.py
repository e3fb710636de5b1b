"""Sequence sources (METHODS §4): the schedules, the layout of generated rows, and training on them through the
trainer, checked against a rollout and a full-logit loss computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llmdistill import DistillConfig
from llmdistill.data import IGNORE_INDEX, DistillCollator
from llmdistill.rollout import Intervention, Sampling, rollout
from llmdistill.sources import SequenceSource, left_padded_prompts, rollout_rows

from conftest import tiny_gpt2, tiny_llama
from test_trainer import as_rows, make_trainer

EOS, PAD = 2, 0


def test_mixed_draws_student_batches_with_probability_lambda():
    source = SequenceSource("mixed", mixed_lambda=0.3, seed=0)
    draws = [source.draw(step, 1000) for step in range(2000)]
    assert set(draws) == {"generate", "gt"}
    assert draws.count("generate") / len(draws) == pytest.approx(0.3, abs=0.03)
    assert {SequenceSource("mixed", mixed_lambda=lam).draw(0, 1) for lam in (0.0,)} == {"gt"}


def drawn_with(source: SequenceSource, r: float, step: int, total: int) -> str:
    source._uniform = lambda: r
    return source.draw(step, total)


def test_adaptive_draw_follows_distillm_with_fixed_r():
    """distillm finetune.py: generate when r < p·(1 − step/T) or (r < p and the buffer is not full); else replay when
    r < p; else gt. With p = 0 nothing is generated, whether or not the buffer is full."""
    source = SequenceSource("adaptive", buffer_size=2, seed=0)
    assert [drawn_with(source, r, 0, 100) for r in (0.0, 0.5, 0.99)] == ["gt"] * 3
    source.student_probability = 0.5  # at step 50 of 100: p·(1 − step/T) = 0.25
    assert [drawn_with(source, r, 50, 100) for r in (0.2, 0.3, 0.6)] == ["generate", "generate", "gt"]
    source.remember([{"input_ids": [1], "labels": [1]}] * 2)
    assert [drawn_with(source, r, 50, 100) for r in (0.2, 0.3, 0.6)] == ["generate", "replay", "gt"]
    assert [drawn_with(source, r, 100, 100) for r in (0.0, 0.49, 0.5)] == ["replay", "replay", "gt"]


def test_adaptive_draws_from_the_generator_at_the_rates_of_the_rule():
    source = SequenceSource("adaptive", buffer_size=4, seed=0)
    source.remember([{"input_ids": [1], "labels": [1]}] * 4)
    source.student_probability = 0.3
    draws = [source.draw(step, 100) for step in range(3000)]
    expected_generate = sum(0.3 * max(0.0, 1 - step / 100) for step in range(3000)) / 3000
    assert draws.count("generate") / 3000 == pytest.approx(expected_generate, abs=0.01)
    assert draws.count("replay") / 3000 == pytest.approx(0.3 - expected_generate, abs=0.02)
    assert len(source.replay(3)) == 3


def test_adaptive_p_sgo_rises_by_a_tenth_when_the_loss_exceeds_the_reference_which_moves_only_then():
    """The first observed loss (before training) is the reference; a loss ≥ reference + 0.1 raises p_SGO by 0.1 and
    becomes the reference; any other loss changes nothing."""
    source = SequenceSource("adaptive", seed=0)
    expected = [  # validation loss → (p_SGO, reference) after it
        (2.0, 0.0, 2.0), (2.05, 0.0, 2.0), (2.125, 0.1, 2.125), (2.0, 0.1, 2.125), (2.2, 0.1, 2.125),
        (2.25, 0.2, 2.25), (2.25, 0.2, 2.25), (1.5, 0.2, 2.25), (3.5, 0.3, 3.5),
    ]
    for loss, probability, reference in expected:
        source.observe_eval_loss(loss)
        assert (source.student_probability, source.reference_loss) == (pytest.approx(probability), reference), loss
    for loss in range(4, 14):
        source.observe_eval_loss(float(loss))
    assert source.student_probability == 1.0 and source.reference_loss == 13.0


def test_adaptive_reference_is_the_students_ce_only_validation_loss_measured_before_training(
    tmp_path, tokenizer, examples
):
    """distillm evaluates before its first step, and its validation loss is the student's CE alone: here the mean CE
    over every evaluation token (not the CE + KD training loss, not a mean of batch means)."""
    trainer = make_trainer(tmp_path, tokenizer, examples, source="adaptive", eval_examples=examples[:6],
                           eval_strategy="steps", eval_steps=10, max_steps=1, per_device_eval_batch_size=4)
    collate = DistillCollator(tokenizer.pad_token_id)
    rows = [trainer.eval_dataset[i] for i in range(6)]
    with torch.no_grad():
        batches = [collate(rows[:4]), collate(rows[4:])]
        total = sum(gold_cross_entropy(trainer.model, batch, reduction="sum") for batch in batches)
        tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
    trainer.train()
    before_training = trainer.state.log_history[0]
    assert before_training["step"] == 0 and before_training["eval_ce"] == pytest.approx(total.item() / tokens, rel=1e-5)
    assert before_training["eval_loss"] != pytest.approx(before_training["eval_ce"], rel=1e-3)
    assert trainer.sequences.source.reference_loss == before_training["eval_ce"]


def test_left_padded_prompts_are_the_tokens_before_the_first_label():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 3, 0, 0], [4, 3, 2, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9], [-100, 6, 3, -100, -100], [-100, -100, -100, -100, 1]])
    prompts, mask = left_padded_prompts(ids, labels, pad_token_id=0)
    assert prompts.tolist() == [[0, 5, 6, 7], [0, 0, 0, 5], [4, 3, 2, 1]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]


def test_generated_rows_supervise_exactly_the_generated_tokens_and_the_rollout_targets_line_up():
    """The rollout's response mask (EOS included, padding after it excluded) becomes the rows' labels, and its
    teacher hidden states are the teacher's hidden states at the collated batch's supervised positions."""
    student, teacher = tiny_llama(40, seed=1).eval(), tiny_gpt2(40, seed=2).eval()
    prompts = torch.tensor([[PAD, PAD, 5, 6, 7], [PAD, 8, 9, 10, 11], [12, 13, 14, 15, 16]])
    mask = (prompts != PAD).long()
    produced = rollout(student, teacher, prompts, mask, Intervention("switch"), Sampling(10), EOS, PAD,
                       torch.Generator().manual_seed(4))
    rows = rollout_rows(produced.sequences, produced.attention_mask, prompts.shape[1])
    batch = DistillCollator(PAD)(rows)
    supervised = batch["labels"][:, 1:] != IGNORE_INDEX
    assert int(supervised.sum()) == int(produced.response_mask.sum())
    for row, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"])):
        generated = produced.sequences[row, prompts.shape[1]:][produced.response_mask[row].bool()]
        assert labels[labels != IGNORE_INDEX].tolist() == generated.tolist()
        assert ids[: int(mask[row].sum())].tolist() == prompts[row][mask[row].bool()].tolist()
    hidden = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    expected = hidden.hidden_states[-1][:, :-1][supervised]
    assert torch.allclose(produced.teacher_hidden[produced.response_mask.bool()], expected, atol=1e-5)


def kd_on_rollout_reference(student, teacher, rows, alpha_weighted_kd_tokens):
    """Σ KL(p‖q) over the rows' supervised positions from full logits, divided as given."""
    batch = DistillCollator(PAD)(rows)
    targets = batch["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    log_q = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][supervised]
    with torch.no_grad():
        log_p = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][supervised]
    log_q, log_p = log_q.log_softmax(-1), log_p.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum() / alpha_weighted_kd_tokens


def gold_cross_entropy(student, batch, reduction="mean"):
    targets = batch["labels"][:, 1:]
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    supervised = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[supervised], targets[supervised], reduction=reduction)


@pytest.mark.parametrize(
    "source, alpha", [("student", 0.5), ("switch", 0.5), ("teacher", 0.5), ("skd", 0.5), ("mixture", 0.5),
                      ("student", 1.0)]
)
def test_training_loss_on_generated_sequences_equals_the_full_logit_reference(
    tmp_path, tokenizer, examples, source, alpha
):
    """The step's loss is (1 - α)·mean CE on the gold batch + α·mean KL on the responses the rollout (rerun here
    with the trainer's seed) produced for the batch's prompts."""
    trainer = make_trainer(tmp_path, tokenizer, examples, source=source, max_new_tokens=12, alpha_kd=alpha)
    batch = trainer._prepare_inputs(DistillCollator(tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(4)]))
    student, teacher = trainer.model, trainer.teacher
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)

    prompts = left_padded_prompts(batch["input_ids"], batch["labels"], tokenizer.pad_token_id)
    produced = rollout(
        student.eval(), teacher, *prompts, trainer.args.intervention(), Sampling(12), tokenizer.eos_token_id,
        tokenizer.pad_token_id, torch.Generator().manual_seed(trainer.args.seed),
    )
    rows = rollout_rows(produced.sequences, produced.attention_mask, prompts[0].shape[1])
    kd = kd_on_rollout_reference(student, teacher, rows, int(produced.response_mask.sum()))
    expected = (1 - alpha) * gold_cross_entropy(student, batch) + alpha * kd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_replayed_batch_trains_on_the_buffers_rows_with_a_fresh_teacher_pass(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, source="adaptive", replay_buffer_size=4,
                           eval_examples=examples[:4], eval_strategy="steps", eval_steps=1)
    source = trainer.sequences.source
    rows = [{"input_ids": row["input_ids"][:-1] + [7, 8, 9],
             "labels": [IGNORE_INDEX] * (len(row["input_ids"]) - 1) + [7, 8, 9]}
            for row in (trainer.train_dataset[i] for i in range(4))]
    source.remember(rows)
    source.student_probability = 1.0
    trainer.state.global_step = trainer.state.max_steps = 10  # r < p·(1 − step/total) = 0 never: replay when r < 1
    batch = trainer._prepare_inputs(DistillCollator(tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    kd = kd_on_rollout_reference(trainer.model, trainer.teacher, rows, 12)
    expected = 0.5 * gold_cross_entropy(trainer.model, batch) + 0.5 * kd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_on_policy_training_runs_and_logs_the_rollout(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, source="switch", max_new_tokens=8, max_steps=2,
                           learning_rate=1e-3, optim="adamw_torch")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("teacher_written_fraction", "teacher_written_fraction_0-15", "jsd_0-15",
                "rollout_tokens_per_second", "generated_batches_fraction", "kd", "ce"):
        assert math.isfinite(logged[key]), key
    assert logged["generated_batches_fraction"] == 1.0
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


def test_one_rollout_generates_for_every_micro_batch_of_a_step(tmp_path, tokenizer, examples):
    """With gradient accumulation the step's micro-batches are generated for together (one rollout of 2 × the
    micro-batch's prompts), and each micro-batch trains on its own prompts' responses."""
    trainer = make_trainer(tmp_path, tokenizer, examples, source="student", max_new_tokens=6, max_steps=2,
                           gradient_accumulation_steps=2, learning_rate=1e-3)
    rollouts, original = [], trainer.sequences.produce

    def produce(student, batches):
        produced = original(student, batches)
        rollouts.append([(len(batch["input_ids"]), len(rows.rows)) for batch, rows in zip(batches, produced)])
        for batch, rows in zip(batches, produced):  # every row continues its own micro-batch's prompt
            for gold, row in zip(batch["input_ids"].tolist(), rows.rows):
                start = row["labels"].count(-100)
                assert gold[:start] == row["input_ids"][:start]
        return produced

    trainer.sequences.produce = produce
    trainer.train()
    size = trainer.args.per_device_train_batch_size
    assert rollouts == [[(size, size), (size, size)]] * 2


def test_student_sources_log_the_jsd_by_position_on_logging_steps_only(tmp_path, tokenizer, examples):
    """The student generates alone and the teacher scores the responses in one pass; that pass gives the JSD buckets,
    measured on the steps that log (here every second one)."""
    trainer = make_trainer(tmp_path, tokenizer, examples, source="student", max_new_tokens=8, max_steps=4,
                           logging_steps=2, learning_rate=1e-3)
    measured = []
    original = trainer._record_divergences
    trainer._record_divergences = lambda *args: (measured.append(trainer.state.global_step), original(*args))
    trainer.train()
    assert measured == [1, 3]  # during the steps after which the Trainer logs (steps 2 and 4)
    for logged in trainer.state.log_history[:2]:
        assert 0 <= logged["jsd_0-15"] <= math.log(2) and "teacher_written_fraction" not in logged


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_cross_tokenizer_on_policy_retokenises_the_writers_text_for_both(tmp_path, real_tokenizers, examples, source):
    """A Llama-tokenizer student (or the GPT-2-tokenizer teacher) generates; each model reads the text in its own
    tokens, paired by ETA, and the KD is finite and logged with the aligned fraction."""
    student_tokenizer, teacher_tokenizer = real_tokenizers["llama2"], real_tokenizers["gpt2"]
    config = DistillConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
        logging_steps=1, report_to=[], use_cpu=True, seed=3, disable_tqdm=True, objective="simple_ctkd",
        source=source, max_new_tokens=6, generation_temperature=0.0,
    )
    from llmdistill import DistillTrainer

    trainer = DistillTrainer(
        model=tiny_llama(len(student_tokenizer), seed=1), teacher=tiny_gpt2(len(teacher_tokenizer), seed=2),
        args=config, train_dataset=as_rows(examples), processing_class=student_tokenizer,
        teacher_processing_class=teacher_tokenizer,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["kd"]) and logged["generated_batches_fraction"] == 1.0
    assert 0 < logged["generated_rows_fraction"] <= 1
    assert 0 <= logged["aligned_fraction"] <= 100


def test_sources_that_need_one_vocabulary_or_validation_loss_say_so(tmp_path, tokenizer, examples):
    with pytest.raises(ValueError, match="one vocabulary"):
        DistillConfig(output_dir=str(tmp_path), objective="uld", source="switch", use_cpu=True)
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillConfig(output_dir=str(tmp_path), objective="sft", source="student", use_cpu=True)
    with pytest.raises(ValueError, match="source='bogus' is unknown"):
        DistillConfig(output_dir=str(tmp_path), source="bogus", use_cpu=True)
    with pytest.raises(ValueError, match="switch_schedule"):
        DistillConfig(output_dir=str(tmp_path), source="switch", switch_schedule="cosine", use_cpu=True)
    with pytest.raises(ValueError, match="eval_strategy"):
        make_trainer(tmp_path, tokenizer, examples, source="adaptive")


def test_cross_tokenizer_rows_of_cut_responses_carry_no_eos_and_pairs_stay_inside(tmp_path, real_tokenizers, examples):
    from llmdistill.data import prepare_dataset
    from llmdistill.quickstart.run import DATA_FORMAT
    from llmdistill.sources import Generation, produce

    student_tokenizer, teacher_tokenizer = real_tokenizers["llama2"], real_tokenizers["gpt2"]
    config = DistillConfig(output_dir=str(tmp_path), objective="simple_ctkd", source="student", max_new_tokens=5,
                           generation_temperature=0.0, use_cpu=True)
    gold = prepare_dataset(as_rows(examples[:4]).rename_column("output", "response"), student_tokenizer, DATA_FORMAT,
                           256, 512, teacher_tokenizer=teacher_tokenizer)
    batch = DistillCollator(student_tokenizer.pad_token_id, teacher_pad_token_id=teacher_tokenizer.pad_token_id)(
        gold.to_list())
    student = tiny_llama(len(student_tokenizer), seed=1).eval()
    (produced,) = produce(student, None, [batch], Generation(config, student_tokenizer, teacher_tokenizer, True), None)
    assert produced.rows and produced.teacher_hidden is None
    for row in produced.rows:  # 5 greedy tokens from a random model: cut, never finished
        assert row["labels"][-1] != student_tokenizer.eos_token_id
        assert row["teacher_labels"][-1] != teacher_tokenizer.eos_token_id
        assert all(t < len(row["teacher_input_ids"]) and s < len(row["input_ids"]) for t, s in row["aligned_pairs"])
        assert row["aligned_pairs"], "the re-tokenised response shares aligned tokens"
