"""Peak memory and time of the KD loss (forward + backward): full logits vs llmdistill's chunked loss.

Each (case, method) runs in a fresh subprocess, so peak memory is that method's alone. "Extra" memory is the
peak during the first forward + backward minus the peak once the inputs (hidden states, heads) exist: resident
memory (RSS) on CPU, allocated memory on CUDA. The student head's gradient counts for every method. Time is
the best of --repeats runs, since a training loop runs the loss warm. Prints one JSON line per case and writes
benchmarks/results/loss_memory.csv (or --output).

    python benchmarks/loss_memory.py                          # the four CPU cases, fkl, fp32
    python benchmarks/loss_memory.py --divergence jsd --vocab 32000 --positions 1024
    python benchmarks/loss_memory.py --device cuda --ce --methods reference chunked liger   # KD + CE, as Liger does

Methods: `reference` builds both [N, V] logit tensors and the divergence the obvious way (F.kl_div for fkl);
`chunked` is llmdistill.losses; `liger` is Liger-Kernel's LigerFusedLinearJSDLoss (fkl, rkl or jsd; it always
computes CE as well, so compare it with --ce).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmdistill.divergences import divergence_per_position
from llmdistill.losses import default_chunk_size, distill_loss_from_hidden
from llmdistill.trainer import peak_memory_mb

STUDENT_WIDTH, TEACHER_WIDTH = 896, 1536  # Qwen2.5-0.5B student, Qwen2.5-1.5B teacher
RESULTS = Path(__file__).parent / "results" / "loss_memory.csv"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LIGER_BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}  # Liger's generalized JSD: β = 0 is fkl, β = 1 is rkl


def make_inputs(positions: int, vocab: int, args, seed: int = 0):
    generator = torch.Generator(args.device).manual_seed(seed)

    def normal(rows, width, scale):
        values = torch.randn(rows, width, generator=generator, device=args.device).mul_(scale)
        return values.to(DTYPES[args.dtype])

    student_hidden = normal(positions, STUDENT_WIDTH, 1.0).requires_grad_()
    student_head = normal(vocab, STUDENT_WIDTH, STUDENT_WIDTH**-0.5).requires_grad_()
    teacher_hidden = normal(positions, TEACHER_WIDTH, 1.0)
    teacher_head = normal(vocab, TEACHER_WIDTH, TEACHER_WIDTH**-0.5)
    labels = torch.randint(0, vocab, (positions,), generator=generator, device=args.device)
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


def reference_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, args):
    """The obvious way: both [N, V] logit tensors (upcast to fp32), log-softmax, then the divergence."""
    student_logits = (student_hidden @ student_head.T).float()
    with torch.no_grad():
        teacher_logits = (teacher_hidden @ teacher_head.T).float()
    if args.divergence == "fkl":
        kd = F.kl_div(
            torch.log_softmax(student_logits / args.temperature, -1),
            torch.log_softmax(teacher_logits / args.temperature, -1),
            reduction="sum",
            log_target=True,
        )
    else:
        kd = divergence_per_position(teacher_logits, student_logits, args.divergence, args.temperature).sum()
    if not args.ce:
        return kd
    return 0.5 * kd + 0.5 * F.cross_entropy(student_logits, labels, reduction="sum")


def chunked_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, args):
    return distill_loss_from_hidden(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        labels if args.ce else None,
        kd_weight=0.5 if args.ce else 1.0,
        ce_weight=0.5,
        divergence=args.divergence,
        temperature=args.temperature,
        chunk_size=args.chunk_size,
    ).loss


def liger_loss(student_hidden, student_head, teacher_hidden, teacher_head, labels, args):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.5 if args.ce else 0.0,
        weight_soft_loss=0.5 if args.ce else 1.0,
        beta=LIGER_BETA[args.divergence],
        temperature=args.temperature,
    )
    # Liger returns the mean over tokens; scale to the sum the other methods return.
    return loss(student_hidden, student_head, teacher_hidden, teacher_head, labels) * labels.numel()


LOSSES = {"reference": reference_loss, "chunked": chunked_loss, "liger": liger_loss}


def measure(method: str, positions: int, vocab: int, args) -> dict:
    """Runs in the worker subprocess: a small warm-up, the first full run for memory, the best time of all."""
    loss_fn = LOSSES[method]

    def run(inputs):
        inputs[1].grad = None
        start = time.perf_counter()
        loss = loss_fn(*inputs, args)
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return loss, time.perf_counter() - start

    run(make_inputs(16, vocab // 16, args))
    inputs = make_inputs(positions, vocab, args)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_memory_mb(args.device)
    loss, seconds = run(inputs)
    extra = peak_memory_mb(args.device) - baseline
    gradient_norm = inputs[1].grad.float().norm().item()
    for _ in range(args.repeats - 1):
        seconds = min(seconds, run(inputs)[1])
    return {"loss": loss.item(), "head_grad_norm": gradient_norm, "seconds": seconds, "extra_mb": extra}


def run_worker(args, method: str, positions: int, vocab: int) -> dict:
    command = [
        sys.executable, __file__, "--worker", method, "--positions", str(positions), "--vocab", str(vocab),
        "--divergence", args.divergence, "--temperature", str(args.temperature), "--device", args.device,
        "--dtype", args.dtype, "--repeats", str(args.repeats),
    ]
    command += ["--ce"] if args.ce else []
    command += ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        lines = finished.stderr.strip().splitlines() or [f"exit code {finished.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def compare(args, positions: int, vocab: int) -> dict:
    row = {
        "device": args.device, "dtype": args.dtype, "divergence": args.divergence, "with_ce": args.ce,
        "vocab": vocab, "positions": positions, "chunk_size": args.chunk_size or default_chunk_size(vocab, args.device),
    }
    results = {method: run_worker(args, method, positions, vocab) for method in args.methods}
    reference = results.get("reference", {})
    for method, result in results.items():
        row[f"{method}_extra_mb"] = result.get("extra_mb")
        row[f"{method}_seconds"] = result.get("seconds")
        if "error" in result:
            row[f"{method}_error"] = result["error"]
        elif method != "reference" and "error" not in reference and reference:
            row[f"{method}_memory_ratio"] = result["extra_mb"] / reference["extra_mb"]
            row[f"{method}_time_ratio"] = result["seconds"] / reference["seconds"]
            row[f"{method}_loss_relative_difference"] = abs(result["loss"] - reference["loss"]) / abs(reference["loss"])
            row[f"{method}_head_grad_relative_difference"] = abs(
                result["head_grad_norm"] - reference["head_grad_norm"]
            ) / abs(reference["head_grad_norm"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--divergence", default="fkl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ce", action="store_true", help="0.5·KD + 0.5·CE on random labels, as Liger computes")
    parser.add_argument("--chunk-size", type=int, default=None, help="positions per chunk (default: automatic)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--methods", nargs="+", default=["reference", "chunked"], choices=sorted(LOSSES))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method; the best counts")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=sorted(LOSSES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.positions[0], args.vocab[0], args)))
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
