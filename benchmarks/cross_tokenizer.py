"""Cross-tokenizer distillation on the quickstart task: the teacher reads its byte-level BPE, every student a
SentencePiece-style BPE of its own. SFT and the five cross-tokenizer objectives, same steps, several seeds.

    python benchmarks/cross_tokenizer.py                      # seeds 0 1 2, the quickstart's default settings
    python benchmarks/cross_tokenizer.py --seeds 0 --smoke    # seconds: the same code path on the smoke settings

The task and the teacher are fixed (quickstart seed 0, the same teacher as the DSKD benchmark); each student seed
draws the students' shared initialisation and data order. Writes benchmarks/results/cross_tokenizer.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from llmdistill.quickstart.run import DEFAULT, SMOKE
from student_comparison import columns, command, objectives_table, parse_args, run_seeds, write

OBJECTIVES = ("sft", "uld", "mined", "simple_ctkd", "cma", "dskd_eta")
RESULTS = Path(__file__).parent / "results" / "cross_tokenizer.md"
CROSS_METRICS = columns("correct", "gold_ce", "teacher_student_kl", "top1_agreement", "aligned_fraction",
                        "exact_match", "rouge_l", "seconds_per_step")


def main() -> None:
    args = parse_args(__doc__, RESULTS, "runs/cross_tokenizer")
    runs = run_seeds(args, OBJECTIVES, cross_tokenizer=True)
    lines = [
        "# Cross-tokenizer KD on the quickstart task (teacher: byte-level BPE; students: SentencePiece-style BPE)",
        "",
        f"`{command('cross_tokenizer.py', args)}`: one teacher (quickstart seed 0), students over seeds "
        f"{args.seeds} (mean ± std; n = {len(runs)}).",
        "KL and top-1 agreement are measured on the held-out references at the ETA-aligned positions (the share of",
        "student response tokens that have one is the 'aligned' column): KL over the shared vocabulary, both sides",
        "renormalised; agreement = the teacher's top-1 mapped to the student token with the same text. Exact match",
        "and ROUGE-L on greedy generations. Every student: same initialisation per seed, same steps, same data order;",
        f"{(SMOKE if args.smoke else DEFAULT).student_steps} steps from a random initialisation (the quickstart's "
        "cross-tokenizer default: the teacher's embeddings do not fit the students' vocabulary).",
        f"Torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
        "time ratios are taken within each run.",
        "",
        *objectives_table(runs, OBJECTIVES, "sft", CROSS_METRICS),
    ]
    write("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
