"""Peak memory and time per step of DistillTrainer (vanilla KD by default) for a small and a large vocabulary.

Uses only the public DistillConfig/DistillTrainer API, so the same script measures any commit: put that commit's
checkout first on PYTHONPATH (see benchmarks/results/trainer_memory.md for the before/after of the chunked loss).

    python benchmarks/trainer_memory.py --case quickstart    # the quickstart's models, data and 512-token vocabulary
    python benchmarks/trainer_memory.py --case qwen3         # Qwen3's real tokenizer (151,936 head rows) on Dolly

"Extra" memory is the peak during training minus the peak once models and data are loaded: resident memory (RSS)
on CPU, allocated memory on CUDA (--device cuda, optionally --model-dtype bfloat16).
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import llmdistill
from llmdistill import DistillConfig, DistillTrainer
from llmdistill.quickstart.task import make_examples
from llmdistill.quickstart.tokenizer import train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {
    # tokenizer, data, teacher (hidden, layers, heads), student, batch size
    "quickstart": ("quickstart", "quickstart", (128, 4, 4), (64, 2, 2), 16),
    "qwen3": ("qwen3", "dolly", (256, 2, 4), (128, 2, 2), 8),
}


def peak_mb(device: str) -> float:
    """Kept here, not imported: this script must also run against older checkouts (see the module docstring)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_data(kind: str, path: Path) -> Path:
    if kind == "quickstart":
        rows = make_examples(256, seed=0)
        lines = [json.dumps({"prompt": r["prompt"], "output": r["response"]}) for r in rows]
    else:
        source = SHARED_DATA / "datasets" / "minillm-kd-eval" / "dolly" / "dev.jsonl"
        rows = [json.loads(line) for line in source.read_text().splitlines()][:256]
        lines = [json.dumps({"prompt": r["prompt"], "output": r["output"]}) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def load_tokenizer(kind: str, scratch: Path):
    if kind == "quickstart":
        rows = make_examples(256, seed=0)
        return train_tokenizer([r["prompt"] + r["response"] for r in rows], vocab_size=512)
    folder = scratch / "tokenizer"
    shutil.copytree(SHARED_DATA / "tokenizers" / kind, folder)
    for packed in folder.glob("*.gz"):  # the shared copy of Qwen3's tokenizer.json is gzipped
        packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
    return AutoTokenizer.from_pretrained(folder)


def save_model(directory: Path, tokenizer, shape, seed: int) -> Path:
    hidden, layers, heads = shape
    rows = -(-len(tokenizer) // 128) * 128  # heads padded to a multiple of 128, as Qwen's are
    config = LlamaConfig(
        vocab_size=rows, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def measure(case: str, steps: int, device: str, model_dtype: str, objective: str = "vanilla") -> dict:
    tokenizer_kind, data_kind, teacher_shape, student_shape, batch_size = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer(tokenizer_kind, tmp)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = DistillConfig(
            output_dir=str(tmp / "out"),
            objective=objective,
            teacher_model_name_or_path=str(save_model(tmp / "teacher", tokenizer, teacher_shape, 0)),
            student_model_name_or_path=str(save_model(tmp / "student", tokenizer, student_shape, 1)),
            dataset_name_or_path=str(write_data(data_kind, tmp / "train.jsonl")),
            drop_overlong_prompts=True,
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=1e-3,
            logging_steps=steps,
            report_to=[],
            use_cpu=device == "cpu",
            model_dtype=model_dtype,
            bf16=model_dtype == "bfloat16",
            seed=0,
            disable_tqdm=True,
        )
        trainer = DistillTrainer(args=config)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        baseline = peak_mb(device)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        loss = trainer.state.log_history[-1].get("train_loss")
    return {
        "case": case,
        "commit": _commit(),
        "device": device,
        "model_dtype": model_dtype,
        "objective": objective,
        "vocab_rows": trainer.model.get_output_embeddings().weight.shape[0],
        "batch_size": batch_size,
        "steps": steps,
        "extra_peak_mb": round(peak_mb(device) - baseline, 1),
        "seconds_per_step": round(seconds / steps, 3),
        "train_loss": loss,
    }


def _commit() -> str:
    checkout = Path(llmdistill.__file__).resolve().parents[1]
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="qwen3")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--objective", default="vanilla", help="any DistillConfig objective (vanilla, dskd, ...)")
    args = parser.parse_args()
    print(json.dumps(measure(args.case, args.steps, args.device, args.model_dtype, args.objective)))


if __name__ == "__main__":
    main()
