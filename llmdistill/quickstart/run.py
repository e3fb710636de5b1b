"""The embedded default: train a tiny teacher on a synthetic task, then an SFT and a KD student, and compare them."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import DistillConfig
from ..config_checks import reads_teacher_cache
from ..data import ExampleFormat, prepare_dataset
from ..evaluation import (
    cross_tokenizer_fidelity,
    exact_match,
    generate_responses,
    gold_cross_entropy,
    rouge_l,
    teacher_student_fidelity,
)
from ..trainer import DistillTrainer
from ..vocab import VocabBridge
from .architecture import tiny_llama
from .report import plot_training_curves, results_table
from .task import OPEN_ENDED, is_correct, make_splits
from .teacher import embedded_teacher_dir
from .tokenizer import train_tokenizer


@dataclasses.dataclass(frozen=True)
class QuickstartSettings:
    n_train: int
    n_eval: int
    vocab_size: int  # of the students' own tokenizer in cross-tokenizer mode
    student_shape: tuple[int, int, int]  # hidden size, layers, attention heads
    student_steps: int
    batch_size: int
    student_learning_rate: float
    max_new_tokens: int


DEFAULT = QuickstartSettings(
    n_train=3000, n_eval=200, vocab_size=512, student_shape=(64, 2, 2), student_steps=800, batch_size=16,
    student_learning_rate=3e-3, max_new_tokens=160,
)
SMOKE = QuickstartSettings(
    n_train=64, n_eval=8, vocab_size=300, student_shape=(16, 1, 2), student_steps=3, batch_size=8,
    student_learning_rate=3e-3, max_new_tokens=16,
)
DATA_FORMAT = ExampleFormat(prompt_column="prompt", response_column="response")
DEV_SEED_OFFSET = 1000  # the validation rows of source=adaptive come from their own task seed
ADAPTIVE_EVAL_EVERY = 25
ROLLOUT_KEYS = (
    "teacher_written_fraction", "teacher_written_fraction_0-15", "teacher_written_fraction_16-63",
    "teacher_written_fraction_64+", "generated_batches_fraction", "rollout_tokens_per_second",
)
MAX_PROMPT_LENGTH, MAX_LENGTH = 256, 512
LONG_RESPONSE_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    objective: str
    steps: int
    learning_rate: float
    batch_size: int
    source: str = "gt"
    max_new_tokens: int = 128
    divergence: str = "fkl"
    temperature: float = 1.0
    alpha_kd: float = 0.5
    opd_estimator: str = "k1"  # objective opd only


def run_quickstart(
    output_dir: str | Path = "llmdistill-quickstart",
    seed: int = 0,
    smoke: bool = False,
    objectives: tuple[str, ...] = ("sft", "vanilla"),
    student_seed: int | None = None,
    cross_tokenizer: bool = False,
    sources: tuple[str, ...] = ("gt",),
    student_seeds: int = 1,
    student_steps: int | None = None,
    teacher_embeddings: bool | None = None,
) -> dict:
    """Writes the task (data/*.jsonl), the models, results.json, results.md and training_curves.png.

    `seed` fixes the task; each objective in `objectives` trains one student from the same initialisation, drawn
    (with its data order) from `student_seed` (default: `seed`); each objective other than SFT trains once per source
    in `sources` (where its KD sequences come from: gt, switch, ...). With `student_seeds` N > 1 every student is
    trained from N initialisations (seeds student_seed, student_seed + 1, ...; each under seed{k}/) and the table
    gives mean ± std over them. With `cross_tokenizer` the students read a SentencePiece-style tokenizer of their own
    while the teacher keeps its byte-level BPE, and everything they write goes under `cross_tokenizer/`.
    `student_steps` overrides the settings' steps per student. With `teacher_embeddings` (default: unless
    `cross_tokenizer`) every student starts from the teacher's embeddings (`principal_projection`).
    """
    started = time.perf_counter()
    if teacher_embeddings is None:
        teacher_embeddings = not cross_tokenizer
    settings = SMOKE if smoke else DEFAULT
    if student_steps is not None:
        settings = dataclasses.replace(settings, student_steps=student_steps)
    task = Task.prepare(output_dir, seed, settings)
    first_seed = seed if student_seed is None else student_seed
    students = Students(task, cross_tokenizer, cache_teacher=True)
    runs = [
        TrainingRun(objective, settings.student_steps, settings.student_learning_rate, settings.batch_size, source,
                    settings.max_new_tokens)
        for objective in objectives
        for source in (("gt",) if objective == "sft" else sources)
    ]
    names = [student_name(run.objective, run.source) for run in runs]
    teacher = AutoModelForCausalLM.from_pretrained(task.teacher_dir)
    fidelity = students.fidelity(teacher)
    seeds = list(range(first_seed, first_seed + student_seeds))
    per_seed, histories = [], {}
    for seed_k in seeds:
        directory = students.directory if len(seeds) == 1 else students.directory / f"seed{seed_k}"
        init = students.initialisation(directory / "student-init", seed_k, teacher_embeddings)
        for run, name in zip(runs, names):
            history = students.train(directory / name, init, run, seed_k)
            histories.setdefault(name, history)  # the curves of the first seed
            scores = _student_scores(task, students, fidelity, directory / name)
            per_seed.append((name, scores | training_summary(history)))
    results = {"models": {"teacher": _teacher_scores(task, teacher)} | _over_seeds(per_seed), "student_seeds": seeds,
               "student_steps": settings.student_steps, "teacher_embeddings": teacher_embeddings}
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    judged = verdict(results, names)
    table = results_table(results) + "\n\n" + judged
    (students.directory / "results.json").write_text(json.dumps(results, indent=2))
    (students.directory / "results.md").write_text(table + "\n")
    plot_training_curves(histories, students.directory / "training_curves.png", results, judged)
    print(table)
    print(f"\nwritten under {students.directory}/ in {results['wall_time_s']} s: results.json, results.md, "
          "training_curves.png")
    return results


def verdict(results: dict, names: list[str]) -> str:
    """One plain sentence per distilled student: does it beat the SFT student on held-out correct answers and CE, by
    more than the seed-to-seed spread (the larger of the two students' standard deviations over seeds)?"""
    models, lines = results["models"], []
    if "student-sft" not in models or len(results["student_seeds"]) < 2:
        return "(one student seed: train with --student-seeds 3 to see whether the gaps exceed seed noise)"
    sft = models["student-sft"]
    for name in names:
        if name == "student-sft":
            continue
        parts = []
        for key, label, sign in (("correct", "correct answers", 1), ("gold_ce", "held-out CE", -1)):
            lead = sign * (models[name][key] - sft[key])
            noise = max(models[name]["seed_std"][key], sft["seed_std"][key])
            judged = "more than the" if lead > noise else "less than the" if lead > 0 else "behind; the"
            digits = 1 if sign > 0 else 3
            gap = f"{models[name][key] - sft[key]:+.{digits}f}"
            parts.append(f"{label} {gap} ({judged} seed spread {noise:.{digits}f})")
        lines.append(f"{name} vs student-sft over {len(results['student_seeds'])} seeds: " + "; ".join(parts))
    return "\n".join(lines)


def _over_seeds(per_seed: list[tuple[str, dict]]) -> dict:
    """name → its scores averaged over seeds (numbers only), with `seed_std` and the rows of each seed."""
    grouped: dict[str, list[dict]] = {}
    for name, row in per_seed:
        grouped.setdefault(name, []).append(row)
    combined = {}
    for name, rows in grouped.items():
        if len(rows) == 1:
            combined[name] = rows[0]
            continue
        numbers = [key for key, value in rows[0].items() if isinstance(value, (int, float))]
        combined[name] = {key: statistics.mean(row[key] for row in rows) for key in numbers} | {
            "seed_std": {key: statistics.stdev(row[key] for row in rows) for key in numbers}, "per_seed": rows,
        }
    return combined


@dataclasses.dataclass(frozen=True)
class Task:
    """The quickstart task under `out`: its rows (also written to data/*.jsonl) and the embedded teacher, which
    was trained on rows of the same task and never on a held-out prompt (see `quickstart.teacher`)."""

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
        teacher_dir = embedded_teacher_dir()
        return cls(out, seed, settings, train_rows, eval_rows, AutoTokenizer.from_pretrained(teacher_dir), teacher_dir)

    def dev_rows(self) -> list[dict]:
        """Validation rows of their own (source=adaptive watches their loss)."""
        return make_splits(self.seed + DEV_SEED_OFFSET, 0, self.settings.n_eval)[1]


class Students:
    """Where the students live, the tokenizer they read, and their training rows: pre-tokenised when they share the
    teacher's tokenizer, raw (the trainer tokenises them for both models and aligns them) when they do not. With
    `cache_teacher`, students that distil off-policy on the shared vocabulary read the teacher from one hidden-state
    cache under `directory` (built by the first of them; the same loss, without a teacher forward per step)."""

    def __init__(self, task: Task, cross_tokenizer: bool = False, cache_teacher: bool = False):
        self.task, self.cross_tokenizer, self.cache_teacher = task, cross_tokenizer, cache_teacher
        if cross_tokenizer:
            self.directory = task.out / "cross_tokenizer"
            self.tokenizer = _tokenizer(
                self.directory / "tokenizer", task.train_rows, task.settings.vocab_size, family="sentencepiece"
            )
            self.train_set = datasets.Dataset.from_list(task.train_rows)
        else:
            self.directory, self.tokenizer = task.out, task.teacher_tokenizer
            self.train_set = _tokenised(task.train_rows, task.teacher_tokenizer, "train")
        self.references = reference_sets(task.eval_rows, self.tokenizer)
        self.held_out = self.references["gold_ce"]
        self.teacher_cache = self.directory / "teacher-cache"
        if cache_teacher:  # an earlier run's cache holds another task's rows (another --seed, --smoke): start afresh
            shutil.rmtree(self.teacher_cache, ignore_errors=True)

    def initialisation(self, directory: Path, student_seed: int, teacher_embeddings: bool = False) -> Path:
        """Saves the students' shared initial weights, drawn from `student_seed`; with `teacher_embeddings` the
        (tied) embedding matrix is the teacher's, projected onto its leading principal directions."""
        embeddings = None
        if teacher_embeddings:
            if self.cross_tokenizer:
                raise ValueError("teacher_embeddings needs the teacher's vocabulary; the students have their own")
            teacher = AutoModelForCausalLM.from_pretrained(self.task.teacher_dir)
            width = self.task.settings.student_shape[0]
            embeddings = principal_projection(teacher.get_input_embeddings().weight, width)
        return _save_init(directory, self.tokenizer, self.task.settings.student_shape, student_seed + 1, embeddings)

    def train(self, directory: Path, init_dir: Path, run: TrainingRun, student_seed: int) -> list[dict]:
        """Trains one student from `init_dir` into `directory`; returns its log history."""
        cacheable = reads_teacher_cache(run.objective, run.source, run.alpha_kd) and not self.cross_tokenizer
        teacher_cache = self.teacher_cache if self.cache_teacher and cacheable else None
        return _train(directory, init_dir, self.task.teacher_dir, run, self.tokenizer, self.train_set, student_seed,
                      self.task.teacher_tokenizer, dev_rows=self.task.dev_rows(), teacher_cache=teacher_cache)

    def gold_ce(self, model) -> dict:
        """The student's cross-entropy per token on the held-out references, in its own tokenization: all of them
        (`gold_ce`) and those of the open-ended sub-tasks (`gold_ce_open`), where a reference is one right answer of
        many."""
        return references_cross_entropy(model, self.references, self.tokenizer.pad_token_id)

    def fidelity(self, teacher):
        """student model → its KL to the teacher and top-1 agreement on the held-out references (at aligned
        positions over the shared vocabulary when the tokenizers differ)."""
        eval_rows, teacher_tokenizer = self.task.eval_rows, self.task.teacher_tokenizer
        if not self.cross_tokenizer:
            return lambda model: teacher_student_fidelity(
                teacher, model, self.held_out, teacher_tokenizer.pad_token_id
            )
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
    """Seconds per optimizer step, the mean logged rollout statistics of generating sources, and the last logged
    t2s accuracy of projector objectives (how often the projected teacher state, read by the student's head, gives
    the teacher's own top-1)."""
    summary = {"seconds_per_step": history[-1]["train_runtime"] / history[-1]["step"]}
    for key in ROLLOUT_KEYS:
        values = [entry[key] for entry in history if key in entry]
        if values:
            summary[key] = sum(values) / len(values)
    t2s = [entry["t2s_accuracy"] for entry in history if "t2s_accuracy" in entry]
    if t2s:
        summary["t2s_accuracy"] = t2s[-1]
    return summary


def principal_projection(weight: torch.Tensor, width: int) -> torch.Tensor:
    """`weight` [V, D] projected onto its `width` leading right singular vectors: [V, width], the best rank-`width`
    copy of the teacher's token geometry in the student's width."""
    _, _, right = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return weight.detach().float() @ right[:width].T


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


def _save_init(
    directory: Path, tokenizer, shape: tuple[int, int, int], seed: int, embeddings: torch.Tensor | None = None
) -> Path:
    model = tiny_llama(tokenizer, shape, seed)
    if embeddings is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(embeddings)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _train(
    directory: Path, student_dir: Path, teacher_dir: Path | None, run: TrainingRun, tokenizer, train_set, seed,
    teacher_tokenizer=None, dev_rows: list[dict] | None = None, teacher_cache: Path | None = None,
):
    """Trains one model with DistillTrainer and returns its log history (also saved beside it). `dev_rows` give
    source=adaptive its validation loss."""
    print(f"training {directory.name} ({run.objective}, source {run.source}, {run.steps} steps)")
    adaptive = run.source == "adaptive"
    config = DistillConfig(
        output_dir=str(directory),
        objective=run.objective,
        alpha_kd=run.alpha_kd,
        divergence=run.divergence,
        temperature=run.temperature,
        opd_estimator=run.opd_estimator,
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
        teacher_cache=str(teacher_cache) if teacher_cache else None,
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


def _teacher_scores(task: Task, teacher) -> dict:
    row = greedy_scores(teacher, task.teacher_tokenizer, task.eval_rows, task.settings.max_new_tokens)
    return row | teacher_gold_ce(task, teacher) | {"parameters": teacher.num_parameters()}


def teacher_gold_ce(task: Task, teacher) -> dict:
    """The teacher's cross-entropy per token on the held-out references: all, and the open-ended ones."""
    tokenizer = task.teacher_tokenizer
    return references_cross_entropy(teacher, reference_sets(task.eval_rows, tokenizer), tokenizer.pad_token_id)


def reference_sets(eval_rows: list[dict], tokenizer) -> dict[str, datasets.Dataset]:
    """The held-out rows tokenised for CE: all of them (`gold_ce`) and, when there are any, those of the open-ended
    sub-tasks (`gold_ce_open`), where a reference is one right answer of many."""
    sets = {"gold_ce": _tokenised(eval_rows, tokenizer, "held-out")}
    open_rows = [row for row in eval_rows if row["task"] in OPEN_ENDED]
    if open_rows:
        sets["gold_ce_open"] = _tokenised(open_rows, tokenizer, "held-out open-ended")
    return sets


def references_cross_entropy(model, sets: dict[str, datasets.Dataset], pad_token_id: int) -> dict[str, float]:
    """`model`'s cross-entropy per token on each of `reference_sets`, under the same keys."""
    return {key: gold_cross_entropy(model, references, pad_token_id) for key, references in sets.items()}


def _student_scores(task: Task, students: Students, fidelity, directory: Path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(directory)
    row = greedy_scores(model, students.tokenizer, task.eval_rows, task.settings.max_new_tokens, task.teacher_tokenizer)
    return row | students.gold_ce(model) | fidelity(model) | {"parameters": model.num_parameters()}


def greedy_scores(model, tokenizer, eval_rows: list[dict], max_new_tokens: int, length_tokenizer=None) -> dict:
    """Correct answers, exact match and ROUGE-L of greedy responses to the held-out prompts: overall, per sub-task
    (`by_task`), and over the long references (`long`: at least LONG_RESPONSE_TOKENS tokens of `length_tokenizer`, by
    default the model's; where SWITCH claims its gain). Pass the teacher's to compare models that tokenise
    differently on the same rows. A response is correct when it equals the reference or, for an open-ended sub-task,
    is any of its right answers (`task.is_correct`)."""
    predictions = generate_responses(model, tokenizer, [row["prompt"] for row in eval_rows], max_new_tokens)
    row = _generation_scores(predictions, eval_rows)
    tasks = [example["task"] for example in eval_rows]
    groups = {task: [other == task for other in tasks] for task in dict.fromkeys(tasks)}
    row["by_task"] = {task: _generation_scores(predictions, eval_rows, chosen) for task, chosen in groups.items()}
    counter = length_tokenizer or tokenizer
    long = [len(counter(example["response"])["input_ids"]) >= LONG_RESPONSE_TOKENS for example in eval_rows]
    if any(long):
        row["long"] = _generation_scores(predictions, eval_rows, long) | {"rows": sum(long)}
    return row


def _generation_scores(predictions: list[str], examples: list[dict], chosen: list[bool] | None = None) -> dict:
    if chosen is not None:
        predictions, examples = zip(*[(p, e) for p, e, keep in zip(predictions, examples, chosen) if keep])
    references = [example["response"] for example in examples]
    correct = 100.0 * sum(is_correct(e, p) for e, p in zip(examples, predictions)) / len(examples)
    return {"correct": correct, "exact_match": exact_match(list(predictions), references),
            "rouge_l": rouge_l(list(predictions), references)}
