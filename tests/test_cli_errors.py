"""The CLI's error contract: bad input ends in one line, `llmdistill: error: ...` on stderr naming the field (and file
and line) and the fix, exit status 2, and nothing trained or written. One test per kind of bad input, through
`llmdistill.cli.main` on tiny real models saved to folders."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmdistill.cli import main
from llmdistill.quickstart.tokenizer import train_tokenizer

from conftest import tiny_llama, write_jsonl


def fails(*argv: str, capsys) -> str:
    """Runs the CLI, expects exit status 2 and returns its one stderr line (without the `llmdistill: error: `)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("llmdistill: error: "), lines
    assert "Traceback" not in "\n".join(lines)
    return lines[-1].removeprefix("llmdistill: error: ")


def console_script(*argv: str, cwd, env=None) -> subprocess.CompletedProcess:
    """Runs `llmdistill` as users run it, in a subprocess (its own stderr, where every logger writes)."""
    return subprocess.run([sys.executable, "-m", "llmdistill", *argv], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


@pytest.fixture()
def train_args(tmp_path, model_dirs, train_file) -> list[str]:
    teacher_dir, student_dir = model_dirs
    return [
        "train", "--teacher_model_name_or_path", str(teacher_dir), "--student_model_name_or_path", str(student_dir),
        "--dataset_name_or_path", str(train_file), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none",
    ]


def test_a_missing_column_names_the_columns_and_the_option(train_args, capsys, tmp_path):
    message = fails(*train_args, "--prompt_column", "question", capsys=capsys)
    assert "dataset_name_or_path=" in message and "'question'" in message and "Set prompt_column" in message
    assert not (tmp_path / "run").exists()


def test_an_empty_response_names_its_row(train_args, capsys, tmp_path, examples):
    rows = [{"prompt": e["prompt"], "output": e["response"]} for e in examples[:4]]
    rows[2]["output"] = " "
    data = write_jsonl(tmp_path / "empty_response.jsonl", rows)
    message = fails(*train_args, "--dataset_name_or_path", str(data), capsys=capsys)
    assert "1 of 4 rows cannot be used" in message and "row 3: the response is empty" in message


def test_a_malformed_json_line_is_named_with_its_number(train_args, capsys, tmp_path, train_file):
    lines = train_file.read_text().splitlines()
    lines.insert(4, '{"prompt": "x", "output": ')
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n")
    message = fails(*train_args, "--dataset_name_or_path", str(data), capsys=capsys)
    assert f"dataset_name_or_path='{data}': line 5 is not valid JSON" in message


def test_a_missing_dataset_file_is_named(train_args, capsys):
    message = fails(*train_args, "--dataset_name_or_path", "missing.jsonl", capsys=capsys)
    assert message.startswith("dataset_name_or_path='missing.jsonl': no such file")


@pytest.mark.parametrize("field", ["teacher_model_name_or_path", "student_model_name_or_path"])
def test_train_names_a_missing_model_folder_before_loading_anything(train_args, capsys, tmp_path, field):
    message = fails(*train_args, f"--{field}", str(tmp_path / "nowhere"), capsys=capsys)
    assert message == f"{field}='{tmp_path / 'nowhere'}': no such folder. Give the folder that save_pretrained wrote."


def test_a_folder_without_a_model_is_named(train_args, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    message = fails(*train_args, "--teacher_model_name_or_path", str(tmp_path / "empty"), capsys=capsys)
    assert message.startswith(f"teacher_model_name_or_path='{tmp_path / 'empty'}': the folder holds no loadable model")


def test_eval_align_and_merge_name_a_missing_model(capsys, tmp_path, model_dirs, train_file):
    teacher_dir, student_dir = model_dirs
    missing = str(tmp_path / "nowhere")
    assert fails("eval", missing, "--data", str(train_file), capsys=capsys).startswith(f"model='{missing}': no such")
    message = fails("eval", str(student_dir), "--teacher", missing, "--data", str(train_file), capsys=capsys)
    assert message.startswith(f"--teacher='{missing}': no such folder")
    message = fails("align", "--teacher", str(teacher_dir), "--student", missing, "--text", "a b", capsys=capsys)
    assert message.startswith(f"--student='{missing}': no such folder")
    assert "adapter_config.json" in fails("merge", missing, str(tmp_path / "merged"), capsys=capsys)
    assert not (tmp_path / "merged").exists() and not (student_dir / "eval").exists()


def test_eval_names_a_bad_line_of_its_data(capsys, tmp_path, model_dirs):
    data = tmp_path / "dolly.jsonl"
    data.write_text('{"prompt": "a", "output": "b"}\n{"prompt": "a" "output": "b"}\n')
    message = fails("eval", str(model_dirs[1]), "--data", str(data), capsys=capsys)
    assert message.startswith(f"--data {data}: line 2 is not valid JSON")


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("objective", "vanila", "objective='vanila' is unknown: choose one of sft, vanilla,"),
    ("divergence", "kl", "divergence='kl' is unknown: choose one of fkl,"),
    ("source", "swich", "source='swich' is unknown: choose one of gt,"),
])
def test_an_unknown_name_lists_the_choices_and_suggests_one(train_args, capsys, option, value, expected):
    message = fails(*train_args, f"--{option}", value, capsys=capsys)
    suggestion = {"objective": "vanilla", "divergence": "fkl", "source": "switch"}[option]
    assert message.startswith(expected) and message.endswith(f"Did you mean {suggestion!r}?")


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("alpha_kd", "1.5", "alpha_kd=1.5 must lie in [0, 1]"),
    ("jsd_beta", "nan", "jsd_beta=nan must lie in [0, 1]"),
    ("generation_top_p", "0", "generation_top_p=0.0 must lie in (0, 1]"),
    ("per_device_train_batch_size", "0", "per_device_train_batch_size=0 must be ≥ 1"),
    ("max_length", "100", "max_length=100 must exceed max_prompt_length=256"),
    ("max_steps", "ten", "argument --max_steps/--max-steps: invalid int value: 'ten'"),
    ("divergense", "fkl", "unknown command-line option '--divergense'. Did you mean --divergence?"),
])
def test_a_bad_number_or_option_is_named_with_its_rule(train_args, capsys, option, value, expected):
    assert fails(*train_args, f"--{option}", value, capsys=capsys).startswith(expected)


def test_a_bad_config_file_is_named_with_its_line(train_args, capsys, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("objective: vanilla\ndivergence: [fkl\n")
    assert fails("train", str(config), capsys=capsys).startswith(f"{config} line 3: not valid YAML")
    config.write_text("objective: vanilla\ndivergense: fkl\n")
    message = fails("train", str(config), capsys=capsys)
    assert message == f"{config}: unknown option 'divergense'. Did you mean 'divergence'?"
    config.write_text("objective: vanilla\nalpha_kd: [0.5]\n")
    assert fails("train", str(config), capsys=capsys) == "alpha_kd=[0.5] must be float, not list."


@pytest.fixture()
def other_tokenizer_student(tmp_path, examples):
    """A student folder whose tokenizer is not the teacher's (merges learned from other text)."""
    tokenizer = train_tokenizer([(e["prompt"] + e["response"]).upper() for e in examples], vocab_size=300)
    folder = tmp_path / "other-student"
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_same_vocabulary_objective_across_tokenizers_says_which_objectives_work(train_args, capsys,
                                                                                  other_tokenizer_student):
    message = fails(*train_args, "--student_model_name_or_path", str(other_tokenizer_student), capsys=capsys)
    assert "objective 'vanilla' needs teacher and student to share one vocabulary" in message
    assert "dskd_eta, uld, mined, cma, simple_ctkd" in message


def test_a_lock_step_source_across_tokenizers_says_which_sources_work(train_args, capsys):
    message = fails(*train_args, "--objective", "dskd_eta", "--source", "switch", capsys=capsys)
    assert message.startswith("source='switch' lets the teacher write single tokens")
    assert "works with source gt, teacher, student, mixed or adaptive" in message


def test_an_overlong_prompt_names_the_row_and_both_fixes(train_args, capsys):
    message = fails(*train_args, "--max_prompt_length", "4", "--max_length", "64", capsys=capsys)
    assert "row 1: the prompt has" in message and "more than max_prompt_length=4" in message
    assert "drop_overlong_prompts=True" in message


def test_a_teacher_with_non_finite_outputs_is_named(train_args, capsys, tmp_path, model_dirs):
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs[0])
    with torch.no_grad():
        teacher.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    broken = tmp_path / "nan-teacher"
    teacher.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((model_dirs[0] / name).read_bytes())
    message = fails(*train_args, "--teacher_model_name_or_path", str(broken), capsys=capsys)
    assert message.startswith(f"the teacher ({broken}) produced non-finite values (NaN or inf)")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_teacher_cache_of_other_data_is_refused(train_args, capsys, tmp_path, examples):
    cache = str(tmp_path / "cache")
    main([*train_args, "--teacher_cache", cache, "--max_steps", "1"])
    rows = [{"prompt": e["prompt"], "output": e["response"]} for e in examples[:8]]
    other = write_jsonl(tmp_path / "other.jsonl", rows)
    message = fails(*train_args, "--teacher_cache", cache, "--dataset_name_or_path", str(other), capsys=capsys)
    assert message.startswith(f"teacher_cache='{cache}' does not match this run: its train_data is")


def test_resuming_needs_a_checkpoint_of_the_same_configuration(train_args, capsys, tmp_path):
    message = fails(*train_args, "--resume_from_checkpoint", "last", capsys=capsys)
    assert message.startswith(f"resume_from_checkpoint='last': output_dir='{tmp_path / 'run'}' holds no checkpoint")
    main([*train_args, "--save_strategy", "steps", "--save_steps", "2"])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    message = fails(*train_args, "--objective", "dskd", "--max_steps", "4", "--resume_from_checkpoint",
                    str(checkpoint), capsys=capsys)
    assert message == (
        f"resume_from_checkpoint='{checkpoint}' was written by a run with objective='vanilla', this run has "
        "objective='dskd': resume with the checkpoint's objective, or start a new output_dir."
    )
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_the_console_script_prints_one_line_and_debug_the_traceback(tmp_path, train_file):
    """Run as users run it: a subprocess, with no hub access (HF_HUB_OFFLINE=1), for a model named like a hub repo."""
    arguments = ["train", "--student_model_name_or_path", "no-such-org/no-such-model", "--dataset_name_or_path",
                 str(train_file), "--objective", "sft", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true"]
    environment = os.environ | {"HF_HUB_OFFLINE": "1"}

    def run(*flags):
        return console_script(*flags, *arguments, cwd=tmp_path, env=environment)

    plain = run()
    assert plain.returncode == 2, plain.stderr[-2000:]
    assert "Traceback" not in plain.stderr
    errors = [line for line in plain.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "llmdistill: error: student_model_name_or_path='no-such-org/no-such-model' is not a local folder, and not a "
        "hub model reachable from this machine (" + errors[0].split("(", 1)[1]
    ]
    assert errors[0].endswith("Give a local folder, or check the name and the network.")
    debug = run("--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ModelError" in debug.stderr


def test_a_malformed_file_through_the_console_script_prints_exactly_one_line(tmp_path, model_dirs, train_file):
    """datasets logs its own reading error to the process's stderr before raising it: only ours may show."""
    data = tmp_path / "broken.jsonl"
    data.write_text(train_file.read_text() + '{"prompt": "x", "output": \n')
    line = len(train_file.read_text().splitlines()) + 1
    arguments = ["train", "--student_model_name_or_path", str(model_dirs[1]), "--dataset_name_or_path", str(data),
                 "--objective", "sft", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true"]
    result = console_script(*arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"llmdistill: error: dataset_name_or_path='{data}': line {line} is not valid JSON (Expecting value, column "
        "27): fix or remove it."
    ]


def test_a_run_shows_progress_lines_not_raw_log_dicts(train_args, capsys):
    main([*train_args, "--logging_steps", "1"])
    out = capsys.readouterr().out
    assert "{'loss'" not in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines[:2]] == ["1/2", "2/2"]
    logged = dict(item.split("=", 1) for item in lines[0].split()[2:])
    assert {"loss", "ce", "kd", "learning_rate"} <= logged.keys() and float(logged["loss"]) > 0


def test_sampled_token_opd_without_student_samples_says_which_sources_work(train_args, capsys):
    message = fails(*train_args, "--objective", "opd", capsys=capsys)
    assert message.startswith("objective='opd' is a policy gradient on the tokens the student sampled")
    assert message.endswith("not source='gt'.")
