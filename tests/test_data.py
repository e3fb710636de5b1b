"""Data: formats, labels on response tokens only, dynamic padding, and clear errors for unusable rows."""

from __future__ import annotations

import copy

import datasets
import pytest

from llmdistill.data import (
    IGNORE_INDEX,
    DataError,
    DistillCollator,
    ExampleFormat,
    load_raw_dataset,
    prepare_dataset,
    resolve_format,
)
from llmdistill.models import load_tokenizer
from llmdistill.quickstart.tokenizer import train_tokenizer
from llmdistill.vocab import token_bytes

from conftest import SHARED_DATA, needs_shared_data, write_jsonl

PROMPT_OUTPUT = ExampleFormat(prompt_column="prompt", response_column="output")


def prepare(rows, tokenizer, fmt=PROMPT_OUTPUT, **options):
    options = {"max_prompt_length": 64, "max_length": 128} | options
    return prepare_dataset(datasets.Dataset.from_list(rows), tokenizer, fmt, **options)


def test_labels_cover_exactly_the_response_and_eos(tokenizer):
    prompt, response = "### Instruction:\nSort 3, 1\n\n### Response:\n", "1, 3"
    row = prepare([{"prompt": prompt, "output": response}], tokenizer)[0]
    start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert tokenizer.decode(row["input_ids"][:start]) == prompt
    assert row["labels"][start:] == row["input_ids"][start:]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["input_ids"][start:-1]) == response


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["prompt", "output"], ExampleFormat(prompt_column="prompt", response_column="output")),
        (["prompt", "completion"], ExampleFormat(prompt_column="prompt", response_column="completion")),
        (["messages"], ExampleFormat(messages_column="messages")),
    ],
)
def test_formats_are_detected_from_columns(columns, expected):
    assert resolve_format(columns, "prompt", None, "messages") == expected


def test_missing_column_names_the_columns_and_the_fix():
    with pytest.raises(DataError, match="response_column"):
        resolve_format(["prompt", "answer"], "prompt", None, "messages")


def test_messages_use_the_chat_template(tokenizer):
    chat = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    chat.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]
    row = prepare([{"messages": messages}], chat, ExampleFormat(messages_column="messages"))[0]
    start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert chat.decode(row["input_ids"][:start]) == "<user>Reverse: a b\n<assistant>"
    assert chat.decode(row["input_ids"][start:], skip_special_tokens=True) == "b a\n"


def test_messages_without_chat_template_use_a_plain_rendering(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b a"}]
    row = prepare([{"messages": messages}], tokenizer, ExampleFormat(messages_column="messages"))[0]
    start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert tokenizer.decode(row["input_ids"][:start]) == "user: hi\nassistant: "
    assert tokenizer.decode(row["input_ids"][start:], skip_special_tokens=True) == "b a"


@needs_shared_data
def test_a_token_straddling_prompt_and_response_is_learned_not_dropped():
    gpt2 = load_tokenizer(str(SHARED_DATA / "tokenizers" / "gpt2"))
    row = prepare([{"prompt": "Answer: ", "output": "blue sky"}], gpt2)[0]
    start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert gpt2.decode(row["input_ids"][:start]) == "Answer:"  # GPT-2 merges the space into " blue"
    assert gpt2.decode(row["input_ids"][start:-1]) == " blue sky"


def test_empty_response_is_reported_with_its_row(tokenizer):
    rows = [{"prompt": "a\n", "output": "b"}, {"prompt": "c\n", "output": "  "}]
    with pytest.raises(DataError, match="row 2: the response is empty"):
        prepare(rows, tokenizer)


def test_overlong_prompt_stops_or_is_dropped_on_request(tokenizer):
    rows = [{"prompt": "x " * 100 + "\n", "output": "y"}, {"prompt": "a\n", "output": "b"}]
    with pytest.raises(DataError, match="max_prompt_length=64.*drop_overlong_prompts"):
        prepare(rows, tokenizer)
    kept = prepare(rows, tokenizer, drop_overlong_prompts=True)
    assert len(kept) == 1


def test_long_responses_are_cut_to_max_length(tokenizer):
    row = prepare([{"prompt": "a\n", "output": "b c " * 200}], tokenizer)[0]
    assert len(row["input_ids"]) == 128


def test_collator_pads_dynamically(tokenizer):
    rows = prepare([{"prompt": "a\n", "output": "b"}, {"prompt": "sort 3 2 1\n", "output": "1 2 3"}], tokenizer)
    batch = DistillCollator(tokenizer.pad_token_id)([rows[0], rows[1]])
    longest = max(len(rows[0]["input_ids"]), len(rows[1]["input_ids"]))
    assert batch["input_ids"].shape == (2, longest)
    short = len(rows[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (longest - short)
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()


def test_jsonl_file_loads(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "output": "o"}])
    assert load_raw_dataset(str(path))[0] == {"prompt": "p", "output": "o"}


@needs_shared_data
def test_minillm_dolly_file_prepares_with_the_gpt2_tokenizer():
    tokenizer = load_tokenizer(str(SHARED_DATA / "tokenizers" / "gpt2"))
    dataset = load_raw_dataset(str(SHARED_DATA / "datasets" / "minillm-kd-eval" / "dolly" / "valid.jsonl"))
    fmt = resolve_format(dataset.column_names, "prompt", None, "messages")
    prepared = prepare_dataset(dataset.select(range(200)), tokenizer, fmt, 256, 512, drop_overlong_prompts=True)
    assert 150 < len(prepared) <= 200
    assert all(any(label != IGNORE_INDEX for label in row) for row in prepared["labels"])


def test_a_split_of_a_local_file_is_refused_not_ignored(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "output": "o"}])
    with pytest.raises(DataError, match="eval_dataset_name_or_path"):
        load_raw_dataset(str(path), split="test")


def test_collator_never_labels_the_first_position(tokenizer):
    feature = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    assert DistillCollator(tokenizer.pad_token_id)([feature])["labels"][0].tolist() == [IGNORE_INDEX, 6, 7]


@needs_shared_data
def test_a_tokenizer_whose_vocabulary_did_not_load_is_refused(tmp_path):
    """The shared Qwen3 folder holds tokenizer.json.gz only: transformers then builds an empty tokenizer silently."""
    folder = tmp_path / "qwen3"
    folder.mkdir()
    config = SHARED_DATA / "tokenizers" / "qwen3" / "tokenizer_config.json"
    (folder / "tokenizer_config.json").write_bytes(config.read_bytes())
    with pytest.raises(ValueError, match="turns text into no tokens.*tokenizer.json"):
        load_tokenizer(str(folder))


# ---------------------------------------------------------------- cross-tokenizer rows


@pytest.fixture(scope="module")
def sentencepiece(examples):
    return train_tokenizer([e["prompt"] + e["response"] for e in examples], vocab_size=260, family="sentencepiece")


def test_cross_tokenizer_rows_carry_the_teacher_view_and_pairs_of_response_tokens(tokenizer, sentencepiece):
    rows = [{"prompt": "### Instruction:\nSort 3 1 2\n\n### Response:\n", "output": "1 2 3"}]
    row = prepare(rows, sentencepiece, teacher_tokenizer=tokenizer, pairings=("mined",))[0]
    assert row["teacher_input_ids"] == tokenizer(rows[0]["prompt"] + rows[0]["output"])["input_ids"] + [2]
    teacher_text, student_text = token_bytes(tokenizer), token_bytes(sentencepiece)
    assert row["aligned_pairs"] and row["mined_pairs"]
    for teacher_index, student_index in row["aligned_pairs"]:
        assert row["teacher_labels"][teacher_index] != IGNORE_INDEX and row["labels"][student_index] != IGNORE_INDEX
        teacher_id, student_id = row["teacher_input_ids"][teacher_index], row["input_ids"][student_index]
        assert teacher_text[teacher_id] == student_text[student_id] or (teacher_id, student_id) == (2, 2)
    assert row["aligned_pairs"][-1] == [len(row["teacher_input_ids"]) - 1, len(row["input_ids"]) - 1]  # EOS ↔ EOS


def test_a_cut_response_has_no_eos_pair(tokenizer, sentencepiece):
    rows = [{"prompt": "a\n", "output": "b c " * 100}]
    row = prepare(rows, sentencepiece, teacher_tokenizer=tokenizer, max_length=40)[0]
    assert len(row["input_ids"]) == 40 and len(row["teacher_input_ids"]) == 40
    last_pair = row["aligned_pairs"][-1]
    assert row["input_ids"][last_pair[1]] != sentencepiece.eos_token_id


def test_a_row_the_teacher_cannot_use_is_reported_as_the_teachers(tokenizer, sentencepiece):
    rows = [{"prompt": " backwards" * 20 + "\n", "output": "y"}]  # fewer student than teacher tokens
    student_count, teacher_count = (len(side(rows[0]["prompt"])["input_ids"]) for side in (sentencepiece, tokenizer))
    assert teacher_count - student_count > 10
    limit = (student_count + teacher_count) // 2
    with pytest.raises(DataError, match="row 1: the prompt has \\d+ teacher tokens"):
        prepare(rows, sentencepiece, teacher_tokenizer=tokenizer, max_prompt_length=limit, max_length=2 * teacher_count)


def test_collator_pads_the_teacher_view_and_the_pairs(tokenizer, sentencepiece):
    rows = prepare(
        [{"prompt": "a\n", "output": "b"}, {"prompt": "sort 3 2 1\n", "output": "1 2 3"}], sentencepiece,
        teacher_tokenizer=tokenizer,
    )
    batch = DistillCollator(sentencepiece.pad_token_id, teacher_pad_token_id=tokenizer.pad_token_id)([rows[0], rows[1]])
    assert batch["teacher_input_ids"].shape[1] == max(len(r["teacher_input_ids"]) for r in rows)
    pairs = batch["aligned_pairs"]
    assert pairs.shape == (2, max(len(r["aligned_pairs"]) for r in rows), 2)
    short = len(rows[0]["aligned_pairs"])
    assert pairs[0, :short].tolist() == rows[0]["aligned_pairs"] and (pairs[0, short:] == -1).all()


def test_rows_rendered_differently_by_each_chat_template_align_on_the_response(tokenizer, sentencepiece):
    teacher = copy.deepcopy(tokenizer)
    teacher.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    response = "Write these letters backwards"
    rows = [{"messages": [{"role": "user", "content": "Sort 3 1 2"}, {"role": "assistant", "content": response}]}]
    row = prepare(rows, sentencepiece, ExampleFormat(messages_column="messages"), teacher_tokenizer=teacher)[0]
    teacher_text, student_text = token_bytes(teacher), token_bytes(sentencepiece)
    text_pairs = row["aligned_pairs"][:-1]
    assert text_pairs and row["aligned_pairs"][-1] == [len(row["teacher_input_ids"]) - 1, len(row["input_ids"]) - 1]
    covered = b"".join(student_text[row["input_ids"][i]] for _, i in text_pairs)
    assert set(covered) <= set(response.encode())  # only response bytes: nothing reaching into either prompt
    for j, i in text_pairs:
        assert teacher_text[row["teacher_input_ids"][j]] == student_text[row["input_ids"][i]]
