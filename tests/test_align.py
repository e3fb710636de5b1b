"""Exact Token Alignment on five real tokenizer families, checked against spans laid out independently from each
token's own bytes; MinED's warping pairs against a plain dynamic-programming reference."""

from __future__ import annotations

import itertools
import json
import random
import time

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from llmdistill.align import (
    align_batch,
    align_spans,
    align_texts,
    alignment_summary,
    render_alignment,
    token_byte_spans,
    token_pieces,
)
from llmdistill.edit_distance import edit_distance_pairs, edit_distances
from llmdistill.vocab import token_bytes

from conftest import REAL_TOKENIZER_FAMILIES, SHARED_DATA

PAIRS = list(itertools.combinations(REAL_TOKENIZER_FAMILIES, 2))
TEXTS_PER_DATASET = 20
HARD_START = (  # emoji, non-ASCII, newlines, a tab, digits, a GSM8K calculator annotation and answer line
    "😀 Ünïcödé — “quotes” naïve café 日本語 ✓\n\n\t3 + 48/2 = <<48/2=24>>24\n  $1,234.56\n#### 18\n"
)
PLAIN_TAIL = (
    "The committee reviewed the proposal carefully and decided that the new library should open next spring, "
    "with longer hours on weekends and a small garden near the entrance."
)
CRAFTED = [
    HARD_START + PLAIN_TAIL,
    "a\n \nb and\n \n\n  c",  # GPT-NeoX trims the trailing space off "\n "'s end offset
    "3 apples",  # Llama: "▁" and "3" share the end of "3"
    "😀 first, then 😀😀",
    " leading space",
    "  two leading spaces and trailing  ",
    "Tabs\tand\r\nCRLF\r\n",
    "x",
    "\n",
]


def read_jsonl(path, count):
    with open(path) as lines:
        return [json.loads(line) for line in itertools.islice(lines, count)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    datasets = SHARED_DATA / "datasets"
    if not datasets.is_dir():
        pytest.skip("../shared/data (datasets) is not beside the checkout")
    gsm8k = [row["answer"] for row in read_jsonl(datasets / "gsm8k" / "test.jsonl", TEXTS_PER_DATASET)]
    dolly = [
        "\n".join(part for part in (row["instruction"], row["input"], row["output"]) if part)
        for row in read_jsonl(datasets / "minillm-kd-eval" / "dolly" / "valid.jsonl", TEXTS_PER_DATASET)
    ]
    self_instruct = [
        "\n".join(part for part in (row["instruction"], instance["input"], instance["output"]) if part)
        for row in read_jsonl(datasets / "self-instruct" / "user_oriented_instructions.jsonl", TEXTS_PER_DATASET)
        for instance in row["instances"][:1]
    ]
    return gsm8k + dolly + self_instruct + CRAFTED


@pytest.fixture(scope="module")
def byte_tables(real_tokenizers) -> dict:
    """vocab.token_bytes of each family, by tokenizer (it serialises the tokenizer on every call)."""
    return {id(tokenizer): token_bytes(tokenizer) for tokenizer in real_tokenizers.values()}


def own_bytes(text: str, ids: list[int], table: list[bytes | None]) -> list[bytes | None]:
    """Each token's bytes from vocab.token_bytes (None: special token), the dummy-prefix space taken off the first.

    Laid end to end they must be the text itself, which makes them an independent source of every token's span.
    """
    pieces = [table[i] for i in ids]
    laid = b"".join(piece for piece in pieces if piece is not None)
    if laid != text.encode():
        assert laid == b" " + text.encode(), "the tokens' bytes do not reproduce the text"
        first = next(k for k, piece in enumerate(pieces) if piece is not None)
        pieces[first] = pieces[first][1:]
    return pieces


def laid_spans(pieces: list[bytes | None]) -> list[tuple[int, int] | None]:
    spans, position = [], 0
    for piece in pieces:
        spans.append((position, position + len(piece)) if piece else None)
        position += len(piece or b"")
    return spans


def aligned_pairs_with_bytes(text, teacher, student, byte_tables):
    alignment = align_texts(text, teacher, student)
    teacher_bytes = own_bytes(text, alignment.teacher_ids, byte_tables[id(teacher)])
    return alignment, teacher_bytes, own_bytes(text, alignment.student_ids, byte_tables[id(student)])


@pytest.mark.parametrize("families", PAIRS, ids=["-".join(pair) for pair in PAIRS])
def test_aligned_tokens_are_the_same_bytes_after_the_same_prefix(real_tokenizers, byte_tables, texts, families):
    teacher, student = (real_tokenizers[family] for family in families)
    pairs = students = 0
    for text in texts:
        alignment, teacher_bytes, student_bytes = aligned_pairs_with_bytes(text, teacher, student, byte_tables)
        for j, i in alignment.pairs:
            assert teacher_bytes[j] and teacher_bytes[j] == student_bytes[i], (text, j, i)
            teacher_prefix = b"".join(piece or b"" for piece in teacher_bytes[:j])
            assert teacher_prefix == b"".join(piece or b"" for piece in student_bytes[:i]), (text, j, i)
        pairs, students = pairs + len(alignment.pairs), students + alignment.student_alignable
    print(f"{families[0]} → {families[1]}: aligned fraction {pairs / students:.3f} of {students} student tokens")


@pytest.mark.parametrize("families", PAIRS, ids=["-".join(pair) for pair in PAIRS])
def test_every_span_both_tokenisations_share_is_aligned(real_tokenizers, byte_tables, texts, families):
    teacher, student = (real_tokenizers[family] for family in families)
    for text in texts:
        alignment, teacher_bytes, student_bytes = aligned_pairs_with_bytes(text, teacher, student, byte_tables)
        teacher_spans, student_spans = laid_spans(teacher_bytes), laid_spans(student_bytes)
        shared = (set(teacher_spans) & set(student_spans)) - {None}
        assert {teacher_spans[j] for j, _ in alignment.pairs} == shared, text
        assert {student_spans[i] for _, i in alignment.pairs} == shared, text


@pytest.mark.parametrize("families", PAIRS, ids=["-".join(pair) for pair in PAIRS])
def test_aligning_a_batch_at_once_equals_aligning_each_text(real_tokenizers, texts, families):
    """align_batch takes running byte sums where a tokenizer keeps the text, offsets elsewhere: same pairs."""
    teacher, student = (real_tokenizers[family] for family in families)
    batch = [*texts, "", "3 apples", "e\u0301 composed", "  two leading spaces", "😀\n\n x", "<|endoftext|> x"]
    encoded = [
        side(batch, add_special_tokens=False, return_offsets_mapping=True) for side in (teacher, student)
    ]
    as_lists = align_batch(batch, *encoded, teacher, student)
    padded = [
        side(batch, add_special_tokens=False, return_offsets_mapping=True, return_tensors="np", padding=True)
        for side in (teacher, student)
    ]
    as_arrays = align_batch(batch, *padded, teacher, student)
    for k, text in enumerate(batch):
        alone = align_spans(*(
            token_byte_spans(text, side["offset_mapping"][k], side["input_ids"][k], tokenizer)
            for side, tokenizer in zip(encoded, (teacher, student))
        ))
        expected = [a.tolist() for a in alone]
        assert [a.tolist() for a in as_lists[k]] == expected == [a.tolist() for a in as_arrays[k]], text


def student_fraction_after(text: str, start: int, teacher, student, byte_tables) -> float:
    """Aligned share of the student tokens that start at or after byte `start`."""
    alignment, _, student_bytes = aligned_pairs_with_bytes(text, teacher, student, byte_tables)
    late = {i for i, span in enumerate(laid_spans(student_bytes)) if span and span[0] >= start}
    return len(late & {i for _, i in alignment.pairs}) / len(late)


@pytest.mark.parametrize("families", PAIRS, ids=["-".join(pair) for pair in PAIRS])
def test_coverage_does_not_collapse_after_emoji_newlines_digits_and_non_ascii(
    real_tokenizers, byte_tables, texts, families
):
    teacher, student = (real_tokenizers[family] for family in families)
    alone = student_fraction_after(PLAIN_TAIL, 0, teacher, student, byte_tables)
    after = student_fraction_after(HARD_START + PLAIN_TAIL, len(HARD_START.encode()), teacher, student, byte_tables)
    assert after >= alone - 0.02 and after >= 0.8
    halves = np.zeros((2, 2))  # [first, second half] × [aligned, student tokens]
    for answer in texts[:TEXTS_PER_DATASET]:  # GSM8K: multi-line, <<48/2=24>> calculator annotations
        alignment = align_texts(answer, teacher, student)
        half = len(alignment.student_ids) // 2
        aligned = np.array([i for _, i in alignment.pairs])
        halves[:, 0] += (aligned < half).sum(), (aligned >= half).sum()
        halves[:, 1] += half, len(alignment.student_ids) - half
    first, second = halves[:, 0] / halves[:, 1]
    assert second >= first - 0.15 and second >= 0.45


def test_tokens_whose_text_the_normaliser_changed_are_not_aligned(real_tokenizers):
    """Qwen3 and GPT-NeoX apply NFC: their token for a decomposed "é" is the composed bytes, not the text's."""
    text = "Cafe\u0301 re\u0301sume\u0301, then plain words to the end"
    for normalising in ("qwen3", "gpt-neox-20b"):
        for other in ("gpt2", "llama2"):
            teacher, student = real_tokenizers[normalising], real_tokenizers[other]
            alignment = align_texts(text, teacher, student)
            teacher_pieces = token_pieces(alignment.teacher_ids, teacher)
            student_pieces = token_pieces(alignment.student_ids, student)
            assert all(teacher_pieces[j] == student_pieces[i] for j, i in alignment.pairs)
            assert not any("é".encode() in teacher_pieces[j] for j, _ in alignment.pairs)
            assert {student_pieces[i] for _, i in alignment.pairs} >= {b" plain", b" words", b" end"}


def test_eos_tokens_are_aligned_after_the_full_text(real_tokenizers):
    teacher, student = real_tokenizers["qwen3"], real_tokenizers["llama2"]
    plain = align_texts("Hi there.\n", teacher, student)
    alignment = align_texts("Hi there.\n", teacher, student, eos=True)
    assert alignment.teacher_ids == plain.teacher_ids + [teacher.eos_token_id]
    assert alignment.student_ids == plain.student_ids + [student.eos_token_id]
    assert alignment.pairs == plain.pairs + [(len(plain.teacher_ids), len(plain.student_ids))]
    assert alignment.student_alignable == plain.student_alignable + 1
    assert align_texts("", teacher, student, eos=True).pairs == [(0, 0)]


def test_special_tokens_get_no_span_and_shift_nothing(real_tokenizers):
    teacher, student = real_tokenizers["llama2"], real_tokenizers["mistral-7b-v0.1"]
    text = "BOS first: 3 apples 😀\n"
    plain = align_texts(text, teacher, student)
    with_bos = align_texts(text, teacher, student, add_special_tokens=True)
    assert with_bos.teacher_ids[0] == teacher.bos_token_id and with_bos.student_ids[0] == student.bos_token_id
    assert with_bos.pairs == [(j + 1, i + 1) for j, i in plain.pairs]
    assert with_bos.teacher_alignable == plain.teacher_alignable


@pytest.mark.parametrize("family", REAL_TOKENIZER_FAMILIES)
def test_a_cut_token_list_never_gets_a_wrong_span(real_tokenizers, family):
    """The data pipeline cuts sequences at max_length, possibly inside a character's byte tokens."""
    tokenizer = real_tokenizers[family]
    text = "😀 a\n \nb 日本 café 3"
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    full = token_byte_spans(text, offsets, ids, tokenizer)
    for cut in range(len(ids) + 1):
        spans = token_byte_spans(text, offsets[:cut], ids[:cut], tokenizer)
        kept = spans[:, 0] >= 0
        assert (spans[kept] == full[:cut][kept]).all()


def test_empty_text_has_no_tokens_and_no_pairs(real_tokenizers):
    alignment = align_texts("", real_tokenizers["gpt2"], real_tokenizers["llama2"])
    assert alignment.pairs == [] and alignment.aligned_fraction == 0.0
    assert token_byte_spans("", [], [], real_tokenizers["gpt2"]).shape == (0, 2)
    assert all(len(index) == 0 for index in align_spans(np.zeros((0, 2)), np.zeros((0, 2))))


def test_offsets_of_another_text_are_refused(real_tokenizers):
    tokenizer = real_tokenizers["gpt2"]
    encoding = tokenizer("a longer text", return_offsets_mapping=True)
    with pytest.raises(ValueError, match="offsets"):
        token_byte_spans("short", encoding["offset_mapping"], encoding["input_ids"], tokenizer)


def test_a_slow_tokenizer_is_refused_with_the_way_to_a_fast_one(real_tokenizers):
    slow = ByT5Tokenizer()
    with pytest.raises(ValueError, match="no character offsets.*tokenizers.*use_fast=True"):
        align_texts("text", slow, real_tokenizers["gpt2"])
    with pytest.raises(ValueError, match="no character offsets"):
        token_byte_spans("text", [(0, 4)], [1], slow)


def test_a_tokenizer_aligned_with_itself_aligns_every_token(tokenizer, examples):
    for example in examples:
        alignment = align_texts(example["prompt"] + example["response"], tokenizer, tokenizer)
        assert alignment.pairs == [(k, k) for k in range(len(alignment.student_ids))]
        assert alignment.aligned_fraction == 1.0


def test_the_rendering_shows_both_sides_pairs_and_coverage(real_tokenizers):
    teacher, student = real_tokenizers["gpt2"], real_tokenizers["llama2"]
    text = "Hello world\n😀 48"
    rendered = render_alignment(text, teacher, student).splitlines()
    alignment = align_texts(text, teacher, student)
    assert rendered[0].split() == ["teacher", "student"]
    assert sum(" = " in line for line in rendered) == len(alignment.pairs)
    assert '"\\n"' in "".join(rendered) and "<f0 9f 98>" in "".join(rendered)  # escaped newline, split emoji as bytes
    assert rendered[-1].startswith(f"aligned: {len(alignment.pairs)} of {alignment.teacher_alignable} teacher tokens")
    summary = json.loads(json.dumps(alignment_summary(text, teacher, student)))
    assert summary["pairs"] == [list(pair) for pair in alignment.pairs]
    assert summary["student"]["aligned_fraction"] == alignment.aligned_fraction
    assert summary["teacher"]["tokens"][0] == '"Hello"' and summary["student"]["tokens"][0] == '" Hello"'


# ---------------------------------------------------------------- MinED


def reference_levenshtein(a, b) -> int:
    previous = list(range(len(b) + 1))
    for row, x in enumerate(a, 1):
        current = [row]
        for column, y in enumerate(b, 1):
            current.append(min(previous[column] + 1, current[-1] + 1, previous[column - 1] + (x != y)))
        previous = current
    return previous[-1]


def reference_pairs(teacher, student) -> list[tuple[int, int]]:
    """Textbook O(n·m) dynamic time warping; the backtrack prefers diagonal, then teacher, then student steps."""
    infinity = float("inf")
    total = [[infinity] * (len(student) + 1) for _ in range(len(teacher) + 1)]
    total[0][0] = 0
    for j, i in itertools.product(range(1, len(teacher) + 1), range(1, len(student) + 1)):
        best = min(total[j - 1][i - 1], total[j - 1][i], total[j][i - 1])
        total[j][i] = reference_levenshtein(teacher[j - 1], student[i - 1]) + best
    path, j, i = [], len(teacher), len(student)
    while (j, i) != (0, 0):
        path.append((j - 1, i - 1))
        moves = [(total[j - 1][i - 1], j - 1, i - 1), (total[j - 1][i], j - 1, i), (total[j][i - 1], j, i - 1)]
        _, j, i = min(moves, key=lambda move: move[0])
    teachers, students = [j for j, _ in path], [i for _, i in path]
    return sorted((j, i) for j, i in path if teachers.count(j) == 1 and students.count(i) == 1)


def as_pairs(indices) -> list[tuple[int, int]]:
    return list(zip(*(index.tolist() for index in indices)))


def test_edit_distance_pairs_on_hand_checked_sequences():
    assert as_pairs(edit_distance_pairs([b"a", b"b", b"c"], [b"a", b"b", b"c"])) == [(0, 0), (1, 1), (2, 2)]
    # "ab" warps onto "a" and "b", so only "c" ↔ "c" is one-to-one.
    assert as_pairs(edit_distance_pairs([b"ab", b"c"], [b"a", b"b", b"c"])) == [(1, 2)]
    # Costs [[1, 0], [0, 1]]: every path into the last cell costs the same; the diagonal is preferred.
    assert as_pairs(edit_distance_pairs([b"a", b"b"], [b"b", b"a"])) == [(0, 0), (1, 1)]
    assert as_pairs(edit_distance_pairs(["▁Hello", "▁world"], ["ĠHello", "Ġwor", "ld"])) == [(0, 0)]
    assert as_pairs(edit_distance_pairs([], [b"a"])) == []


def random_piece(rng: random.Random, alphabet: bytes) -> bytes:
    length = rng.choice([0, 1, 2, 3, 5, 8, 63, 64, 65, 130]) if rng.random() < 0.2 else rng.randrange(1, 7)
    return bytes(rng.choice(alphabet) for _ in range(length))


def test_edit_distances_and_pairs_match_the_plain_reference_on_random_pieces():
    rng = random.Random(0)
    for _ in range(150):
        teacher = [random_piece(rng, b"abc ") for _ in range(rng.randrange(1, 9))]
        student = [random_piece(rng, b"abcd") for _ in range(rng.randrange(1, 9))]
        expected = [[reference_levenshtein(a, b) for b in student] for a in teacher]
        assert edit_distances(teacher, student).tolist() == expected
        assert as_pairs(edit_distance_pairs(teacher, student)) == reference_pairs(teacher, student)
    characters = ["é", "日本", "naïve", "", "e\u0301"]
    assert edit_distances(characters, characters).tolist() == [
        [reference_levenshtein(a, b) for b in characters] for a in characters
    ]


def test_edit_distance_pairs_is_fast_enough_for_a_data_pipeline(real_tokenizers, texts):
    teacher, student = real_tokenizers["qwen3"], real_tokenizers["llama2"]
    text = " ".join(texts[TEXTS_PER_DATASET:])
    teacher_pieces = token_pieces(teacher(text, add_special_tokens=False)["input_ids"][:300], teacher)
    student_pieces = token_pieces(student(text, add_special_tokens=False)["input_ids"][:300], student)
    edit_distance_pairs(teacher_pieces, student_pieces)
    start = time.perf_counter()
    pairs = as_pairs(edit_distance_pairs(teacher_pieces, student_pieces))
    assert time.perf_counter() - start < 0.25  # ~5 ms on 2 CPU cores; 0.25 s catches a per-pair Python loop
    assert len(pairs) > 150
