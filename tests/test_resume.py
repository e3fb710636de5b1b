"""Resuming from a checkpoint continues exactly as the uninterrupted run: weights, optimizer, scheduler, RNG, data
position, DSKD's projectors and, for generating sources, the sampling generator, the replay buffer and p_SGO."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.errors import ConfigError

STEPS, KILLED_AT = 6, 3


class _Killed(Exception):
    pass


class _KillAfterSaving(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == KILLED_AT:
            raise _Killed


def _trainer(output_dir, model_dirs, tokenizer, examples, **overrides) -> DistillTrainer:
    teacher_dir, student_dir = model_dirs
    rows = datasets.Dataset.from_list([{"prompt": e["prompt"], "response": e["response"]} for e in examples])
    options = dict(
        output_dir=str(output_dir), student_model_name_or_path=str(student_dir),
        teacher_model_name_or_path=str(teacher_dir), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=1e-2, lr_scheduler_type="cosine", save_strategy="steps", save_steps=KILLED_AT, seed=3,
        report_to=[], use_cpu=True, disable_tqdm=True, max_new_tokens=12,
    )
    config = DistillConfig(**(options | overrides))
    evaluation = rows.select(range(8)) if config.source == "adaptive" else None
    trainer = DistillTrainer(args=config, train_dataset=rows, eval_dataset=evaluation, processing_class=tokenizer)
    if config.source == "adaptive":  # p_SGO starts at 0 and six steps may never raise it: generate and replay now
        trainer.sequences.source.student_probability = 0.5
    return trainer


def _final_weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


@pytest.mark.parametrize("overrides", [
    {"objective": "vanilla"},
    {"objective": "dskd"},
    {"objective": "vanilla", "source": "mixed"},
    {"objective": "vanilla", "source": "adaptive", "eval_strategy": "steps", "eval_steps": 2, "replay_buffer_size": 8},
], ids=["vanilla", "dskd", "mixed", "adaptive"])
def test_resume_after_a_kill_ends_with_the_uninterrupted_runs_weights(tmp_path, model_dirs, tokenizer, examples,
                                                                      overrides):
    whole = _trainer(tmp_path / "whole", model_dirs, tokenizer, examples, **overrides)
    whole.train()
    whole.save_model()

    killed = _trainer(tmp_path / "resumed", model_dirs, tokenizer, examples, **overrides)
    killed.add_callback(_KillAfterSaving())
    with pytest.raises(_Killed):
        killed.train()
    resumed = _trainer(tmp_path / "resumed", model_dirs, tokenizer, examples, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / f"checkpoint-{KILLED_AT}"))
    resumed.save_model()

    expected, actual = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "resumed")
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_resuming_from_a_checkpoint_of_another_source_or_without_its_source_state_says_so(tmp_path, model_dirs,
                                                                                          tokenizer, examples):
    _trainer(tmp_path / "gt", model_dirs, tokenizer, examples, objective="vanilla", max_steps=KILLED_AT).train()
    on_policy = _trainer(tmp_path / "mixed", model_dirs, tokenizer, examples, objective="vanilla", source="mixed")
    with pytest.raises(ConfigError, match="written by a run with source='gt', this run has source='mixed'"):
        on_policy.train(resume_from_checkpoint=str(tmp_path / "gt" / f"checkpoint-{KILLED_AT}"))

    on_policy.args.max_steps = KILLED_AT
    on_policy.train()
    checkpoint = tmp_path / "mixed" / f"checkpoint-{KILLED_AT}"
    (checkpoint / "sequence_source_rank0.pt").unlink()  # as if written on another number of processes
    again = _trainer(tmp_path / "mixed", model_dirs, tokenizer, examples, objective="vanilla", source="mixed")
    with pytest.raises(ConfigError, match="sequence_source_rank0.pt is missing.*source='mixed'"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_llmdistill_train_resumes_from_the_last_checkpoint(tmp_path, model_dirs, examples):
    from llmdistill.trainer import distill

    teacher_dir, student_dir = model_dirs
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": e["prompt"], "response": e["response"]}) + "\n" for e in examples))
    options = dict(
        output_dir=str(tmp_path / "out"), student_model_name_or_path=str(student_dir),
        teacher_model_name_or_path=str(teacher_dir), dataset_name_or_path=str(data), objective="dskd",
        per_device_train_batch_size=4, save_strategy="steps", save_steps=KILLED_AT, report_to=[], use_cpu=True,
        disable_tqdm=True,
    )
    distill(DistillConfig(**options, max_steps=KILLED_AT))
    state_file = tmp_path / "out" / f"checkpoint-{KILLED_AT}" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"].append({"marker": "from the checkpoint", "step": KILLED_AT})
    state_file.write_text(json.dumps(state))
    resumed = distill(DistillConfig(**options, max_steps=STEPS, resume_from_checkpoint="last"))
    assert resumed.state.global_step == STEPS
    assert {"marker": "from the checkpoint", "step": KILLED_AT} in resumed.state.log_history
