"""Peak memory and time of the KD loss (forward + backward): full logits vs llmdistill's chunked loss.

Each (case, method) runs in a fresh subprocess, so peak resident memory is that method's alone. "Extra" memory
is the process's peak RSS during forward + backward minus its peak after the inputs (hidden states, heads)
exist; the student head's gradient counts for both methods. Prints one JSON line per case and writes
benchmarks/results/loss_memory.csv.

    python benchmarks/loss_memory.py                      # the issue's four CPU cases, fkl, fp32
    python benchmarks/loss_memory.py --divergence jsd --vocab 32000 --positions 1024
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmdistill.divergences import divergence_per_position
from llmdistill.losses import default_chunk_size, kd_loss_from_hidden

STUDENT_WIDTH, TEACHER_WIDTH = 896, 1536  # Qwen2.5-0.5B student, Qwen2.5-1.5B teacher
RESULTS = Path(__file__).parent / "results" / "loss_memory.csv"


def make_inputs(positions: int, vocab: int, device: str, seed: int = 0):
    generator = torch.Generator(device).manual_seed(seed)

    def normal(rows, width, scale):
        return torch.randn(rows, width, generator=generator, device=device).mul_(scale)

    student_hidden = normal(positions, STUDENT_WIDTH, 1.0).requires_grad_()
    student_head = normal(vocab, STUDENT_WIDTH, STUDENT_WIDTH**-0.5).requires_grad_()
    teacher_hidden = normal(positions, TEACHER_WIDTH, 1.0)
    teacher_head = normal(vocab, TEACHER_WIDTH, TEACHER_WIDTH**-0.5)
    return student_hidden, student_head, teacher_hidden, teacher_head


def reference_loss(student_hidden, student_head, teacher_hidden, teacher_head, divergence, temperature):
    """The obvious way: both [N, V] logit tensors, log-softmax, then the divergence (F.kl_div for fkl)."""
    student_logits = student_hidden @ student_head.T
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_head.T
    if divergence == "fkl":
        return F.kl_div(
            torch.log_softmax(student_logits / temperature, -1),
            torch.log_softmax(teacher_logits / temperature, -1),
            reduction="sum",
            log_target=True,
        )
    return divergence_per_position(teacher_logits, student_logits, divergence, temperature).sum()


def chunked_loss(student_hidden, student_head, teacher_hidden, teacher_head, divergence, temperature, chunk_size):
    loss, _ = kd_loss_from_hidden(
        student_hidden, student_head, teacher_hidden, teacher_head, divergence, temperature, chunk_size
    )
    return loss


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(method: str, positions: int, vocab: int, divergence: str, temperature: float, chunk_size, device):
    """Runs in the worker subprocess: one warm-up on a small input, then the timed forward + backward."""
    def run(inputs):
        if method == "reference":
            loss = reference_loss(*inputs, divergence, temperature)
        else:
            loss = chunked_loss(*inputs, divergence, temperature, chunk_size)
        loss.backward()
        return loss

    run(make_inputs(16, vocab // 16, device))
    inputs = make_inputs(positions, vocab, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.max_memory_allocated() / 2**20
    else:
        baseline = peak_rss_mb()
    start = time.perf_counter()
    loss = run(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    gradient_norm = inputs[1].grad.norm().item()
    return {"loss": loss.item(), "head_grad_norm": gradient_norm, "seconds": seconds, "extra_mb": peak - baseline}


def run_worker(args, method: str, positions: int, vocab: int) -> dict:
    command = [
        sys.executable, __file__, "--worker", method, "--positions", str(positions), "--vocab", str(vocab),
        "--divergence", args.divergence, "--temperature", str(args.temperature), "--device", args.device,
    ]
    if args.chunk_size:
        command += ["--chunk-size", str(args.chunk_size)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        return {"error": (finished.stderr.strip().splitlines() or [f"exit code {finished.returncode}"])[-1]}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def compare(args, positions: int, vocab: int) -> dict:
    reference = run_worker(args, "reference", positions, vocab)
    ours = run_worker(args, "chunked", positions, vocab)
    row = {
        "device": args.device,
        "divergence": args.divergence,
        "vocab": vocab,
        "positions": positions,
        "chunk_size": args.chunk_size or default_chunk_size(vocab),
        "reference_extra_mb": reference.get("extra_mb"),
        "ours_extra_mb": ours.get("extra_mb"),
        "reference_seconds": reference.get("seconds"),
        "ours_seconds": ours.get("seconds"),
    }
    if "error" in reference or "error" in ours:
        row["error"] = reference.get("error") or ours.get("error")
        return row
    row["memory_ratio"] = ours["extra_mb"] / reference["extra_mb"]
    row["time_ratio"] = ours["seconds"] / reference["seconds"]
    row["loss_relative_difference"] = abs(ours["loss"] - reference["loss"]) / abs(reference["loss"])
    row["head_grad_relative_difference"] = abs(ours["head_grad_norm"] - reference["head_grad_norm"]) / abs(
        reference["head_grad_norm"]
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--divergence", default="fkl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="positions per chunk (default: automatic)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["reference", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(
            args.worker, args.positions[0], args.vocab[0], args.divergence, args.temperature, args.chunk_size,
            args.device,
        )
        print(json.dumps(result))
        return
    rows = []
    for vocab in args.vocab:
        for positions in args.positions:
            rows.append(compare(args, positions, vocab))
            print(json.dumps(rows[-1]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with args.output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
