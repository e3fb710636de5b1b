"""SWITCH rollout speed: the KV-cached dual-model engine (`llmdistill.rollout`) against a naive loop that recomputes
both models over the whole prefix at every step, in the same run, on the same prompts and seed (the two must produce
the same tokens). Also the cost of a SWITCH rollout relative to a plain student rollout plus one teacher pass over the
finished sequences (what on-policy KD without intervention needs: `student.generate`, then one teacher forward).

    python benchmarks/rollout.py                     # batch 8, 64-token prompts, 128 new tokens
    python benchmarks/rollout.py --new-tokens 32     # quicker

Models are randomly initialised Llama-style decoders (student 4 layers × 256, teacher 8 layers × 512, vocabulary
32,000); EOS is disabled so every row generates all new tokens. Prints one JSON line per measurement and writes
benchmarks/results/rollout.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmdistill.rollout import Intervention, Sampling, jensen_shannon, rollout, sample

RESULTS = Path(__file__).parent / "results" / "rollout.md"
NO_EOS = -1


def model(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def naive_switch(student, teacher, ids, mask, intervention: Intervention, sampling: Sampling, generator):
    """SWITCH by recomputation: both models run over the whole prefix at every step; the same draws as the engine."""
    for step in range(sampling.max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        student_logits = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        teacher_logits = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        student_token = sample(student_logits, sampling, generator)
        teacher_token = sample(teacher_logits, sampling, generator)
        writes = jensen_shannon(teacher_logits, student_logits) > intervention.threshold(step)
        token = torch.where(writes, teacher_token, student_token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def timed(run, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--draft-tokens", type=int, default=8, help="speculative SWITCH: most tokens per draft")
    parser.add_argument("--tau0", type=float, default=0.3, help="SWITCH threshold τ0 (λ = 0.1, exp)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    vocab = 32_000
    student, teacher = model(256, 4, vocab, seed=0), model(512, 8, vocab, seed=1)
    ids = torch.randint(3, vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=1.0)
    switch = Intervention(rule="switch", switch_tau0=args.tau0, switch_decay=0.1)

    def engine(rule: Intervention, draft_tokens: int = 0):
        return lambda: rollout(student, teacher, ids, mask, rule, sampling, NO_EOS, 0, torch.Generator().manual_seed(1),
                               draft_tokens=draft_tokens)

    seconds = {}
    seconds["engine_switch"], produced = timed(engine(switch), args.repeats)
    seconds["speculative_switch"], speculative = timed(engine(switch, args.draft_tokens), args.repeats)
    assert torch.equal(produced.sequences, speculative.sequences), "speculative decoding changed the tokens"
    seconds["naive_switch"], naive = timed(
        lambda: naive_switch(student, teacher, ids, mask, switch, sampling, torch.Generator().manual_seed(1)), 1
    )
    assert torch.equal(produced.sequences, naive), "the engine and the recomputation produced different tokens"
    seconds["student_generate"], plain = timed(
        lambda: student.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
        ),
        args.repeats,
    )
    seconds["teacher_pass"], _ = timed(
        lambda: teacher(input_ids=plain, attention_mask=torch.ones_like(plain), output_hidden_states=True,
                        logits_to_keep=1),
        args.repeats,
    )
    tokens = args.batch * args.new_tokens
    rows = {
        "new_tokens_per_s": {name: tokens / spent for name, spent in seconds.items() if name != "teacher_pass"},
        "speedup_vs_naive": seconds["naive_switch"] / seconds["engine_switch"],
        "switch_vs_student_plus_teacher_pass": seconds["engine_switch"]
        / (seconds["student_generate"] + seconds["teacher_pass"]),
        "speculative_vs_student_plus_teacher_pass": seconds["speculative_switch"]
        / (seconds["student_generate"] + seconds["teacher_pass"]),
        "teacher_written_fraction": produced.teacher_written.float().mean().item(),
        "kd_target_mib": produced.teacher_hidden.numel() * produced.teacher_hidden.element_size() / 2**20,
        "logits_mib": produced.response_mask.numel() * vocab * 4 / 2**20,
        "teacher_pass_share": seconds["teacher_pass"] / seconds["engine_switch"],
        "seconds": seconds,
    }
    print(json.dumps(rows))
    write(rows, args)


def write(rows: dict, args) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    rates = rows["new_tokens_per_s"]
    lines = [
        "# SWITCH rollout: KV-cached engine vs recomputation",
        "",
        f"`python benchmarks/rollout.py --batch {args.batch} --prompt-tokens {args.prompt_tokens} --new-tokens "
        f"{args.new_tokens} --tau0 {args.tau0}` on {machine}. Student: Llama 4 × 256, teacher: Llama 8 × 512, "
        f"vocabulary 32,000, random weights, sampling at temperature 1, SWITCH τ0 = {args.tau0}, λ = 0.1 (exp); every "
        "loop produces the same tokens (asserted).",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| SWITCH, engine (both KV caches) | {rates['engine_switch']:.0f} new tokens/s |",
        f"| SWITCH, naive recomputation of both models | {rates['naive_switch']:.0f} new tokens/s |",
        f"| speed-up of the engine | **{rows['speedup_vs_naive']:.1f}×** |",
        f"| student-only sampling (`student.generate`, KV cache) | {rates['student_generate']:.0f} new tokens/s |",
        f"| SWITCH ÷ (student rollout + one teacher pass over the sequences) | **{rows['switch_vs_student_plus_teacher_pass']:.2f}** |",
        f"| speculative SWITCH (drafts of up to {args.draft_tokens}; same tokens, asserted) | "
        f"{rates['speculative_switch']:.0f} new tokens/s |",
        f"| speculative SWITCH ÷ (student rollout + one teacher pass) | "
        f"**{rows['speculative_vs_student_plus_teacher_pass']:.2f}** |",
        f"| teacher-written fraction | {rows['teacher_written_fraction']:.2f} |",
        f"| KD target kept by the rollout: the teacher's hidden states [B, T, D] | {rows['kd_target_mib']:.1f} MiB |",
        f"| the same target as fp32 logits [B, T, V] | {rows['logits_mib']:.0f} MiB |",
        f"| teacher pass over the sequences that keeping the target saves, ÷ SWITCH rollout time | "
        f"{rows['teacher_pass_share']:.2f} |",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
