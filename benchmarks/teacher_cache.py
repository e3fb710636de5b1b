"""Teacher cache: time per step in the epochs after the first, with the live teacher and from the cache.

    python benchmarks/teacher_cache.py            # 3 epochs over 256 quickstart rows; writes results/teacher_cache.md
    python benchmarks/teacher_cache.py --smoke    # seconds: the same code path

A 4×-wider, 4×-deeper teacher than the student (the usual shape of distillation), vanilla KD (fkl, α = 0.5). The
runs: the live teacher; a hidden-state cache (exact: the same loss); top-k caches (the renormalised top-k target),
each student then scored by its held-out KL to the live teacher.
Every run starts from the same student and sees the same data order. The first cached run of each kind builds the
cache (one teacher pass over the data), timed on its own; the runs then train without the teacher's layers.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from llmdistill import DistillConfig, DistillTrainer
from llmdistill.quickstart.task import make_examples
from llmdistill.quickstart.tokenizer import train_tokenizer

RESULTS = Path(__file__).parent / "results" / "teacher_cache.md"


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step after the first epoch."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.epoch > 1:
            self.times.append(time.perf_counter() - self._start)


def llama(vocab: int, width: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32), max_position_embeddings=512, tie_word_embeddings=False,
    ))


def prepare(workdir: Path, rows: int, teacher_shape: tuple[int, int], student_shape: tuple[int, int],
            teacher_steps: int):
    """Tokenizer, training and held-out rows, the student's initialisation and a teacher fine-tuned on the rows
    (an untrained teacher's near-uniform distribution would make every top-k target look equally bad)."""
    examples = make_examples(rows + 32, seed=0)
    tokenizer = train_tokenizer([e["prompt"] + e["response"] for e in examples], vocab_size=512)
    table = datasets.Dataset.from_list([{"prompt": e["prompt"], "response": e["response"]} for e in examples])
    train = table.select(range(rows))
    for name, (width, layers), seed in (("teacher", teacher_shape, 0), ("student", student_shape, 1)):
        llama(len(tokenizer), width, layers, seed).save_pretrained(workdir / name)
        tokenizer.save_pretrained(workdir / name)
    config = DistillConfig(
        output_dir=str(workdir / "teacher"), objective="sft", student_model_name_or_path=str(workdir / "teacher"),
        max_steps=teacher_steps, per_device_train_batch_size=16, learning_rate=3e-3, seed=0, report_to=[],
        disable_tqdm=True, save_strategy="no", logging_steps=1000, use_cpu=True,
    )
    teacher = DistillTrainer(args=config, train_dataset=train, processing_class=tokenizer)
    teacher.train()
    teacher.save_model()
    return tokenizer, train, table.select(range(rows, rows + 32))


def kl_to_live_teacher(student_dir: Path, workdir: Path, tokenizer, evaluation) -> float:
    """The held-out KD term (forward KL per token) of a trained student against the live teacher."""
    config = DistillConfig(
        output_dir=str(workdir / "runs" / "scoring"), teacher_model_name_or_path=str(workdir / "teacher"),
        student_model_name_or_path=str(student_dir), per_device_eval_batch_size=8, report_to=[], disable_tqdm=True,
        use_cpu=True,
    )
    trainer = DistillTrainer(args=config, train_dataset=evaluation, eval_dataset=evaluation, processing_class=tokenizer)
    return trainer.evaluate()["eval_kd"]


def run(name: str, workdir: Path, tokenizer, train, evaluation, epochs: int, batch: int, **cache) -> dict:
    config = DistillConfig(
        output_dir=str(workdir / "runs" / name), teacher_model_name_or_path=str(workdir / "teacher"),
        student_model_name_or_path=str(workdir / "student"), num_train_epochs=epochs,
        per_device_train_batch_size=batch, per_device_eval_batch_size=batch, learning_rate=3e-3, seed=0,
        report_to=[], disable_tqdm=True, save_strategy="no", logging_steps=1000, use_cpu=True, **cache,
    )
    start = time.perf_counter()
    trainer = DistillTrainer(args=config, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer)
    set_up = time.perf_counter() - start
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    trainer.save_model()
    teacher_parameters = 0 if trainer.teacher is None else sum(p.numel() for p in trainer.teacher.parameters())
    directory = Path(cache["teacher_cache"]) if cache else None
    return {
        "run": name, "set_up_s": set_up, "s_per_step": sum(timer.times) / len(timer.times), "steps": len(timer.times),
        "kl_to_teacher": kl_to_live_teacher(Path(config.output_dir), workdir, tokenizer, evaluation),
        "teacher_parameters_in_memory": teacher_parameters,
        "cache_mb": sum(f.stat().st_size for f in directory.iterdir()) / 2**20 if directory else 0.0,
        "weights": load_file(Path(config.output_dir) / "model.safetensors"),
    }


def report(results: list[dict], args, teacher_parameters: int) -> list[str]:
    live = results[0]
    lines = [
        "# Teacher cache: time per step after the first epoch",
        "",
        f"`python benchmarks/teacher_cache.py` on {platform.machine()} CPU ({torch.get_num_threads()} threads), fp32, "
        f"{args.rows} training rows, batch {args.batch}, {args.epochs} epochs; teacher Llama {args.teacher_width}×"
        f"{args.teacher_layers} ({teacher_parameters / 1e6:.1f} M parameters), student Llama {args.student_width}×"
        f"{args.student_layers}; the teacher first fine-tuned {args.teacher_steps} steps on the rows; vanilla KD, fkl, "
        f"α = 0.5. s/step: mean over the {live['steps']} steps of epochs 2–{args.epochs}. Set-up: building the trainer, "
        "which includes the teacher pass over the data when the run builds the cache. KL: the trained student's "
        "held-out forward KL per token to the live teacher.",
        "",
        "| run | s/step | ratio to live | set-up s | cache MB | teacher parameters in memory | KL to the teacher | "
        "max weight difference to live |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        difference = max((result["weights"][k] - live["weights"][k]).abs().max().item() for k in live["weights"])
        lines.append(
            f"| {result['run']} | {result['s_per_step']:.4f} | {result['s_per_step'] / live['s_per_step']:.2f} | "
            f"{result['set_up_s']:.1f} | {result['cache_mb']:.1f} | {result['teacher_parameters_in_memory']:,} | "
            f"{result['kl_to_teacher']:.4f} | {difference:.1e} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--teacher-width", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--student-width", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--top-k", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="tiny models and data: checks the code path")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.epochs, args.teacher_width, args.teacher_layers, args.top_k = 16, 2, 64, 2, [4]
        args.teacher_steps = 2
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(temporary)
        tokenizer, train, evaluation = prepare(workdir, args.rows, (args.teacher_width, args.teacher_layers),
                                               (args.student_width, args.student_layers), args.teacher_steps)
        teacher_parameters = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(workdir / "teacher").parameters())
        common = (workdir, tokenizer, train, evaluation, args.epochs, args.batch)
        results = [run("live teacher", *common)]
        hidden = {"teacher_cache": str(workdir / "cache_hidden")}
        results += [run("hidden cache (building)", *common, **hidden), run("hidden cache", *common, **hidden)]
        for k in args.top_k:
            topk = {"teacher_cache": str(workdir / f"cache_top{k}"), "teacher_cache_kind": "topk",
                    "teacher_cache_top_k": k}
            results.append(run(f"top-{k} cache", *common, **topk))
        for result in results:
            print(json.dumps({key: value for key, value in result.items() if key != "weights"}))
        lines = report(results, args, teacher_parameters)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
