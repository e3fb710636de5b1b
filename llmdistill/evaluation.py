"""Evaluation: batched generation, exact match and ROUGE-L, and teacher→student fidelity on reference responses."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import IGNORE_INDEX, DistillCollator, ExampleFormat, json_file_problem, prepare_dataset
from .errors import DataError
from .losses import distill_loss_from_hidden, top1_from_hidden
from .models import (
    LMHead, check_model_source, eval_mode, load_model, load_tokenizer, supervised_hidden_states,
)
from .objectives.cross_batch import Positions, token_pairs_to_positions
from .objectives.cross_common import head_rows, shared_vocabulary, teacher_to_student_ids
from .rollout import Intervention, Sampling, rollout
from .vocab import VocabBridge


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
    responses = []
    with eval_mode(model):
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
    return responses


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions equal to their reference after stripping surrounding whitespace."""
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(references)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure ×100 with stemming, as the MiniLLM/DSKD papers report it."""
    return rouge_l_best(predictions, [[reference] for reference in references])


def _reference_batches(tokenised_dataset, pad_token_id: int, batch_size: int, device):
    """(batch on `device`, [B, T-1] mask of the positions that predict a reference token) per batch of rows."""
    collate = DistillCollator(pad_token_id)
    for start in range(0, len(tokenised_dataset), batch_size):
        batch = collate([tokenised_dataset[i] for i in range(start, min(start + batch_size, len(tokenised_dataset)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        yield batch, batch["labels"][:, 1:] != IGNORE_INDEX


@torch.no_grad()
def gold_cross_entropy(model: PreTrainedModel, tokenised_dataset, pad_token_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats per token) of `model` on the reference responses' tokens: how well it predicts the
    gold text, whoever wrote its own generations."""
    ce_sum, tokens = 0.0, 0
    device = next(model.parameters()).device
    for batch, supervised in _reference_batches(tokenised_dataset, pad_token_id, batch_size, device):
        hidden = supervised_hidden_states(model, batch["input_ids"], batch["attention_mask"], supervised)
        sums = distill_loss_from_hidden(hidden, LMHead.of(model), labels=batch["labels"][:, 1:][supervised])
        ce_sum += sums.ce.item()
        tokens += sums.count
    return ce_sum / tokens


@torch.no_grad()
def teacher_student_fidelity(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenised_dataset,
    pad_token_id: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Per-token forward KL(teacher ‖ student) and top-1 agreement over the reference responses' tokens (and how many
    tokens that is)."""
    device = next(student.parameters()).device
    kl_sum, agreements, tokens = 0.0, 0.0, 0
    for batch, supervised in _reference_batches(tokenised_dataset, pad_token_id, batch_size, device):
        teacher_hidden, student_hidden = (
            supervised_hidden_states(m, batch["input_ids"], batch["attention_mask"], supervised)
            for m in (teacher, student)
        )
        sums = distill_loss_from_hidden(student_hidden, LMHead.of(student), teacher_hidden, LMHead.of(teacher))
        kl_sum += sums.kd.item()
        agreements += sums.top1_agreements.item()
        tokens += sums.count
    return {"teacher_student_kl": kl_sum / tokens, "top1_agreement": 100.0 * agreements / tokens,
            "fidelity_positions": tokens}


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
    the student token with the same text), the share of the student's response tokens that are aligned, and how many
    positions that is."""
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
        "fidelity_positions": aligned,
    }


# The papers' protocol (METHODS §5): sampled responses, ROUGE-L averaged over seeds, GSM8K final-number match.

PAPER_SEEDS = (10, 20, 30, 40, 50)
GSM8K_PROMPT = "### Instruction:\n{question}\n\n### Response:\n"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Protocol:
    """Generation settings of the evaluation: sampling at temperature 1, top-p 1, top-k 0 (temperature 0 = greedy);
    prompts keep their last `max_prompt_length` tokens and prompt + response stay within `max_length`. With
    `chat_template` each prompt's instruction is one user turn through the model's chat template (instruct models)."""

    max_prompt_length: int = 256
    max_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16
    chat_template: bool = False


class EvalSet(NamedTuple):
    name: str
    prompts: list[str]  # the papers' plain prompt texts
    references: list[list[str]]  # one or more references per prompt (S-NI has several)
    gsm8k: bool  # score by the final number, not ROUGE-L
    user_turns: list[str]  # the same requests as a chat user would write them (no "### Instruction" scaffold)


def load_eval_set(path: str | Path, limit: int | None = None) -> EvalSet:
    """A JSONL file of `prompt` + `output` (a string or a list of references; the MiniLLM/DSKD evaluation files) or
    GSM8K's `question` + `answer`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"--data {path}: no such file. Give JSONL files of prompt + output, or GSM8K's question + answer."
        )
    problem = json_file_problem(path)
    if problem is not None:
        raise DataError(f"--data {path}: {problem}.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    if {"question", "answer"} <= rows[0].keys():
        prompts = [GSM8K_PROMPT.format(question=row["question"]) for row in rows]
        questions = [row["question"] for row in rows]
        return EvalSet(_set_name(path), prompts, [[row["answer"]] for row in rows], True, questions)
    if not {"prompt", "output"} <= rows[0].keys():
        raise DataError(
            f"--data {path}: rows need 'prompt' and 'output' (a reference or a list of them), or GSM8K's 'question' and "
            f"'answer'; the first row has {sorted(rows[0])}."
        )
    references = [row["output"] if isinstance(row["output"], list) else [row["output"]] for row in rows]
    return EvalSet(_set_name(path), [row["prompt"] for row in rows], references, False, list(map(_user_turn, rows)))


def _user_turn(row: dict) -> str:
    """An instruction row (MiniLLM's files keep `instruction` and `input` beside the templated `prompt`) as one user
    message; a row without them is its prompt."""
    if not row.get("instruction"):
        return row["prompt"]
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def model_prompts(eval_set: EvalSet, tokenizer: PreTrainedTokenizerBase, protocol: Protocol) -> list[str]:
    """The prompt texts a model is given: the plain prompts, or each user turn through its chat template."""
    if not protocol.chat_template:
        return eval_set.prompts
    if not tokenizer.chat_template:
        raise DataError("--chat-template: the model's tokenizer has no chat template; leave the flag out.")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": turn}], tokenize=False, add_generation_prompt=True)
        for turn in eval_set.user_turns
    ]


def _set_name(path: Path) -> str:
    """dolly/valid.jsonl → dolly; my_prompts.jsonl → my_prompts."""
    return path.parent.name if path.stem in ("valid", "test", "dev", "train") else path.stem


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], protocol: Protocol, seed: int,
    progress: bool = False,
) -> list[str]:
    """Responses under `protocol`, in left-padded batches through the KV-cached rollout engine, reproducible for a
    seed (the generator is seeded once per call)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sampling_fields = {"temperature": protocol.temperature, "top_p": protocol.top_p, "top_k": protocol.top_k}
    responses = []
    batches = tqdm(range(0, len(prompts), protocol.batch_size), desc=f"seed {seed}", disable=not progress)
    with eval_mode(model):
        for start in batches:
            ids, mask = _left_padded(tokenizer, prompts[start : start + protocol.batch_size], protocol, device)
            budgets = (protocol.max_length - mask.sum(-1)).tolist()  # each row: prompt + response ≤ max_length
            sampling = Sampling(max_new_tokens=max(budgets), **sampling_fields)
            produced = rollout(model, None, ids, mask, Intervention("student"), sampling, tokenizer.eos_token_id,
                               tokenizer.pad_token_id, generator)
            new_tokens = produced.sequences[:, ids.shape[1] :].tolist()
            responses += tokenizer.batch_decode(
                [tokens[:budget] for tokens, budget in zip(new_tokens, budgets)], skip_special_tokens=True
            )
    return responses


def _left_padded(tokenizer, prompts: list[str], protocol: Protocol, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the prompts, each cut to its last `max_prompt_length` tokens, left-padded."""
    rendered = tokenizer(prompts, add_special_tokens=not protocol.chat_template)["input_ids"]  # a template has its own
    encoded = [ids[-protocol.max_prompt_length :] for ids in rendered]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    return ids.to(device), mask.to(device)


def rouge_l_best(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over examples of the best ROUGE-L F ×100 (stemming) against any of the example's references."""
    from rouge_score import rouge_scorer  # it imports nltk, scipy and pandas (0.6 s, ~30 MB): only scoring needs it

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in candidates)
        for prediction, candidates in zip(predictions, references, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores)


def final_number(text: str) -> str | None:
    """GSM8K's answer: the number after the last `####`, else the last number in the text; commas, `$` and trailing
    decimal zeros removed (12.50 → 12.5, 18.0 → 18)."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    number = numbers[0 if "####" in text else -1].replace(",", "").replace("$", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def gsm8k_exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Percentage of predictions whose final number equals the reference's (after `####`)."""
    answers = [final_number(prediction) for prediction in predictions]
    hits = sum(
        answer is not None and answer == final_number(candidates[0])
        for answer, candidates in zip(answers, references, strict=True)
    )
    return 100.0 * hits / len(references)


def score(eval_set: EvalSet, predictions: list[str]) -> dict[str, float]:
    if eval_set.gsm8k:
        return {"exact_match": gsm8k_exact_match(predictions, eval_set.references)}
    return {"rouge_l": rouge_l_best(predictions, eval_set.references)}


def evaluate_model(
    model_dir: str | Path,
    data: list[str | Path],
    output_dir: str | Path,
    teacher_dir: str | Path | None = None,
    seeds: tuple[int, ...] = PAPER_SEEDS,
    protocol: Protocol = Protocol(),
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """`llmdistill eval`: per data file, the metric averaged over seeds (mean and std) and, with a teacher, the
    held-out teacher→student KL and top-1 agreement on the first reference. Writes results.json, results.md and
    predictions.jsonl (one line per prompt and seed) to `output_dir`."""
    check_model_source(str(model_dir), "model")
    if teacher_dir:
        check_model_source(str(teacher_dir), "--teacher")
    eval_sets = [load_eval_set(path, limit) for path in data]
    model, tokenizer = load_model(str(model_dir), field="model"), load_tokenizer(str(model_dir), field="model")
    teacher = load_model(str(teacher_dir), field="--teacher") if teacher_dir else None
    teacher_tokenizer = load_tokenizer(str(teacher_dir), field="--teacher") if teacher_dir else None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results, predictions_file = {"model": str(model_dir), "seeds": list(seeds), "protocol": vars(protocol),
                                 "datasets": {}}, []
    for eval_set in eval_sets:
        per_seed, prompts = [], model_prompts(eval_set, tokenizer, protocol)
        for seed in seeds:
            predictions = sample_responses(model, tokenizer, prompts, protocol, seed, progress)
            per_seed.append(score(eval_set, predictions))
            predictions_file += [
                {"dataset": eval_set.name, "seed": seed, "prompt": prompt, "prediction": prediction}
                for prompt, prediction in zip(prompts, predictions)
            ]
        row = _mean_and_std(per_seed)
        row |= reference_scores(model, tokenizer, teacher, teacher_tokenizer, eval_set, protocol)
        results["datasets"][eval_set.name] = row
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(results_markdown(results) + "\n")
    (output_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions_file))
    return results


def _mean_and_std(per_seed: list[dict[str, float]]) -> dict[str, float]:
    row = {}
    for key in per_seed[0]:
        values = torch.tensor([scores[key] for scores in per_seed], dtype=torch.float64)
        row[key] = values.mean().item()
        row[f"{key}_std"] = values.std().item() if len(values) > 1 else 0.0
    return row


def reference_scores(model, tokenizer, teacher, teacher_tokenizer, eval_set: EvalSet, protocol: Protocol) -> dict:
    """The model's CE on the first references and, with a teacher, teacher→student KL and top-1 agreement there."""
    bridge = VocabBridge.between(teacher_tokenizer, tokenizer) if teacher is not None else None
    cross = bridge is not None and not bridge.same_vocabulary
    readers = (tokenizer, teacher_tokenizer) if cross else (tokenizer,)
    rows, fmt = _reference_rows(eval_set, protocol, readers)
    tokenised = prepare_dataset(rows, tokenizer, fmt, protocol.max_prompt_length, protocol.max_length,
                                drop_overlong_prompts=True, name=eval_set.name,
                                teacher_tokenizer=teacher_tokenizer if cross else None)
    scores = {"reference_ce": gold_cross_entropy(model, tokenised, tokenizer.pad_token_id, protocol.batch_size)}
    if cross:
        scores |= cross_tokenizer_fidelity(teacher, model, tokenised, bridge, tokenizer.pad_token_id,
                                           teacher_tokenizer.pad_token_id)
    elif teacher is not None:
        scores |= teacher_student_fidelity(teacher, model, tokenised, tokenizer.pad_token_id)
    return scores


def _reference_rows(eval_set: EvalSet, protocol: Protocol, readers) -> tuple[datasets.Dataset, ExampleFormat]:
    """Each prompt with its first reference as the response: chat turns (each reader renders its own template), or
    the plain prompt's end that fits every reader's prompt budget."""
    pairs = [(i, references[0]) for i, references in enumerate(eval_set.references) if references[0].strip()]
    if protocol.chat_template:
        turns = [[{"role": "user", "content": eval_set.user_turns[i]}, {"role": "assistant", "content": reference}]
                 for i, reference in pairs]
        return datasets.Dataset.from_list([{"messages": m} for m in turns]), ExampleFormat(messages_column="messages")
    keep = protocol.max_prompt_length - 1  # room for a BOS token
    return datasets.Dataset.from_list([
        {"prompt": min((_last_tokens(eval_set.prompts[i], reader, keep) for reader in readers), key=len),
         "response": reference}
        for i, reference in pairs
    ]), ExampleFormat(prompt_column="prompt", response_column="response")


def _last_tokens(text: str, tokenizer, count: int) -> str:
    """The end of `text` that the tokenizer splits into at most `count` tokens, cut at a token boundary (generation
    keeps the prompt's last tokens the same way)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if len(offsets) <= count else text[offsets[-count][0] :]


def results_markdown(results: dict) -> str:
    """One row per dataset: the metric as mean ± std over seeds, and fidelity when a teacher was given."""
    lines = [f"Model: `{results['model']}`; seeds {results['seeds']}.", "",
             "| data | metric | mean ± std over seeds | reference CE | teacher→student KL | top-1 agreement % |",
             "|---|---|---|---|---|---|"]
    for name, row in results["datasets"].items():
        metric = "exact_match" if "exact_match" in row else "rouge_l"
        kl, agreement = row.get("teacher_student_kl"), row.get("top1_agreement")
        lines.append(
            f"| {name} | {metric} | {row[metric]:.2f} ± {row[metric + '_std']:.2f} | {row['reference_ce']:.3f} | "
            f"{'—' if kl is None else f'{kl:.3f}'} | {'—' if agreement is None else f'{agreement:.1f}'} |"
        )
    return "\n".join(lines)
