"""SWITCH rollout speed: the KV-cached dual-model engine (`llmdistill.rollout`) against a naive loop that recomputes
both models over the whole prefix at every step, in the same run, on the same prompts and seed (the two must produce
the same tokens). Also the cost of a SWITCH rollout relative to a plain student rollout plus one teacher pass over the
finished sequences (what on-policy KD without intervention needs: `student.generate`, then one teacher forward).

    python benchmarks/rollout.py                     # batch 8, 64-token prompts, 128 new tokens
    python benchmarks/rollout.py --new-tokens 32     # quicker
    python benchmarks/rollout.py --pair trained      # the quickstart's teacher and a student distilled from it

`--pair random` (default): randomly initialised Llama-style decoders (student 4 layers × 256, teacher 8 layers × 512,
vocabulary 32,000) on random prompts; they disagree almost everywhere. `--pair trained`: the quickstart's embedded
teacher and a student distilled from it (KD from the teacher's embeddings, `--student-steps` steps, trained once into
`--work-dir` and reused), on held-out prompts whose references are longer than the new tokens; they mostly agree, the
case speculation is for. EOS is disabled so every row generates all new tokens. Prints one JSON line and writes
benchmarks/results/rollout.md (rollout_trained.md for the trained pair).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmdistill.rollout import Intervention, Sampling, jensen_shannon, rollout, sample

RESULTS = Path(__file__).parent / "results"
NO_EOS = -1
LONG_SUBTASKS = ("count", "multiples")  # the quickstart sub-tasks with the longest responses


def model(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def random_pair(args):
    """Random Llama-style models over a 32k vocabulary and random prompts: (student, teacher, ids, mask, label)."""
    student, teacher = model(256, 4, 32_000, seed=0), model(512, 8, 32_000, seed=1)
    ids = torch.randint(3, 32_000, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    label = ("Student: Llama 4 × 256, teacher: Llama 8 × 512, vocabulary 32,000, random weights, "
             f"{args.prompt_tokens}-token random prompts")
    return student, teacher, ids, torch.ones_like(ids), label


def trained_models(work_dir: Path, student_steps: int):
    """The quickstart's embedded teacher and a student distilled from it (KD from the teacher's embeddings,
    `student_steps` steps; trained once into `work_dir` and reused), with their tokenizer, left-padding:
    (student, teacher, tokenizer)."""
    from llmdistill.quickstart.run import DEFAULT, Students, Task, TrainingRun

    task = Task.prepare(work_dir, seed=0)
    student_dir = work_dir / f"student-kd-{student_steps}"
    if not (student_dir / "config.json").is_file():
        students = Students(task)
        init = students.initialisation(work_dir / "student-init", 0, teacher_embeddings=True)
        run = TrainingRun("vanilla", student_steps, DEFAULT.student_learning_rate, DEFAULT.batch_size)
        students.train(student_dir, init, run, 0)
    tokenizer = task.teacher_tokenizer
    tokenizer.padding_side = "left"
    student, teacher = (AutoModelForCausalLM.from_pretrained(path).eval() for path in (student_dir, task.teacher_dir))
    return student, teacher, tokenizer


def trained_pair(args):
    """`trained_models` and `args.batch` held-out prompts whose references are longer than `args.new_tokens` tokens,
    left-padded: (student, teacher, ids, mask, label)."""
    from llmdistill.quickstart.task import is_held_out, make_examples

    student, teacher, tokenizer = trained_models(args.work_dir, args.student_steps)
    long_rows = [row for row in make_examples(4000, seed=1, subtasks=LONG_SUBTASKS)
                 if is_held_out(row["prompt"]) and len(tokenizer(row["response"])["input_ids"]) > args.new_tokens]
    if len(long_rows) < args.batch:
        sys.exit(f"--new-tokens {args.new_tokens}: only {len(long_rows)} held-out prompts have longer references; "
                 "lower it")
    prompts = tokenizer([row["prompt"] for row in long_rows[: args.batch]], return_tensors="pt", padding=True)
    label = (f"Teacher: the quickstart's embedded teacher (Llama 3 × 128, vocabulary {len(tokenizer)}); student: "
             f"Llama 2 × 64 distilled from it ({args.student_steps} KD steps from the teacher's embeddings); held-out "
             f"{'/'.join(LONG_SUBTASKS)} prompts whose references exceed {args.new_tokens} tokens")
    return student, teacher, prompts["input_ids"], prompts["attention_mask"], label


def real_pair(args):
    """Qwen2.5-Coder-1.5B-Instruct teaching Qwen2.5-Coder-0.5B-Instruct ($LLMDISTILL_MODELS, from
    ../shared/models/fetch.py) on GSM8K test questions in the chat template, left-padded: (student, teacher, ids,
    mask, label)."""
    from llmdistill.models import load_tokenizer

    from real_checkpoints import QWEN_05, QWEN_15, models_dir

    names = (QWEN_05, QWEN_15)
    folder = models_dir(*names)
    student, teacher = (AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.float32).eval() for name in names)
    tokenizer = load_tokenizer(str(folder / names[0]))
    tokenizer.padding_side = "left"
    gsm8k = Path(__file__).resolve().parents[2] / "shared" / "data" / "datasets" / "gsm8k" / "test.jsonl"
    with open(gsm8k) as lines:
        questions = [json.loads(line)["question"] for line, _ in zip(lines, range(args.batch))]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True) for question in questions]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    label = (f"Teacher: Qwen2.5-Coder-1.5B-Instruct (1.78 B parameters); student: Qwen2.5-Coder-0.5B-Instruct (630 M), "
             f"fp32, from ../shared/models/fetch.py; the first {args.batch} GSM8K test questions in the chat template")
    return student, teacher, encoded["input_ids"], encoded["attention_mask"], label


PAIRS = {"random": random_pair, "trained": trained_pair, "real": real_pair}


@torch.no_grad()
def naive_switch(student, teacher, ids, mask, intervention: Intervention, sampling: Sampling, generator):
    """SWITCH by recomputation: both models run over the whole prefix at every step; the same draws as the engine
    (two uniform tensors per step from the generator; both models sample from the first, as SWITCH's are coupled)."""
    for step in range(sampling.max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        student_logits = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        teacher_logits = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        uniforms, _ = (torch.rand(student_logits.shape, generator=generator) for _ in range(2))
        student_token = sample(student_logits, sampling, noise=uniforms)
        teacher_token = sample(teacher_logits, sampling, noise=uniforms)
        writes = jensen_shannon(teacher_logits, student_logits) > intervention.threshold(step)
        token = torch.where(writes, teacher_token, student_token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def forward_calls(run, student, teacher) -> tuple[int, int]:
    """(student, teacher) forward calls made by one `run()`: on large models each teacher call is what speculation
    saves, whatever these small models' per-call overheads are."""
    counts = [0, 0]
    hooks = [model.register_forward_hook(lambda *_, which=which: counts.__setitem__(which, counts[which] + 1))
             for which, model in enumerate((student, teacher))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return counts[0], counts[1]


def timed(run, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=list(PAIRS), default="random")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="random pair: prompt length")
    parser.add_argument("--new-tokens", type=int, help="default 128 (random pair), 48 (trained pair), 64 (real pair)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--draft-tokens", type=int, default=8, help="speculative SWITCH: most tokens per draft")
    parser.add_argument("--tau0", type=float, default=0.3, help="SWITCH threshold τ0 (λ = 0.1, exp)")
    parser.add_argument("--student-steps", type=int, default=1000, help="trained pair: the student's KD steps")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/rollout-trained"), help="trained pair: its models")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or {"random": 128, "trained": 48, "real": 64}[args.pair]
    args.output = args.output or RESULTS / ("rollout.md" if args.pair == "random" else f"rollout_{args.pair}.md")
    student, teacher, ids, mask, args.label = PAIRS[args.pair](args)
    vocab = student.config.vocab_size
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=1.0)
    rules = {"switch": Intervention(rule="switch", switch_tau0=args.tau0, switch_decay=0.1),
             "skd": Intervention(rule="skd")}

    def engine(rule: Intervention, draft_tokens: int = 0):
        return lambda: rollout(student, teacher, ids, mask, rule, sampling, NO_EOS, 0, torch.Generator().manual_seed(1),
                               draft_tokens=draft_tokens)

    seconds, produced, calls = {}, {}, {}
    for name, rule in rules.items():
        seconds[f"engine_{name}"], produced[name] = timed(engine(rule), args.repeats)
        seconds[f"speculative_{name}"], speculative = timed(engine(rule, args.draft_tokens), args.repeats)
        assert torch.equal(produced[name].sequences, speculative.sequences), f"speculative {name} changed the tokens"
        for mode, draft_tokens in ((f"engine_{name}", 0), (f"speculative_{name}", args.draft_tokens)):
            calls[mode] = forward_calls(engine(rule, draft_tokens), student, teacher)
    if args.pair != "real":  # recomputing a 1.5 B teacher over every prefix would take most of an hour on a CPU
        seconds["naive_switch"], naive = timed(
            lambda: naive_switch(student, teacher, ids, mask, rules["switch"], sampling, torch.Generator().manual_seed(1)),
            1,
        )
        assert torch.equal(produced["switch"].sequences, naive), "the engine and the recomputation made different tokens"
    seconds["engine_student"], _ = timed(  # source: student, as the trainer runs it
        lambda: rollout(student, None, ids, mask, Intervention(), sampling, NO_EOS, 0, torch.Generator().manual_seed(1)),
        args.repeats,
    )

    def generate(model):
        return lambda: model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
        )

    seconds["student_generate"], plain = timed(generate(student), args.repeats)
    if args.pair == "real":
        seconds["teacher_generate"], _ = timed(generate(teacher), args.repeats)
    seconds["teacher_pass"], _ = timed(
        lambda: teacher(input_ids=plain, attention_mask=torch.cat([mask, torch.ones_like(plain[:, ids.shape[1]:])], 1),
                        output_hidden_states=True, logits_to_keep=1),
        args.repeats,
    )
    baseline = seconds["student_generate"] + seconds["teacher_pass"]
    tokens = args.batch * args.new_tokens
    switch = produced["switch"]
    rows = {
        "new_tokens_per_s": {name: tokens / spent for name, spent in seconds.items() if name != "teacher_pass"},
        "speedup_vs_naive": seconds["naive_switch"] / seconds["engine_switch"] if "naive_switch" in seconds else None,
        "vs_student_plus_teacher_pass": {
            name: seconds[name] / baseline for name in seconds if name.startswith(("engine_", "speculative_"))
        },
        "teacher_written_fraction": {name: out.teacher_written.float().mean().item() for name, out in produced.items()},
        "forward_calls_per_new_token": {  # per row-step: the batch shares every call
            mode: {"student": student_calls / args.new_tokens, "teacher": teacher_calls / args.new_tokens}
            for mode, (student_calls, teacher_calls) in calls.items()
        },
        "kd_target_mib": switch.teacher_hidden.numel() * switch.teacher_hidden.element_size() / 2**20,
        "logits_mib": switch.response_mask.numel() * vocab * 4 / 2**20,
        "teacher_pass_share": seconds["teacher_pass"] / seconds["engine_switch"],
        "seconds": seconds,
    }
    print(json.dumps(rows))
    write(rows, args)


def machine() -> str:
    """The machine a timing was taken on, as the results files name it."""
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


def write(rows: dict, args) -> None:
    rates, ratios = rows["new_tokens_per_s"], rows["vs_student_plus_teacher_pass"]
    written, calls = rows["teacher_written_fraction"], rows["forward_calls_per_new_token"]
    lines = [
        "# SWITCH and SKD rollouts: KV-cached engine, speculation, recomputation",
        "",
        f"`python benchmarks/rollout.py --pair {args.pair} --batch {args.batch} --new-tokens {args.new_tokens} --tau0 "
        f"{args.tau0} --draft-tokens {args.draft_tokens}` on {machine()}. {args.label}. Sampling at temperature 1, EOS "
        f"disabled; SWITCH τ0 = {args.tau0}, λ = 0.1 (exp); SKD top-25. Token by token and speculative produce the "
        "same tokens, and the engine the same as recomputation (asserted, except on the real pair). Ratios are to a plain student rollout "
        "(`student.generate`) plus one teacher pass over its output.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| student-only sampling (`student.generate`, KV cache) | {rates['student_generate']:.1f} new tokens/s |",
        f"| `source: student` (the engine, student alone) | {rates['engine_student']:.1f} new tokens/s, "
        f"**{rates['engine_student'] / rates['student_generate']:.2f}×** `student.generate`'s rate |",
    ]
    if "teacher_generate" in rates:
        both = 1 / (1 / rates["student_generate"] + 1 / rates["teacher_generate"])
        lines += [
            f"| teacher-only sampling (`teacher.generate`) | {rates['teacher_generate']:.1f} new tokens/s |",
            f"| both models one after the other (1 / (1/student + 1/teacher)) | {both:.1f} new tokens/s |",
        ]
    if rows["speedup_vs_naive"] is not None:
        lines += [
            f"| SWITCH, naive recomputation of both models | {rates['naive_switch']:.0f} new tokens/s |",
            f"| speed-up of the engine over recomputation | **{rows['speedup_vs_naive']:.1f}×** |",
        ]
    for name, title in (("switch", "SWITCH"), ("skd", "SKD")):
        lines.append(f"| {title}: teacher-written fraction | {written[name]:.2f} |")
        for mode, how in ((f"engine_{name}", "token by token"),
                          (f"speculative_{name}", f"speculative (drafts of up to {args.draft_tokens})")):
            lines.append(
                f"| {title}, {how} | {rates[mode]:.1f} new tokens/s, **{ratios[mode]:.2f}×**; forward calls per new "
                f"token: student {calls[mode]['student']:.2f}, teacher {calls[mode]['teacher']:.2f} |"
            )
    lines += [
        f"| KD target kept by the SWITCH rollout: the teacher's hidden states [B, T, D] | "
        f"{rows['kd_target_mib']:.1f} MiB |",
        f"| the same target as fp32 logits [B, T, V] | {rows['logits_mib']:.0f} MiB |",
        f"| teacher pass over the sequences that keeping the target saves, ÷ SWITCH rollout time | "
        f"{rows['teacher_pass_share']:.2f} |",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
