"""Sampled-token on-policy distillation (OPD) against full-distribution on-policy KD on the quickstart task.

    OMP_NUM_THREADS=1 python benchmarks/opd.py                # seeds 0 1 2, the quickstart's settings
    python benchmarks/opd.py --seeds 0 --smoke                # seconds: the same code path

One teacher (quickstart seed 0, trained once and reused); per student seed every student starts from the same
initialisation and sees the same data order. Both distilled students learn on the student's own samples
(`source: student`, temperature 1) with alpha_kd 0.5 and CE on the dataset's responses: vanilla KD compares the full
next-token distributions (forward KL) at every sampled position; OPD (k1 estimator) only scores the sampled tokens,
a policy gradient with per-token advantage log p_T − log q_S. SFT is the floor. Writes benchmarks/results/opd.md.
"""

from __future__ import annotations

from pathlib import Path

from llmdistill.quickstart.run import student_name
from student_comparison import parse_args, run_seeds, single_threaded_run, table, teacher_line, write

RESULTS = Path(__file__).parent / "results" / "opd.md"


def main() -> None:
    args = parse_args(__doc__, RESULTS, "runs/opd")
    runs = run_seeds(args, ("sft", "vanilla", "opd"), sources=("student",))
    names = [student_name("sft"), student_name("vanilla", "student"), student_name("opd", "student")]
    lines = [
        "# Sampled-token on-policy distillation (OPD) against on-policy KD on the quickstart task",
        "",
        single_threaded_run("opd.py", args, runs),
        "The quickstart's default students (800 steps from the teacher's embeddings), alpha_kd 0.5, CE on the",
        "dataset's responses. Both distilled students train on the student's own samples (temperature 1, up to 160",
        "new tokens): KD with forward KL over the full distributions, OPD with the k1 estimator on the sampled tokens.",
        "KL and agreement per response token on the held-out references; correct answers, exact match and ROUGE-L on",
        "greedy generations.",
        "",
        *table(runs, names, student_name("vanilla", "student")),
        "",
        teacher_line(runs),
    ]
    write("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
