import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from llmdistill.quickstart.task import (
    OPEN_ENDED, PROMPT_TEMPLATE, SUBTASKS, is_correct, is_held_out, make_examples, make_splits, make_training_rows,
)
from llmdistill.quickstart.tokenizer import train_tokenizer

PROMPT_PREFIX, PROMPT_SUFFIX = PROMPT_TEMPLATE.split("{instruction}")


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=0)


@pytest.fixture(scope="module")
def all_texts(splits):
    train, held_out = splits
    return [example["prompt"] + example["response"] for example in train + held_out]


@pytest.fixture(scope="module")
def tokenizer(all_texts):
    return train_tokenizer(all_texts, vocab_size=512)


def instruction_of(example):
    return example["prompt"].removeprefix(PROMPT_PREFIX).removesuffix(PROMPT_SUFFIX)


def listed_after_colon(instruction):
    return instruction.rsplit(": ", 1)[1].rstrip("?")


# --- task data ---------------------------------------------------------------


def test_make_examples_is_deterministic_in_seed():
    assert make_examples(200, seed=3) == make_examples(200, seed=3)
    assert make_examples(200, seed=3) != make_examples(200, seed=4)


def test_make_examples_balances_and_restricts_subtasks():
    counts = Counter(example["task"] for example in make_examples(10 * len(SUBTASKS), seed=0))
    assert counts == {name: 10 for name in SUBTASKS}
    assert {example["task"] for example in make_examples(20, seed=0, subtasks=["copy", "count"])} == {"copy", "count"}
    with pytest.raises(ValueError):
        make_examples(5, seed=0, subtasks=["translate"])


def test_make_splits_is_deterministic_in_seed(splits):
    assert make_splits(seed=0) == splits
    assert make_splits(seed=1) != splits


def test_make_splits_sizes_and_prompt_uniqueness(splits):
    train, held_out = splits
    assert (len(train), len(held_out)) == (2000, 200)
    train_prompts = {example["prompt"] for example in train}
    assert len(train_prompts) == len(train)
    assert not train_prompts & {example["prompt"] for example in held_out}


def test_eval_prompts_come_from_the_held_out_share_only(splits):
    train, held_out = splits
    assert all(is_held_out(example["prompt"]) for example in held_out)
    assert not any(is_held_out(example["prompt"]) for example in train + make_training_rows(7, 500))
    share = sum(map(is_held_out, (example["prompt"] for example in make_examples(2000, seed=5)))) / 2000
    assert 0.07 < share < 0.13


def test_teacher_rows_take_the_subtasks_in_turn_with_prompts_repeating():
    rows = make_training_rows(3, 1200, distinct=False)
    counts = Counter(row["task"] for row in rows)
    assert set(counts) == set(SUBTASKS) and max(counts.values()) < 1.2 * min(counts.values())
    assert len({row["prompt"] for row in rows}) < len(rows)
    assert not any(is_held_out(row["prompt"]) for row in rows)


def test_eval_split_does_not_depend_on_train_size(splits):
    assert make_splits(seed=0, n_train=50)[1] == splits[1]


def test_every_subtask_in_both_splits(splits):
    for examples in splits:
        assert {example["task"] for example in examples} == set(SUBTASKS)
    assert len(SUBTASKS) >= 5


def test_prompt_and_response_format(splits):
    for example in splits[0] + splits[1]:
        assert example["prompt"].startswith(PROMPT_PREFIX)
        assert example["prompt"].endswith(PROMPT_SUFFIX)
        assert example["response"] and example["response"] == example["response"].strip()


def test_response_lengths_span_short_and_long(splits):
    lengths = [len(example["response"]) for example in splits[0]]
    assert sum(length <= 10 for length in lengths) > 100
    assert sum(length >= 60 for length in lengths) > 100
    assert max(lengths) <= 160


def expected_response(example):
    instruction = instruction_of(example)
    numbers = [int(number) for number in re.findall(r"\d+", instruction)]
    task = example["task"]
    if task == "count":
        return ", ".join(map(str, range(numbers[0], numbers[1] + 1)))
    if task == "multiples":
        base, n = (numbers[0], numbers[1]) if instruction.startswith("Count by") else (numbers[1], numbers[0])
        return ", ".join(str(base * k) for k in range(1, n + 1))
    if task == "reverse":
        return " ".join(reversed(listed_after_colon(instruction).split()))
    if task == "copy":
        return listed_after_colon(instruction)
    if task == "spell":
        return ", ".join(" ".join(word) for word in listed_after_colon(instruction).split())
    if task == "next":
        return str(numbers[0] + (1 if re.search("after|follows", instruction) else -1))
    raise AssertionError(f"no checker for {task}")


def right_answer(example, response):
    """An open-ended response checked from scratch: `between` wants n distinct increasing numbers in [low, high],
    `choose` n of the offered words in their order."""
    instruction = instruction_of(example)
    numbers = [int(number) for number in re.findall(r"\d+", instruction)]
    if example["task"] == "between":
        values = [int(part) for part in response.split(", ")] if re.fullmatch(r"\d+(, \d+)*", response) else []
        return len(values) == numbers[0] and all(numbers[1] <= a < b <= numbers[2] for a, b in zip(values, values[1:]))
    offered, words = listed_after_colon(instruction).split(), response.split(" ")
    it = iter(offered)
    return len(words) == numbers[0] and all(word in it for word in words)  # a subsequence of the offered words


def test_held_out_responses_follow_their_rule(splits):
    for example in splits[1]:
        if example["task"] in OPEN_ENDED:
            assert right_answer(example, example["response"]) and is_correct(example, example["response"]), example
        else:
            assert example["response"] == expected_response(example), example


@pytest.mark.parametrize("task", OPEN_ENDED)
def test_open_ended_answers_are_judged_by_their_rule_not_the_reference(splits, task):
    examples = [example for example in splits[0] + splits[1] if example["task"] == task]
    assert len({example["response"] for example in examples}) > 0.7 * len(examples)  # the answers vary
    for example in examples[:200]:
        reference = example["response"]
        candidates = [reference, reference + " x", reference[: reference.rfind(" ")].rstrip(","),
                      " ".join(reversed(reference.split(" "))), reference.replace("1", "7"), "", "cat"]
        for candidate in candidates:
            assert is_correct(example, candidate) == right_answer(example, candidate), (example, candidate)


def test_the_deterministic_subtasks_are_judged_by_exact_match(splits):
    for example in splits[1]:
        if example["task"] not in OPEN_ENDED:
            assert is_correct(example, f" {example['response']}\n") and not is_correct(example, example["response"] + "1")


def test_a_fifth_of_training_responses_carry_one_typo(splits):
    clean = make_training_rows(0, 2000, typo_rate=0.0)
    assert [row["prompt"] for row in clean] == [row["prompt"] for row in splits[0]]
    with_typo = 0
    for example, original in zip(splits[0], clean):
        if example["task"] not in OPEN_ENDED:
            assert original["response"] == expected_response(original), original
        differing = [(got, want) for got, want in zip(example["response"], original["response"]) if got != want]
        assert len(example["response"]) == len(original["response"]) and len(differing) <= 1, example
        if differing:
            (got, want), = differing
            assert got.isdigit() == want.isdigit() and got.isalnum()
            with_typo += 1
    assert 0.17 < with_typo / len(splits[0]) < 0.23


def test_rows_can_be_restricted_to_some_subtasks():
    rows = make_training_rows(5, 300, subtasks=("count", "copy"))
    assert {row["task"] for row in rows} == {"count", "copy"}
    assert {row["task"] for row in make_training_rows(5, 300, distinct=False, subtasks=("next",))} == {"next"}


# --- tokenizer -----------------------------------------------------------------


def test_tokenizer_training_is_deterministic(all_texts, tokenizer):
    retrained = train_tokenizer(iter(all_texts), vocab_size=512)
    assert retrained.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_special_tokens_and_defaults(tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<bos>", "<eos>")
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 512
    batch = tokenizer(["ab", "ab cd ef"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id


def test_encode_adds_no_special_tokens(tokenizer, all_texts):
    special_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    for ids in tokenizer(all_texts[:200])["input_ids"]:
        assert not special_ids & set(ids)


def test_round_trip(tokenizer, all_texts):
    for text, ids in zip(all_texts, tokenizer(all_texts)["input_ids"]):
        assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.tokenize("12 + 345 = 357\nAnswer: 2024")
    assert [token for token in tokens if any(char.isdigit() for char in token)] == list("12345357") + list("2024")


def test_offsets_are_exact_character_spans(tokenizer, all_texts):
    for text in all_texts[:100]:
        encoding = tokenizer(text, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
        assert all(previous[1] == current[0] for previous, current in zip(offsets, offsets[1:]))
        for token_id, (start, end) in zip(encoding["input_ids"], offsets):
            assert text[start:end] == tokenizer.decode([token_id])


def test_save_and_reload_is_identical(tokenizer, all_texts, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.special_tokens_map == tokenizer.special_tokens_map
    assert (reloaded.padding_side, reloaded.model_max_length) == ("right", 512)
    sample = all_texts[:50]
    assert reloaded(sample, return_offsets_mapping=True) == tokenizer(sample, return_offsets_mapping=True)


def test_long_responses_take_at_least_64_tokens(tokenizer, splits):
    token_counts = [len(ids) for ids in tokenizer([example["response"] for example in splits[1]])["input_ids"]]
    assert max(token_counts) <= 150
    assert sum(count >= 64 for count in token_counts) >= 10


def test_a_word_is_the_same_token_at_the_start_and_after_a_space(tokenizer):
    """Copying a word from the prompt into the response is then exact token copying."""
    first, space, second = tokenizer("door door")["input_ids"]
    assert first == second and tokenizer.decode([space]) == " "


def test_sentencepiece_style_tokenizer_training_is_deterministic():
    texts = [e["prompt"] + e["response"] for e in make_examples(200, seed=3)]
    first, second = (train_tokenizer(texts, vocab_size=300, family="sentencepiece") for _ in range(2))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
