"""The embedded default: train a tiny teacher on a synthetic task, then an SFT and a KD student, and compare them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..config import DistillConfig
from ..data import ExampleFormat, prepare_dataset
from ..evaluation import exact_match, generate_responses, rouge_l, teacher_student_fidelity
from ..trainer import DistillTrainer
from .report import plot_training_curves, results_table
from .task import make_splits
from .tokenizer import train_tokenizer


@dataclasses.dataclass(frozen=True)
class QuickstartSettings:
    n_train: int
    n_eval: int
    vocab_size: int
    teacher_shape: tuple[int, int, int]  # hidden size, layers, attention heads
    student_shape: tuple[int, int, int]
    teacher_steps: int
    student_steps: int
    batch_size: int
    teacher_learning_rate: float
    student_learning_rate: float
    max_new_tokens: int


DEFAULT = QuickstartSettings(
    n_train=3000, n_eval=100, vocab_size=512, teacher_shape=(128, 4, 4), student_shape=(64, 2, 2),
    teacher_steps=1100, student_steps=300, batch_size=16, teacher_learning_rate=2e-3, student_learning_rate=3e-3,
    max_new_tokens=160,
)
SMOKE = QuickstartSettings(
    n_train=64, n_eval=8, vocab_size=300, teacher_shape=(32, 1, 2), student_shape=(16, 1, 2),
    teacher_steps=3, student_steps=3, batch_size=8, teacher_learning_rate=1e-3, student_learning_rate=3e-3,
    max_new_tokens=16,
)
DATA_FORMAT = ExampleFormat(prompt_column="prompt", response_column="response")


def run_quickstart(output_dir: str | Path = "llmdistill-quickstart", seed: int = 0, smoke: bool = False) -> dict:
    """Writes the task, models, results.json, results.md and training_curves.png under `output_dir`."""
    settings, out = (SMOKE if smoke else DEFAULT), Path(output_dir)
    started = time.perf_counter()
    train_rows, eval_rows = make_splits(seed, settings.n_train, settings.n_eval)
    tokenizer = _tokenizer(out / "tokenizer", train_rows, settings.vocab_size)
    teacher_dir = _teacher(out, tokenizer, train_rows, settings, seed)
    student_init = _save_init(out / "student-init", tokenizer, settings.student_shape, seed + 1)
    histories = {"teacher": json.loads((teacher_dir / "log_history.json").read_text())}
    for name, objective in (("student-sft", "sft"), ("student-kd", "vanilla")):
        histories[name] = _train(
            out / name, student_init, teacher_dir, objective, tokenizer, train_rows, settings, seed,
            settings.student_steps, settings.student_learning_rate,
        )
    results = _evaluate(out, tokenizer, eval_rows, settings)
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    table = results_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    plot_training_curves(histories, out / "training_curves.png")
    print(table)
    print(f"\nwritten under {out}/ in {results['wall_time_s']} s: results.json, results.md, training_curves.png")
    return results


def _tokenizer(directory: Path, rows: list[dict], vocab_size: int):
    if not (directory / "tokenizer.json").is_file():
        train_tokenizer([row["prompt"] + row["response"] for row in rows], vocab_size).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _teacher(out: Path, tokenizer, rows, settings: QuickstartSettings, seed: int) -> Path:
    """Trains the teacher once; a later run with the same settings and seed reuses it."""
    teacher_dir = out / "teacher"
    fingerprint = hashlib.sha256(json.dumps([dataclasses.asdict(settings), seed]).encode()).hexdigest()
    stamp = teacher_dir / "quickstart_fingerprint.txt"
    if stamp.is_file() and stamp.read_text() == fingerprint:
        print(f"reusing the teacher in {teacher_dir}")
        return teacher_dir
    init_dir = _save_init(out / "teacher-init", tokenizer, settings.teacher_shape, seed)
    _train(
        teacher_dir, init_dir, None, "sft", tokenizer, rows, settings, seed,
        settings.teacher_steps, settings.teacher_learning_rate,
    )
    stamp.write_text(fingerprint)
    return teacher_dir


def _save_init(directory: Path, tokenizer, shape: tuple[int, int, int], seed: int) -> Path:
    hidden, layers, heads = shape
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _train(
    directory, student_dir, teacher_dir, objective, tokenizer, rows, settings, seed, steps, learning_rate
) -> list[dict]:
    print(f"training {directory.name} ({objective}, {steps} steps)")
    config = DistillConfig(
        output_dir=str(directory), objective=objective, alpha_kd=0.5, divergence="fkl",
        student_model_name_or_path=str(student_dir),
        teacher_model_name_or_path=str(teacher_dir) if teacher_dir else None,
        max_steps=steps, per_device_train_batch_size=settings.batch_size, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(steps // 20, 1), weight_decay=0.0, logging_steps=max(steps // 25, 1),
        seed=seed, report_to=[], disable_tqdm=True, use_cpu=True,
    )
    dataset = prepare_dataset(datasets.Dataset.from_list(rows), tokenizer, DATA_FORMAT, config.max_prompt_length, config.max_length)
    trainer = DistillTrainer(args=config, train_dataset=dataset, processing_class=tokenizer, teacher_processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    history = trainer.state.log_history
    (directory / "log_history.json").write_text(json.dumps(history))
    return history


def _evaluate(out: Path, tokenizer, eval_rows: list[dict], settings: QuickstartSettings) -> dict:
    prompts = [row["prompt"] for row in eval_rows]
    references = [row["response"] for row in eval_rows]
    held_out = prepare_dataset(datasets.Dataset.from_list(eval_rows), tokenizer, DATA_FORMAT, 256, 512, name="held-out")
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher")
    results = {"models": {}}
    for name in ("teacher", "student-sft", "student-kd"):
        model = teacher if name == "teacher" else AutoModelForCausalLM.from_pretrained(out / name)
        predictions = generate_responses(model, tokenizer, prompts, settings.max_new_tokens)
        row = {"exact_match": exact_match(predictions, references), "rouge_l": rouge_l(predictions, references)}
        if name != "teacher":
            row |= teacher_student_fidelity(teacher, model, held_out, tokenizer.pad_token_id, len(tokenizer))
        row["parameters"] = model.num_parameters()
        results["models"][name] = row
    return results
