"""SFT, vanilla KD and DSKD students from one quickstart teacher, same steps, over several student seeds.

    python benchmarks/dskd_vs_kd.py                      # seeds 0 1 2, the quickstart's default settings
    python benchmarks/dskd_vs_kd.py --seeds 0 --smoke    # seconds: the same code path on the smoke settings

The task and the teacher are fixed (quickstart seed 0; the teacher is trained once and reused); each student
seed draws the students' shared initialisation and data order. Writes benchmarks/results/dskd_vs_kd.md with
mean ± std per metric and the time per training step of each student relative to vanilla KD.
"""

from __future__ import annotations

from pathlib import Path

from student_comparison import command, objectives_table, parse_args, run_seeds, write

OBJECTIVES = ("sft", "vanilla", "dskd")
RESULTS = Path(__file__).parent / "results" / "dskd_vs_kd.md"


def main() -> None:
    args = parse_args(__doc__, RESULTS, "runs/dskd_vs_kd")
    runs = run_seeds(args, OBJECTIVES)
    lines = [
        "# SFT vs vanilla KD vs DSKD on the quickstart task",
        "",
        f"`{command('dskd_vs_kd.py', args)}`: one teacher (quickstart seed 0), students over seeds {args.seeds} "
        f"(mean ± std; n = {len(runs)}).",
        "KL and agreement are per response token on the held-out references; exact match and ROUGE-L on",
        "greedy generations. Every student: same initialisation per seed, same steps, same data order.",
        "",
        *objectives_table(runs, OBJECTIVES, "vanilla"),
    ]
    write("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
