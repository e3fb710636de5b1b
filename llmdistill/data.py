"""Training data: load, render prompt/response text, tokenise with labels on response tokens only, pad batches."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .align import align_batch, align_spans, token_byte_spans, token_pieces
from .edit_distance import edit_distance_pairs
from .errors import DataError, first_line, is_hub_name

IGNORE_INDEX = -100
RESPONSE_COLUMNS = ("output", "completion", "response")
PLAIN_CHAT_SUFFIX = "assistant: "
MAX_LISTED_PROBLEMS = 3
PAIR_COLUMNS = ("aligned_pairs", "mined_pairs")
CACHE_INDEX_COLUMN = "cache_index"  # a row's place in the teacher cache (teacher_cache.py)
TEACHER_INDEX_COLUMN = "teacher_index"  # a row's teacher, 0-based, when several teachers are routed (teachers.py)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExampleFormat:
    """Where the text is: `messages` (chat turns) or a prompt column plus a response column."""

    messages_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None


def load_raw_dataset(
    name_or_path: str, split: str = "train", config_name: str | None = None, field: str = "dataset_name_or_path"
) -> datasets.Dataset:
    """A JSONL/JSON file, a folder written by `Dataset.save_to_disk`, or a hub dataset name; `field` is the option
    that named it, for the error messages."""
    path = Path(name_or_path).expanduser()
    if path.exists() and split != "train":
        raise DataError(
            f"split {split!r} cannot be taken from the local dataset {path}: a file or saved folder is one split. "
            "Give the evaluation data its own file (eval_dataset_name_or_path)."
        )
    if path.is_file():
        return _load_json_file(path, field)
    if (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path))
    if not path.exists() and not is_hub_name(name_or_path):
        raise DataError(
            f"{field}={name_or_path!r}: no such file or folder. Give a .jsonl/.json file, a folder written by "
            "Dataset.save_to_disk, or a hub dataset name."
        )
    try:
        return datasets.load_dataset(name_or_path, config_name, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DataError(
            f"{field}={name_or_path!r} is not a local file or folder, and the hub could not provide it "
            f"({first_line(error)}). Give a local .jsonl/.json file, or a hub dataset reachable from this machine."
        ) from error


def _load_json_file(path: Path, field: str) -> datasets.Dataset:
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{field}={str(path)!r} must be a .jsonl (one JSON object per line) or .json file.")
    try:
        with _datasets_quiet():
            dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # datasets wraps every reading error alike: find the line it came from
        problem = json_file_problem(path) or first_line(error.__cause__ or error)
        raise DataError(f"{field}={str(path)!r}: {problem}.") from error
    if len(dataset) == 0:
        raise DataError(f"{field}={str(path)!r} holds no rows.")
    return dataset


@contextmanager
def _datasets_quiet():
    """datasets logs a reading error before it raises it; the raised one becomes a one-line DataError instead."""
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)


def json_file_problem(path: Path) -> str | None:
    """Where a JSON/JSONL file stops being a list of objects, as `line N: ...`; None if it is one."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return "the file is empty: it holds no rows"
    documents = [(1, text)] if path.suffix == ".json" else [
        (number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()
    ]
    for number, document in documents:
        try:
            value = json.loads(document)
        except json.JSONDecodeError as error:
            line = number + error.lineno - 1
            return f"line {line} is not valid JSON ({error.msg}, column {error.colno}): fix or remove it"
        rows = value if path.suffix == ".json" and isinstance(value, list) else [value]
        if not all(isinstance(row, dict) for row in rows):
            return f"line {number}: each row must be a JSON object {{\"prompt\": ..., \"output\": ...}}"
    return None


def resolve_format(
    column_names: list[str], prompt_column: str, response_column: str | None, messages_column: str
) -> ExampleFormat:
    if messages_column in column_names:
        return ExampleFormat(messages_column=messages_column)
    candidates = (response_column,) if response_column else RESPONSE_COLUMNS
    found = [name for name in candidates if name in column_names]
    if prompt_column in column_names and found:
        return ExampleFormat(prompt_column=prompt_column, response_column=found[0])
    raise DataError(
        f"the dataset has columns {column_names}: it needs '{messages_column}' (chat turns) or "
        f"'{prompt_column}' plus a response column ({' or '.join(repr(c) for c in candidates)}). "
        "Set prompt_column / response_column / messages_column to the names your data uses."
    )


def render_example(row: dict, fmt: ExampleFormat, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(prompt text, response text); chat turns go through the tokenizer's chat template when it has one."""
    if fmt.messages_column is None:
        return row[fmt.prompt_column], row[fmt.response_column]
    messages = row[fmt.messages_column]
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("the last message must have role 'assistant': it is the response to learn.")
    if not tokenizer.chat_template:
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + PLAIN_CHAT_SUFFIX
        return prompt, messages[-1]["content"]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the conversation differently from its prompt part.")
    return prompt, full[len(prompt) :]


class TokenizedExample(NamedTuple):
    ids: list[int]  # prompt + response + EOS, cut to max_length
    response_start: int  # index of the first token covering a response character, -1 if none
    text_ids: list[int]  # the tokenizer's own ids for the text (before EOS is appended and the cut)
    offsets: list[tuple[int, int]]  # their character offsets
    complete: bool  # nothing was cut: the sequence ends with EOS right after the full text


def tokenize_example(
    prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool, max_length: int
) -> TokenizedExample:
    """Token ids of prompt + response + EOS (cut to max_length) and the index of the first response token.

    The whole text is tokenised at once; the first response token is the first one that covers any response
    character, so a token merging the prompt's trailing space with the response's first word (" b") is learned,
    not lost.
    """
    encoding = tokenizer(
        prompt + response, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False
    )
    text_ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    response_start = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), -1)
    ids = text_ids
    if response_start >= 0 and ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    return TokenizedExample(ids[:max_length], response_start, text_ids, offsets, len(ids) <= max_length)


def prepare_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    fmt: ExampleFormat,
    max_prompt_length: int,
    max_length: int,
    drop_overlong_prompts: bool = False,
    name: str = "train",
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    pairings: tuple[str, ...] = (),
) -> datasets.Dataset:
    """Tokenise every row to `input_ids` and `labels` (IGNORE_INDEX on the prompt); stop on any unusable row.

    With a `teacher_tokenizer` (cross-tokenizer objectives) each row is tokenised for the teacher as well
    (`teacher_input_ids`, `teacher_labels`) and carries the token pairs its objective compares: `aligned_pairs`
    (ETA, always) and `mined_pairs` (MinED, when `pairings` asks for "mined"), as (teacher index, student index).
    """
    sides = [("", tokenizer)] + ([("teacher ", teacher_tokenizer)] if teacher_tokenizer is not None else [])
    usable, kept, problems, dropped = [], [], [], 0
    for index, row in enumerate(dataset):
        encoded, problem = [], None
        for role, side_tokenizer in sides:
            side, problem = _tokenize_side(row, fmt, side_tokenizer, max_prompt_length, max_length)
            if problem is not None:
                break
            encoded.append(side)
        if problem == "overlong" and drop_overlong_prompts:
            dropped += 1
        elif problem == "overlong":
            problems.append(
                f"row {index + 1}: the prompt has {side.example.response_start} {role}tokens, more than max_prompt_length="
                f"{max_prompt_length} (raise max_prompt_length, or set drop_overlong_prompts=True to skip such rows)"
            )
        elif problem:
            problems.append(f"row {index + 1}: {role + 'tokenizer: ' if role else ''}{problem}")
        else:
            usable.append(encoded)
            kept.append(index)
    _raise_if_problems(problems, len(dataset), name)
    if not usable:
        raise DataError(f"{name} data: no usable example is left ({dropped} dropped for overlong prompts).")
    if dropped:
        logger.warning("%s data: skipped %d examples with prompts over %d tokens", name, dropped, max_prompt_length)
    features = _features(usable, tokenizer, teacher_tokenizer, pairings)
    if TEACHER_INDEX_COLUMN in dataset.column_names:
        routes = dataset[TEACHER_INDEX_COLUMN]
        features[TEACHER_INDEX_COLUMN] = [routes[index] for index in kept]
    return datasets.Dataset.from_dict(features)


class _Side(NamedTuple):
    prompt: str
    response: str
    example: TokenizedExample


def _tokenize_side(row, fmt, tokenizer, max_prompt_length, max_length) -> tuple[_Side | None, str | None]:
    """One tokenizer's view of a row, or the problem that makes the row unusable ("overlong" for long prompts)."""
    try:
        prompt, response = render_example(row, fmt, tokenizer)
    except DataError as error:
        return None, str(error)
    problem = _text_problem(prompt, response)
    if problem is not None:
        return None, problem
    add_special_tokens = fmt.messages_column is None or not tokenizer.chat_template
    example = tokenize_example(prompt, response, tokenizer, add_special_tokens, max_length)
    return _Side(prompt, response, example), _token_problem(example.response_start, max_prompt_length)


def _features(usable: list[list[_Side]], tokenizer, teacher_tokenizer, pairings) -> dict[str, list]:
    students = [encoded[0].example for encoded in usable]
    features = {"input_ids": [e.ids for e in students], "labels": [_labels(e) for e in students]}
    if teacher_tokenizer is None:
        return features
    teacher_sides, student_sides = [encoded[1] for encoded in usable], [encoded[0] for encoded in usable]
    features["teacher_input_ids"] = [side.example.ids for side in teacher_sides]
    features["teacher_labels"] = [_labels(side.example) for side in teacher_sides]
    features["aligned_pairs"] = eta_pairs(teacher_sides, student_sides, teacher_tokenizer, tokenizer)
    if "mined" in pairings:
        features["mined_pairs"] = [
            mined_pairs(t.example, s.example, teacher_tokenizer, tokenizer) for t, s in zip(teacher_sides, student_sides)
        ]
    return features


def _labels(example: TokenizedExample) -> list[int]:
    return [IGNORE_INDEX] * example.response_start + example.ids[example.response_start :]


def eta_pairs(teachers: list[_Side], students: list[_Side], teacher_tokenizer, student_tokenizer) -> list[list]:
    """Per row, (teacher index, student index) of the kept response tokens that cover the same bytes (ETA); the two
    EOS tokens are paired when both follow the full text.

    Rows whose two prompts are the same text (prompt/response data) are aligned all at once (`align_batch`). Rows
    whose prompts differ (chat templates) are aligned one by one on the response, where a token reaching into the
    prompt covers different text on each side and is not aligned.
    """
    same = [k for k, (teacher, student) in enumerate(zip(teachers, students)) if teacher.prompt == student.prompt]
    together = align_batch(
        [students[k].prompt + students[k].response for k in same],
        *({"input_ids": [side[k].example.text_ids for k in same], "offset_mapping": [side[k].example.offsets for k in same]}
          for side in (teachers, students)),
        teacher_tokenizer, student_tokenizer,
    )
    aligned = dict(zip(same, together))
    return [
        _kept_pairs(
            teacher.example, student.example, teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id,
            *(aligned.get(k) or _response_alignment(teacher, student, teacher_tokenizer, student_tokenizer)),
        )
        for k, (teacher, student) in enumerate(zip(teachers, students))
    ]


def _kept_pairs(teacher: TokenizedExample, student: TokenizedExample, teacher_eos: int, student_eos: int,
                teacher_index: np.ndarray, student_index: np.ndarray) -> list[list[int]]:
    """The pairs of response tokens that survived the cut, plus EOS ↔ EOS when both sequences end with it."""
    keep = (teacher_index >= teacher.response_start) & (student_index >= student.response_start)
    keep &= (teacher_index < len(teacher.ids)) & (student_index < len(student.ids))
    pairs = np.stack([teacher_index[keep], student_index[keep]], axis=1).tolist()
    ends_with_eos = (
        teacher.complete and student.complete and teacher.ids[-1] == teacher_eos and student.ids[-1] == student_eos
    )
    return pairs + [[len(teacher.ids) - 1, len(student.ids) - 1]] if ends_with_eos else pairs


def _response_alignment(teacher: _Side, student: _Side, teacher_tokenizer, student_tokenizer):
    return align_spans(_response_spans(teacher, teacher_tokenizer), _response_spans(student, student_tokenizer))


def _response_spans(side: _Side, tokenizer) -> np.ndarray:
    """Byte spans of the text tokens counted from the response's first byte; -1 for those starting in the prompt."""
    example = side.example
    spans = token_byte_spans(side.prompt + side.response, example.offsets, example.text_ids, tokenizer)
    spans = spans - len(side.prompt.encode())
    spans[spans[:, 0] < 0] = -1
    return spans


def mined_pairs(teacher: TokenizedExample, student: TokenizedExample, teacher_tokenizer, student_tokenizer):
    """MinED: the 1-to-1 steps of the edit-distance warping between the two responses' tokens."""
    teacher_index, student_index = edit_distance_pairs(
        token_pieces(teacher.ids[teacher.response_start :], teacher_tokenizer),
        token_pieces(student.ids[student.response_start :], student_tokenizer),
    )
    return np.stack(
        [teacher_index + teacher.response_start, student_index + student.response_start], axis=1
    ).tolist()


def _text_problem(prompt, response) -> str | None:
    if not isinstance(prompt, str) or not isinstance(response, str):
        return "prompt and response must be text"
    if not response.strip():
        return "the response is empty: drop the row or fill in the response"
    return None


def _token_problem(response_start: int, max_prompt_length: int) -> str | None:
    if response_start < 0:
        return "the response tokenises to nothing"
    if response_start == 0:
        return "the prompt tokenises to nothing: the first response token would have no context"
    if response_start > max_prompt_length:
        return "overlong"
    return None


def _raise_if_problems(problems: list[str], total: int, name: str) -> None:
    if not problems:
        return
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataError(
        f"{name} data: {len(problems)} of {total} rows cannot be used (rows counted from 1): {listed}{more}."
    )


@dataclass
class DistillCollator:
    """Right-pads `input_ids` (pad id) and `labels` (IGNORE_INDEX) to the longest row of the batch.

    Cross-tokenizer rows also carry `teacher_input_ids`/`teacher_labels` (padded with `teacher_pad_token_id`) and
    token pairs (`aligned_pairs`, `mined_pairs`), padded with -1 to [B, K, 2]; rows of a teacher-cached run their
    `cache_index`, rows routed between several teachers their `teacher_index`.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    teacher_pad_token_id: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._pad_tokens(features, "input_ids", "labels", self.pad_token_id)
        if "teacher_input_ids" in features[0]:
            pad = self.pad_token_id if self.teacher_pad_token_id is None else self.teacher_pad_token_id
            teacher = self._pad_tokens(features, "teacher_input_ids", "teacher_labels", pad)
            batch |= {f"teacher_{key}": value for key, value in teacher.items()}
        for key in PAIR_COLUMNS:
            if key in features[0]:
                batch[key] = _pad_pairs([feature[key] for feature in features])
        for column in (CACHE_INDEX_COLUMN, TEACHER_INDEX_COLUMN):
            if column in features[0]:
                batch[column] = torch.tensor([feature[column] for feature in features])
        return batch

    def _pad_tokens(self, features, ids_key: str, labels_key: str, pad_token_id: int) -> dict[str, torch.Tensor]:
        longest = max(len(f[ids_key]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature[ids_key])
            input_ids[row, :length] = torch.as_tensor(feature[ids_key])
            labels[row, :length] = torch.as_tensor(feature[labels_key])
            attention_mask[row, :length] = 1
        labels[:, 0] = IGNORE_INDEX  # nothing predicts the first token; the Trainer's token count must agree
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_pairs(rows: list[list[list[int]]]) -> torch.Tensor:
    longest = max(1, max(len(pairs) for pairs in rows))
    padded = torch.full((len(rows), longest, 2), -1, dtype=torch.long)
    for row, pairs in enumerate(rows):
        if pairs:
            padded[row, : len(pairs)] = torch.as_tensor(pairs, dtype=torch.long).view(-1, 2)
    return padded
