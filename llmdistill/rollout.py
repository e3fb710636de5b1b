"""On-policy generation (METHODS §4, §4.2): the student and the teacher decode together, each with its own KV cache
(one prefill, then one incremental step per token), and an intervention rule decides per token who writes it.

Rules: `student` (plain on-policy), `teacher` (SeqKD), `switch` (SWITCH, §4.1: the teacher writes token t when
JSD(p_t, q_t) exceeds a threshold that falls with t), `skd` (a student token outside the teacher's top-K is replaced by
a teacher sample) and `mixture` (every token from (1 − α)·q + α·p). Each step draws one student and one teacher sample
from the same generator whatever the rule, so rules that agree on who writes give the same tokens for the same seed.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, StaticCache

from .distributed import all_ranks, is_sharded
from .divergences import divergence_per_position
from .losses import default_chunk_size

RULES = ("student", "teacher", "switch", "skd", "mixture")
SCHEDULES = ("exp", "linear", "constant")
POSITION_BUCKETS = ((0, 16), (16, 64), (64, None))  # response positions [start, end): 0–15, 16–63, 64+


@dataclass(frozen=True)
class Sampling:
    """Decoding settings shared by both models; temperature 0 is greedy."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be ≥ 1.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be ≥ 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1].")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be ≥ 0 (0 = no top-k filter).")


@dataclass(frozen=True)
class Intervention:
    """Who writes each token. SWITCH's threshold at step t: τ0·exp(−λt) (exp), τ0·max(0, 1 − λt) (linear) or τ0."""

    rule: str = "student"
    switch_tau0: float = 0.3
    switch_decay: float = 0.1
    switch_schedule: str = "exp"
    skd_top_k: int = 25
    mixture_alpha: float = 0.2

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule={self.rule!r} is unknown: choose one of {', '.join(RULES)}.")
        if self.switch_schedule not in SCHEDULES:
            raise ValueError(f"switch_schedule={self.switch_schedule!r} is unknown: choose {', '.join(SCHEDULES)}.")
        if self.switch_tau0 < 0 or self.switch_decay < 0:
            raise ValueError("switch_tau0 and switch_decay must be ≥ 0.")
        if self.skd_top_k < 1:
            raise ValueError(f"skd_top_k={self.skd_top_k} must be ≥ 1.")
        if not 0 <= self.mixture_alpha <= 1:
            raise ValueError(f"mixture_alpha={self.mixture_alpha} must lie in [0, 1].")

    def threshold(self, step: int) -> float:
        if self.switch_schedule == "exp":
            return self.switch_tau0 * math.exp(-self.switch_decay * step)
        if self.switch_schedule == "linear":
            return self.switch_tau0 * max(0.0, 1.0 - self.switch_decay * step)
        return self.switch_tau0


class Rollout(NamedTuple):
    sequences: torch.Tensor  # [B, P + T] the left-padded prompts, then the generated tokens (pad after EOS)
    attention_mask: torch.Tensor  # [B, P + T] 1 on prompt and response tokens (EOS included)
    response_mask: torch.Tensor  # [B, T] 1 on generated tokens up to and including EOS
    teacher_written: torch.Tensor  # [B, T] whether the teacher wrote the token
    divergence: torch.Tensor  # [B, T] JSD(p_t, q_t) of the raw next-token distributions (natural log)
    teacher_hidden: torch.Tensor | None  # [B, T, D] the teacher's final hidden states that predict each generated
    # token (kept as the loss target instead of a second teacher pass); None when the student generated alone
    student_hidden: torch.Tensor  # [B, T, D] the student's, at generation time (its next-token distributions)


@torch.no_grad()
def rollout(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    intervention: Intervention,
    sampling: Sampling,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> Rollout:
    """Generate responses to left-padded prompts [B, P] with both models in lock step (same tokenizer).

    Heads padded to different row counts (one tokenizer) decode over the ids both have (`on_shared_ids`). With
    `teacher=None` the student generates alone (rule `student` only), over its first `vocab_size` ids (the rows the
    teacher that scores the result also has): its tokens are the same as with that teacher in lock step for the same
    seed, and the rollout has no teacher hidden states and zero divergence.
    """
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded (every row's last position a real token): set padding_side='left'.")
    if teacher is None and intervention.rule != "student":
        raise ValueError(f"rule {intervention.rule!r} needs the teacher's next-token distribution: pass the teacher.")
    lockstep = is_sharded(student) or (teacher is not None and is_sharded(teacher))
    students = _Decoder(student, input_ids, attention_mask, sampling.max_new_tokens)
    teachers = _Decoder(teacher, input_ids, attention_mask, sampling.max_new_tokens) if teacher is not None else None
    finished = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    steps, teacher_hidden, student_hidden = [], [], []
    for step in range(sampling.max_new_tokens):
        student_logits = students.logits[:, :vocab_size]
        # without a teacher its logits are the student's: same draws from the generator, zero divergence
        teacher_logits = teachers.logits if teachers is not None else student_logits
        student_logits, teacher_logits = on_shared_ids(student_logits, teacher_logits)
        divergence = jensen_shannon(teacher_logits, student_logits)
        token, teacher_writes = _choose(student_logits, teacher_logits, divergence, step, intervention, sampling,
                                        generator)
        token = torch.where(finished, pad_token_id, token)
        steps.append((token, teacher_writes & ~finished, divergence, ~finished))
        student_hidden.append(students.hidden)
        if teachers is not None:
            teacher_hidden.append(teachers.hidden)
        finished = finished | (token == eos_token_id)
        # sharded models gather their weights in every forward: a rank that stopped early would hang the others
        if all_ranks(bool(finished.all())) if lockstep else bool(finished.all()):
            break
        for decoder in (students, teachers):
            if decoder is not None:
                decoder.advance(token)
    tokens, written, divergences, alive = (torch.stack(column, dim=1) for column in zip(*steps))
    response_mask = alive.long()
    return Rollout(
        torch.cat([input_ids, tokens], dim=1), torch.cat([attention_mask, response_mask], dim=1), response_mask,
        written, divergences * alive, torch.stack(teacher_hidden, dim=1) if teacher_hidden else None,
        torch.stack(student_hidden, dim=1),
    )


def rollout_statistics(produced: Rollout) -> dict[str, float]:
    """What to log about a rollout: the teacher-written fraction overall and per position bucket, and the mean JSD
    per bucket, over generated tokens only (buckets with no token are left out)."""
    mask = produced.response_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)[mask]
    return {
        "teacher_written_fraction": _mean(produced.teacher_written[mask]),
        **bucket_means("teacher_written_fraction", produced.teacher_written[mask], positions),
        **bucket_means("jsd", produced.divergence[mask], positions),
    }


def bucket_means(name: str, values: torch.Tensor, positions: torch.Tensor) -> dict[str, float]:
    """`{name}_0-15`, `{name}_16-63`, `{name}_64+`: the mean of `values` [N] over the tokens at those response
    positions [N] (a bucket with no token is left out)."""
    means = {}
    for start, end in POSITION_BUCKETS:
        in_bucket = (positions >= start) & (positions < end if end is not None else True)
        if in_bucket.any():
            means[f"{name}_{start}-{end - 1}" if end is not None else f"{name}_{start}+"] = _mean(values[in_bucket])
    return means


def _mean(values: torch.Tensor) -> float:
    return values.float().mean().item() if values.numel() else 0.0


@torch.no_grad()
def divergence_statistics(student_hidden: torch.Tensor, student_head, teacher_hidden: torch.Tensor, teacher_head,
                          positions: torch.Tensor, chunk_size: int | None = None) -> dict[str, float]:
    """The rollout's `jsd_*` buckets from hidden states [N, D] at generated tokens (response `positions` [N]): the
    student's from generation time, the teacher's from one pass over the finished responses. A teacher in lock step
    would have seen the same prefixes, so these are the JSDs it would have measured. Chunked over positions like the
    loss (`default_chunk_size` by default), so it never holds more [chunk, V] buffers than the loss does."""
    chunk_size = chunk_size or default_chunk_size(student_head.weight.shape[0])
    divergence = torch.cat([
        jensen_shannon(*reversed(on_shared_ids(
            student_head.logits(student_hidden[start:start + chunk_size]),
            teacher_head.logits(teacher_hidden[start:start + chunk_size]),
        )))
        for start in range(0, len(positions), chunk_size)
    ])
    return bucket_means("jsd", divergence, positions)


def on_shared_ids(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both [B, V] logits cut to the first min(V_S, V_T) ids, as the losses compare padded heads of one tokenizer
    (METHODS §1; the trainer has checked with `vocab.shared_vocab_size` that every real token has a row in both): a
    token either model writes is then one the other can read, and the rules compare distributions over one support.
    """
    shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[:, :shared], teacher_logits[:, :shared]


def jensen_shannon(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """[B] symmetric JSD(p, q) of the raw next-token distributions: the `jsd` divergence at β = ½, in [0, ln 2]."""
    return divergence_per_position(teacher_logits, student_logits, "jsd", beta=0.5).clamp(0.0, math.log(2))


def _choose(student_logits, teacher_logits, divergence, step, intervention, sampling, generator):
    """(token [B], teacher wrote it [B]) for one step under the intervention rule."""
    student_token = sample(student_logits, sampling, generator)
    teacher_token = sample(teacher_logits, sampling, generator)
    rule = intervention.rule
    if rule == "mixture":
        alpha = intervention.mixture_alpha
        probs = (1 - alpha) * _warped_probs(student_logits, sampling) + alpha * _warped_probs(teacher_logits, sampling)
        return _draw(probs, sampling, generator), torch.zeros_like(student_token, dtype=torch.bool)
    if rule == "student":
        teacher_writes = torch.zeros_like(student_token, dtype=torch.bool)
    elif rule == "teacher":
        teacher_writes = torch.ones_like(student_token, dtype=torch.bool)
    elif rule == "switch":
        teacher_writes = divergence > intervention.threshold(step)
    else:  # skd
        top = teacher_logits.topk(min(intervention.skd_top_k, teacher_logits.shape[-1]), dim=-1).indices
        teacher_writes = ~(top == student_token[:, None]).any(-1)
    return torch.where(teacher_writes, teacher_token, student_token), teacher_writes


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B] next tokens from [B, V] logits: greedy at temperature 0, else temperature, top-k and top-p sampling."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return _draw(_warped_probs(logits, sampling), sampling, generator)


def _warped_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / sampling.temperature, -1)


def _draw(probs: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Sample after keeping the top-k tokens and the smallest set whose mass reaches top-p."""
    if sampling.top_k:
        kth = probs.topk(min(sampling.top_k, probs.shape[-1]), dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        keep_sorted = before < sampling.top_p * sorted_probs.sum(-1, keepdim=True)
        probs = probs * torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    # The exponential race: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i / Σp, as multinomial
    # does, but from uniforms (5× cheaper to draw on CPU than multinomial's exponentials). The noise has the same
    # shape whatever the rule, so every rule advances the generator alike. Inverse-CDF sampling would need one
    # uniform per row, but float error accumulated along a 32k-entry cumsum flips ~1 draw in 30.
    exponential = -torch.rand(probs.shape, generator=generator, device=probs.device).log()
    return (probs / exponential).argmax(-1)


class _Decoder:
    """One model decoding with its own KV cache: the prefill on construction, then `advance` one token at a time.

    The cache is preallocated for the whole rollout (`StaticCache`): a growing cache copies every layer's keys and
    values at each step, which took half the rollout's time. Future slots are masked out.
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int):
        self.model, self.length = model, input_ids.shape[1]
        self.attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(len(input_ids), new_tokens)], dim=1)
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        self.next_position = positions[:, -1:] + 1
        self.cache = {cache_keyword(model): StaticCache(config=model.config, max_cache_len=self.length + new_tokens)}
        self._read(model(
            input_ids=input_ids, attention_mask=self.attention_mask, position_ids=positions,
            cache_position=torch.arange(self.length, device=input_ids.device), **self.cache,
            use_cache=True, output_hidden_states=True, logits_to_keep=1,
        ))

    def advance(self, token: torch.Tensor) -> None:
        self.attention_mask[:, self.length] = 1
        self._read(self.model(
            input_ids=token[:, None], attention_mask=self.attention_mask, position_ids=self.next_position,
            cache_position=torch.tensor([self.length], device=token.device), **self.cache,
            use_cache=True, output_hidden_states=True,
        ))
        self.length += 1
        self.next_position = self.next_position + 1

    def _read(self, outputs) -> None:
        self.logits = outputs.logits[:, -1].float()
        self.hidden = outputs.hidden_states[-1][:, -1]


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward argument that takes the KV cache: `cache` since transformers renamed it (`past_key_values` is
    removed in 5.40), `past_key_values` in the earlier 5.x releases and in models with their own code."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
