"""Where the training sequences come from (METHODS §4): the dataset, or responses generated during training.

`SequenceSource.draw` decides per micro-batch whether KD runs on the gold batch (`"gt"`), on fresh generations
(`"generate"`) or on earlier generations from the replay buffer (`"replay"`); `produce` generates, and
`StepSequences` does both for the micro-batches of each optimizer step in training.
Generated responses continue the batch's own prompts (the tokens before the first label) and come back as rows in
the training data's layout (`input_ids`, `labels` on the response, and for cross-tokenizer objectives the teacher's
tokenisation and the token pairs), so the trainer's collator and objectives take them unchanged.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import IGNORE_INDEX, PAIR_COLUMNS, ExampleFormat, prepare_dataset
from .models import eval_mode, head_row_count
from .rollout import Intervention, Rollout, Sampling, rollout, rollout_statistics

SOURCES = ("gt", "teacher", "student", "mixed", "adaptive", "switch", "skd", "mixture")
RULE = {
    "teacher": "teacher", "student": "student", "mixed": "student", "adaptive": "student",
    "switch": "switch", "skd": "skd", "mixture": "mixture",
}
LOCK_STEP = {"switch", "skd", "mixture"}  # both models decide every token together, so they must share tokens
ADAPTIVE_LOSS_RISE, ADAPTIVE_STEP = 0.1, 0.1  # DistiLLM: p_SGO += 0.1 when validation loss rose by ≥ 0.1
_TEXT_FORMAT = ExampleFormat(prompt_column="prompt", response_column="response")


class Produced(NamedTuple):
    """Generated rows (lists, ready for the collator) and what to log about them."""

    rows: list[dict]
    teacher_hidden: torch.Tensor | None  # [N, D] at the rows' supervised positions, in order; None: run the teacher
    statistics: dict[str, float]
    student_hidden: torch.Tensor | None = None  # [N, D] likewise, from generation; same tokenizer only


class ReplayBuffer:
    """The last `capacity` generated rows (DistiLLM's replay buffer); the oldest go first."""

    def __init__(self, capacity: int):
        self.rows: deque[dict] = deque(maxlen=capacity)

    @property
    def full(self) -> bool:
        return len(self.rows) == self.rows.maxlen

    def push(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def sample(self, count: int, generator: torch.Generator) -> list[dict]:
        picks = torch.randperm(len(self.rows), generator=generator)[:count]
        return [self.rows[int(index)] for index in picks]


class SequenceSource:
    """One of `SOURCES` with its schedule state (GKD's λ; DistiLLM's p_SGO and replay buffer)."""

    def __init__(self, name: str, mixed_lambda: float = 0.5, buffer_size: int = 1000, seed: int = 0):
        if name not in SOURCES:
            raise ValueError(f"source={name!r} is unknown: choose one of {', '.join(SOURCES)}.")
        self.name, self.mixed_lambda = name, mixed_lambda
        self.generator = torch.Generator().manual_seed(seed)
        self.student_probability = 0.0  # DistiLLM's p_SGO
        self.buffer = ReplayBuffer(buffer_size) if name == "adaptive" else None
        self.reference_loss: float | None = None  # the validation loss p_SGO last rose at (first: before training)

    @property
    def generates(self) -> bool:
        return self.name != "gt"

    def draw(self, step: int, total_steps: int) -> str:
        """"gt", "generate" or "replay" for the next micro-batch."""
        if self.name == "gt":
            return "gt"
        if self.name == "mixed":
            return "generate" if self._uniform() < self.mixed_lambda else "gt"
        if self.name == "adaptive":
            return self._adaptive_draw(step, total_steps)
        return "generate"

    def _adaptive_draw(self, step: int, total_steps: int) -> str:
        """distillm finetune.py: fresh samples while r < p·(1 − step/T), or while r < p and the buffer is not yet
        full; a replayed batch for the rest of r < p; the dataset otherwise (always while p = 0)."""
        r, p = self._uniform(), self.student_probability
        if r < p * (1 - step / max(total_steps, 1)) or (r < p and not self.buffer.full):
            return "generate"
        return "replay" if r < p else "gt"

    def observe_eval_loss(self, loss: float) -> None:
        """DistiLLM's adaptive schedule, fed the student's CE-only validation loss after each evaluation. The first
        loss (measured before training) is the reference; a loss ≥ reference + 0.1 raises p_SGO by 0.1 and becomes
        the reference; any other loss changes nothing."""
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + ADAPTIVE_LOSS_RISE:
            self.student_probability = min(1.0, self.student_probability + ADAPTIVE_STEP)
            self.reference_loss = loss

    def replay(self, count: int) -> list[dict]:
        return self.buffer.sample(count, self.generator)

    def remember(self, rows: list[dict]) -> None:
        if self.buffer is not None:
            self.buffer.push(rows)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to draw, replay and schedule exactly as an uninterrupted one."""
        return {
            "generator": self.generator.get_state(), "student_probability": self.student_probability,
            "reference_loss": self.reference_loss, "buffer": list(self.buffer.rows) if self.buffer else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.student_probability, self.reference_loss = state["student_probability"], state["reference_loss"]
        if self.buffer is not None:
            self.buffer.rows.clear()
            self.buffer.push(state["buffer"])

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


def left_padded_prompts(input_ids: torch.Tensor, labels: torch.Tensor, pad_token_id: int):
    """The prompts of a right-padded batch (the tokens before each row's first label), left-padded: (ids, mask)."""
    lengths = (labels != IGNORE_INDEX).int().argmax(-1)
    if bool((lengths == 0).any()):
        raise ValueError("a row has no prompt token before its first label: on-policy sources continue the prompt.")
    width = int(lengths.max())
    columns = torch.arange(width, device=input_ids.device)
    shift = (width - lengths)[:, None]
    source = (columns - shift).clamp_min(0)
    mask = (columns >= shift).long()
    ids = torch.where(mask.bool(), input_ids.gather(1, source), torch.full_like(source, pad_token_id))
    return ids, mask


def rollout_rows(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> list[dict]:
    """Left-padded rollout sequences as training rows: prompt + response without padding, labels on the response."""
    rows = []
    for ids, mask in zip(sequences.tolist(), attention_mask.tolist()):
        prompt = [token for token, keep in zip(ids[:prompt_width], mask[:prompt_width]) if keep]
        response = [token for token, keep in zip(ids[prompt_width:], mask[prompt_width:]) if keep]
        rows.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    return rows


class Generation:
    """Everything `produce` needs besides the batch: decoding settings, intervention, tokenizers, limits."""

    def __init__(self, config, tokenizer: PreTrainedTokenizerBase, teacher_tokenizer=None, cross_tokenizer=False,
                 pairings: tuple[str, ...] = ()):
        self.intervention = config.intervention()
        self.sampling = config.sampling()
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer
        self.cross_tokenizer, self.pairings = cross_tokenizer, pairings
        self.max_length, self.max_prompt_length = config.max_length, config.max_prompt_length
        self.draft_tokens = config.speculative_draft_tokens


@torch.no_grad()
def produce(student: PreTrainedModel, teacher: PreTrainedModel, batches: list[dict], generation: Generation,
            generator: torch.Generator | None) -> list[Produced]:
    """Responses to the prompts of `batches` (the micro-batches of one optimizer step) under the source's rule, as
    training rows, one `Produced` per batch: every prompt of the step goes into one rollout, a larger and faster
    generation batch than a micro-batch, and each batch gets back its own rows.

    Same tokenizer: the student writes alone under rule `student` (the trainer then scores the responses with one
    teacher pass); under the other rules both models decode in lock step and the teacher's hidden states of the
    rollout are the KD target. Different tokenizers: the writer generates alone, its text is re-tokenised for both
    models and paired by ETA (the trainer then runs the teacher on its own tokenisation).
    """
    started = time.perf_counter()
    cross = generation.cross_tokenizer
    writer_is_teacher = cross and generation.intervention.rule == "teacher"
    side = "teacher_" if writer_is_teacher else ""
    tokenizer = generation.teacher_tokenizer if writer_is_teacher else generation.tokenizer
    ids, mask = _stacked_prompts(batches, side, tokenizer.pad_token_id)
    sampling = Sampling(
        min(generation.sampling.max_new_tokens, generation.max_length - ids.shape[1]),
        generation.sampling.temperature, generation.sampling.top_p, generation.sampling.top_k,
    )
    writer = teacher if writer_is_teacher else student
    alone = cross or generation.intervention.rule == "student"
    produced = rollout(
        writer, None if alone else teacher, ids, mask,
        Intervention("student") if cross else generation.intervention, sampling,
        tokenizer.eos_token_id, tokenizer.pad_token_id, generator,
        vocab_size=None if cross else min(head_row_count(student), head_row_count(teacher)),
        draft_tokens=generation.draft_tokens,
    )
    statistics = rollout_statistics(produced) if not alone else {}
    statistics["rollout_tokens_per_second"] = int(produced.response_mask.sum()) / max(
        time.perf_counter() - started, 1e-9
    )
    starts = torch.tensor([0] + [len(batch["input_ids"]) for batch in batches]).cumsum(0).tolist()
    return [
        _produced_rows(_rows_of(produced, slice(begin, end)), ids.shape[1], tokenizer, generation, alone, statistics)
        for begin, end in zip(starts, starts[1:])
    ]


def _stacked_prompts(batches: list[dict], side: str, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every batch's prompts (`left_padded_prompts`), left-padded to one width and stacked: (ids, mask)."""
    prompts = [left_padded_prompts(batch[f"{side}input_ids"], batch[f"{side}labels"], pad_token_id) for batch in batches]
    width = max(ids.shape[1] for ids, _ in prompts)
    return tuple(
        torch.cat([torch.nn.functional.pad(pair[which], (width - pair[which].shape[1], 0), value=fill)
                   for pair in prompts])
        for which, fill in ((0, pad_token_id), (1, 0))
    )


def _rows_of(produced: Rollout, rows: slice) -> Rollout:
    return Rollout(*(None if field is None else field[rows] for field in produced))


def _produced_rows(produced: Rollout, prompt_width: int, tokenizer, generation: Generation, alone: bool,
                   statistics: dict) -> Produced:
    if generation.cross_tokenizer:
        return Produced(_retokenised_rows(produced, prompt_width, tokenizer, generation), None, statistics)
    response = produced.response_mask.bool()
    rows = rollout_rows(produced.sequences, produced.attention_mask, prompt_width)
    if alone:
        return Produced(rows, None, statistics, produced.student_hidden[response])
    return Produced(rows, produced.teacher_hidden[response], statistics)


def _retokenised_rows(produced, prompt_width: int, writer_tokenizer, generation: Generation) -> list[dict]:
    """The generated texts tokenised for both models with their token pairs, as the data pipeline does it.

    Rows whose response decodes to no text (EOS first) have nothing to align and are left out; a response cut by
    `max_new_tokens` gets no EOS on either side (the data pipeline would append one).
    """
    texts, finished = [], []
    for row in rollout_rows(produced.sequences, produced.attention_mask, prompt_width):
        start = row["labels"].count(IGNORE_INDEX)
        prompt = writer_tokenizer.decode(row["input_ids"][:start], skip_special_tokens=True)
        response = writer_tokenizer.decode(row["input_ids"][start:], skip_special_tokens=True)
        if response.strip():
            texts.append({"prompt": prompt, "response": response})
            finished.append(row["input_ids"][-1] == writer_tokenizer.eos_token_id)
    if not texts:
        return []
    prepared = prepare_dataset(
        datasets.Dataset.from_list(texts), generation.tokenizer, _TEXT_FORMAT, generation.max_prompt_length,
        generation.max_length, drop_overlong_prompts=True, name="generated", teacher_tokenizer=generation.teacher_tokenizer,
        pairings=generation.pairings,
    )
    eos = (generation.tokenizer.eos_token_id, generation.teacher_tokenizer.eos_token_id)
    return [row if done else _without_final_eos(row, *eos) for row, done in zip(prepared.to_list(), finished)]


def _without_final_eos(row: dict, student_eos: int, teacher_eos: int) -> dict:
    """The row without the EOS the data pipeline appended to each side, and without pairs that point at it."""
    row = dict(row)
    for prefix, eos in (("", student_eos), ("teacher_", teacher_eos)):
        if row[f"{prefix}input_ids"][-1] == eos:
            row[f"{prefix}input_ids"] = row[f"{prefix}input_ids"][:-1]
            row[f"{prefix}labels"] = row[f"{prefix}labels"][:-1]
    for key in PAIR_COLUMNS:
        if key in row:
            row[key] = [pair for pair in row[key]
                        if pair[0] < len(row["teacher_input_ids"]) and pair[1] < len(row["input_ids"])]
    return row


class StepSequences:
    """A generating source in the training loop: each micro-batch's draw and the rows KD trains on for it.

    The draws of all micro-batches of an optimizer step are made, and their prompts generated for in one rollout, at
    the step's first micro-batch: after `keep`, and after a resumed run restored the state. Without kept batches
    (outside the Trainer's loop) each call draws and generates for its own batch alone.
    """

    def __init__(self, source: SequenceSource, generation: Generation, generator: torch.Generator,
                 teacher: PreTrainedModel, prepare):
        self.source, self.generation, self.generator = source, generation, generator
        self.teacher, self.prepare = teacher, prepare  # prepare: puts a collated batch on the training device
        self._batches, self._plan = None, []

    def keep(self, batches: list[dict]) -> None:
        """The micro-batches of the coming optimizer step."""
        self._batches, self._plan = list(batches), []

    def next(self, student: PreTrainedModel, inputs: dict, step: int, total_steps: int
             ) -> tuple[str, Produced | None]:
        """This micro-batch's draw ("gt", "generate" or "replay") and, unless "gt", the rows KD runs on: responses
        generated to its prompts (kept for replay), or rows replayed from the buffer."""
        if not self._plan:
            batches, self._batches = self._batches or [inputs], None
            draws = [self.source.draw(step, total_steps) for _ in batches]
            generating = [index for index, draw in enumerate(draws) if draw == "generate"]
            produced = dict(zip(generating, self.produce(student, [batches[index] for index in generating])))
            self._plan = [(draw, produced.get(index)) for index, draw in enumerate(draws)]
        draw, produced = self._plan.pop(0)
        if draw == "replay":
            produced = Produced(self.source.replay(len(inputs["input_ids"])), None, {})
        elif draw == "generate":
            self.source.remember(produced.rows)
        return draw, produced

    def produce(self, student: PreTrainedModel, batches: list[dict]) -> list[Produced]:
        if not batches:
            return []
        batches = [self.prepare(batch) for batch in batches]
        with eval_mode(student) as student:
            return produce(student, self.teacher, batches, self.generation, self.generator)

    def state_dict(self) -> dict:
        """The source's state and the rollout's sampling generator: a resumed run draws and samples as before."""
        return {"source": self.source.state_dict(), "rollout": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.generator.set_state(state["rollout"])
