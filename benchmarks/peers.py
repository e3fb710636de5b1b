"""llmdistill beside TRL on the same models, data and settings: time per optimizer step and peak memory.

    pip install -e ".[bench]"            # adds trl
    python benchmarks/peers.py           # on-policy and off-policy, 3 interleaved repeats, writes results/peers.md

On-policy: TRL's `DistillationTrainer` (student samples, then generalized JSD against the teacher on them; HF
`generate`, no vLLM) against `DistillTrainer` with `source: student`, `divergence: jsd`, `alpha_kd: 1` (the same loss
on the same kind of sequences). Off-policy: TRL's `GKDTrainer` with `lmbda: 0` (dataset responses only) against
`source: gt`, `divergence: jsd`, `alpha_kd: 1`. Both sides: a tiny Qwen2 teacher (2 × 128) and student (2 × 64) over
Qwen3's real tokenizer (151,669 ids), fp32, batch 4, Dolly prompts, 64 new tokens (on-policy), one thread.
`--pair real`: Qwen2.5-Coder-1.5B-Instruct teaching Qwen2.5-Coder-0.5B-Instruct ($LLMDISTILL_MODELS, from
../shared/models/fetch.py), fp32, batch 2, GSM8K rows, 32 new tokens, at most 384 tokens off-policy, both cores;
writes results/peers_real.md.

Each measurement runs in a fresh process (`--run NAME`), so its peak resident memory is its own; the steps after the
first are timed (the first compiles kernels and warms caches), and the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, TrainerCallback

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).parent / "results" / "peers.md"
RUNS = ("trl_on_policy", "ours_on_policy", "trl_off_policy", "ours_off_policy")
QWEN_TEACHER, QWEN_STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class Setting:
    batch: int
    new_tokens: int
    max_prompt_tokens: int
    steps: int
    off_policy_max_length: int  # prompt + the dataset's response, on both sides
    threads: int


SETTINGS = {
    "tiny": Setting(batch=4, new_tokens=64, max_prompt_tokens=192, steps=6, off_policy_max_length=1024, threads=1),
    "real": Setting(batch=2, new_tokens=32, max_prompt_tokens=192, steps=4, off_policy_max_length=384, threads=2),
}


class StepClock(TrainerCallback):
    """Wall time of every optimizer step."""

    def __init__(self):
        self.started, self.seconds = None, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def build_real_pair(folder: Path, setting: Setting) -> None:
    """Links to the real teacher and student folders, and GSM8K training rows."""
    from real_checkpoints import models_dir

    models = models_dir(QWEN_TEACHER, QWEN_STUDENT)
    for role, name in (("teacher", QWEN_TEACHER), ("student", QWEN_STUDENT)):
        (folder / role).symlink_to(models / name)
    with open(SHARED_DATA / "datasets" / "gsm8k" / "train.jsonl") as source, open(folder / "rows.jsonl", "w") as file:
        for line, _ in zip(source, range(setting.batch * setting.steps * 2)):
            row = json.loads(line)
            messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
            file.write(json.dumps({"prompt": row["question"], "output": row["answer"], "messages": messages}) + "\n")


def build_models_and_data(folder: Path, setting: Setting) -> None:
    """Teacher and student folders (Qwen3's tokenizer beside each) and the Dolly rows, written once per benchmark."""
    source = SHARED_DATA / "tokenizers" / "qwen3"
    unpacked = folder / "tokenizer"
    unpacked.mkdir(parents=True)
    with gzip.open(source / "tokenizer.json.gz") as packed, open(unpacked / "tokenizer.json", "wb") as plain:
        shutil.copyfileobj(packed, plain)
    shutil.copy(source / "tokenizer_config.json", unpacked)
    tokenizer = AutoTokenizer.from_pretrained(unpacked)
    for name, width, seed in (("teacher", 128, 1), ("student", 64, 2)):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        Qwen2ForCausalLM(config).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    rows = [json.loads(line) for line in (SHARED_DATA / "datasets/minillm-kd-eval/dolly/dev.jsonl").open()]
    short = [r for r in rows if len(tokenizer(r["prompt"])["input_ids"]) <= setting.max_prompt_tokens]
    short = short[: setting.batch * setting.steps * 2]
    with open(folder / "rows.jsonl", "w") as file:
        for row in short:
            messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["output"]}]
            file.write(json.dumps({"prompt": row["prompt"], "output": row["output"], "messages": messages}) + "\n")


def common_options(output_dir: Path, setting: Setting) -> dict:
    return dict(
        output_dir=str(output_dir), per_device_train_batch_size=setting.batch, gradient_accumulation_steps=1,
        max_steps=setting.steps, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=setting.steps, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )


def trainer_for(name: str, folder: Path, output_dir: Path, setting: Setting):
    import datasets

    rows = datasets.load_dataset("json", data_files=str(folder / "rows.jsonl"), split="train")
    teacher, student = str(folder / "teacher"), str(folder / "student")
    if name.startswith("ours"):
        from llmdistill import DistillConfig, DistillTrainer

        on_policy = name == "ours_on_policy"
        config = DistillConfig(
            **common_options(output_dir, setting), objective="vanilla", divergence="jsd", jsd_beta=0.5, alpha_kd=1.0,
            source="student" if on_policy else "gt", max_new_tokens=setting.new_tokens, generation_temperature=1.0,
            max_prompt_length=setting.max_prompt_tokens + 16,
            max_length=setting.max_prompt_tokens + 16 + setting.new_tokens if on_policy else setting.off_policy_max_length,
        )
        columns = ["prompt", "output"] if on_policy else ["messages"]
        return DistillTrainer(student=student, teacher=teacher, args=config,
                              train_dataset=rows.select_columns(columns))
    if name == "trl_on_policy":
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(
            **common_options(output_dir, setting), beta=0.5, temperature=1.0, max_completion_length=setting.new_tokens,
            bf16=False,
            gradient_checkpointing=False,
        )
        return DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                   train_dataset=rows.select_columns(["prompt"]))
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    config = GKDConfig(
        **common_options(output_dir, setting), lmbda=0.0, beta=0.5, temperature=1.0, max_new_tokens=setting.new_tokens,
        bf16=False, gradient_checkpointing=False, max_length=setting.off_policy_max_length,
    )
    return GKDTrainer(model=student, teacher_model=teacher, args=config,
                      train_dataset=rows.select_columns(["messages"]),
                      processing_class=AutoTokenizer.from_pretrained(student))


def measure(name: str, folder: Path, setting: Setting) -> dict:
    torch.set_num_threads(setting.threads)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trainer_for(name, folder, Path(output_dir), setting)
        loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"run": name, "seconds_per_step": statistics.median(clock.seconds[1:]), "peak_mb": peak_mb,
            "extra_peak_mb": peak_mb - loaded_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", choices=RUNS, help="measure one run in this process (used by the benchmark itself)")
    parser.add_argument("--folder", type=Path, help="with --run: the models and data")
    parser.add_argument("--pair", choices=list(SETTINGS), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    setting = SETTINGS[args.pair]
    if args.run:
        print(json.dumps(measure(args.run, args.folder, setting)))
        return
    args.output = args.output or (RESULTS if args.pair == "tiny" else RESULTS.with_name(f"peers_{args.pair}.md"))
    results: dict[str, list[dict]] = {name: [] for name in args.runs}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (build_models_and_data if args.pair == "tiny" else build_real_pair)(folder, setting)
        environment = os.environ | {"OMP_NUM_THREADS": str(setting.threads), "TOKENIZERS_PARALLELISM": "false"}
        for repeat in range(args.repeats):
            for name in args.runs:  # interleaved, so drift in the machine's speed touches every run alike
                finished = subprocess.run(
                    [sys.executable, __file__, "--run", name, "--folder", str(folder), "--pair", args.pair],
                    capture_output=True, text=True,
                    env=environment, check=False,
                )
                if finished.returncode != 0:
                    sys.exit(f"{name} failed:\n{finished.stderr[-3000:]}")
                results[name].append(json.loads(finished.stdout.strip().splitlines()[-1]))
                print(repeat, results[name][-1], flush=True)
    write(summarise(results), args, setting)


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    return {
        name: {key: statistics.median(run[key] for run in runs) for key in ("seconds_per_step", "peak_mb",
                                                                             "extra_peak_mb")}
        for name, runs in results.items()
    }


def write(summary: dict[str, dict], args, setting: Setting) -> None:
    import trl

    import llmdistill

    threads = "one thread" if setting.threads == 1 else f"{setting.threads} threads"
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {threads} per run, torch {torch.__version__}"
    models = (
        "Tiny Qwen2 teacher (2 × 128) and student (2 × 64) over Qwen3's tokenizer (151,669 ids), fp32, batch "
        f"{setting.batch}, Dolly prompts" if args.pair == "tiny" else
        "Qwen2.5-Coder-1.5B-Instruct teaching Qwen2.5-Coder-0.5B-Instruct (../shared/models/fetch.py), fp32, batch "
        f"{setting.batch}, GSM8K rows, at most {setting.off_policy_max_length} tokens off-policy"
    )
    lines = [
        "# llmdistill beside TRL: time per step and peak memory",
        "",
        f"`python benchmarks/peers.py --pair {args.pair} --repeats {args.repeats}` on {machine}; TRL {trl.__version__}, "
        f"llmdistill {llmdistill.__version__}. {models}; on-policy: {setting.new_tokens} sampled tokens per prompt at "
        "temperature 1, generalized JSD (β = 0.5) on them; off-policy: the dataset's responses, the same loss. "
        f"Median over {args.repeats} interleaved repeats of the median step after the first; each run is its own "
        "process (peak = its peak resident memory; extra = peak − after loading the models and data).",
        "",
        "| setting | TRL s/step | llmdistill s/step | time ratio | TRL peak MB | llmdistill peak MB | memory ratio | "
        "TRL extra MB | llmdistill extra MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, (theirs, ours) in {
        "on-policy (TRL DistillationTrainer vs `source: student`)": ("trl_on_policy", "ours_on_policy"),
        "off-policy (TRL GKDTrainer, λ = 0, vs `source: gt`)": ("trl_off_policy", "ours_off_policy"),
    }.items():
        if theirs not in summary or ours not in summary:
            continue
        t, o = summary[theirs], summary[ours]
        lines.append(
            f"| {setting} | {t['seconds_per_step']:.3f} | {o['seconds_per_step']:.3f} | "
            f"**{o['seconds_per_step'] / t['seconds_per_step']:.2f}** | {t['peak_mb']:.0f} | {o['peak_mb']:.0f} | "
            f"**{o['peak_mb'] / t['peak_mb']:.2f}** | {t['extra_peak_mb']:.0f} | {o['extra_peak_mb']:.0f} |"
        )
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
