"""Every objective and source on real pretrained checkpoints (../shared/models/fetch.py), not models built here.

Same tokenizer: Qwen2.5-Coder-0.5B-Instruct teaches the same model cut to its first two layers (the common
distillation initialisation; the 1.5B teacher does not fit a test's time on 2 cores). Different tokenizers: the
0.5B model teaches SmolLM2-135M-Instruct. GSM8K rows through the chat templates, two steps each. The tests find the
models in $LLMDISTILL_MODELS and skip when it is unset. All of them take about 10 minutes on 2 CPU cores, so the
suite (and CI) runs a subset, one case of each kind, in about 4; LLMDISTILL_REAL_TESTS=all runs every case:

    python ../shared/models/fetch.py ~/.cache/llmdistill-models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
    LLMDISTILL_MODELS=~/.cache/llmdistill-models LLMDISTILL_REAL_TESTS=all python -m pytest tests/test_real_models.py -q
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.cli import main as cli_main

from conftest import SHARED_DATA

MODELS = Path(os.environ.get("LLMDISTILL_MODELS", "")).expanduser()
QWEN, SMOLLM = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"
pytestmark = pytest.mark.skipif(
    not os.environ.get("LLMDISTILL_MODELS") or not all((MODELS / name / "config.json").is_file() for name in (QWEN, SMOLLM)),
    reason=f"real checkpoints: set LLMDISTILL_MODELS to a folder with {QWEN} and {SMOLLM} (../shared/models/fetch.py)",
)
GSM8K = SHARED_DATA / "datasets" / "gsm8k"
every_case = pytest.mark.skipif(
    os.environ.get("LLMDISTILL_REAL_TESTS") != "all",
    reason="a real-model case outside the suite's subset: set LLMDISTILL_REAL_TESTS=all",
)


def cases(names: list[str], in_subset: tuple[str, ...]) -> list:
    """`names` as parameters, those outside `in_subset` only with LLMDISTILL_REAL_TESTS=all."""
    return [name if name in in_subset else pytest.param(name, marks=every_case) for name in names]


def gsm8k_rows(split: str, count: int, longest_answer: int = 160) -> datasets.Dataset:
    """The first `count` short GSM8K problems as chat turns (short answers keep two steps to seconds)."""
    rows = []
    with open(GSM8K / f"{split}.jsonl") as lines:
        for line in lines:
            row = json.loads(line)
            if len(row["answer"]) <= longest_answer:
                rows.append({"messages": [{"role": "user", "content": row["question"]},
                                          {"role": "assistant", "content": row["answer"]}]})
            if len(rows) == count:
                break
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def qwen_teacher():
    return AutoModelForCausalLM.from_pretrained(MODELS / QWEN, dtype=torch.float32)


@pytest.fixture(scope="module")
def cut_student_dir(tmp_path_factory, qwen_teacher) -> Path:
    """The teacher's first two layers (embeddings, final norm and tied head kept): a 0.16 B same-vocabulary student."""
    folder = tmp_path_factory.mktemp("qwen-2-layers")
    model = AutoModelForCausalLM.from_pretrained(MODELS / QWEN, dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:2]
    model.save_pretrained(folder)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(MODELS / QWEN).save_pretrained(folder)
    return folder


def train(tmp_path, student: Path, teacher, steps: int = 2, rows: int = 8, **options) -> DistillTrainer:
    config = DistillConfig(**({
        "output_dir": str(tmp_path / "out"), "objective": "vanilla", "per_device_train_batch_size": 2,
        "max_length": 160, "max_prompt_length": 128, "max_new_tokens": 8, "learning_rate": 1e-5,
        "max_steps": steps, "logging_steps": 1, "report_to": [], "use_cpu": True, "seed": 0, "disable_tqdm": True,
    } | options))
    teacher_tokenizer = None if teacher is None else MODELS / QWEN
    trainer = DistillTrainer(
        model=str(student), teacher=teacher, args=config, train_dataset=gsm8k_rows("train", rows),
        eval_dataset=gsm8k_rows("test", 4) if config.source == "adaptive" else None,
        teacher_processing_class=None if teacher_tokenizer is None else _tokenizer(teacher_tokenizer),
    )
    trainer.train()
    trainer.save_model()
    return trainer


def _tokenizer(folder: Path):
    from llmdistill.models import load_tokenizer

    return load_tokenizer(str(folder))


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]


def assert_trained_and_reloadable(trainer, terms=("loss", "ce")) -> None:
    logs = step_logs(trainer)
    assert len(logs) == trainer.args.max_steps
    for entry in logs:
        for term in terms:
            assert math.isfinite(entry[term]), (term, entry)
    out = Path(trainer.args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    saved = load_file(out / "model.safetensors")
    name = next(name for name in saved if name.endswith("norm.weight"))
    torch.testing.assert_close(reloaded.state_dict()[name], saved[name])


@pytest.mark.parametrize("objective", cases(["sft", "vanilla", "dskd", "dskd_v1"], ("dskd",)))
def test_same_tokenizer_objectives(tmp_path, cut_student_dir, qwen_teacher, objective):
    teacher = None if objective == "sft" else qwen_teacher
    trainer = train(tmp_path, cut_student_dir, teacher, objective=objective)
    terms = ("loss", "ce") + (("ce_ts", "kd_ts", "kd_st", "t2s_accuracy") if objective.startswith("dskd") else ())
    assert_trained_and_reloadable(trainer, terms)
    if objective.startswith("dskd"):
        assert (Path(trainer.args.output_dir) / "projectors.safetensors").is_file()


@pytest.mark.parametrize("objective", cases(["dskd_eta", "cma", "uld", "mined", "simple_ctkd"], ("dskd_eta", "uld")))
def test_cross_tokenizer_objectives(tmp_path, qwen_teacher, objective):
    trainer = train(tmp_path, MODELS / SMOLLM, qwen_teacher, objective=objective)
    assert_trained_and_reloadable(trainer, ("loss", "ce", "kd"))
    if objective in ("dskd_eta", "simple_ctkd"):
        assert all(entry["aligned_fraction"] > 0.5 for entry in step_logs(trainer))  # real tokenizers mostly agree


@pytest.mark.parametrize(
    "source", cases(["teacher", "student", "mixed", "adaptive", "skd", "mixture", "switch"], ("student", "switch"))
)
def test_sources(tmp_path, cut_student_dir, qwen_teacher, source):
    options = {"source": source, "mixed_lambda": 1.0}
    if source == "adaptive":
        options |= {"eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 2}
    trainer = train(tmp_path, cut_student_dir, qwen_teacher, **options)
    assert_trained_and_reloadable(trainer, ("loss", "kd"))
    if source == "switch":
        assert all(0 <= entry["teacher_written_fraction"] <= 1 for entry in step_logs(trainer))


@every_case
def test_opd_and_cross_tokenizer_on_policy(tmp_path, cut_student_dir, qwen_teacher):
    opd = train(tmp_path / "opd", cut_student_dir, qwen_teacher, objective="opd", source="student")
    assert_trained_and_reloadable(opd, ("loss",))
    eta = train(tmp_path / "eta", MODELS / SMOLLM, qwen_teacher, objective="dskd_eta", source="student")
    assert_trained_and_reloadable(eta, ("loss", "kd"))


def test_dskd_eta_projector_terms_fall_from_the_first_step(tmp_path, qwen_teacher):
    """The papers' projector rate 1e-3 took ce_ts 3.6 -> 18 at step 2 on this pair; the scaled default must not."""
    trainer = train(tmp_path, MODELS / SMOLLM, qwen_teacher, steps=6, rows=12, objective="dskd_eta")
    ce_ts = [entry["ce_ts"] for entry in step_logs(trainer)]
    assert max(ce_ts[1:]) < 1.2 * ce_ts[0], ce_ts
    assert min(ce_ts[-2:]) < ce_ts[0], ce_ts


def test_teacher_cache_gives_the_live_teachers_loss(tmp_path, cut_student_dir, qwen_teacher):
    live = train(tmp_path / "live", cut_student_dir, qwen_teacher, steps=1)
    cached = train(tmp_path / "cached", cut_student_dir, str(MODELS / QWEN), steps=1,
                   teacher_cache=str(tmp_path / "cache"))
    assert (tmp_path / "cache").is_dir()
    for term in ("loss", "kd", "ce"):
        assert step_logs(cached)[0][term] == pytest.approx(step_logs(live)[0][term], rel=1e-4)


def test_lora_adapter_trains_and_merges(tmp_path, cut_student_dir, qwen_teacher):
    pytest.importorskip("peft")
    trainer = train(tmp_path, cut_student_dir, qwen_teacher, use_peft=True, lora_r=4)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    cli_main(["merge", str(tmp_path / "out"), str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.num_hidden_layers == 2
    assert all(math.isfinite(entry["loss"]) for entry in step_logs(trainer))


@every_case
def test_resume_continues_exactly(tmp_path, cut_student_dir, qwen_teacher):
    options = dict(steps=3, objective="dskd", save_strategy="steps", save_steps=2)
    whole = train(tmp_path / "whole", cut_student_dir, qwen_teacher, **options)
    config = whole.args.to_dict()
    resumed = DistillTrainer(
        model=str(cut_student_dir), teacher=qwen_teacher,
        args=DistillConfig(**(config | {"output_dir": str(tmp_path / "resumed")})), train_dataset=gsm8k_rows("train", 8),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-2"))
    for mine, theirs in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


@every_case
def test_eval_on_gsm8k(tmp_path, cut_student_dir):
    results = tmp_path / "eval"
    cli_main(["eval", str(cut_student_dir), "--data", str(GSM8K / "test.jsonl"), "--teacher", str(MODELS / QWEN),
              "--greedy", "--limit", "3", "--max-length", "200", "--output-dir", str(results)])
    text = "".join(path.read_text() for path in results.iterdir() if path.suffix in (".json", ".md"))
    assert "gsm8k" in text.lower()
