"""Where the KD sequences come from: gt KD, GKD (mixed), DistiLLM (adaptive), SKD and SWITCH on the quickstart task.

    OMP_NUM_THREADS=1 python benchmarks/on_policy.py                      # seeds 0 1 2, the quickstart's settings
    python benchmarks/on_policy.py --seeds 0 --smoke                      # seconds: the same code path

One teacher (quickstart seed 0, trained once and reused); per student seed, every student starts from the same
initialisation and sees the same data order. All KD students use vanilla KD (forward KL, alpha_kd 0.5); only the
source of the KD sequences differs; CE is always on the dataset's responses. Reports the usual metrics over all
held-out prompts, then separately for the long-response sub-tasks (counting on over up to 30 numbers, lists of up
to 15 multiples) and the short ones, plus the fraction of training tokens the teacher wrote.
Writes benchmarks/results/on_policy.md.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from llmdistill.quickstart.run import student_name
from student_comparison import METRICS, mean_std, parse_args, run_seeds, single_threaded_run, table, teacher_line, write

SOURCES = ("gt", "mixed", "adaptive", "skd", "switch")
LONG_TASKS = ("count", "multiples")
RESULTS = Path(__file__).parent / "results" / "on_policy.md"
GENERATION_METRICS = tuple(metric for metric in METRICS if metric[0] in ("correct", "exact_match", "rouge_l"))
ROLLOUT_COLUMNS = (  # key, header
    ("generated_batches_fraction", "batches generated"),
    ("teacher_written_fraction", "teacher-written"),
    ("teacher_written_fraction_0-15", "teacher-written, tokens 0–15"),
    ("teacher_written_fraction_16-63", "tokens 16–63"),
    ("teacher_written_fraction_64+", "tokens 64+"),
)


def task_group(tasks: tuple[str, ...] | None):
    """Model results → exact match and ROUGE-L averaged over the given sub-tasks (or the others, for None)."""

    def select(row: dict) -> dict:
        chosen = [scores for task, scores in row["by_task"].items() if (task in LONG_TASKS) == (tasks is not None)]
        return {key: statistics.mean(scores[key] for scores in chosen) for key, _, _ in GENERATION_METRICS}

    return select


def rollout_table(runs: list[dict], names: list[str]) -> list[str]:
    lines = ["| student | " + " | ".join(title for _, title in ROLLOUT_COLUMNS) + " |", "|---" * 6 + "|"]
    for name in names:
        cells = []
        for key, _ in ROLLOUT_COLUMNS:
            values = [run["models"][name][key] for run in runs if key in run["models"][name]]
            cells.append(mean_std([100 * v for v in values], "{:.1f}") + " %" if values else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    args = parse_args(__doc__, RESULTS, "runs/on_policy")
    runs = run_seeds(args, ("sft", "vanilla"), sources=SOURCES)
    names = [student_name("sft")] + [student_name("vanilla", source) for source in SOURCES]
    baseline = student_name("vanilla")
    lines = [
        "# Sources of the KD sequences on the quickstart task",
        "",
        single_threaded_run("on_policy.py", args, runs),
        "Every KD student: vanilla KD (forward KL), alpha_kd 0.5, CE on the dataset's responses, same initialisation,",
        "steps and data order; generation during training samples at temperature 1 (up to 160 new tokens). SWITCH:",
        "τ0 = 0.3, λ = 0.1, exp schedule; SKD: top-25; GKD: λ = 0.5; DistiLLM: replay buffer 1000, validation loss",
        "every 25 steps on 100 rows of their own. KL and agreement are per response token on the held-out references;",
        "correct answers, exact match and ROUGE-L on greedy generations. The quickstart's default students: 800 steps",
        "from the teacher's embeddings; student-kd reads the teacher from its hidden-state cache (the same loss), the",
        "generating sources run the live teacher, so their time per step includes every teacher forward.",
        "",
        "## All held-out prompts",
        "",
        *table(runs, names, baseline),
        "",
        teacher_line(runs),
        "",
        f"## Long-response sub-tasks ({', '.join(LONG_TASKS)})",
        "",
        *table(runs, names, baseline, GENERATION_METRICS, select=task_group(LONG_TASKS)),
        "",
        "## Short-response sub-tasks (the others)",
        "",
        *table(runs, names, baseline, GENERATION_METRICS, select=task_group(None)),
        "",
        "## Who wrote the training sequences",
        "",
        "Share of micro-batches whose KD ran on generated responses, and of the generated tokens the teacher wrote",
        "(overall and by response position).",
        "",
        *rollout_table(runs, names[1:]),
    ]
    write("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
