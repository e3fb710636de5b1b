"""End to end through the console script: `llmdistill train` on tiny real models saved to folders."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmdistill.models import load_tokenizer

from conftest import SHARED_DATA, needs_shared_data, tiny_gpt2, tiny_llama

CONFIGS = Path(__file__).parents[1] / "configs"


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmdistill", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def write_config(tmp_path, teacher_dir, student_dir, train_file, **options):
    config = {
        "teacher_model_name_or_path": str(teacher_dir),
        "student_model_name_or_path": str(student_dir),
        "dataset_name_or_path": str(train_file),
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "divergence": "jsd",
        "report_to": [],
        "use_cpu": True,
        **options,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_from_yaml_saves_a_loadable_student_that_generates(tmp_path, model_dirs, train_file):
    teacher_dir, student_dir = model_dirs
    config = write_config(tmp_path, teacher_dir, student_dir, train_file)
    result = run_cli("train", str(config), "--alpha_kd", "0.7", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "run"
    student = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert student.config.model_type == "llama"
    prompt = tokenizer("### Instruction:\nSort 2, 1\n\n### Response:\n", return_tensors="pt")
    generated = student.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4 or tokenizer.eos_token_id in generated[0]
    resolved = yaml.safe_load((out / "distill_config.yaml").read_text())
    assert resolved["alpha_kd"] == 0.7 and resolved["divergence"] == "jsd"


def test_bad_option_fails_before_training_with_a_clear_message(tmp_path, model_dirs, train_file):
    teacher_dir, student_dir = model_dirs
    config = write_config(tmp_path, teacher_dir, student_dir, train_file)
    result = run_cli("train", str(config), "--divergence", "kl", cwd=tmp_path)
    assert result.returncode != 0
    assert "divergence='kl' is unknown" in result.stderr and "Did you mean 'fkl'?" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_student_is_named(tmp_path, train_file):
    result = run_cli("train", "--dataset_name_or_path", str(train_file), "--use_cpu", "true", cwd=tmp_path)
    assert result.returncode != 0
    assert "student_model_name_or_path" in result.stderr


@needs_shared_data
def test_dskd_eta_from_a_gpt2_tokenizer_teacher_into_a_llama_tokenizer_student(tmp_path, train_file):
    teacher_tokenizer = load_tokenizer(str(SHARED_DATA / "tokenizers" / "gpt2"))
    student_tokenizer = load_tokenizer(str(SHARED_DATA / "tokenizers" / "llama2"))
    teacher_dir, student_dir = tmp_path / "gpt2-teacher", tmp_path / "llama-student"
    for directory, model, tokenizer in (
        (teacher_dir, tiny_gpt2(len(teacher_tokenizer)), teacher_tokenizer),
        (student_dir, tiny_llama(len(student_tokenizer)), student_tokenizer),
    ):
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    config = write_config(tmp_path, teacher_dir, student_dir, train_file, objective="dskd_eta", logging_steps=1)
    result = run_cli("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    fractions = [float(v) for v in re.findall(r"aligned_fraction=([0-9.e-]+)", result.stdout)]
    assert len(fractions) == 3 and all(0.3 < fraction <= 1 for fraction in fractions)
    out = tmp_path / "run"
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.vocab_size == len(student_tokenizer)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == student_tokenizer.get_vocab()
    assert (out / "projectors.safetensors").is_file()


@needs_shared_data
def test_align_shows_both_tokenisations_and_the_coverage(tmp_path):
    tokenizers = SHARED_DATA / "tokenizers"
    args = ["align", "--teacher", str(tokenizers / "gpt2"), "--student", str(tokenizers / "llama2")]
    shown = run_cli(*args, "--text", "48/2 = <<48/2=24>>24 clips.\nDone", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert re.search(r'"\\n"\s+=\s+"\\n"', shown.stdout)
    assert re.search(r"aligned: \d+ of \d+ teacher tokens .*student tokens", shown.stdout)
    text_file = tmp_path / "text.txt"
    text_file.write_text("a b", encoding="utf-8")
    as_json = json.loads(run_cli(*args, "--file", str(text_file), "--json", cwd=tmp_path).stdout)
    assert as_json["pairs"] == [[0, 0], [1, 1]]
    assert as_json["student"]["aligned_fraction"] == 1.0


def test_shipped_switch_and_gkd_configs_train_tiny_models(tmp_path, model_dirs, train_file):
    """configs/switch.yaml and configs/gkd.yaml as shipped, with only the models, data and run length overridden."""
    teacher_dir, student_dir = model_dirs
    for name in ("switch", "gkd"):
        out = tmp_path / name
        result = run_cli(
            "train", str(CONFIGS / f"{name}.yaml"), "--teacher_model_name_or_path", str(teacher_dir),
            "--student_model_name_or_path", str(student_dir), "--dataset_name_or_path", str(train_file),
            "--output_dir", str(out), "--max_steps", "2", "--max_new_tokens", "8", "--logging_steps", "1",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--use_cpu", "true",
            "--save_strategy", "no", "--report_to", "none", cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        resolved = yaml.safe_load((out / "distill_config.yaml").read_text())
        assert resolved["source"] == {"switch": "switch", "gkd": "mixed"}[name]
        assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
        if name == "switch":
            assert "teacher_written_fraction" in result.stdout
