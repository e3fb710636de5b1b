"""Training data: load, render prompt/response text, tokenise with labels on response tokens only, pad batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
RESPONSE_COLUMNS = ("output", "completion", "response")
PLAIN_CHAT_SUFFIX = "assistant: "
MAX_LISTED_PROBLEMS = 5

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot be trained on as given; the message says which rows and how to fix them."""


@dataclass(frozen=True)
class ExampleFormat:
    """Where the text is: `messages` (chat turns) or a prompt column plus a response column."""

    messages_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None


def load_raw_dataset(name_or_path: str, split: str = "train", config_name: str | None = None) -> datasets.Dataset:
    """A JSONL/JSON file, a folder written by `Dataset.save_to_disk`, or a hub dataset name."""
    path = Path(name_or_path)
    if path.exists() and split != "train":
        raise DataError(
            f"split {split!r} cannot be taken from the local dataset {path}: a file or saved folder is one split. "
            "Give the evaluation data its own file (eval_dataset_name_or_path)."
        )
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise DataError(f"dataset file {path} must be .jsonl or .json.")
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset(name_or_path, config_name, split=split)


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


def tokenize_example(
    prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool, max_length: int
) -> tuple[list[int], int]:
    """Token ids of prompt + response + EOS (cut to max_length) and the index of the first response token.

    The whole text is tokenised at once; the first response token is the first one that covers any response
    character, so a token merging the prompt's trailing space with the response's first word (" b") is learned,
    not lost. Returns a response start of -1 when no token covers the response.
    """
    encoding = tokenizer(
        prompt + response, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False
    )
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    response_start = next(
        (i for i, (_, end) in enumerate(offsets) if end > len(prompt)), -1
    )
    if response_start >= 0 and ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    return ids[:max_length], response_start


def prepare_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    fmt: ExampleFormat,
    max_prompt_length: int,
    max_length: int,
    drop_overlong_prompts: bool = False,
    name: str = "train",
) -> datasets.Dataset:
    """Tokenise every row to `input_ids` and `labels` (IGNORE_INDEX on the prompt); stop on any unusable row."""
    add_special_tokens = fmt.messages_column is None or not tokenizer.chat_template
    rows, problems, dropped = {"input_ids": [], "labels": []}, [], 0
    for index, row in enumerate(dataset):
        try:
            prompt, response = render_example(row, fmt, tokenizer)
        except DataError as error:
            problems.append(f"row {index}: {error}")
            continue
        problem = _text_problem(prompt, response)
        if problem is None:
            ids, response_start = tokenize_example(prompt, response, tokenizer, add_special_tokens, max_length)
            problem = _token_problem(response_start, max_prompt_length)
        if problem == "overlong" and drop_overlong_prompts:
            dropped += 1
        elif problem == "overlong":
            problems.append(
                f"row {index}: the prompt has {response_start} tokens, more than max_prompt_length="
                f"{max_prompt_length} (raise max_prompt_length, or set drop_overlong_prompts=True to skip such rows)"
            )
        elif problem:
            problems.append(f"row {index}: {problem}")
        else:
            rows["input_ids"].append(ids)
            rows["labels"].append([IGNORE_INDEX] * response_start + ids[response_start:])
    _raise_if_problems(problems, len(dataset), name)
    if not rows["input_ids"]:
        raise DataError(f"{name} data: no usable example is left ({dropped} dropped for overlong prompts).")
    if dropped:
        logger.warning("%s data: skipped %d examples with prompts over %d tokens", name, dropped, max_prompt_length)
    return datasets.Dataset.from_dict(rows)


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
    listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise DataError(f"{name} data: {len(problems)} of {total} examples cannot be used:\n  {listed}{more}")


@dataclass
class DistillCollator:
    """Right-pads `input_ids` (pad id) and `labels` (IGNORE_INDEX) to the longest row of the batch."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"])
            labels[row, :length] = torch.as_tensor(feature["labels"])
            attention_mask[row, :length] = 1
        labels[:, 0] = IGNORE_INDEX  # nothing predicts the first token; the Trainer's token count must agree
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
