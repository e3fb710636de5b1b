"""One rollout per optimizer step against one per micro-batch: what generating for all gradient-accumulation
micro-batches at once buys a plain student source (`student`, `mixed`, `adaptive`).

    OMP_NUM_THREADS=1 python benchmarks/generation_batch.py     # micro-batches of 4, 4 accumulated, 32 steps

The student generates alone, as the trainer has it do for these sources: `rollout(student, None, ...)` under rule
`student`, sampling at temperature 1 up to 128 new tokens (the config's default), EOS on, so a rollout lasts until
its longest response ends. Per step, the same prompts (held-out quickstart prompts of every sub-task) go either into
one rollout of micro-batch × accumulation rows, left-padded together, or into `accumulation` rollouts of one
micro-batch each; the two alternate step by step. The student: `rollout.py --pair trained`'s (the quickstart's
teacher distilled into a 2 × 64 student, trained once and reused). Writes benchmarks/results/generation_batch.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rollout import machine, trained_models

from llmdistill.rollout import Intervention, Sampling, rollout

RESULTS = Path(__file__).parent / "results" / "generation_batch.md"


def timed_rollouts(student, tokenizer, prompt_groups: list[list[str]], sampling: Sampling, seed: int):
    """Seconds and new tokens of one rollout per group of prompts (each group left-padded to its own width)."""
    seconds, tokens, generator = 0.0, 0, torch.Generator().manual_seed(seed)
    for prompts in prompt_groups:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        start = time.perf_counter()
        produced = rollout(student, None, batch["input_ids"], batch["attention_mask"], Intervention("student"),
                           sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
        seconds += time.perf_counter() - start
        tokens += int(produced.response_mask.sum())
    return seconds, tokens


def main() -> None:
    from llmdistill.quickstart.task import is_held_out, make_examples

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--student-steps", type=int, default=1000, help="the trained student's KD steps")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/rollout-trained"), help="its models")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    student, _, tokenizer = trained_models(args.work_dir, args.student_steps)
    rows_per_step = args.micro_batch * args.accumulation
    needed = rows_per_step * args.steps
    prompts = [row["prompt"] for row in make_examples(20 * needed, seed=1) if is_held_out(row["prompt"])][:needed]
    if len(prompts) < needed:
        sys.exit(f"only {len(prompts)} held-out prompts for {needed} rows: lower --steps")
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=1.0)
    totals = {"one rollout per step": [0.0, 0], "one rollout per micro-batch": [0.0, 0]}
    for step in range(args.steps):
        step_prompts = prompts[step * rows_per_step:(step + 1) * rows_per_step]
        groups = {
            "one rollout per step": [step_prompts],
            "one rollout per micro-batch": [step_prompts[start:start + args.micro_batch]
                                            for start in range(0, rows_per_step, args.micro_batch)],
        }
        for name in (list(groups) if step % 2 == 0 else list(groups)[::-1]):
            seconds, tokens = timed_rollouts(student, tokenizer, groups[name], sampling, seed=step)
            totals[name][0] += seconds
            totals[name][1] += tokens
    write(totals, args)


def write(totals: dict, args) -> None:
    per_step, per_micro = totals["one rollout per step"], totals["one rollout per micro-batch"]
    lines = [
        "# Generation batch: one rollout per optimizer step against one per micro-batch",
        "",
        f"`python benchmarks/generation_batch.py --micro-batch {args.micro_batch} --accumulation {args.accumulation} "
        f"--steps {args.steps} --new-tokens {args.new_tokens}` on {machine()}. The student of `rollout.py --pair "
        f"trained` ({args.student_steps} KD steps) generates alone, temperature 1, EOS on, up to {args.new_tokens} "
        f"new tokens, for {args.steps} steps of {args.micro_batch * args.accumulation} held-out quickstart prompts.",
        "",
        "| rollouts | seconds for all steps | new tokens | new tokens / s |",
        "|---|---|---|---|",
    ]
    for name, (seconds, tokens) in totals.items():
        lines.append(f"| {name} | {seconds:.2f} | {tokens} | {tokens / seconds:.0f} |")
    lines += [
        "",
        f"One rollout per step takes **{per_step[0] / per_micro[0]:.2f}×** the time of one rollout per micro-batch "
        f"(throughput {per_step[1] / per_step[0] / (per_micro[1] / per_micro[0]):.2f}×; the responses differ, being "
        "drawn in another order).",
    ]
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
