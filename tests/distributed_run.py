"""Trains a tiny teacher/student pair with DistillTrainer for a few steps and saves the student; run by
tests/test_distributed.py once as one process and once under `torchrun --nproc_per_node 2` (gloo, CPU).

    python tests/distributed_run.py MODELS_DIR OUTPUT_DIR --batch-size 4
    torchrun --nproc_per_node 2 tests/distributed_run.py MODELS_DIR OUTPUT_DIR --batch-size 2

MODELS_DIR holds teacher/, student/ and train.jsonl (prompt/response rows).

The rows' response lengths differ, so the ranks see different supervised-token counts in every step; the data is
read in order (`train_sampling_strategy: sequential`), so both runs see the same global batches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets

from llmdistill.config import DistillConfig
from llmdistill.distributed import end_distributed
from llmdistill.models import load_tokenizer
from llmdistill.trainer import DistillTrainer
from uneven_generation import generate_unevenly


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    parser.add_argument("--objective", default="vanilla")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--source", default="gt")
    parser.add_argument("--save-steps", type=int, help="write checkpoints every this many steps")
    parser.add_argument("--resume-from", help="a checkpoint folder to resume from")
    parser.add_argument("--generate-unevenly", action="store_true", help="after training; see uneven_generation.py")
    args = parser.parse_args()
    models = args.models_dir
    config = DistillConfig(
        output_dir=str(args.output_dir / "student"), objective=args.objective, source=args.source, alpha_kd=0.5,
        max_new_tokens=12,
        student_model_name_or_path=str(models / "student"), teacher_model_name_or_path=str(models / "teacher"),
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.0, train_sampling_strategy="sequential", seed=0,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to=[], disable_tqdm=True, use_cpu=True,
    )
    lines = (models / "train.jsonl").read_text().splitlines()
    rows = datasets.Dataset.from_list([json.loads(line) for line in lines])
    trainer = DistillTrainer(args=config, train_dataset=rows, processing_class=load_tokenizer(str(models / "student")))
    trainer.train(resume_from_checkpoint=args.resume_from)
    trainer.save_model()
    if args.generate_unevenly:
        rank, first_rows = trainer.accelerator.process_index, trainer.train_dataset.select(range(2))
        prompt = trainer.data_collator([first_rows[rank]])
        generate_unevenly(trainer.model, trainer.teacher, prompt, trainer.processing_class.pad_token_id, rank,
                          args.output_dir)


if __name__ == "__main__":
    main()
    end_distributed()
