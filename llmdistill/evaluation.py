"""Evaluation: batched generation, exact match and ROUGE-L, and teacher→student fidelity on reference responses."""

from __future__ import annotations

import copy

import torch
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import IGNORE_INDEX, DistillCollator
from .losses import distill_loss_from_hidden, top1_from_hidden
from .models import LMHead, supervised_hidden_states
from .objectives.cross_batch import Positions, token_pairs_to_positions
from .objectives.cross_common import head_rows, shared_vocabulary, teacher_to_student_ids


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    do_sample: bool = False,
) -> list[str]:
    """Responses to `prompts`, generated in left-padded batches with the KV cache; special tokens stripped."""
    left_padded = copy.copy(tokenizer)
    left_padded.padding_side = "left"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses = []
    for start in range(0, len(prompts), batch_size):
        batch = left_padded(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        responses += left_padded.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return responses


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions equal to their reference after stripping surrounding whitespace."""
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(references)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure ×100 with stemming, as the MiniLLM/DSKD papers report it."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


@torch.no_grad()
def teacher_student_fidelity(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenised_dataset,
    pad_token_id: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Per-token forward KL(teacher ‖ student) and top-1 agreement over the reference responses' tokens."""
    collate = DistillCollator(pad_token_id)
    device = next(student.parameters()).device
    kl_sum, agreements, tokens = 0.0, 0.0, 0
    for start in range(0, len(tokenised_dataset), batch_size):
        batch = collate([tokenised_dataset[i] for i in range(start, min(start + batch_size, len(tokenised_dataset)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        supervised = batch["labels"][:, 1:] != IGNORE_INDEX
        teacher_hidden, student_hidden = (
            supervised_hidden_states(m, batch["input_ids"], batch["attention_mask"], supervised)
            for m in (teacher, student)
        )
        sums = distill_loss_from_hidden(student_hidden, LMHead.of(student), teacher_hidden, LMHead.of(teacher))
        kl_sum += sums.kd.item()
        agreements += sums.top1_agreements.item()
        tokens += sums.count
    return {"teacher_student_kl": kl_sum / tokens, "top1_agreement": 100.0 * agreements / tokens}


@torch.no_grad()
def cross_tokenizer_fidelity(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    cross_tokenised_dataset,
    bridge,
    pad_token_id: int,
    teacher_pad_token_id: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Fidelity between models with different vocabularies, at the ETA-aligned response positions: KL(teacher ‖
    student) over the shared vocabulary C (both renormalised over C), top-1 agreement (the teacher's top-1 mapped to
    the student token with the same text), and the share of the student's response tokens that are aligned."""
    collate = DistillCollator(pad_token_id, teacher_pad_token_id=teacher_pad_token_id)
    device = next(student.parameters()).device
    student_head, teacher_head = LMHead.of(student), LMHead.of(teacher)
    teacher_ids, student_ids = shared_vocabulary(bridge, student_head, teacher_head)
    to_student = teacher_to_student_ids(bridge, len(teacher_head.weight), len(student_head.weight), device)
    kl_sum, agreements, aligned, tokens = 0.0, 0.0, 0, 0
    for start in range(0, len(cross_tokenised_dataset), batch_size):
        rows = range(start, min(start + batch_size, len(cross_tokenised_dataset)))
        batch = {key: value.to(device) for key, value in collate([cross_tokenised_dataset[i] for i in rows]).items()}
        student_side, teacher_side = (
            Positions.gather(
                supervised_hidden_states(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                         batch[prefix + "labels"][:, 1:] != IGNORE_INDEX),
                LMHead.of(model), batch[prefix + "input_ids"], batch[prefix + "labels"],
            )
            for model, prefix in ((student, ""), (teacher, "teacher_"))
        )
        teacher_index, student_index = token_pairs_to_positions(
            batch["aligned_pairs"], batch["teacher_labels"], batch["labels"]
        ).unbind(1)
        student_hidden, teacher_hidden = student_side.hidden[student_index], teacher_side.hidden[teacher_index]
        sums = distill_loss_from_hidden(
            student_hidden, head_rows(student_head, student_ids), teacher_hidden, head_rows(teacher_head, teacher_ids)
        )
        teacher_top1 = to_student[top1_from_hidden(teacher_hidden, teacher_head)]
        agreements += (teacher_top1 == top1_from_hidden(student_hidden, student_head)).sum().item()
        kl_sum += sums.kd.item()
        aligned += len(student_index)
        tokens += len(student_side.rows)
    return {
        "teacher_student_kl": kl_sum / max(aligned, 1),
        "top1_agreement": 100.0 * agreements / max(aligned, 1),
        "aligned_fraction": aligned / tokens,
    }
