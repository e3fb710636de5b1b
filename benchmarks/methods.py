"""Every distillation method on the quickstart task, same tokenizer and cross-tokenizer, over seeds: one table.

    python benchmarks/methods.py              # all methods, seeds 0 1 2 (over an hour on 2 CPU cores)
    python benchmarks/methods.py --quick      # one seed, 60 steps per student, one sampling seed (under 10 min)
    python benchmarks/methods.py --student-steps 1000 --methods SFT "KD (fkl)" --results benchmarks/results/methods_1000_steps.md
    python benchmarks/methods.py --smoke --methods SFT "KD (fkl)"   # seconds: the same code path

One teacher: the quickstart's embedded one (never trained on a held-out prompt). For each student seed every method
starts from the same initialisation and sees the same data order; the students train in parallel worker processes,
one thread each, longest first. Each student is scored on the 100 held-out prompts: teacher→student KL and top-1
agreement and the student's own CE on the references, exact match and ROUGE-L of greedy responses (as `llmdistill
quickstart`; also over the references of at least 64 tokens), and ROUGE-L under the papers' protocol (sampling at
T=1, top-p 1, top-k 0, prompt ≤ 256, total ≤ 512, averaged over --sampling-seeds). The report opens with the papers'
claims judged against seed noise. Writes benchmarks/results/methods.md and methods.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from llmdistill.divergences import DIVERGENCES  # noqa: E402
from llmdistill.evaluation import PAPER_SEEDS, Protocol, rouge_l, sample_responses  # noqa: E402
from llmdistill.quickstart.run import (  # noqa: E402
    DEFAULT, SMOKE, Students, Task, TrainingRun, greedy_scores, teacher_gold_ce, training_summary,
)
from llmdistill.quickstart.teacher import EMBEDDED_SHA256  # noqa: E402
from student_comparison import columns, mean_std, table, write  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "methods.md"
# 300 steps per student, the quickstart's former default: every committed methods table was measured at it
FULL = dataclasses.replace(DEFAULT, student_steps=300)
QUICK = dataclasses.replace(DEFAULT, student_steps=60)
COLUMNS = columns("teacher_student_kl", "top1_agreement", "correct", "exact_match", "rouge_l", "gold_ce",
                  "gold_ce_open", "long_rouge_l", "sampled_rouge_l", "seconds_per_step")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    objective: str
    divergence: str = "fkl"
    source: str = "gt"
    cross_tokenizer: bool = False
    teacher_embeddings: bool = False  # the student starts from the teacher's embeddings (principal projection)
    temperature: float = TrainingRun.temperature  # the quickstart's, unless the method names another
    alpha_kd: float = TrainingRun.alpha_kd
    opd_estimator: str = TrainingRun.opd_estimator


METHODS = (
    Method("SFT", "sft"),
    *(Method(f"KD ({divergence})", "vanilla", divergence) for divergence in DIVERGENCES),
    Method("KD (fkl, τ = 2)", "vanilla", temperature=2.0),  # the DSKD scripts' temperature, no τ² factor
    Method("KD (fkl, α = 1)", "vanilla", alpha_kd=1.0),  # no CE on the references (a fifth carry a typo)
    Method("DSKD", "dskd"),
    Method("SFT, teacher-embedding init", "sft", teacher_embeddings=True),
    Method("KD (fkl), teacher-embedding init", "vanilla", teacher_embeddings=True),
    Method("DSKD, teacher-embedding init", "dskd", teacher_embeddings=True),
    Method("KD (fkl, τ = 2), teacher-embedding init", "vanilla", teacher_embeddings=True, temperature=2.0),
    Method("KD (fkl, α = 1), teacher-embedding init", "vanilla", teacher_embeddings=True, alpha_kd=1.0),
    Method("SeqKD", "vanilla", source="teacher"),
    Method("on-policy KD (student only)", "vanilla", source="student"),
    Method("GKD", "vanilla", "jsd", "mixed"),
    Method("DistiLLM", "vanilla", "skl", "adaptive"),
    Method("SKD", "vanilla", source="skd"),
    Method("SWITCH", "vanilla", source="switch"),
    Method("OPD (k1)", "opd", source="student"),  # sampled-token policy gradient on the student's own samples
    Method("OPD (k3)", "opd", source="student", opd_estimator="k3"),
    Method("SFT, own tokenizer", "sft", cross_tokenizer=True),
    Method("DSKD-ETA", "dskd_eta", cross_tokenizer=True),
    Method("ULD", "uld", cross_tokenizer=True),
    Method("MinED", "mined", cross_tokenizer=True),
    Method("CMA (DSKD v1)", "cma", cross_tokenizer=True),
    Method("shared-vocabulary KD", "simple_ctkd", cross_tokenizer=True),
)
MAIN_METRICS = ("correct", "gold_ce", "gold_ce_open")
# The papers' claims, each as (claim, the method claimed better, the one it is compared with, metrics).
CLAIMS = (
    ("KD > SFT", "KD (fkl)", "SFT", MAIN_METRICS),
    ("KD > SFT, teacher-embedding init", "KD (fkl), teacher-embedding init", "SFT, teacher-embedding init",
     MAIN_METRICS),
    ("KD with softened targets (τ = 2) > SFT", "KD (fkl, τ = 2)", "SFT", MAIN_METRICS),
    ("KD with softened targets (τ = 2) > SFT, teacher-embedding init", "KD (fkl, τ = 2), teacher-embedding init",
     "SFT, teacher-embedding init", MAIN_METRICS),
    ("KD without the noisy references' CE (α = 1) > SFT", "KD (fkl, α = 1)", "SFT", MAIN_METRICS),
    ("KD without the noisy references' CE (α = 1) > SFT, teacher-embedding init",
     "KD (fkl, α = 1), teacher-embedding init", "SFT, teacher-embedding init", MAIN_METRICS),
    ("DSKD > vanilla KD (DSKD paper)", "DSKD", "KD (fkl)", MAIN_METRICS),
    ("DSKD > vanilla KD, teacher-embedding init (DSKD paper)", "DSKD, teacher-embedding init",
     "KD (fkl), teacher-embedding init",
     MAIN_METRICS),
    ("on-policy > off-policy KD (GKD paper)", "GKD", "KD (fkl)", MAIN_METRICS),
    ("on-policy KD > SFT (GKD paper)", "GKD", "SFT", MAIN_METRICS),
    ("on-policy > off-policy KD (DistiLLM paper)", "DistiLLM", "KD (fkl)", MAIN_METRICS),
    ("SWITCH > student-only on-policy (SWITCH paper)", "SWITCH", "on-policy KD (student only)",
     ("correct", "long_rouge_l", "gold_ce", "gold_ce_open")),
    *((f"DSKD-ETA > {other} (DSKDv2 paper)", "DSKD-ETA", other, MAIN_METRICS)
      for other in ("ULD", "MinED", "CMA (DSKD v1)")),
)
LOWER_IS_BETTER = {"gold_ce", "gold_ce_open", "teacher_student_kl"}
# Relative time per step by source (measured): the pool starts the longest jobs first.
COST = {"gt": 1, "adaptive": 2, "mixed": 3, "teacher": 3, "student": 4, "skd": 4, "switch": 4}


@dataclasses.dataclass(frozen=True)
class Job:
    method: Method
    seed: int
    students: Students
    init_dir: Path
    directory: Path
    run: TrainingRun
    sampling_seeds: tuple[int, ...]

    def fingerprint(self) -> str:
        parts = [self.method, self.seed, self.run, self.sampling_seeds, self.students.task.settings]
        return hashlib.sha256(repr(parts).encode()).hexdigest()


def main() -> None:
    args = _parse_args()
    started = time.perf_counter()
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.student_steps:
        settings = dataclasses.replace(settings, student_steps=args.student_steps)
    if args.n_train:
        settings = dataclasses.replace(settings, n_train=args.n_train)
    seeds = args.seeds or ([0] if args.quick or args.smoke else [0, 1, 2])
    sampling_seeds = tuple(args.sampling_seeds or (PAPER_SEEDS[:1] if args.quick or args.smoke else PAPER_SEEDS))
    methods = [method for method in METHODS if not args.methods or method.name in args.methods]
    unknown = set(args.methods or ()) - {method.name for method in METHODS}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {[method.name for method in METHODS]}")
    task = Task.prepare(args.output_dir, 0, settings)
    jobs = _jobs(task, methods, seeds, sampling_seeds)
    teacher = _teacher_scores(task, sampling_seeds)
    rows = _run(jobs, args.workers)
    runs = [{"models": {job.method.name: row for job, row in zip(jobs, rows) if job.seed == seed}} for seed in seeds]
    wall = time.perf_counter() - started
    lines = _report(args, methods, runs, teacher, settings, seeds, sampling_seeds, wall)
    _chart(methods, runs, teacher, args.results.with_suffix(".png"))
    write("\n".join(lines) + "\n", args.results)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="one seed, 60 steps per student, one sampling seed")
    modes.add_argument("--smoke", action="store_true", help="the quickstart's smoke settings (seconds)")
    parser.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0 1 2; 0 with --quick)")
    parser.add_argument("--sampling-seeds", type=int, nargs="+",
                        help=f"seeds of the papers' sampled ROUGE-L (default {list(PAPER_SEEDS)}; the first with "
                        "--quick)")
    parser.add_argument("--methods", nargs="+", help="only these methods (names as in the table)")
    parser.add_argument("--student-steps", type=int, help="steps per student (default 300)")
    parser.add_argument("--n-train", type=int, help="labelled training rows (default: the quickstart's 3,000)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel students")
    parser.add_argument("--output-dir", type=Path, help="default runs/methods (runs/methods-quick with --quick)")
    parser.add_argument("--results", type=Path,
                        help="default benchmarks/results/methods.md; with --quick or --smoke OUTPUT_DIR/methods.md")
    args = parser.parse_args()
    mode = "-quick" if args.quick else "-smoke" if args.smoke else ""
    args.output_dir = args.output_dir or Path(f"runs/methods{mode}")
    args.results = args.results or (args.output_dir / "methods.md" if mode else RESULTS)
    return args


def _jobs(task: Task, methods: list[Method], seeds: list[int], sampling_seeds: tuple[int, ...]) -> list[Job]:
    """One job per method and seed; the students' tokenizers and initial weights are written here, before any
    worker starts, so that workers only read them."""
    settings, jobs = task.settings, []
    students = {cross: Students(task, cross) for cross in {method.cross_tokenizer for method in methods}}
    for seed in seeds:
        inits = {
            (method.cross_tokenizer, method.teacher_embeddings): _initialisation(students[method.cross_tokenizer],
                                                                                 seed, method.teacher_embeddings)
            for method in methods
        }
        for method in methods:
            run = TrainingRun(method.objective, settings.student_steps, settings.student_learning_rate,
                              settings.batch_size, method.source, settings.max_new_tokens, method.divergence,
                              method.temperature, method.alpha_kd, method.opd_estimator)
            group = students[method.cross_tokenizer]
            directory = group.directory / f"seed{seed}" / _slug(method.name)
            init = inits[method.cross_tokenizer, method.teacher_embeddings]
            jobs.append(Job(method, seed, group, init, directory, run, sampling_seeds))
    return jobs


def _initialisation(students: Students, seed: int, teacher_embeddings: bool) -> Path:
    suffix = "-teacher-embeddings" if teacher_embeddings else ""
    return students.initialisation(students.directory / f"student-init-seed{seed}{suffix}", seed, teacher_embeddings)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _run(jobs: list[Job], workers: int) -> list[dict]:
    order = sorted(range(len(jobs)), key=lambda i: -COST[jobs[i].method.source] - jobs[i].method.cross_tokenizer)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {i: pool.submit(train_and_score, jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]


def train_and_score(job: Job) -> dict:
    """Trains one student (or reuses the one a previous run of the same job left, against the same teacher) and
    scores it."""
    torch.set_num_threads(1)
    saved = job.directory / "benchmark_row.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    if earlier.get("fingerprint") == job.fingerprint() and earlier.get("teacher") == EMBEDDED_SHA256:
        return earlier["row"] | {"reused": True}
    started = time.perf_counter()
    history = job.students.train(job.directory, job.init_dir, job.run, job.seed)
    task = job.students.task
    teacher = AutoModelForCausalLM.from_pretrained(task.teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(job.directory)
    row = _scores(student, job.students.tokenizer, task, job.sampling_seeds)
    row |= job.students.fidelity(teacher)(student) | training_summary(history)
    row |= job.students.gold_ce(student)
    row["job_seconds"] = time.perf_counter() - started
    saved.write_text(json.dumps({"fingerprint": job.fingerprint(), "teacher": EMBEDDED_SHA256, "row": row}))
    return row


def _scores(model, tokenizer, task: Task, sampling_seeds: tuple[int, ...]) -> dict:
    """Greedy exact match and ROUGE-L (as the quickstart) and the papers' sampled ROUGE-L, averaged over seeds."""
    row = greedy_scores(model, tokenizer, task.eval_rows, task.settings.max_new_tokens, task.teacher_tokenizer)
    row["long_exact_match"], row["long_rouge_l"] = row["long"]["exact_match"], row["long"]["rouge_l"]
    prompts, references = [row["prompt"] for row in task.eval_rows], [row["response"] for row in task.eval_rows]
    sampled = [rouge_l(sample_responses(model, tokenizer, prompts, Protocol(), seed), references)
               for seed in sampling_seeds]
    return row | {"sampled_rouge_l": statistics.mean(sampled)}


def _teacher_scores(task: Task, sampling_seeds: tuple[int, ...]) -> dict:
    teacher = AutoModelForCausalLM.from_pretrained(task.teacher_dir)
    return _scores(teacher, task.teacher_tokenizer, task, sampling_seeds) | teacher_gold_ce(task, teacher)


def _report(args, methods, runs, teacher, settings, seeds, sampling_seeds, wall) -> list[str]:
    same = [method.name for method in methods if not method.cross_tokenizer]
    cross = [method.name for method in methods if method.cross_tokenizer]
    lines = [
        "# Every method on the quickstart task",
        "",
        f"`{shlex.join(['python', 'benchmarks/methods.py', *sys.argv[1:]])}`: seeds {seeds} (mean ± std over "
        f"seeds), {settings.n_train:,} training rows, {settings.student_steps} steps per student, batch "
        f"{settings.batch_size}; {args.workers} worker "
        f"processes, one thread each; {_timing(runs, wall)}. Sampled ROUGE-L: the papers' protocol over "
        f"sampling seeds {list(sampling_seeds)}.",
        "",
        "Every student: same initialisation per seed, same steps and data order, alpha_kd 0.5 (CE on the dataset's",
        "responses) and temperature 1 unless its name says otherwise (\"α = 1\": alpha_kd 1, KD only), each method",
        "with its paper's divergence: forward KL unless named (GKD: generalized JSD β = 0.5; DistiLLM: skew KL",
        f"α = 0.1). Generating sources sample at temperature 1, up to {settings.max_new_tokens} new tokens: SeqKD",
        "(the teacher writes), GKD (the student, λ = 0.5), DistiLLM (adaptive schedule, replay buffer), SKD (top-25),",
        "SWITCH (τ0 = 0.3, λ = 0.1, exp). KL and top-1 agreement per response token on the held-out references",
        "(cross-tokenizer: at ETA-aligned positions over the shared vocabulary); exact match and ROUGE-L on greedy",
        "responses. Time per step relative to SFT with the same tokenizer, within each seed's run.",
        "",
        "## The papers' claims",
        "",
        "A claim holds when the claimed-better method's mean beats the other's by more than the larger of their two",
        "seed standard deviations; \"within noise\" when it is ahead by less; otherwise it does not hold. The last",
        "column pairs the two students of each seed (same initialisation and data order) and counts the seeds where",
        "the claimed-better one is ahead.",
        "",
        *_claims(runs, {method.name for method in methods}),
        "",
        "## Same tokenizer",
        "",
        *(table(runs, same, "SFT" if "SFT" in same else same[0], COLUMNS) if same else []),
        "",
        "## Different tokenizers (teacher: byte-level BPE; students: SentencePiece-style BPE)",
        "",
        *(table(runs, cross, "SFT, own tokenizer", COLUMNS) if "SFT, own tokenizer" in cross else []),
        "",
        f"Teacher: correct {teacher['correct']:.1f}%, exact match {teacher['exact_match']:.1f}% (long responses "
        f"{teacher['long_exact_match']:.1f}%), "
        f"ROUGE-L {teacher['rouge_l']:.1f} greedy (long responses {teacher['long_rouge_l']:.1f}), "
        f"{teacher['sampled_rouge_l']:.1f} sampled, held-out CE {teacher['gold_ce']:.3f} (open-ended "
        f"{teacher['gold_ce_open']:.3f}).",
        "",
        *_t2s_lines(runs, methods),
        "",
        f"![every method]({args.results.with_suffix('.png').name})",
    ]
    return lines


def _claims(runs: list[dict], names: set[str]) -> list[str]:
    lines = ["| claim | metric | claimed better | compared with | verdict | seeds where it is better |",
             "|---|---|---|---|---|---|"]
    titles = {key: title for key, title, _ in COLUMNS}
    for claim, better, other, metrics in CLAIMS:
        if not {better, other} <= names:
            continue
        for key in metrics:
            values = [[run["models"][name][key] for run in runs] for name in (better, other)]
            means = [statistics.mean(v) for v in values]
            spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in values)
            lead = (means[1] - means[0]) if key in LOWER_IS_BETTER else (means[0] - means[1])
            verdict = "holds" if lead > spread else "within noise" if lead > 0 else "does not hold"
            fmt = "{:.3f}" if key in LOWER_IS_BETTER else "{:.1f}"
            cells = [mean_std(v, fmt) for v in values]
            sign = -1 if key in LOWER_IS_BETTER else 1
            won = sum(sign * (mine - theirs) > 0 for mine, theirs in zip(*values))  # paired: same seed, same start
            lines.append(f"| {claim} | {titles[key]} | {better}: {cells[0]} | {other}: {cells[1]} | {verdict} "
                         f"| {won} of {len(runs)} |")
    return lines


def _t2s_lines(runs: list[dict], methods: list[Method]) -> list[str]:
    """The projector objectives' t2s accuracy at the end of training: how often the teacher's projected state,
    read by the student's head, gives the teacher's own top-1 (DSKD's ideal projector is only as good as this)."""
    names = [method.name for method in methods if "t2s_accuracy" in runs[0]["models"][method.name]]
    cells = [f"{name} {mean_std([run['models'][name]['t2s_accuracy'] for run in runs], '{:.1f}')}%" for name in names]
    return ["t2s accuracy at the end of training: " + "; ".join(cells) + "."] if names else []


def _timing(runs: list[dict], wall: float) -> str:
    rows = [row for run in runs for row in run["models"].values()]
    reused = sum(row.get("reused", False) for row in rows)
    text = f"students trained and scored in {sum(row['job_seconds'] for row in rows) / 60:.0f} CPU-min"
    text += f", {wall / 60:.0f} min wall time"
    return text + (f" (this invocation reused {reused} of {len(rows)} students from an earlier one)" if reused else "")


def _chart(methods: list[Method], runs: list[dict], teacher: dict, path: Path) -> None:
    """Horizontal bars (mean, std as error bar) of correct answers, held-out CE and KL per method."""
    panels = (("correct", "correct %, greedy ↑"), ("gold_ce", "held-out CE on the references ↓"),
              ("teacher_student_kl", "teacher→student KL ↓"))
    names = [method.name for method in methods]
    colours = ["tab:orange" if method.cross_tokenizer else "tab:blue" for method in methods]
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 0.35 * len(names) + 1.5), sharey=True)
    for axis, (key, title) in zip(axes, panels):
        values = [[run["models"][name][key] for run in runs] for name in names]
        means = [statistics.mean(v) for v in values]
        spreads = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        axis.barh(range(len(names)), means, xerr=spreads, color=colours, capsize=2)
        if key in teacher:
            axis.axvline(teacher[key], color="black", linestyle="--", linewidth=1, label="teacher")
            axis.legend(loc="lower right")
        axis.set_title(title)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    figure.suptitle("blue: same tokenizer; orange: the student has its own tokenizer (KL at aligned positions)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
