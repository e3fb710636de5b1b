"""On-policy generation (METHODS §4, §4.2): the student and the teacher decode together, each with its own KV cache
(one prefill, then one incremental step per token), and an intervention rule decides per token who writes it.

Rules: `student` (plain on-policy), `teacher` (SeqKD), `switch` (SWITCH, §4.1: the teacher writes token t when
JSD(p_t, q_t) exceeds a threshold that falls with t), `skd` (a student token outside the teacher's top-K is replaced by
a teacher sample) and `mixture` (every token from (1 − α)·q + α·p). Each step draws the same uniforms from the generator
whatever the rule, so rules that agree on who writes give the same tokens for the same seed (see `_Noise`).
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
SPECULATIVE_RULES = ("switch", "skd")  # the student drafts, the teacher only replaces
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
    draft_tokens: int = 0,
) -> Rollout:
    """Generate responses to left-padded prompts [B, P] with both models in lock step (same tokenizer).

    Heads padded to different row counts (one tokenizer) decode over the ids both have (`on_shared_ids`). With
    `teacher=None` the student generates alone (rule `student` only), over its first `vocab_size` ids (the rows the
    teacher that scores the result also has): its tokens are the same as with that teacher in lock step for the same
    seed, and the rollout has no teacher hidden states and zero divergence.

    `draft_tokens` > 1 decodes rules `switch` and `skd` speculatively (METHODS §4.2, `_decode_speculatively`): the
    same tokens as token by token for the same generator, with the teacher scoring drafts in parallel passes.
    """
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded (every row's last position a real token): set padding_side='left'.")
    if teacher is None and intervention.rule != "student":
        raise ValueError(f"rule {intervention.rule!r} needs the teacher's next-token distribution: pass the teacher.")
    lockstep = is_sharded(student) or (teacher is not None and is_sharded(teacher))
    students = _Decoder(student, input_ids, attention_mask, sampling.max_new_tokens)
    teachers = _Decoder(teacher, input_ids, attention_mask, sampling.max_new_tokens) if teacher is not None else None
    steps = _Steps(len(input_ids), eos_token_id, pad_token_id, input_ids.device)
    noise = _Noise(sampling, generator, coupled=intervention.rule != "skd")
    if draft_tokens > 1 and intervention.rule in SPECULATIVE_RULES and not lockstep:
        _decode_speculatively(students, teachers, steps, noise, intervention, sampling, vocab_size, draft_tokens)
    else:
        _decode_token_by_token(students, teachers, steps, noise, intervention, sampling, vocab_size, lockstep)
    return steps.rollout(input_ids, attention_mask)


def _decode_token_by_token(students, teachers, steps, noise, intervention, sampling, vocab_size, lockstep) -> None:
    for step in range(sampling.max_new_tokens):
        student_logits = students.logits[:, :vocab_size]
        # without a teacher its logits are the student's: same draws from the generator, zero divergence
        teacher_logits = teachers.logits if teachers is not None else student_logits
        student_logits, teacher_logits = on_shared_ids(student_logits, teacher_logits)
        divergence = jensen_shannon(teacher_logits, student_logits)
        student_noise, teacher_noise = noise.at(step, student_logits)
        token, teacher_writes = _choose(student_logits, teacher_logits, divergence, step, intervention, sampling,
                                        student_noise, teacher_noise)
        noise.release(step + 1)
        all_finished = steps.add(token, teacher_writes, divergence, students.hidden,
                                 teachers.hidden if teachers is not None else None)
        # sharded models gather their weights in every forward: a rank that stopped early would hang the others
        if all_ranks(all_finished) if lockstep else all_finished:
            break
        for decoder in (students, teachers):
            if decoder is not None:
                decoder.advance(steps.tokens[-1][:, None])


def _decode_speculatively(students, teachers, steps, noise, intervention, sampling, vocab_size, draft_tokens) -> None:
    """Speculative SWITCH/SKD: the student drafts up to `draft_tokens` tokens alone (fewer after the teacher changed
    one: see `draft`), the teacher scores them in one parallel pass, and the rule decides position by position; at
    the first position where the teacher writes a token other than the draft in any row, every row's token there is
    final, the drafts after it are dropped and both KV caches are cut back to it. Each step's sampling noise is drawn once, in the
    token-by-token order, so a dropped draft is redrawn identically and the output equals token-by-token decoding for
    the same generator (tested). The teacher reads each round's final token together with the next round's drafts,
    one pass per round instead of two."""
    step, draft, unread = 0, 2, []  # unread: the final token the teacher has not read yet ([B] ids), after round 1
    while step < sampling.max_new_tokens:
        width = min(draft, sampling.max_new_tokens - step)
        drafts, student_logits, student_hidden = [], [], []
        for offset in range(width):
            logits = on_shared_ids(students.logits[:, :vocab_size], teachers.logits)[0]
            student_logits.append(logits)
            student_hidden.append(students.hidden)
            drafts.append(sample(logits, sampling, noise=noise.at(step + offset, logits)[0]))
            if offset < width - 1:
                students.advance(drafts[-1][:, None])
        teacher_logits, teacher_hidden = ([], []) if unread else ([teachers.logits], [teachers.hidden])
        if unread or width > 1:
            scored = teachers.advance(torch.stack(unread + drafts[:-1], dim=1))
            teacher_logits += scored.logits.float().unbind(1)
            teacher_hidden += scored.hidden_states[-1].unbind(1)
        for offset in range(width):
            shared_student, shared_teacher = on_shared_ids(student_logits[offset], teacher_logits[offset])
            divergence = jensen_shannon(shared_teacher, shared_student)
            teacher_token = sample(shared_teacher, sampling, noise=noise.at(step + offset, shared_teacher)[1])
            teacher_writes = _teacher_writes(intervention, divergence, step + offset, shared_teacher, drafts[offset])
            token = torch.where(teacher_writes, teacher_token, drafts[offset])
            all_finished = steps.add(token, teacher_writes, divergence, student_hidden[offset], teacher_hidden[offset])
            # A teacher token equal to the draft leaves both caches true: only a changed token ends the round.
            changed = bool(((token != drafts[offset]) & steps.alive[-1]).any())
            if all_finished or changed:
                break
        accepted = offset + 1
        # draft as far as the student was trusted lately: doubling after a round with no changed token, back to
        # the run it kept before one (1 drafts a token at a time, at the cost of token-by-token decoding)
        draft = min(2 * draft, draft_tokens) if accepted == width and not changed else accepted
        step += accepted
        noise.release(step)
        if all_finished or step == sampling.max_new_tokens:
            return
        for decoder in (students, teachers):  # both have read drafts[:width - 1]; keep those still true
            decoder.crop(width - accepted)
        students.advance(steps.tokens[-1][:, None])
        unread = [steps.tokens[-1]]


class _Steps:
    """The final tokens of a rollout, step by step, with each row's finished state (pad after its EOS)."""

    def __init__(self, rows: int, eos_token_id: int, pad_token_id: int, device):
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.tokens, self.written, self.divergences, self.alive = [], [], [], []
        self.student_hidden, self.teacher_hidden = [], []

    def add(self, token, teacher_writes, divergence, student_hidden, teacher_hidden) -> bool:
        """Records one step; whether every row has now finished."""
        token = torch.where(self.finished, self.pad_token_id, token)
        self.tokens.append(token)
        self.written.append(teacher_writes & ~self.finished)
        self.divergences.append(divergence)
        self.alive.append(~self.finished)
        self.student_hidden.append(student_hidden)
        if teacher_hidden is not None:
            self.teacher_hidden.append(teacher_hidden)
        self.finished = self.finished | (token == self.eos_token_id)
        return bool(self.finished.all())

    def rollout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Rollout:
        tokens, written, divergences, alive = (
            torch.stack(column, dim=1) for column in (self.tokens, self.written, self.divergences, self.alive)
        )
        response_mask = alive.long()
        return Rollout(
            torch.cat([input_ids, tokens], dim=1), torch.cat([attention_mask, response_mask], dim=1), response_mask,
            written, divergences * alive, torch.stack(self.teacher_hidden, dim=1) if self.teacher_hidden else None,
            torch.stack(self.student_hidden, dim=1),
        )


class _Noise:
    """The uniforms of each step's two samples (the student's, then the teacher's), drawn from the generator the
    first time the step is reached, in step order, and kept until the step is final (`release`).

    `coupled`: both samples read the first uniforms, so where the two distributions agree the two models draw the
    same token, and a speculative SWITCH round goes on past a teacher-written token equal to the draft. Each sample
    keeps its own distribution, and SWITCH decides who writes before it looks at either sample, so the output is
    still exact. SKD's decision reads the student's sample, so there the teacher's draw takes the second uniforms."""

    def __init__(self, sampling: Sampling, generator: torch.Generator | None, coupled: bool = True):
        self.sampling, self.generator, self.coupled, self.kept = sampling, generator, coupled, {}

    def at(self, step: int, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The step's student and teacher uniform tensors, shaped and placed like the `logits` they sample from."""
        if self.sampling.temperature == 0:
            return None, None
        if step not in self.kept:
            first, second = (torch.rand(logits.shape, generator=self.generator, device=logits.device) for _ in range(2))
            self.kept[step] = (first, first if self.coupled else second)
        return self.kept[step]

    def release(self, final_steps: int) -> None:
        for step in [step for step in self.kept if step < final_steps]:
            del self.kept[step]


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
    would have seen the same prefixes, so these are the JSDs it would have measured. Chunked over positions: a sixth
    of the loss's default chunk, since the plain JSD keeps about six times as many [chunk, V] buffers alive as the
    loss's closed form does per row (a logging step must not raise the run's peak memory)."""
    chunk_size = chunk_size or max(1, default_chunk_size(student_head.weight.shape[0], student_hidden.device) // 6)
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


def _choose(student_logits, teacher_logits, divergence, step, intervention, sampling, student_noise, teacher_noise):
    """(token [B], teacher wrote it [B]) for one step under the intervention rule."""
    student_token = sample(student_logits, sampling, noise=student_noise)
    teacher_token = sample(teacher_logits, sampling, noise=teacher_noise)
    if intervention.rule == "mixture":
        alpha = intervention.mixture_alpha
        probs = (1 - alpha) * _warped_probs(student_logits, sampling) + alpha * _warped_probs(teacher_logits, sampling)
        return _draw(probs, sampling, None, student_noise), torch.zeros_like(student_token, dtype=torch.bool)
    teacher_writes = _teacher_writes(intervention, divergence, step, teacher_logits, student_token)
    return torch.where(teacher_writes, teacher_token, student_token), teacher_writes


def _teacher_writes(intervention, divergence, step, teacher_logits, student_token) -> torch.Tensor:
    """[B] whether the teacher writes this step's token under rules student, teacher, switch and skd."""
    rule = intervention.rule
    if rule in ("student", "teacher"):
        return torch.full_like(student_token, rule == "teacher", dtype=torch.bool)
    if rule == "switch":
        return divergence > intervention.threshold(step)
    top = teacher_logits.topk(min(intervention.skd_top_k, teacher_logits.shape[-1]), dim=-1).indices
    return ~(top == student_token[:, None]).any(-1)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """[B] next tokens from [B, V] logits: greedy at temperature 0, else temperature, top-k and top-p sampling
    (from `noise`, uniforms shaped like the logits, when given; else from the generator)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return _draw(_warped_probs(logits, sampling), sampling, generator, noise)


def _warped_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / sampling.temperature, -1)


def _draw(probs: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
          noise: torch.Tensor | None = None) -> torch.Tensor:
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
    if noise is None:
        noise = torch.rand(probs.shape, generator=generator, device=probs.device)
    exponential = -noise.log()
    return (probs / exponential).argmax(-1)


class _Decoder:
    """One model decoding with its own KV cache: the prefill on construction, then `advance` over the tokens read next.

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

    def advance(self, tokens: torch.Tensor):
        """Reads tokens [B, n] in one pass (n = 1 when decoding token by token); the model's outputs, whose logits
        [B, n, V] and last hidden states [B, n, D] predict the position after each token."""
        count = tokens.shape[1]
        self.attention_mask[:, self.length:self.length + count] = 1
        outputs = self.model(
            input_ids=tokens, attention_mask=self.attention_mask,
            position_ids=self.next_position + torch.arange(count, device=tokens.device),
            cache_position=torch.arange(self.length, self.length + count, device=tokens.device), **self.cache,
            use_cache=True, output_hidden_states=True,
        )
        self.length += count
        self.next_position = self.next_position + count
        self._read(outputs)
        return outputs

    def crop(self, count: int) -> None:
        """Forgets the last `count` tokens read; their cache slots are masked out and written over next."""
        if count == 0:
            return
        self.length -= count
        self.next_position = self.next_position - count
        self.attention_mask[:, self.length:] = 0
        for layer in getattr(next(iter(self.cache.values())), "layers", ()):
            if hasattr(layer, "cumulative_length"):  # transformers ≥ 5.2x: the layer counts what it holds
                layer.crop(-count)

    def _read(self, outputs) -> None:
        self.logits = outputs.logits[:, -1].float()
        self.hidden = outputs.hidden_states[-1][:, -1]


def cache_keyword(model: PreTrainedModel) -> str:
    """The forward argument that takes the KV cache: `cache` since transformers renamed it (`past_key_values` is
    removed in 5.40), `past_key_values` in the earlier 5.x releases and in models with their own code."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
