"""The quickstart's embedded teacher: shipped with the package, rebuilt by one command, checked at load.

`python -m llmdistill.quickstart.teacher OUT_DIR` rebuilds it from nothing: the byte-level BPE trained on the
texts of the deterministic sub-tasks, an SFT run on their rows, then a second SFT run that continues it on rows of
every sub-task, the open-ended ones included. All rows are drawn from their own seeds, none from the held-out share
of the prompt space (`task.is_held_out`), so every quickstart seed evaluates it on prompts it never saw.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import DistillConfig
from ..data import ExampleFormat, prepare_dataset
from ..errors import ModelError
from ..trainer import DistillTrainer
from .architecture import MAX_POSITIONS, tiny_llama
from .task import OPEN_ENDED, SUBTASKS, make_training_rows
from .tokenizer import train_tokenizer

EMBEDDED_DIR = Path(__file__).parent / "teacher"
WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
    seed: int = 20_261_202  # the rows' and the initialisation's seed, apart from every quickstart seed
    vocab_size: int = 512
    tokenizer_rows: int = 5_000
    shape: tuple[int, int, int] = (128, 3, 4)  # hidden size, layers, attention heads
    train_rows: int = 150_000
    steps: int = 12_000
    batch_size: int = 32
    learning_rate: float = 2e-3
    max_length: int = MAX_POSITIONS
    # the second run: every sub-task, the open-ended ones included, from the first run's weights
    all_tasks_rows: int = 96_000
    all_tasks_steps: int = 3_000
    all_tasks_learning_rate: float = 1e-3


DETERMINISTIC = tuple(name for name in SUBTASKS if name not in OPEN_ENDED)  # the first run's sub-tasks


RECIPE = TeacherRecipe()
# sha256 of the shipped weights; `python -m llmdistill.quickstart.teacher OUT` prints the one of a rebuild
EMBEDDED_SHA256 = "33535ad0298bbc1bdf8714195a8d4e9d6e5c07092b87951f6315474cfc492e96"


class EmbeddedTeacherError(ModelError):
    """The shipped teacher is missing or is not the one its fingerprint names."""


def embedded_teacher_dir() -> Path:
    """The shipped teacher's folder, after checking its weights against the fingerprint recorded here."""
    weights = EMBEDDED_DIR / WEIGHTS_FILE
    if not weights.is_file():
        raise EmbeddedTeacherError(
            f"the embedded quickstart teacher is missing ({weights}): reinstall llmdistill, or rebuild it with "
            f"`python -m llmdistill.quickstart.teacher {EMBEDDED_DIR}`"
        )
    digest = sha256_of(weights)
    if digest != EMBEDDED_SHA256:
        raise EmbeddedTeacherError(
            f"the embedded quickstart teacher's weights ({weights}) have sha256 {digest}, not the shipped "
            f"{EMBEDDED_SHA256}: reinstall llmdistill (or, after rebuilding it on purpose, record the new digest "
            "in llmdistill/quickstart/teacher.py)"
        )
    return EMBEDDED_DIR


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_teacher(
    output_dir: str | Path, recipe: TeacherRecipe = RECIPE, threads: int | None = None, first_run: Path | None = None
) -> str:
    """Trains the teacher of `recipe` into `output_dir` and returns the sha256 of its weights. With `first_run`
    (a folder holding the first run's model and tokenizer) only the second run is trained."""
    out = Path(output_dir)
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    if first_run is None:
        first_run = out / "first_run"
        _first_run(first_run, recipe)
    tokenizer = AutoTokenizer.from_pretrained(first_run)
    # Every sub-task in turn, prompts repeating: the teacher sees as many multiples as reversals.
    rows = make_training_rows(recipe.seed + 2, recipe.all_tasks_rows, distinct=False)
    _train(AutoModelForCausalLM.from_pretrained(first_run), tokenizer, rows, out, recipe.all_tasks_steps,
           recipe.all_tasks_learning_rate, recipe)
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe) | {
        "build_seconds": round(time.perf_counter() - started), "torch": torch.__version__,
    }, indent=2))
    return sha256_of(out / WEIGHTS_FILE)


def _first_run(out: Path, recipe: TeacherRecipe) -> None:
    """The tokenizer and an SFT run on the deterministic sub-tasks, from a random initialisation."""
    tokenizer = train_tokenizer([
        row["prompt"] + row["response"]
        for row in make_training_rows(recipe.seed + 1, recipe.tokenizer_rows, subtasks=DETERMINISTIC)
    ], recipe.vocab_size)
    rows = make_training_rows(recipe.seed, recipe.train_rows, distinct=False, subtasks=DETERMINISTIC)
    model = tiny_llama(tokenizer, recipe.shape, recipe.seed)
    _train(model, tokenizer, rows, out, recipe.steps, recipe.learning_rate, recipe)
    tokenizer.save_pretrained(out)


def _train(model, tokenizer, rows: list[dict], out: Path, steps: int, learning_rate: float, recipe: TeacherRecipe):
    train_set = prepare_dataset(
        datasets.Dataset.from_list(rows), tokenizer, ExampleFormat(prompt_column="prompt", response_column="response"),
        recipe.max_length, recipe.max_length, name="teacher train",
    )
    trainer = DistillTrainer(
        student=model, args=_training_config(out, recipe, steps, learning_rate), train_dataset=train_set,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


def _training_config(out: Path, recipe: TeacherRecipe, steps: int, learning_rate: float) -> DistillConfig:
    return DistillConfig(
        output_dir=str(out), objective="sft", max_steps=steps, per_device_train_batch_size=recipe.batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=steps // 50,
        weight_decay=0.0, logging_steps=max(steps // 100, 1), seed=recipe.seed, report_to=[],
        disable_tqdm=True, use_cpu=True, save_strategy="no",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the quickstart's embedded teacher.")
    parser.add_argument("output_dir")
    parser.add_argument("--steps", type=int, default=RECIPE.steps, help="fewer first-run steps for a quick trial")
    parser.add_argument("--all-tasks-steps", type=int, default=RECIPE.all_tasks_steps, help="second-run steps")
    parser.add_argument("--first-run", type=Path, default=None,
                        help="a folder with the first run's model and tokenizer: train only the second run from it")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    recipe = dataclasses.replace(RECIPE, steps=args.steps, all_tasks_steps=args.all_tasks_steps)
    digest = build_teacher(args.output_dir, recipe, args.threads, args.first_run)
    print(f"teacher written to {args.output_dir}; sha256 of {WEIGHTS_FILE}: {digest}")


if __name__ == "__main__":
    main()
