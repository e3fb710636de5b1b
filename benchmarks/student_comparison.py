"""Shared by the benchmarks that train several quickstart students from one teacher and compare them over seeds."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from llmdistill.quickstart.run import run_quickstart, student_name

COLUMNS = {key: (key, header, fmt) for key, header, fmt in (  # every column a student table can show
    ("correct", "correct % ↑", "{:.1f}"),
    ("gold_ce", "held-out CE ↓", "{:.3f}"),
    ("gold_ce_open", "held-out CE, open-ended ↓", "{:.3f}"),
    ("teacher_student_kl", "teacher→student KL ↓", "{:.3f}"),
    ("top1_agreement", "top-1 agreement % ↑", "{:.1f}"),
    ("aligned_fraction", "aligned fraction", "{:.3f}"),
    ("exact_match", "exact match % ↑", "{:.1f}"),
    ("rouge_l", "ROUGE-L ↑", "{:.1f}"),
    ("long_rouge_l", "ROUGE-L, long ↑", "{:.1f}"),
    ("sampled_rouge_l", "ROUGE-L, sampled ↑", "{:.1f}"),
    ("seconds_per_step", "s / step", "{:.3f}"),
)}


def columns(*keys: str) -> tuple:
    """The (key, header, format) of each named column, in that order."""
    return tuple(COLUMNS[key] for key in keys)


METRICS = columns("correct", "gold_ce", "teacher_student_kl", "top1_agreement", "exact_match", "rouge_l",
                  "seconds_per_step")


def mean_std(values: list[float], fmt: str) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(spread)}"


def table(runs: list[dict], names: list[str], baseline: str, metrics=METRICS, select=lambda row: row) -> list[str]:
    """One Markdown row per student: mean ± std of each metric (read from `select(model results)`) and the time
    per step relative to the student named `baseline`."""
    lines = [
        "| student | " + " | ".join(title for _, title, _ in metrics) + f" | time per step vs {baseline} |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for name in names:
        rows = [select(run["models"][name]) for run in runs]
        cells = [mean_std([row[key] for row in rows], fmt) for key, _, fmt in metrics]
        ratios = [
            run["models"][name]["seconds_per_step"] / run["models"][baseline]["seconds_per_step"] for run in runs
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_std(ratios, '{:.2f}')}× |")
    return lines


def objectives_table(runs: list[dict], objectives: tuple[str, ...], baseline: str, metrics=METRICS) -> list[str]:
    """`table` for students named by their objective (all trained on the dataset's responses), then the teacher."""
    names = [student_name(objective) for objective in objectives]
    return [*table(runs, names, student_name(baseline), metrics), "", teacher_line(runs)]


def teacher_line(runs: list[dict]) -> str:
    teacher = runs[0]["models"]["teacher"]
    return (f"Teacher: {teacher['correct']:.1f}% correct, exact match {teacher['exact_match']:.1f}%, ROUGE-L "
            f"{teacher['rouge_l']:.1f}, held-out CE {teacher['gold_ce']:.3f}.")


def parse_args(description: str, results: Path, output_dir: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, default=Path(output_dir))
    parser.add_argument("--smoke", action="store_true", help="the quickstart's smoke settings (seconds)")
    parser.add_argument("--results", type=Path, default=results)
    return parser.parse_args()


def run_seeds(args: argparse.Namespace, objectives: tuple[str, ...], **quickstart_options) -> list[dict]:
    """One quickstart run per student seed (task and teacher fixed by quickstart seed 0), each saved as JSON."""
    runs = []
    for seed in args.seeds:
        runs.append(
            run_quickstart(
                args.output_dir, seed=0, smoke=args.smoke, objectives=objectives, student_seed=seed,
                **quickstart_options,
            )
        )
        (args.output_dir / f"results_seed{seed}.json").write_text(json.dumps(runs[-1], indent=2))
    return runs


def command(script: str, args: argparse.Namespace) -> str:
    return f"python benchmarks/{script} " + " ".join(
        ["--seeds", *map(str, args.seeds)] + (["--smoke"] if args.smoke else [])
    )


def single_threaded_run(script: str, args: argparse.Namespace, runs: list[dict]) -> str:
    """The opening sentence of a results file measured under OMP_NUM_THREADS: the command, the teacher, the seeds."""
    return (f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} {command(script, args)}`: one teacher "
            f"(quickstart seed 0), students over seeds {args.seeds} (mean ± std; n = {len(runs)}); torch threads: "
            f"{torch.get_num_threads()}.")


def write(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
