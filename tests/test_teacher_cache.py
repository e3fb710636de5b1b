"""Teacher cache: a hidden-state cache trains exactly as the live teacher; a top-k cache trains on the renormalised
top-k teacher distribution (checked against that plain formula); a cache that does not match the run is refused."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.data import IGNORE_INDEX, prepare_dataset, resolve_format
from llmdistill.models import freeze
from llmdistill.teacher_cache import build_teacher_cache


def _rows(examples):
    return datasets.Dataset.from_list([{"prompt": e["prompt"], "response": e["response"]} for e in examples])


def _trainer(output_dir, model_dirs, tokenizer, examples, **overrides) -> DistillTrainer:
    teacher_dir, student_dir = model_dirs
    options = dict(
        output_dir=str(output_dir), student_model_name_or_path=str(student_dir),
        teacher_model_name_or_path=str(teacher_dir), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, seed=3, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
    )
    rows = _rows(examples)
    return DistillTrainer(args=DistillConfig(**(options | overrides)), train_dataset=rows.select(range(32)),
                          eval_dataset=rows.select(range(32, 40)), processing_class=tokenizer)


def _trained_weights(trainer) -> dict[str, torch.Tensor]:
    trainer.train()
    trainer.save_model()
    return load_file(f"{trainer.args.output_dir}/model.safetensors")


@pytest.mark.parametrize("objective", ["vanilla", "dskd"])
def test_training_from_a_hidden_state_cache_equals_training_with_the_live_teacher(tmp_path, model_dirs, tokenizer,
                                                                                 examples, objective):
    live = _trained_weights(_trainer(tmp_path / "live", model_dirs, tokenizer, examples, objective=objective))
    cache = tmp_path / "cache"
    first = _trainer(tmp_path / "first", model_dirs, tokenizer, examples, objective=objective, teacher_cache=str(cache))
    assert (cache / "signal-00000.safetensors").is_file()
    (model_dirs[0] / "model.safetensors").unlink()  # later runs never load the teacher's weights
    cached = _trainer(tmp_path / "cached", model_dirs, tokenizer, examples, objective=objective,
                      teacher_cache=str(cache))
    assert not any(name.startswith("transformer.") for name, _ in cached.teacher.named_parameters())
    for run in (first, cached):
        weights = _trained_weights(run)
        for name in live:
            torch.testing.assert_close(weights[name], live[name], rtol=0, atol=1e-5)
    assert "eval_kd" in cached.evaluate()


def test_top_k_cache_trains_on_the_renormalised_top_k_teacher_distribution(tmp_path, model_dirs, tokenizer, examples):
    k, temperature, alpha = 5, 2.0, 0.5
    trainer = _trainer(tmp_path / "run", model_dirs, tokenizer, examples, teacher_cache=str(tmp_path / "cache"),
                       teacher_cache_kind="topk", teacher_cache_top_k=k, temperature=temperature, alpha_kd=alpha)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)

    teacher = AutoModelForCausalLM.from_pretrained(model_dirs[0])
    labels = batch["labels"][:, 1:]
    supervised = labels != IGNORE_INDEX
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    teacher_logits, student_logits = teacher_logits[:, :-1][supervised], student_logits[:, :-1][supervised]
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    top = p.topk(k, dim=-1)
    p_k = torch.zeros_like(p).scatter_(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    kd = (torch.xlogy(p_k, p_k) - p_k * log_q).sum()
    ce = F.cross_entropy(student_logits.double(), labels[supervised], reduction="sum")
    expected = ((1 - alpha) * ce + alpha * kd) / supervised.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_a_cache_that_does_not_match_the_run_is_refused(tmp_path, model_dirs, tokenizer, examples):
    cache = str(tmp_path / "cache")
    _trainer(tmp_path / "a", model_dirs, tokenizer, examples, teacher_cache=cache, teacher_cache_kind="topk",
             teacher_cache_top_k=4)
    with pytest.raises(ValueError, match="its temperature is 1.0, the run's is 2.0"):
        _trainer(tmp_path / "b", model_dirs, tokenizer, examples, teacher_cache=cache, teacher_cache_kind="topk",
                 teacher_cache_top_k=4, temperature=2.0)
    with pytest.raises(ValueError, match="its kind is 'topk', the run's is 'hidden'"):
        _trainer(tmp_path / "c", model_dirs, tokenizer, examples, teacher_cache=cache)
    with pytest.raises(ValueError, match="its train_data is"):
        _trainer(tmp_path / "d", model_dirs, tokenizer, examples[::-1], teacher_cache=cache,
                 teacher_cache_kind="topk", teacher_cache_top_k=4)


@pytest.mark.parametrize("overrides, message", [
    ({"source": "mixed"}, "source='gt'"),
    ({"objective": "uld"}, "same-vocabulary objective"),
    ({"teacher_cache_kind": "topk", "divergence": "rkl"}, "divergence fkl, jsd, skl, srkl, tvd"),
    ({"teacher_cache_kind": "topk", "objective": "dskd"}, "objective 'vanilla'"),
    ({"teacher_cache_kind": "logits"}, "teacher_cache_kind='logits' is unknown"),
])
def test_teacher_cache_settings_that_cannot_work_are_refused_before_any_model_loads(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(output_dir=str(tmp_path), teacher_cache=str(tmp_path / "cache"), report_to=[],
                      **overrides)


@pytest.mark.parametrize("kind", ["hidden", "topk"])
def test_a_cache_written_in_many_shards_reads_back_the_signal_of_one_shard(tmp_path, model_dirs, tokenizer, examples,
                                                                          kind):
    rows = prepare_dataset(_rows(examples[:20]), tokenizer, resolve_format(["prompt", "response"], "prompt", None,
                                                                           "messages"), 256, 512)
    teacher = freeze(AutoModelForCausalLM.from_pretrained(model_dirs[0]))
    built = {
        name: build_teacher_cache(tmp_path / name, teacher, [rows.select(range(12)), rows.select(range(12, 20))],
                                  tokenizer.pad_token_id, kind, top_k=4, batch_size=3, shard_bytes=shard_bytes)
        for name, shard_bytes in (("one", 1 << 30), ("many", 1))
    }
    assert len(list((tmp_path / "one").glob("signal-*"))) == 1
    assert len(list((tmp_path / "many").glob("signal-*"))) == 7  # one per batch of 3 rows
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    for batch in order.split(5):
        torch.testing.assert_close(built["many"].signal(batch), built["one"].signal(batch), rtol=0, atol=0)
