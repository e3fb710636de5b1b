"""LoRA students through peft: DSKD trains the adapters only (the closed-form projector is computed once, since the
head is frozen), the run saves an adapter, and `llmdistill merge` folds it into a plain HF model; activation
(gradient) checkpointing leaves the training unchanged."""

from __future__ import annotations

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.cli import main as cli
from llmdistill.errors import ModelError
from llmdistill.models import merge_adapter

peft = pytest.importorskip("peft", reason="LoRA needs the peft extra")


def _trainer(output_dir, model_dirs, tokenizer, examples, **overrides) -> DistillTrainer:
    teacher_dir, student_dir = model_dirs
    rows = datasets.Dataset.from_list([{"prompt": e["prompt"], "response": e["response"]} for e in examples[:16]])
    options = dict(
        output_dir=str(output_dir), student_model_name_or_path=str(student_dir),
        teacher_model_name_or_path=str(teacher_dir), objective="dskd", use_peft=True, lora_r=4, lora_dropout=0.0,
        max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, seed=0, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no",
    )
    return DistillTrainer(args=DistillConfig(**(options | overrides)), train_dataset=rows, processing_class=tokenizer)


def test_dskd_with_a_lora_student_trains_the_adapter_saves_it_and_merges_into_a_plain_model(tmp_path, model_dirs,
                                                                                            tokenizer, examples):
    trainer = _trainer(tmp_path / "run", model_dirs, tokenizer, examples)
    student = trainer.model
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    s2t = trainer.projectors.s2t.weight
    s2t_version = s2t._version
    trainer.train()
    trainer.save_model()

    for name, parameter in student.named_parameters():
        if name not in trainable:
            assert torch.equal(parameter, before[name]), f"frozen {name} changed"
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters() if "lora_B" in n)
    assert s2t._version == s2t_version, "the head is frozen: the closed-form s2t must not be recomputed"

    output = tmp_path / "run"
    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    assert (output / "projectors.safetensors").is_file()
    cli(["merge", str(output), str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in load_file(tmp_path / "merged" / "model.safetensors"))
    ids = torch.tensor([tokenizer("a b c d")["input_ids"]])
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, student(ids).logits, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_trains_the_same_lora_student(tmp_path, model_dirs, tokenizer, examples):
    plain = _trainer(tmp_path / "plain", model_dirs, tokenizer, examples, objective="vanilla")
    checkpointed = _trainer(tmp_path / "checkpointed", model_dirs, tokenizer, examples, objective="vanilla",
                            activation_checkpointing=True)
    for trainer in (plain, checkpointed):
        trainer.train()
    assert checkpointed.model.base_model.model.is_activation_checkpointing
    expected = dict(plain.model.named_parameters())
    for name, parameter in checkpointed.model.named_parameters():
        torch.testing.assert_close(parameter, expected[name], rtol=0, atol=1e-6, msg=name)


def test_merging_a_folder_without_an_adapter_says_so(tmp_path, model_dirs):
    with pytest.raises(ModelError, match="adapter_config.json"):
        merge_adapter(model_dirs[1], tmp_path / "merged")
