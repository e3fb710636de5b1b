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
from ..evaluation import (
    cross_tokenizer_fidelity,
    exact_match,
    generate_responses,
    rouge_l,
    teacher_student_fidelity,
)
from ..trainer import DistillTrainer
from ..vocab import VocabBridge
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
DEV_SEED_OFFSET = 1000  # the validation rows of source=adaptive come from their own task seed
ADAPTIVE_EVAL_EVERY = 25
ROLLOUT_KEYS = (
    "teacher_written_fraction", "teacher_written_fraction_0-15", "teacher_written_fraction_16-63",
    "teacher_written_fraction_64+", "generated_batches_fraction", "rollout_tokens_per_second",
)
MAX_PROMPT_LENGTH, MAX_LENGTH = 256, 512


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    objective: str
    steps: int
    learning_rate: float
    batch_size: int
    source: str = "gt"
    max_new_tokens: int = 128
    divergence: str = "fkl"


def run_quickstart(
    output_dir: str | Path = "llmdistill-quickstart",
    seed: int = 0,
    smoke: bool = False,
    objectives: tuple[str, ...] = ("sft", "vanilla"),
    student_seed: int | None = None,
    cross_tokenizer: bool = False,
    sources: tuple[str, ...] = ("gt",),
) -> dict:
    """Writes the task (data/*.jsonl), the models, results.json, results.md and training_curves.png.

    `seed` fixes the task and the teacher (cached across runs); each objective in `objectives` trains one student
    from the same initialisation, drawn (with its data order) from `student_seed` (default: `seed`); each objective
    other than SFT trains once per source in `sources` (where its KD sequences come from: gt, switch, ...). With
    `cross_tokenizer` the students read a SentencePiece-style tokenizer of their own while the teacher keeps its
    byte-level BPE, and everything they write goes under `cross_tokenizer/`.
    """
    started = time.perf_counter()
    task = Task.prepare(output_dir, seed, SMOKE if smoke else DEFAULT)
    settings, student_seed = task.settings, seed if student_seed is None else student_seed
    students = Students(task, cross_tokenizer)
    student_init = students.initialisation(students.directory / "student-init", student_seed)
    histories = {"teacher": json.loads((task.teacher_dir / "log_history.json").read_text())}
    runs = [
        TrainingRun(objective, settings.student_steps, settings.student_learning_rate, settings.batch_size, source,
                    settings.max_new_tokens)
        for objective in objectives
        for source in (("gt",) if objective == "sft" else sources)
    ]
    for run in runs:
        name = student_name(run.objective, run.source)
        histories[name] = students.train(students.directory / name, student_init, run, student_seed)
    names = [student_name(run.objective, run.source) for run in runs]
    results = _evaluate(task, students, names)
    for name in names:
        results["models"][name] |= training_summary(histories[name])
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    table = results_table(results)
    (students.directory / "results.json").write_text(json.dumps(results, indent=2))
    (students.directory / "results.md").write_text(table + "\n")
    plot_training_curves(histories, students.directory / "training_curves.png")
    print(table)
    print(f"\nwritten under {students.directory}/ in {results['wall_time_s']} s: results.json, results.md, "
          "training_curves.png")
    return results


@dataclasses.dataclass(frozen=True)
class Task:
    """The quickstart task under `out`: its rows (also written to data/*.jsonl), the teacher's byte-level BPE and
    the teacher, trained once and reused by every later run with the same settings and seed."""

    out: Path
    seed: int
    settings: QuickstartSettings
    train_rows: list[dict]
    eval_rows: list[dict]
    teacher_tokenizer: object
    teacher_dir: Path

    @classmethod
    def prepare(cls, output_dir: str | Path, seed: int = 0, settings: QuickstartSettings = DEFAULT) -> Task:
        out = Path(output_dir)
        train_rows, eval_rows = make_splits(seed, settings.n_train, settings.n_eval)
        for name, rows in (("train", train_rows), ("held_out", eval_rows)):
            _write_jsonl(out / "data" / f"{name}.jsonl", rows)
        tokenizer = _tokenizer(out / "tokenizer", train_rows, settings.vocab_size)
        teacher_dir = _teacher(out, tokenizer, _tokenised(train_rows, tokenizer, "train"), settings, seed)
        return cls(out, seed, settings, train_rows, eval_rows, tokenizer, teacher_dir)

    def dev_rows(self) -> list[dict]:
        """Validation rows of their own (source=adaptive watches their loss)."""
        return make_splits(self.seed + DEV_SEED_OFFSET, 0, self.settings.n_eval)[1]


class Students:
    """Where the students live, the tokenizer they read, and their training rows: pre-tokenised when they share the
    teacher's tokenizer, raw (the trainer tokenises them for both models and aligns them) when they do not."""

    def __init__(self, task: Task, cross_tokenizer: bool = False):
        self.task, self.cross_tokenizer = task, cross_tokenizer
        if cross_tokenizer:
            self.directory = task.out / "cross_tokenizer"
            self.tokenizer = _tokenizer(
                self.directory / "tokenizer", task.train_rows, task.settings.vocab_size, family="sentencepiece"
            )
            self.train_set = datasets.Dataset.from_list(task.train_rows)
        else:
            self.directory, self.tokenizer = task.out, task.teacher_tokenizer
            self.train_set = _tokenised(task.train_rows, task.teacher_tokenizer, "train")

    def initialisation(self, directory: Path, student_seed: int) -> Path:
        """Saves the students' shared initial weights, drawn from `student_seed`."""
        return _save_init(directory, self.tokenizer, self.task.settings.student_shape, student_seed + 1)

    def train(self, directory: Path, init_dir: Path, run: TrainingRun, student_seed: int) -> list[dict]:
        """Trains one student from `init_dir` into `directory`; returns its log history."""
        return _train(directory, init_dir, self.task.teacher_dir, run, self.tokenizer, self.train_set, student_seed,
                      self.task.teacher_tokenizer, dev_rows=self.task.dev_rows())

    def fidelity(self, teacher):
        """student model → its KL to the teacher and top-1 agreement on the held-out references (at aligned
        positions over the shared vocabulary when the tokenizers differ)."""
        eval_rows, teacher_tokenizer = self.task.eval_rows, self.task.teacher_tokenizer
        if not self.cross_tokenizer:
            held_out = _tokenised(eval_rows, teacher_tokenizer, "held-out")
            return lambda model: teacher_student_fidelity(teacher, model, held_out, teacher_tokenizer.pad_token_id)
        held_out = prepare_dataset(
            datasets.Dataset.from_list(eval_rows), self.tokenizer, DATA_FORMAT, MAX_PROMPT_LENGTH, MAX_LENGTH,
            name="held-out", teacher_tokenizer=teacher_tokenizer,
        )
        bridge = VocabBridge.between(teacher_tokenizer, self.tokenizer)
        return lambda model: cross_tokenizer_fidelity(
            teacher, model, held_out, bridge, self.tokenizer.pad_token_id, teacher_tokenizer.pad_token_id
        )


def student_name(objective: str, source: str = "gt") -> str:
    name = {"sft": "student-sft", "vanilla": "student-kd"}.get(objective, f"student-{objective}")
    return name if source == "gt" else f"{name}-{source}"


def training_summary(history: list[dict]) -> dict:
    """Seconds per optimizer step and, for generating sources, the mean logged rollout statistics."""
    summary = {"seconds_per_step": history[-1]["train_runtime"] / history[-1]["step"]}
    for key in ROLLOUT_KEYS:
        values = [entry[key] for entry in history if key in entry]
        if values:
            summary[key] = sum(values) / len(values)
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _tokenised(rows: list[dict], tokenizer, name: str) -> datasets.Dataset:
    return prepare_dataset(
        datasets.Dataset.from_list(rows), tokenizer, DATA_FORMAT, MAX_PROMPT_LENGTH, MAX_LENGTH, name=name
    )


def _tokenizer(directory: Path, rows: list[dict], vocab_size: int, family: str = "byte_bpe"):
    if not (directory / "tokenizer.json").is_file():
        texts = [row["prompt"] + row["response"] for row in rows]
        train_tokenizer(texts, vocab_size, family=family).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _teacher(out: Path, tokenizer, train_set, settings: QuickstartSettings, seed: int) -> Path:
    """Trains the teacher once; a later run with the same settings and seed reuses it."""
    teacher_dir = out / "teacher"
    fingerprint = hashlib.sha256(json.dumps([dataclasses.asdict(settings), seed]).encode()).hexdigest()
    stamp = teacher_dir / "quickstart_fingerprint.txt"
    if stamp.is_file() and stamp.read_text() == fingerprint:
        print(f"reusing the teacher in {teacher_dir}")
        return teacher_dir
    init_dir = _save_init(out / "teacher-init", tokenizer, settings.teacher_shape, seed)
    run = TrainingRun("sft", settings.teacher_steps, settings.teacher_learning_rate, settings.batch_size)
    _train(teacher_dir, init_dir, None, run, tokenizer, train_set, seed)
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
    directory: Path, student_dir: Path, teacher_dir: Path | None, run: TrainingRun, tokenizer, train_set, seed,
    teacher_tokenizer=None, dev_rows: list[dict] | None = None,
):
    """Trains one model with DistillTrainer and returns its log history (also saved beside it). `dev_rows` give
    source=adaptive its validation loss."""
    print(f"training {directory.name} ({run.objective}, source {run.source}, {run.steps} steps)")
    adaptive = run.source == "adaptive"
    config = DistillConfig(
        output_dir=str(directory),
        objective=run.objective,
        alpha_kd=0.5,
        divergence=run.divergence,
        student_model_name_or_path=str(student_dir),
        teacher_model_name_or_path=str(teacher_dir) if teacher_dir else None,
        max_steps=run.steps,
        per_device_train_batch_size=run.batch_size,
        learning_rate=run.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(run.steps // 20, 1),
        weight_decay=0.0,
        logging_steps=max(run.steps // 25, 1),
        seed=seed,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        source=run.source,
        max_new_tokens=run.max_new_tokens,
        eval_strategy="steps" if adaptive else "no",
        eval_steps=ADAPTIVE_EVAL_EVERY if adaptive else None,
        per_device_eval_batch_size=run.batch_size,
    )
    dev_set = None
    if adaptive:  # in the training data's form: tokenised, or raw rows the trainer tokenises for both models
        pretokenised = "input_ids" in train_set.column_names
        dev_set = _tokenised(dev_rows, tokenizer, "dev") if pretokenised else datasets.Dataset.from_list(dev_rows)
    trainer = DistillTrainer(
        args=config, train_dataset=train_set, eval_dataset=dev_set, processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer or tokenizer,
    )
    trainer.train()
    trainer.save_model()
    history = trainer.state.log_history
    (directory / "log_history.json").write_text(json.dumps(history))
    return history


def _evaluate(task: Task, students: Students, names: list[str]) -> dict:
    teacher = AutoModelForCausalLM.from_pretrained(task.teacher_dir)
    fidelity = students.fidelity(teacher)
    results = {"models": {}}
    for name in ["teacher", *names]:
        model = teacher if name == "teacher" else AutoModelForCausalLM.from_pretrained(students.directory / name)
        tokenizer = task.teacher_tokenizer if name == "teacher" else students.tokenizer
        row = greedy_scores(model, tokenizer, task.eval_rows, task.settings.max_new_tokens)
        if name != "teacher":
            row |= fidelity(model)
        row["parameters"] = model.num_parameters()
        results["models"][name] = row
    return results


def greedy_scores(model, tokenizer, eval_rows: list[dict], max_new_tokens: int) -> dict:
    """Exact match and ROUGE-L of greedy responses to the held-out prompts, overall and per sub-task (`by_task`)."""
    predictions = generate_responses(model, tokenizer, [row["prompt"] for row in eval_rows], max_new_tokens)
    references, tasks = [row["response"] for row in eval_rows], [row["task"] for row in eval_rows]
    row = _generation_scores(predictions, references)
    row["by_task"] = {
        task: _generation_scores(*zip(*[(p, r) for p, r, t in zip(predictions, references, tasks) if t == task]))
        for task in dict.fromkeys(tasks)
    }
    return row


def _generation_scores(predictions, references) -> dict:
    predictions, references = list(predictions), list(references)
    return {"exact_match": exact_match(predictions, references), "rouge_l": rouge_l(predictions, references)}
