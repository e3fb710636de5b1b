"""FSDP2 (torch `fully_shard`) on CPU ranks, without accelerate, which never enables FSDP for a CPU run (a
multi-process CPU run is its MULTI_CPU type, which takes DDP). Run by tests/test_distributed.py:

    python tests/fsdp2_run.py MODELS_DIR OUTPUT_DIR --objective dskd                       # one process
    torchrun --nproc_per_node 2 tests/fsdp2_run.py MODELS_DIR OUTPUT_DIR --objective dskd  # two sharded ranks

It trains as DistillTrainer does under FSDP2: the teacher and the student sharded per decoder layer by
`shard_keeping_head_whole`, both LM heads whole (for the student, the trainer asks accelerate for the same layout),
the loss normalised by the global supervised-token count, the head's and projectors' gradients averaged over the
ranks. Each of the 3 steps takes the next 4 rows; with two ranks, rank r takes 2 of them. The student is written
to OUTPUT_DIR/student.safetensors. Then both ranks generate with the sharded models, their responses ending at
different steps (uneven_generation.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import datasets
import torch
from safetensors.torch import save_file

from llmdistill.config import DistillConfig
from llmdistill.data import IGNORE_INDEX, DistillCollator, prepare_dataset, resolve_format
from llmdistill.distributed import (
    average_gradients_over_ranks, end_distributed, shard_keeping_head_whole, sum_over_ranks, world_size,
)
from llmdistill.models import LMHead, freeze, load_model, load_tokenizer, supervised_hidden_states
from llmdistill.objectives import OBJECTIVES
from uneven_generation import generate_unevenly

STEPS, GLOBAL_BATCH = 3, 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--objective", default="vanilla")
    args = parser.parse_args()
    if "RANK" in os.environ:  # started by torchrun
        torch.distributed.init_process_group("gloo")
    size, rank = world_size(), int(os.environ.get("RANK", 0))

    config = DistillConfig(output_dir=str(args.output_dir), objective=args.objective, alpha_kd=0.5, report_to=[],
                           use_cpu=True)
    tokenizer = load_tokenizer(str(args.models_dir / "student"))
    teacher = freeze(load_model(str(args.models_dir / "teacher")))
    student = load_model(str(args.models_dir / "student"))
    objective = OBJECTIVES[args.objective](config, student, teacher)
    projectors = list(objective.projectors.parameters()) if objective.projectors is not None else []
    if size > 1:
        shard_keeping_head_whole(teacher)
        shard_keeping_head_whole(student)
    head = list(student.get_output_embeddings().parameters())
    trainable = [p for p in (*student.parameters(), *projectors) if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)

    lines = (args.models_dir / "train.jsonl").read_text().splitlines()
    raw = datasets.Dataset.from_list([json.loads(line) for line in lines])
    rows = prepare_dataset(raw, tokenizer, resolve_format(raw.column_names, "prompt", None, "messages"), 256, 512)
    collate = DistillCollator(tokenizer.pad_token_id)
    local = GLOBAL_BATCH // size
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * local
        batch = collate([rows[i] for i in range(start, start + local)])
        supervised = batch["labels"][:, 1:] != IGNORE_INDEX
        tokens = sum_over_ranks(supervised.sum().float())
        student_hidden = supervised_hidden_states(student, batch["input_ids"], batch["attention_mask"], supervised)
        with torch.no_grad():
            teacher_hidden = supervised_hidden_states(teacher, batch["input_ids"], batch["attention_mask"], supervised)
        output = objective(student_hidden, LMHead.of(student), teacher_hidden, LMHead.of(teacher),
                           batch["labels"][:, 1:][supervised], ce_weight=0.5 / tokens, kd_weight=0.5 / tokens)
        (output.loss * size).backward()  # FSDP averages the sharded gradients over the ranks; the loss is a global sum
        average_gradients_over_ranks([*head, *projectors])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if objective.projectors is not None:
            objective.projectors.head_changed()

    weights = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for name, p in student.named_parameters()}
    if rank == 0:
        save_file(weights, args.output_dir / "student.safetensors")

    generate_unevenly(student, teacher, collate([rows[rank]]), tokenizer.pad_token_id, rank, args.output_dir)


if __name__ == "__main__":
    main()
    end_distributed()
