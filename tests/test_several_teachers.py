"""Several teachers: the mixture target against a plain formula, per-row routing and the average end to end."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import torch.nn.functional as F

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.data import DistillCollator
from llmdistill.errors import ConfigError, DataError
from llmdistill.losses import distill_loss_from_hidden
from llmdistill.models import LMHead
from llmdistill.teachers import MixtureHead

from conftest import tiny_gpt2, tiny_llama, write_jsonl
from test_divergences import ref_divergence

DIVERGENCES = ["fkl", "rkl", "jsd", "tvd", "srkl"]


def _heads_and_hidden(n=9, widths=(8, 12), rows=(40, 44), student=(42, 6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    heads = [LMHead(torch.randn(v, d, generator=generator) / d**0.5) for v, d in zip(rows, widths)]
    hidden = [torch.randn(n, d, generator=generator) * 3 for d in widths]
    student_head = LMHead((torch.randn(*student, generator=generator) / student[1] ** 0.5).requires_grad_())
    student_hidden = (torch.randn(n, student[1], generator=generator) * 3).requires_grad_()
    return heads, hidden, student_head, student_hidden


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mixture_target_equals_the_weighted_average_of_the_teachers_distributions(divergence, temperature):
    heads, hidden, student_head, student_hidden = _heads_and_hidden()
    # the first rows average both teachers, the others are routed to one
    weights = torch.tensor([[0.5, 0.5]] * 3 + [[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    packed = torch.cat([*hidden, weights], dim=1)
    ours = distill_loss_from_hidden(
        student_hidden, student_head, packed, MixtureHead(heads, temperature), kd_weight=1.0, ce_weight=0.0,
        divergence=divergence, temperature=temperature, chunk_size=4,
    )

    shared = 40  # the ids every head has
    p = sum(
        weight.double().unsqueeze(1) * torch.softmax((h @ head.weight[:shared].T).double() / temperature, -1)
        for weight, h, head in zip(weights.T, hidden, heads)
    )
    q = torch.softmax((student_hidden @ student_head.weight[:shared].T).double() / temperature, -1)
    reference = ref_divergence(p, q, divergence, beta=0.5, skew_alpha=0.1, akl_mu=0.5).sum()
    torch.testing.assert_close(ours.kd.double(), reference, rtol=1e-4, atol=1e-6)
    parameters = [student_hidden, student_head.weight]
    for mine, theirs in zip(torch.autograd.grad(ours.loss, parameters), torch.autograd.grad(reference, parameters)):
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-3, atol=1e-6)


def test_one_teacher_as_a_mixture_is_that_teacher():
    heads, hidden, student_head, student_hidden = _heads_and_hidden(widths=(8,), rows=(40,))
    packed = torch.cat([hidden[0], torch.ones(len(hidden[0]), 1)], dim=1)
    mixture = distill_loss_from_hidden(student_hidden, student_head, packed, MixtureHead(heads, 2.0), temperature=2.0)
    plain = distill_loss_from_hidden(student_hidden, student_head, hidden[0], heads[0], temperature=2.0)
    torch.testing.assert_close(mixture.kd, plain.kd)
    assert torch.equal(mixture.teacher_top1, plain.teacher_top1)


# --------------------------------------------------------------------------- the trainer


@pytest.fixture()
def teacher_dirs(tmp_path, tokenizer):
    """Two teachers of the student's tokenizer: a GPT-2 of width 32, a Llama of width 40 with a padded head."""
    folders = []
    for name, model in (("gpt2", tiny_gpt2(len(tokenizer), seed=3)),
                        ("llama", tiny_llama(len(tokenizer) + 5, seed=4, hidden_size=40))):
        folder = tmp_path / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def _rows(examples, routes=None):
    rows = [{"prompt": e["prompt"], "output": e["response"]} for e in examples]
    if routes is not None:
        rows = [row | {"expert": route} for row, route in zip(rows, routes)]
    return datasets.Dataset.from_list(rows)


def _trainer(tmp_path, tokenizer, examples, teachers, routes=None, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=1, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, seed=7,
        disable_tqdm=True, temperature=2.0,
    )
    options.update(overrides)
    return DistillTrainer(
        model=tiny_llama(len(tokenizer), seed=1), teacher=teachers, args=DistillConfig(**options),
        train_dataset=_rows(examples, routes), processing_class=tokenizer,
    )


def _batch(trainer, size=6):
    return DistillCollator(trainer.processing_class.pad_token_id)([trainer.train_dataset[i] for i in range(size)])


def _reference_loss(student, teachers, batch, weights, alpha=0.5, temperature=2.0):
    """(1-α)·mean CE + α·mean KL(Σ_k w_k p_k ‖ q) at temperature τ, from full logits, per row's weights [B, K]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = batch["labels"][:, 1:]
    supervised = targets != -100
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    vocab = logits.shape[-1]
    with torch.no_grad():
        p = sum(
            weights[:, k, None, None]
            * torch.softmax(teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab] / temperature, -1)
            for k, teacher in enumerate(teachers)
        )[supervised]
    log_q = torch.log_softmax(logits[supervised] / temperature, -1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    return (1 - alpha) * F.cross_entropy(logits[supervised], targets[supervised]) + alpha * kl


def test_rows_routed_by_a_column_are_taught_by_their_teacher(tmp_path, tokenizer, examples, teacher_dirs):
    first, second = teacher_dirs
    routes = [second, first, second, second, first, first] * 11  # by name (the CLI test routes by place)
    trainer = _trainer(tmp_path, tokenizer, examples, ",".join(teacher_dirs), routes,
                       teacher_routing_column="expert")
    batch = _batch(trainer)
    assert batch["teacher_index"].tolist() == [1, 0, 1, 1, 0, 0]
    routed = F.one_hot(batch["teacher_index"], 2).float()
    expected = _reference_loss(trainer.model, trainer.teacher_signal.teachers, batch, routed)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)


def test_without_a_routing_column_the_target_is_the_teachers_average(tmp_path, tokenizer, examples, teacher_dirs):
    trainer = _trainer(tmp_path, tokenizer, examples, teacher_dirs)
    batch = _batch(trainer)
    teachers = trainer.teacher_signal.teachers
    expected = _reference_loss(trainer.model, teachers, batch, torch.full((6, 2), 0.5))
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)
    assert trainer.teacher is teachers[0], "the teacher with the fewest head rows bounds what is sampled"


def test_several_teachers_train_end_to_end_from_the_command_line(tmp_path, examples, teacher_dirs, model_dirs, capsys):
    from llmdistill.cli import main

    rows = [{"prompt": e["prompt"], "output": e["response"], "expert": i % 2} for i, e in enumerate(examples)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"teacher_model_name_or_path": teacher_dirs, "teacher_routing_column": "expert"}))
    out = tmp_path / "run"
    main(["train", str(config), "--student_model_name_or_path", str(model_dirs[1]), "--dataset_name_or_path",
          str(data), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
          "--use_cpu", "--report_to", "none"])
    assert (out / "model.safetensors").is_file()
    kd = float(capsys.readouterr().out.split(" kd=")[1].split()[0])
    assert 0 < kd < float("inf")


@pytest.mark.parametrize("overrides, field", [
    ({"objective": "dskd"}, "objective"),
    ({"source": "switch"}, "source"),
    ({"teacher_routing_column": "expert", "source": "student"}, "source"),
    ({"teacher_cache": "cache"}, "teacher_cache"),
])
def test_what_several_teachers_do_not_support_is_named(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        DistillConfig(output_dir="out", teacher_model_name_or_path="a,b", **overrides)


def test_a_routing_column_needs_several_teachers():
    with pytest.raises(ConfigError, match="teacher_routing_column='expert' routes rows between several teachers"):
        DistillConfig(output_dir="out", teacher_model_name_or_path="a", teacher_routing_column="expert")


def test_rows_that_name_no_teacher_are_listed(tmp_path, tokenizer, examples, teacher_dirs):
    with pytest.raises(DataError, match=r"3 rows do not \(row 2: 2, row 3: 5, row 4: -1\)"):
        _trainer(tmp_path, tokenizer, examples[:4], teacher_dirs, [0, 2, 5, -1], teacher_routing_column="expert")
    with pytest.raises(DataError, match=r"1 rows do not \(row 2: 'nobody'\)"):
        _trainer(tmp_path, tokenizer, examples[:2], teacher_dirs, [teacher_dirs[0], "nobody"],
                 teacher_routing_column="expert")
    with pytest.raises(DataError, match="teacher_routing_column='route' is not a column"):
        _trainer(tmp_path, tokenizer, examples, teacher_dirs, [0] * len(examples), teacher_routing_column="route")


def test_the_student_writes_and_the_teachers_average_scores_its_responses(tmp_path, tokenizer, examples, teacher_dirs):
    trainer = _trainer(tmp_path, tokenizer, examples, teacher_dirs, source="student", max_new_tokens=8,
                       logging_steps=1)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["generated_batches_fraction"] == 1.0 and 0 < logged["kd"] < float("inf")
    assert "jsd_0-15" in logged, "the JSD statistics read the mixture too"
