"""llmdistill's training step against a plain-PyTorch step on real checkpoints: same models, rows, loss, optimizer.

    python ../shared/models/fetch.py ~/.cache/llmdistill-models      # once
    LLMDISTILL_MODELS=~/.cache/llmdistill-models python benchmarks/real_step.py                     # ~40 min, 2 cores
    LLMDISTILL_MODELS=... python benchmarks/real_step.py --objectives uld --rounds 1 --steps 2      # a few minutes

The plain step is what a user writes by hand: the teacher's forward under no_grad, the student's forward and
backward, the objective written from METHODS with full [B, T, V] logits, AdamW (student 1e-5; DSKD's t2s projector
at the rate llmdistill gives it). llmdistill's step is DistillTrainer's. Both read the same GSM8K rows in the same
order (sequential sampler, batch 2, at most --max-length tokens). Each side runs in its own process, sides
alternate over --rounds, and each process reports the median of its timed steps (after --warmup) and its peak
resident memory over the steps (models and optimizer state included; the loading peak is reported apart, Linux).
The first step's loss of both sides is printed beside the times: equal losses show that the two steps compute the
same thing. Writes benchmarks/results/real_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from real_checkpoints import QWEN_05, QWEN_15, SMOLLM, gsm8k_messages, models_dir

RESULTS = Path(__file__).parent / "results" / "real_step.md"
OBJECTIVES = {  # objective: (teacher, student)
    "vanilla": (QWEN_15, QWEN_05),
    "dskd": (QWEN_15, QWEN_05),
    "dskd_eta": (QWEN_05, SMOLLM),
    "uld": (QWEN_05, SMOLLM),
    "mined": (QWEN_05, SMOLLM),
}
ALPHA = 0.5


def config_for(objective: str, scratch: Path, args):
    from llmdistill import DistillConfig

    teacher, student = OBJECTIVES[objective]
    models = models_dir(teacher, student)
    return DistillConfig(
        output_dir=str(scratch / "out"), teacher_model_name_or_path=str(models / teacher),
        student_model_name_or_path=str(models / student), objective=objective, alpha_kd=ALPHA,
        dataset_name_or_path=str(gsm8k_messages("train", 2 * (args.warmup + args.steps), scratch / "train.jsonl")),
        per_device_train_batch_size=2, max_length=args.max_length, max_prompt_length=args.max_length - 32,
        learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        disable_tqdm=True, train_sampling_strategy="sequential", model_dtype=args.dtype,
        bf16=args.dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
    )


def peak_rss_mb() -> float:
    """This process's peak resident set since it started or since `restart_peak_rss`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def restart_peak_rss() -> float:
    """The peak so far (loading), then the peak starts over from the current resident set (Linux), so that the
    steps' peak is not the loading's: from_pretrained maps the checkpoint file, whose pages count as resident while
    mapped (Qwen 1.5B stored in fp32, loaded in bf16: 6.9 GB of file pages beside the 3.7 GB model), and the two
    sides load the models in different orders."""
    loading = peak_rss_mb()
    Path("/proc/self/clear_refs").write_text("5")
    return loading


def run_llmdistill(objective: str, args) -> dict:
    from transformers import TrainerCallback

    from llmdistill import DistillTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], 0.0

        def on_train_begin(self, *_, **__):
            self.loading_mb = restart_peak_rss()

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as scratch:
        trainer = DistillTrainer(args=config_for(objective, Path(scratch), args))
        timer = StepTimes()
        trainer.add_callback(timer)
        trainer.train()
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {"step_s": timer.times[args.warmup:], "peak_mb": peak_rss_mb(), "loading_mb": timer.loading_mb,
            "first_loss": first["loss"]}


def run_plain(objective: str, args) -> dict:
    """Loads the models with transformers, builds the same batches (llmdistill's tokenisation and collation: data
    preparation, not timed) and runs the step written out below."""
    from transformers import AutoModelForCausalLM

    from llmdistill.data import DistillCollator
    from llmdistill.models import load_tokenizer
    from llmdistill.trainer_inputs import tokenise

    with tempfile.TemporaryDirectory() as scratch:
        config = config_for(objective, Path(scratch), args)
        from llmdistill.data import load_raw_dataset

        rows = load_raw_dataset(config.dataset_name_or_path, "train")
    dtype = getattr(torch, args.dtype)
    teacher = AutoModelForCausalLM.from_pretrained(config.teacher_model_name_or_path, dtype=dtype).eval()
    student = AutoModelForCausalLM.from_pretrained(config.student_model_name_or_path, dtype=dtype).train()
    teacher.requires_grad_(False)
    student_tokenizer = load_tokenizer(config.student_model_name_or_path)
    teacher_tokenizer = load_tokenizer(config.teacher_model_name_or_path)
    cross = objective in ("dskd_eta", "uld", "mined")
    dataset = tokenise(rows, config, student_tokenizer, "train", teacher_tokenizer if cross else None)
    collate = DistillCollator(student_tokenizer.pad_token_id, teacher_pad_token_id=teacher_tokenizer.pad_token_id)
    batches = [collate([dataset[i] for i in range(start, start + 2)]) for start in range(0, len(dataset) - 1, 2)]
    loss_fn, extra = PLAIN_STEPS[objective](teacher, student, student_tokenizer, teacher_tokenizer)
    optimizer = torch.optim.AdamW(
        [{"params": list(student.parameters()), "lr": 1e-5}] + extra, lr=1e-5, weight_decay=0.0
    )
    times, first_loss, loading_mb = [], None, restart_peak_rss()
    for batch in batches[: args.warmup + args.steps]:
        started = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        first_loss = first_loss if first_loss is not None else loss.item()
    return {"step_s": times[args.warmup:], "peak_mb": peak_rss_mb(), "loading_mb": loading_mb,
            "first_loss": first_loss}


def fkl_rows(teacher_logits, student_logits):
    """KL(p‖q) per row, fp32."""
    p_log = F.log_softmax(teacher_logits.float(), -1)
    return (p_log.exp() * (p_log - F.log_softmax(student_logits.float(), -1))).sum(-1)


def response_mask(labels):
    return labels[:, 1:] != -100


def plain_vanilla(teacher, student, *_):
    def step(batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
        student_logits = student(input_ids=ids, attention_mask=mask).logits
        supervised = response_mask(labels)
        z_s, z_t = student_logits[:, :-1][supervised], teacher_logits[:, :-1][supervised]
        ce = F.cross_entropy(z_s.float(), labels[:, 1:][supervised])
        return (1 - ALPHA) * ce + ALPHA * fkl_rows(z_t, z_s).mean()

    return step, []


class PlainDualSpace:
    """DSKD v2 (METHODS §2) with full logits: ideal-initialised t2s (trained), closed-form s2t recomputed each
    step from the student head; the projector initialisation is llmdistill's (set-up, not timed)."""

    def __init__(self, teacher, student, shared):
        from llmdistill.models import LMHead
        from llmdistill.objectives.dskd import DualSpaceProjectors
        from llmdistill.projector_rates import scaled_learning_rate

        projectors = DualSpaceProjectors(LMHead.of(student), LMHead.of(teacher), shared, "v2", "closed_form")
        self.t2s = projectors.t2s
        self.teacher_ids, self.student_ids = projectors.teacher_ids, projectors.student_ids
        self.teacher_gram_pinv = projectors.teacher_gram_pinv
        self.groups = [{"params": [self.t2s.weight], "lr": scaled_learning_rate(self.t2s.weight)}]
        self.w_t, self.w_s = teacher.get_output_embeddings().weight, student.get_output_embeddings().weight

    def s2t(self):
        with torch.no_grad():
            return self.teacher_gram_pinv @ (self.w_t[self.teacher_ids].float().T @ self.w_s[self.student_ids].float())

    def terms(self, h_t, h_s, z_t, z_s, targets):
        """(ce_ts, kd_ts, kd_st) means over the K rows: teacher states h_t [K, D] with logits z_t, student states
        h_s [K, d] with logits z_s, targets [K] in the student vocabulary."""
        z_ts = self.t2s(h_t.float()) @ self.w_s.detach().float().T
        ce_ts = F.cross_entropy(z_ts, targets)
        agree = (z_ts.argmax(-1) == targets).float()
        kd_ts = (fkl_rows(z_ts.detach(), z_s) * agree).sum() / agree.sum().clamp_min(1)
        z_st = (h_s.float() @ self.s2t().T) @ self.w_t.float().T
        return ce_ts, kd_ts, fkl_rows(z_t, z_st).mean()


def plain_dskd(teacher, student, *_):
    rows = min(teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0])
    dual = PlainDualSpace(teacher, student, rows)

    def step(batch):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with torch.no_grad():
            teacher_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        student_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        supervised = response_mask(labels)
        h_t, z_t = teacher_out.hidden_states[-1][:, :-1][supervised], teacher_out.logits[:, :-1][supervised][:, :rows]
        h_s, z_s = student_out.hidden_states[-1][:, :-1][supervised], student_out.logits[:, :-1][supervised]
        ce = F.cross_entropy(z_s.float(), labels[:, 1:][supervised])
        ce_ts, kd_ts, kd_st = dual.terms(h_t, h_s, z_t, z_s[:, :rows], z_t.argmax(-1))
        return (1 - ALPHA) * ce + ALPHA * (ce_ts + kd_ts + kd_st)

    return step, dual.groups


def both_sides(teacher, student, batch):
    """(teacher states, teacher logits, student states, student logits, student gold) at each side's supervised
    positions, flattened row by row, and the student's gold CE."""
    with torch.no_grad():
        teacher_out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                              output_hidden_states=True)
    student_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True)
    t_mask, s_mask = response_mask(batch["teacher_labels"]), response_mask(batch["labels"])
    return (teacher_out.hidden_states[-1][:, :-1][t_mask], teacher_out.logits[:, :-1][t_mask],
            student_out.hidden_states[-1][:, :-1][s_mask], student_out.logits[:, :-1][s_mask],
            batch["labels"][:, 1:][s_mask])


def plain_dskd_eta(teacher, student, student_tokenizer, teacher_tokenizer):
    """DSKD over ETA's aligned pairs (METHODS §3.2): pairs whose teacher top-1 has no student token drop out; the
    three projector terms are means over the remaining pairs."""
    from llmdistill.models import LMHead
    from llmdistill.objectives.cross_batch import token_pairs_to_positions
    from llmdistill.objectives.cross_common import shared_vocabulary, teacher_to_student_ids
    from llmdistill.vocab import VocabBridge

    bridge = VocabBridge.between(teacher_tokenizer, student_tokenizer)
    dual = PlainDualSpace(teacher, student, shared_vocabulary(bridge, LMHead.of(student), LMHead.of(teacher)))
    to_student = teacher_to_student_ids(
        bridge, dual.w_t.shape[0], dual.w_s.shape[0], dual.w_t.device
    )

    def step(batch):
        h_t, z_t, h_s, z_s, gold = both_sides(teacher, student, batch)
        pairs = token_pairs_to_positions(batch["aligned_pairs"], batch["teacher_labels"], batch["labels"])
        targets = to_student[z_t[pairs[:, 0]].argmax(-1)]
        pairs, targets = pairs[targets >= 0], targets[targets >= 0]
        t, s = pairs[:, 0], pairs[:, 1]
        ce_ts, kd_ts, kd_st = dual.terms(h_t[t], h_s[s], z_t[t], z_s[s], targets)
        return (1 - ALPHA) * F.cross_entropy(z_s.float(), gold) + ALPHA * (ce_ts + kd_ts + kd_st)

    return step, dual.groups


def plain_uld(teacher, student, *_):
    """ULD (METHODS §3.4): the k-th response position of each row on both sides, sorted probabilities, L1."""

    def step(batch):
        _, z_t, _, z_s, gold = both_sides(teacher, student, batch)
        t_lengths = response_mask(batch["teacher_labels"]).sum(1).tolist()
        s_lengths = response_mask(batch["labels"]).sum(1).tolist()
        distance, t_start, s_start = 0.0, 0, 0
        for t_len, s_len in zip(t_lengths, s_lengths):
            k = min(t_len, s_len)
            p = torch.softmax(z_t[t_start : t_start + k].float(), -1).sort(-1, descending=True).values
            q = torch.softmax(z_s[s_start : s_start + k].float(), -1).sort(-1, descending=True).values
            width = max(p.shape[-1], q.shape[-1])
            distance = distance + (F.pad(p, (0, width - p.shape[-1])) - F.pad(q, (0, width - q.shape[-1]))).abs().sum()
            t_start, s_start = t_start + t_len, s_start + s_len
        return (1 - ALPHA) * F.cross_entropy(z_s.float(), gold) + ALPHA * distance / len(gold)

    return step, []


def plain_mined(teacher, student, student_tokenizer, teacher_tokenizer):
    """MinED (METHODS §3.4): at the warping's 1-to-1 pairs whose teacher token has the student token's text, forward
    KL to the teacher's distribution re-indexed into the student vocabulary (renormalised); elsewhere a one-hot on
    the gold token (plain CE)."""
    from llmdistill.objectives.cross_batch import token_pairs_to_positions
    from llmdistill.objectives.cross_common import teacher_to_student_ids
    from llmdistill.vocab import VocabBridge

    student_rows = student.get_output_embeddings().weight.shape[0]
    to_student = teacher_to_student_ids(VocabBridge.between(teacher_tokenizer, student_tokenizer),
                                        teacher.get_output_embeddings().weight.shape[0], student_rows, "cpu")
    mapped = torch.nonzero(to_student >= 0).squeeze(1)

    def step(batch):
        _, z_t, _, z_s, gold = both_sides(teacher, student, batch)
        teacher_gold = batch["teacher_labels"][:, 1:][response_mask(batch["teacher_labels"])]
        pairs = token_pairs_to_positions(batch["mined_pairs"], batch["teacher_labels"], batch["labels"])
        pairs = pairs[to_student[teacher_gold[pairs[:, 0]]] == gold[pairs[:, 1]]]
        probs = torch.softmax(z_t[pairs[:, 0]].float(), -1)
        target = probs.new_zeros(len(pairs), student_rows).index_add_(1, to_student[mapped], probs[:, mapped])
        target = target / target.sum(-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)
        log_q = F.log_softmax(z_s.float(), -1)
        paired = (torch.xlogy(target, target) - target * log_q[pairs[:, 1]]).sum()
        unpaired = torch.ones(len(gold), dtype=torch.bool)
        unpaired[pairs[:, 1]] = False
        one_hot = F.nll_loss(log_q[unpaired], gold[unpaired], reduction="sum")
        return (1 - ALPHA) * F.nll_loss(log_q, gold) + ALPHA * (paired + one_hot) / len(gold)

    return step, []


PLAIN_STEPS = {
    "vanilla": plain_vanilla, "dskd": plain_dskd, "dskd_eta": plain_dskd_eta, "uld": plain_uld, "mined": plain_mined,
}


def one(args) -> None:
    torch.manual_seed(0)
    run = run_llmdistill if args.side == "llmdistill" else run_plain
    Path(args.output).write_text(json.dumps(run(args.objective, args)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--rounds", type=int, default=2, help="each side runs this many times, alternating")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--objective", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        one(args)
        return
    models_dir(*{name for objective in args.objectives for name in OBJECTIVES[objective]})
    lines = header(args)
    for objective in args.objectives:
        runs = {"llmdistill": [], "plain": []}
        for _ in range(args.rounds):
            for side in runs:
                with tempfile.NamedTemporaryFile(suffix=".json") as output:
                    subprocess.run([
                        sys.executable, __file__, "--side", side, "--objective", objective, "--output", output.name,
                        "--warmup", str(args.warmup), "--steps", str(args.steps), "--max-length", str(args.max_length),
                        "--dtype", args.dtype,
                    ], check=True)
                    runs[side].append(json.loads(Path(output.name).read_text()))
        lines.append(row(objective, runs))
        print(lines[-1], flush=True)
        args.results.write_text("\n".join(lines) + "\n")


def header(args) -> list[str]:
    command = " ".join(["python benchmarks/real_step.py", "--objectives", *args.objectives, "--rounds",
                        str(args.rounds), "--warmup", str(args.warmup), "--steps", str(args.steps), "--max-length",
                        str(args.max_length), "--dtype", args.dtype])
    return [
        "# One training step on real checkpoints: llmdistill against plain PyTorch",
        "",
        f"`LLMDISTILL_MODELS=... {command}` on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {args.dtype}, batch 2 of GSM8K train rows in the chat template, at most "
        f"{args.max_length} tokens, α = {ALPHA}, τ = 1. Step time: median over each process's timed steps, then over "
        "processes; memory: each process's peak resident set over its steps (models and optimizer included), largest "
        "over processes (the last column is the peak while loading, mostly the checkpoint files' mapped pages). "
        "First loss: the first step's loss on each side (same rows): equal values show the two steps compute the "
        "same objective.",
        "",
        "| objective | teacher → student | llmdistill s / step | plain s / step | time ratio | llmdistill peak MB | "
        "plain peak MB | memory ratio | first loss (llmdistill / plain) | loading peak MB (llmdistill / plain) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]


def row(objective: str, runs: dict[str, list[dict]]) -> str:
    step = {side: statistics.median(statistics.median(r["step_s"]) for r in results) for side, results in runs.items()}
    peak = {side: max(r["peak_mb"] for r in results) for side, results in runs.items()}
    first = {side: results[0]["first_loss"] for side, results in runs.items()}
    loading = {side: max(r["loading_mb"] for r in results) for side, results in runs.items()}
    teacher, student = OBJECTIVES[objective]
    return (
        f"| {objective} | {teacher} → {student} | {step['llmdistill']:.2f} | {step['plain']:.2f} | "
        f"**{step['llmdistill'] / step['plain']:.2f}x** | {peak['llmdistill']:,.0f} | {peak['plain']:,.0f} | "
        f"**{peak['llmdistill'] / peak['plain']:.2f}x** | {first['llmdistill']:.4f} / {first['plain']:.4f} | "
        f"{loading['llmdistill']:,.0f} / {loading['plain']:,.0f} |"
    )


if __name__ == "__main__":
    main()
