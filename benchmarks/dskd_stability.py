"""Do the objectives train stably on real checkpoints? Loss terms, projector accuracy and held-out CE over the first
steps of real pairs, with the projectors' learning rate at the DSKD papers' 1e-3 and at the scaled default.

    python ../shared/models/fetch.py ~/.cache/llmdistill-models      # once: real checkpoints as HF folders
    LLMDISTILL_MODELS=~/.cache/llmdistill-models python benchmarks/dskd_stability.py            # ~25 min, 2 cores
    LLMDISTILL_MODELS=... python benchmarks/dskd_stability.py --cases qwen-eta:dskd_eta:1e-3 --steps 5   # one case

Each case `PAIR:OBJECTIVE:PROJECTOR_LR` (PROJECTOR_LR `scaled` = unset) runs in its own process: GSM8K training
rows through the student's chat template (batch 2, at most 256 tokens, AdamW at 1e-5, constant rate, fp32),
logging every step; held-out CE on GSM8K test rows before and after. Writes benchmarks/results/dskd_stability.md
and .png (the curves) and the raw logs as .json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from real_checkpoints import QWEN_05, QWEN_15, SMOLLM, gsm8k_messages, models_dir

RESULTS = Path(__file__).parent / "results" / "dskd_stability"
PAIRS = {"qwen": (QWEN_15, QWEN_05), "qwen-eta": (QWEN_05, SMOLLM)}  # name: (teacher, student) folders
DEFAULT_CASES = ("qwen:dskd:1e-3", "qwen:dskd:scaled", "qwen-eta:dskd_eta:1e-3", "qwen-eta:dskd_eta:scaled")
CURVES = ("ce_ts", "t2s_accuracy", "kd_ts", "kd_st", "ce", "kd")


def run_case(case: str, steps: int, eval_rows: int, output: Path) -> None:
    from llmdistill import DistillConfig, DistillTrainer

    pair, objective, projector_lr = case.split(":")
    models = models_dir(*PAIRS[pair])
    teacher, student = (str(models / name) for name in PAIRS[pair])
    with tempfile.TemporaryDirectory() as scratch:
        config = DistillConfig(
            output_dir=scratch, teacher_model_name_or_path=teacher, student_model_name_or_path=student,
            dataset_name_or_path=str(gsm8k_messages("train", 2 * steps, Path(scratch) / "train.jsonl")),
            eval_dataset_name_or_path=str(gsm8k_messages("test", eval_rows, Path(scratch) / "test.jsonl")),
            objective=objective, projector_learning_rate=None if projector_lr == "scaled" else float(projector_lr),
            per_device_train_batch_size=2, per_device_eval_batch_size=2, max_length=256, max_prompt_length=192,
            learning_rate=1e-5, lr_scheduler_type="constant", max_steps=steps, logging_steps=1, save_strategy="no",
            report_to=[], seed=0, disable_tqdm=True,
        )
        trainer = DistillTrainer(args=config)
        before = trainer.evaluate()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started  # kept in the raw log only: other jobs may have shared the cores
        after = trainer.evaluate()
    rates = [group["lr"] for group in trainer.optimizer.param_groups if group.get("projectors")]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "eval_loss" not in entry]
    output.write_text(json.dumps({
        "case": case, "projector_rates": rates, "seconds_per_step": seconds / steps,
        "eval_before": before, "eval_after": after, "logs": logs,
    }))


def summary_rows(results: list[dict]) -> list[str]:
    lines = [
        "| pair | objective | projector lr | ce_ts: step 1 → 2 → last | t2s acc %: step 1 → 2 → last | "
        "kd_ts: 1 → last | kd_st: 1 → last | held-out CE: before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        pair, objective, rate = result["case"].split(":")
        logs = result["logs"]
        series = {name: [entry.get(name, float("nan")) for entry in logs] for name in CURVES}
        rate = ", ".join(f"{r:.2e}" for r in result["projector_rates"]) + (" (scaled)" if rate == "scaled" else "")
        lines.append(
            f"| {pair} | {objective} | {rate} | {_path(series['ce_ts'])} | {_path(series['t2s_accuracy'], '.0f')} | "
            f"{series['kd_ts'][0]:.2f} → {series['kd_ts'][-1]:.2f} | {series['kd_st'][0]:.2f} → {series['kd_st'][-1]:.2f} | "
            f"{result['eval_before']['eval_ce']:.3f} → {result['eval_after']['eval_ce']:.3f} |"
        )
    return lines


def _path(values: list[float], spec: str = ".2f") -> str:
    return " → ".join(format(v, spec) for v in (values[0], values[1], values[-1]))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    for result in results:
        steps = [entry["step"] for entry in result["logs"]]
        for axis, name in zip(axes, ("ce_ts", "t2s_accuracy", "kd_ts", "kd_st")):
            axis.plot(steps, [entry.get(name, float("nan")) for entry in result["logs"]], label=result["case"])
            axis.set_title(name)
            axis.set_xlabel("step")
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="rewrite the report from the saved .json logs")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_case(args.one, args.steps, args.eval_rows, args.output)
        return
    models_dir(*{name for case in args.cases for name in PAIRS[case.split(":")[0]]})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.cases:  # one process each: the models' memory is returned between cases
        output = args.results.with_name(f"{args.results.name}_{case.replace(':', '_')}.json")
        if not args.render:
            subprocess.run([sys.executable, __file__, "--one", case, "--steps", str(args.steps), "--eval-rows",
                            str(args.eval_rows), "--output", str(output)], check=True)
        results.append(json.loads(output.read_text()))
        print("\n".join(summary_rows(results)[-1:]), flush=True)
    plot(results, args.results.with_suffix(".png"))
    header = [
        "# DSKD on real checkpoints: the projectors' first steps",
        "",
        f"`{' '.join(['python', 'benchmarks/dskd_stability.py', '--cases', *args.cases, '--steps', str(args.steps)])}` "
        f"(GSM8K train rows in the chat template, batch 2, ≤ 256 tokens, AdamW 1e-5 constant, fp32, 2 CPU cores; "
        f"held-out CE on {args.eval_rows} GSM8K test rows). Curves: `dskd_stability.png`.",
        "",
    ]
    args.results.with_suffix(".md").write_text("\n".join(header + summary_rows(results)) + "\n")


if __name__ == "__main__":
    main()
