"""Synthetic instruction-following task for the offline quickstart demo.

Every sub-task is deterministic and rule-based over small alphabets and small numbers, built from what a small
transformer learns well (copying from the prompt, reversing, counting on, recalling a spelling), so that a teacher
of under a million parameters masters it while a briefly trained student does not. Responses range from one token
(``next``) to ~120 (``count``, ``multiples``), so that the quality of long generations shows up in the evaluation.
Training responses carry the occasional typo (:data:`TYPO_RATE`); held-out references never do.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable, Iterator, Sequence

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"

WORDS = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "red", "blue", "green",
    "big", "small", "fast", "slow", "cold", "warm", "rain", "snow", "wind", "star",
    "lake", "hill", "road", "book", "lamp", "door", "milk", "bread", "apple", "river",
    "stone", "cloud", "horse", "mouse", "runs", "jumps", "sings", "reads", "sleeps", "the",
)

InstructionGenerator = Callable[[random.Random], tuple[str, str]]


def _count(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(1, 80)
    end = start + rng.randint(2, 29)
    phrasing = rng.choice(("Count from {} to {}.", "List the numbers from {} to {}.", "Write every number from {} to {}."))
    return phrasing.format(start, end), ", ".join(map(str, range(start, end + 1)))


def _multiples(rng: random.Random) -> tuple[str, str]:
    base, n = rng.randint(2, 9), rng.randint(3, 15)
    phrasing = rng.choice((
        "List the first {n} multiples of {base}.", "Write {n} multiples of {base}, starting at {base}.",
        "Count by {base}s, {n} numbers.",
    ))
    return phrasing.format(n=n, base=base), ", ".join(str(base * k) for k in range(1, n + 1))


def _reverse(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        # Space-separated letters tokenize one letter per token, which keeps reversal learnable.
        items = rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))
        phrasing = rng.choice(("Reverse the letters: {}", "Write these letters backwards: {}"))
    else:
        items = rng.choices(WORDS, k=rng.randint(2, 5))
        phrasing = rng.choice(("Reverse the order of these words: {}", "Write these words backwards: {}"))
    return phrasing.format(" ".join(items)), " ".join(reversed(items))


def _copy(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))
    phrasing = rng.choice(("Repeat after me: {}", "Copy this exactly: {}", "Say it back: {}"))
    return phrasing.format(text), text


def _spell(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(1, 3))
    phrasing = rng.choice(("Spell: {}", "Spell out each word: {}", "Write the letters of: {}"))
    return phrasing.format(" ".join(words)), ", ".join(" ".join(word) for word in words)


def _next(rng: random.Random) -> tuple[str, str]:
    number = rng.randint(1, 98)
    if rng.random() < 0.5:
        phrasing, answer = rng.choice(("What comes after {}?", "What number follows {}?")), number + 1
    else:
        phrasing, answer = rng.choice(("What comes before {}?", "What number precedes {}?")), number - 1
    return phrasing.format(number), str(answer)


def _between(rng: random.Random) -> tuple[str, str]:
    low, n = rng.randint(1, 70), rng.randint(2, 5)
    high = low + rng.randint(9, 29)
    phrasing = rng.choice((
        "Name {n} numbers between {low} and {high}, smallest first.",
        "Pick {n} numbers from {low} to {high}, in increasing order.",
    ))
    chosen = sorted(rng.sample(range(low, high + 1), n))
    return phrasing.format(n=n, low=low, high=high), ", ".join(map(str, chosen))


def _choose(rng: random.Random) -> tuple[str, str]:
    offered = rng.sample(WORDS, rng.randint(4, 7))
    n = rng.randint(1, len(offered) - 2)
    phrasing = rng.choice(("Choose {n} of these words: {words}", "Keep any {n} of these words, in order: {words}"))
    chosen = sorted(rng.sample(range(len(offered)), n))
    return phrasing.format(n=n, words=" ".join(offered)), " ".join(offered[index] for index in chosen)


_GENERATORS: dict[str, InstructionGenerator] = {
    "count": _count,
    "multiples": _multiples,
    "reverse": _reverse,
    "copy": _copy,
    "spell": _spell,
    "next": _next,
    "between": _between,
    "choose": _choose,
}

SUBTASKS: tuple[str, ...] = tuple(_GENERATORS)
# Sub-tasks with many right answers: the reference is one of them, drawn at random, so a teacher's next-token
# distribution carries what a single reference does not (every answer still allowed at each step).
OPEN_ENDED: tuple[str, ...] = ("between", "choose")


def is_correct(example: dict, response: str) -> bool:
    """Whether `response` answers `example`'s prompt: equal to the reference (stripped), or, for an open-ended
    sub-task, any of its right answers."""
    if example["task"] == "between":
        n, low, high = map(int, re.findall(r"\d+", _instruction(example["prompt"])))
        numbers = response.strip().split(", ")
        if not all(number.isdigit() for number in numbers):
            return False
        values = [int(number) for number in numbers]
        return len(values) == n and values == sorted(set(values)) and low <= values[0] and values[-1] <= high
    if example["task"] == "choose":
        instruction = _instruction(example["prompt"])
        n, offered = int(re.findall(r"\d+", instruction)[0]), instruction.rsplit(": ", 1)[1].split()
        words = response.strip().split(" ")
        positions = [offered.index(word) for word in words if word in offered]
        return len(words) == n and len(positions) == n and positions == sorted(set(positions))
    return response.strip() == example["response"].strip()


def _instruction(prompt: str) -> str:
    prefix, suffix = PROMPT_TEMPLATE.split("{instruction}")
    return prompt.removeprefix(prefix).removesuffix(suffix)


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


def make_splits(seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> tuple[list[dict], list[dict]]:
    """Train and held-out eval examples with pairwise distinct prompts, the eval prompts from the held-out share
    (:func:`is_held_out`) and the training prompts from the rest.

    Each split is drawn from its own filtered stream, so the eval set depends only on ``seed`` and ``n_eval``. The
    eval set takes the sub-tasks in turn (counts differ by at most one), so that even a few rows cover them all.
    """
    return make_training_rows(seed, n_train), _unique(seed, n_eval, held_out=True, in_turn=True)


TYPO_RATE = 0.2  # share of training responses with one wrong character, as written by a careless annotator


def make_training_rows(
    seed: int, n: int, typo_rate: float = TYPO_RATE, distinct: bool = True, subtasks: Sequence[str] | None = None
) -> list[dict]:
    """``n`` examples, none from the held-out share, with pairwise distinct prompts (with `distinct`: sub-tasks with
    few prompts, like ``multiples``, then run out and the others fill in) or the sub-tasks in turn, prompts
    repeating. A `typo_rate` share of the responses carry one wrong character (a digit for a digit, a letter for a
    letter), drawn from their own seed. Held-out references are always correct. `subtasks` restricts the rows to
    some sub-tasks (default: all)."""
    if distinct:
        rows = _unique(seed, n, held_out=False, in_turn=False, subtasks=subtasks)
    else:
        stream = (example for example in _example_stream(seed, subtasks) if not is_held_out(example["prompt"]))
        rows = [next(stream) for _ in range(n)]
    rng = random.Random(f"typos-{seed}")
    return [row | {"response": _with_typo(row["response"], rng)} if rng.random() < typo_rate else row for row in rows]


def _with_typo(response: str, rng: random.Random) -> str:
    position = rng.choice([index for index, char in enumerate(response) if char.isalnum()])
    alphabet = string.digits if response[position].isdigit() else string.ascii_lowercase
    wrong = rng.choice(alphabet.replace(response[position], ""))
    return response[:position] + wrong + response[position + 1:]


def _unique(seed: int, n: int, held_out: bool, in_turn: bool, subtasks: Sequence[str] | None = None) -> list[dict]:
    seen_prompts: set[str] = set()
    unique: list[dict] = []
    stream = _example_stream(seed, subtasks)
    while len(unique) < n:
        example = next(stream)
        if in_turn and example["task"] != SUBTASKS[len(unique) % len(SUBTASKS)]:
            continue
        if example["prompt"] not in seen_prompts and is_held_out(example["prompt"]) == held_out:
            seen_prompts.add(example["prompt"])
            unique.append(example)
    return unique
