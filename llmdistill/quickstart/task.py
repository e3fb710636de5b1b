"""Synthetic instruction-following task for the offline quickstart demo.

Every sub-task is deterministic and rule-based over small alphabets and small
numbers, so a tiny transformer can learn it from a couple of thousand examples.
Response lengths range from one token (``lookup``, ``count``) to ~125 tokens
(``arithmetic``, written out step by step), so that the quality of long
generations shows up in the evaluation.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Iterator, Sequence

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"

WORDS = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "red", "blue", "green",
    "big", "small", "fast", "slow", "cold", "warm", "rain", "snow", "wind", "star",
    "lake", "hill", "road", "book", "lamp", "door", "milk", "bread", "apple", "river",
    "stone", "cloud", "horse", "mouse", "runs", "jumps", "sings", "reads", "sleeps", "the",
)

MAX_TOTAL = 99  # running totals stay two-digit so each step is small-number arithmetic

InstructionGenerator = Callable[[random.Random], tuple[str, str]]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    total = rng.randint(1, 30)
    expression = [str(total)]
    steps = []
    for _ in range(rng.randint(2, 10)):
        operand = rng.randint(1, 9)
        if total + operand > MAX_TOTAL or (total >= operand and rng.random() < 0.5):
            operator, result = "-", total - operand
        else:
            operator, result = "+", total + operand
        expression.append(f"{operator} {operand}")
        steps.append(f"{total} {operator} {operand} = {result}")
        total = result
    phrasing = rng.choice((
        "Compute step by step: {}",
        "Work out {} one step at a time.",
        "Evaluate step by step: {}",
    ))
    return phrasing.format(" ".join(expression)), "\n".join(steps + [f"Answer: {total}"])


def _reverse(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        # Space-separated letters tokenize one letter per token, which keeps reversal learnable.
        items = rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))
        phrasing = rng.choice(("Reverse the letters: {}", "Write these letters backwards: {}"))
    else:
        items = rng.choices(WORDS, k=rng.randint(2, 5))
        phrasing = rng.choice(("Reverse the order of these words: {}", "Write these words backwards: {}"))
    return phrasing.format(" ".join(items)), " ".join(reversed(items))


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    phrasing = rng.choice((
        "Sort in ascending order: {}",
        "Sort these numbers from smallest to largest: {}",
        "Put in increasing order: {}",
    ))
    listed = ", ".join(map(str, numbers))
    return phrasing.format(listed), ", ".join(map(str, sorted(numbers)))


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample("abcdefgh", rng.randint(3, 6))
    values = {key: rng.randint(0, 99) for key in keys}
    table = ", ".join(f"{key}={value}" for key, value in values.items())
    query = rng.choice(keys)
    phrasing = rng.choice((
        "Given {table}, what is {query}?",
        "Look up {query} in: {table}",
        "{table}\nReturn the value of {query}.",
    ))
    return phrasing.format(table=table, query=query), str(values[query])


def _count(rng: random.Random) -> tuple[str, str]:
    letters = rng.choices("abc", k=rng.randint(4, 9))
    target = rng.choice("abc")
    phrasing = rng.choice((
        "How many times does {target} appear in: {letters}?",
        "Count the letter {target} in: {letters}",
    ))
    instruction = phrasing.format(target=target, letters=" ".join(letters))
    return instruction, str(letters.count(target))


def _repeat(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    times = rng.randint(2, 6)
    phrasing = rng.choice((
        "Repeat the word {word} {times} times.",
        "Write {word} {times} times.",
        "Say {word} exactly {times} times.",
    ))
    return phrasing.format(word=word, times=times), " ".join([word] * times)


def _uppercase(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.choices(WORDS, k=rng.randint(3, 35)))
    phrasing = rng.choice(("Convert to uppercase: {}", "Write in capital letters: {}"))
    return phrasing.format(text), text.upper()


_GENERATORS: dict[str, InstructionGenerator] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "lookup": _lookup,
    "count": _count,
    "repeat": _repeat,
    "uppercase": _uppercase,
}

SUBTASKS: tuple[str, ...] = tuple(_GENERATORS)


def _resolve_subtasks(subtasks: Sequence[str] | None) -> tuple[str, ...]:
    if subtasks is None:
        return SUBTASKS
    if not subtasks or any(name not in _GENERATORS for name in subtasks):
        raise ValueError(f"subtasks must be a non-empty selection of {SUBTASKS}, got {list(subtasks)}")
    return tuple(subtasks)


def _example_stream(seed: int, subtasks: Sequence[str] | None) -> Iterator[dict]:
    """Endless examples, cycling through the sub-tasks so each gets an equal share."""
    rng = random.Random(seed)
    names = _resolve_subtasks(subtasks)
    while True:
        for name in names:
            instruction, response = _GENERATORS[name](rng)
            yield {
                "prompt": PROMPT_TEMPLATE.format(instruction=instruction),
                "response": response,
                "task": name,
            }


def make_examples(n: int, seed: int, subtasks: Sequence[str] | None = None) -> list[dict]:
    """``n`` examples ``{"prompt", "response", "task"}``, deterministic from ``seed``.

    Sub-tasks are taken in turn, so counts per sub-task differ by at most one.
    Prompts may repeat; use :func:`make_splits` for de-duplicated data.
    """
    stream = _example_stream(seed, subtasks)
    return [next(stream) for _ in range(n)]


HELD_OUT_SHARE = 10  # one prompt in 10 is reserved for evaluation, for every seed


def is_held_out(prompt: str) -> bool:
    """Whether `prompt` belongs to the evaluation share of the prompt space, which no training split ever draws
    from; the embedded teacher was trained on the rest, so every quickstart seed evaluates on prompts it never saw."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % HELD_OUT_SHARE == 0


def make_splits(seed: int = 0, n_train: int = 2000, n_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """Train and held-out eval examples with pairwise distinct prompts, the eval prompts from the held-out share
    (:func:`is_held_out`) and the training prompts from the rest.

    Each split is drawn from its own filtered stream, so the eval set depends only on ``seed`` and ``n_eval``. The
    eval set takes the sub-tasks in turn (counts differ by at most one), so that even a few rows cover them all.
    """
    return make_training_rows(seed, n_train), _unique(seed, n_eval, held_out=True, in_turn=True)


def make_training_rows(seed: int, n: int) -> list[dict]:
    """``n`` examples with pairwise distinct prompts, none from the held-out share."""
    return _unique(seed, n, held_out=False, in_turn=False)


def _unique(seed: int, n: int, held_out: bool, in_turn: bool) -> list[dict]:
    seen_prompts: set[str] = set()
    unique: list[dict] = []
    stream = _example_stream(seed, None)
    while len(unique) < n:
        example = next(stream)
        if in_turn and example["task"] != SUBTASKS[len(unique) % len(SUBTASKS)]:
            continue
        if example["prompt"] not in seen_prompts and is_held_out(example["prompt"]) == held_out:
            seen_prompts.add(example["prompt"])
            unique.append(example)
    return unique
