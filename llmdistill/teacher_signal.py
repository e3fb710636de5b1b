"""The teacher's side of the loss, whichever way it is had: one live teacher, several, or a teacher cache.

`TeacherSignal(inputs)` gives the teacher's hidden states at a batch's supervised positions (a mixture's packed
states, or a cache's rows) and `TeacherSignal.head` turns them into logits, so the objectives read every kind alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from .data import CACHE_INDEX_COLUMN, IGNORE_INDEX
from .models import (
    LMHead, freeze, head_row_count, last_hidden_states, load_config, load_model, supervised_hidden_states,
)
from .teacher_cache import (
    META_FILENAME, CachedTeacher, TeacherCache, TopKHead, build_teacher_cache, config_fingerprint,
    data_fingerprint, tokenizer_fingerprint,
)
from .teachers import TEACHER_INDEX_COLUMN, MixtureHead, mixture_signal


class TeacherSignal:
    """The frozen teacher(s) or the cache standing in for them. `model` is what rollouts and the objectives' set-up
    read: the live teacher (with several, the one with the fewest head rows, which bounds what the student may
    sample), the cached head (hidden kind), or None (top-k kind)."""

    def __init__(self, teachers: list[PreTrainedModel], temperature: float = 1.0, cross_tokenizer: bool = False):
        self.teachers, self.temperature = teachers, temperature
        self.prefix = "teacher_" if cross_tokenizer else ""  # a cross-tokenizer teacher reads its own tokenisation
        self.model = min(teachers, key=head_row_count) if teachers else None
        self.cache, self._cached_head = None, None

    @classmethod
    def from_cache(cls, cache: TeacherCache, device) -> TeacherSignal:
        signal = cls([])
        signal.cache, signal._cached_head = cache, cache.head(device)
        signal.model = CachedTeacher(signal._cached_head) if cache.kind == "hidden" else None
        return signal

    @property
    def head(self) -> LMHead | TopKHead | MixtureHead:
        if self.cache is not None:
            return self._cached_head
        if len(self.teachers) > 1:
            return MixtureHead([LMHead.of(teacher) for teacher in self.teachers], self.temperature)
        return LMHead.of(self.model)

    @property
    def head_rows(self) -> int:
        return head_row_count(self.model) if self.model is not None else self.head.weight.shape[0]

    @torch.no_grad()
    def __call__(self, inputs: dict) -> torch.Tensor:
        """[N, D] at the N supervised positions of `inputs`, in order."""
        if self.cache is not None:
            return self.cache.signal(inputs[CACHE_INDEX_COLUMN])
        ids, mask = inputs[f"{self.prefix}input_ids"], inputs[f"{self.prefix}attention_mask"]
        supervised = inputs[f"{self.prefix}labels"][:, 1:] != IGNORE_INDEX
        if len(self.teachers) > 1:
            return mixture_signal(self.teachers, ids, mask, supervised, inputs.get(TEACHER_INDEX_COLUMN))
        return supervised_hidden_states(self.model, ids, mask, supervised)

    @torch.no_grad()
    def finite(self, inputs: dict) -> bool:
        """Whether the teacher's heads and its outputs on `inputs` (or the cached signal) hold no NaN or inf."""
        head = self.head
        heads = head.heads if isinstance(head, MixtureHead) else [head]
        if not all(
            torch.isfinite(tensor).all() for head in heads if isinstance(head, LMHead)
            for tensor in (head.weight, head.bias) if tensor is not None
        ):
            return False
        if self.cache is not None:
            return bool(torch.isfinite(self.cache.signal(inputs[CACHE_INDEX_COLUMN])).all())
        ids, mask = inputs[f"{self.prefix}input_ids"], inputs[f"{self.prefix}attention_mask"]
        return all(torch.isfinite(last_hidden_states(teacher, ids, mask)).all() for teacher in self.teachers)


def load_teacher(teacher: PreTrainedModel | str, args) -> PreTrainedModel:
    if not isinstance(teacher, str):
        return teacher
    return load_model(teacher, args.model_dtype, args.trust_remote_code, field="teacher_model_name_or_path")


def open_teacher_cache(args, teacher: PreTrainedModel | str, teacher_tokenizer, splits: dict,
                       main_process_first) -> TeacherCache:
    """The cache at args.teacher_cache, built on the first run (the main process first, from the teacher, which is
    then dropped) from the tokenised `splits`, and checked against this run's data, teacher tokenizer and config,
    kind, k and temperature."""
    topk = args.teacher_cache_kind == "topk"
    config = teacher.config if not isinstance(teacher, str) else load_config(
        teacher, args.trust_remote_code, field="teacher_model_name_or_path"
    )
    expected = {
        "kind": args.teacher_cache_kind,
        "top_k": args.teacher_cache_top_k if topk else None,
        "temperature": args.temperature if topk else None,
        "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer),
        "teacher_config": config_fingerprint(config),
        **{f"{split}_data": data_fingerprint(dataset) for split, dataset in splits.items()},
    }
    directory = Path(args.teacher_cache)
    with main_process_first():
        if not (directory / META_FILENAME).is_file():
            build_teacher_cache(
                directory, freeze(load_teacher(teacher, args)).to(args.device), list(splits.values()),
                teacher_tokenizer.pad_token_id, args.teacher_cache_kind, args.teacher_cache_top_k, args.temperature,
                args.per_device_eval_batch_size, fingerprints=expected,
            )
    cache = TeacherCache(directory)
    cache.check(expected)
    return cache
