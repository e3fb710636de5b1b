"""SFT, vanilla KD and DSKD students from one quickstart teacher, same steps, over several student seeds.

    python benchmarks/dskd_vs_kd.py                      # seeds 0 1 2, the quickstart's default settings
    python benchmarks/dskd_vs_kd.py --seeds 0 --smoke    # seconds: the same code path on the smoke settings

The task and the teacher are fixed (quickstart seed 0; the teacher is trained once and reused); each student
seed draws the students' shared initialisation and data order. Writes benchmarks/results/dskd_vs_kd.md with
mean ± std per metric and the time per training step of each student relative to vanilla KD.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from llmdistill.quickstart.run import run_quickstart, student_name

OBJECTIVES = ("sft", "vanilla", "dskd")
METRICS = (  # key, header, format
    ("teacher_student_kl", "teacher→student KL ↓", "{:.3f}"),
    ("top1_agreement", "top-1 agreement % ↑", "{:.1f}"),
    ("exact_match", "exact match % ↑", "{:.1f}"),
    ("rouge_l", "ROUGE-L ↑", "{:.1f}"),
    ("seconds_per_step", "s / step", "{:.3f}"),
)
RESULTS = Path(__file__).parent / "results" / "dskd_vs_kd.md"


def mean_std(values: list[float], fmt: str) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(spread)}"


def report(runs: list[dict], seeds: list[int], command: str) -> str:
    lines = [
        "# SFT vs vanilla KD vs DSKD on the quickstart task",
        "",
        f"`{command}`: one teacher (quickstart seed 0), students over seeds {seeds} (mean ± std; n = {len(runs)}).",
        "KL and agreement are per response token on the held-out references; exact match and ROUGE-L on",
        "greedy generations. Every student: same initialisation per seed, same steps, same data order.",
        "",
        "| student | " + " | ".join(title for _, title, _ in METRICS) + " | time per step vs KD |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for objective in OBJECTIVES:
        name = student_name(objective)
        rows = [run["models"][name] for run in runs]
        cells = [mean_std([row[key] for row in rows], fmt) for key, _, fmt in METRICS]
        ratios = [
            run["models"][name]["seconds_per_step"] / run["models"][student_name("vanilla")]["seconds_per_step"]
            for run in runs
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_std(ratios, '{:.2f}')}× |")
    teacher = runs[0]["models"]["teacher"]
    lines += ["", f"Teacher: exact match {teacher['exact_match']:.1f}%, ROUGE-L {teacher['rouge_l']:.1f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/dskd_vs_kd"))
    parser.add_argument("--smoke", action="store_true", help="the quickstart's smoke settings (seconds)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        runs.append(run_quickstart(args.output_dir, seed=0, smoke=args.smoke, objectives=OBJECTIVES, student_seed=seed))
        (args.output_dir / f"results_seed{seed}.json").write_text(json.dumps(runs[-1], indent=2))
    command = "python benchmarks/dskd_vs_kd.py " + " ".join(
        ["--seeds", *map(str, args.seeds)] + (["--smoke"] if args.smoke else [])
    )
    text = report(runs, args.seeds, command)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
