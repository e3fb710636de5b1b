"""Which teacher and student tokens stand for the same text, for cross-tokenizer distillation.

Exact Token Alignment (ETA): both tokenizers encode the same text; a teacher token and a student token are aligned
when they cover exactly the same bytes of it (`token_byte_spans`, `align_spans`, `align_texts`). MinED instead pairs
the tokens on the cheapest edit-distance warping path between the two token sequences (`edit_distance_pairs`).

Spans are in bytes of the UTF-8 text, so tokens that split one character (byte-level BPE, byte fallback) get spans too.
A span is kept only when the token's own bytes are the text's bytes there, so an aligned pair always predicts the same
bytes after the same text prefix; tokens whose text a normaliser changed (NFC) are left unaligned.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from transformers import PreTrainedTokenizerBase

from .vocab import token_bytes

NO_SPAN = -1
WORD_BITS = 64
BYTE_LEVEL_SPACE = "\u0120"  # Ġ


class _VocabTable(NamedTuple):
    """Per-id arrays of one tokenizer: byte length (-1 for special tokens), where its bytes start in `flat`, and how
    many trailing spaces the tokenizer trims off its end offset (ByteLevel post-processing with trim_offsets)."""

    lengths: np.ndarray
    starts: np.ndarray
    flat: np.ndarray
    trimmed_end: np.ndarray


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_table(tokenizer: PreTrainedTokenizerBase) -> _VocabTable:
    """Built once per tokenizer object (rebuilt if tokens were added): serialising a tokenizer takes up to 80 ms."""
    _require_fast(tokenizer)
    size, table = _TABLES.get(tokenizer, (None, None))
    if size != len(tokenizer):
        table = _build_vocab_table(tokenizer)
        _TABLES[tokenizer] = (len(tokenizer), table)
    return table


def _require_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer: it has no character offsets, which token "
            "alignment needs. Install the `tokenizers` package and load it with "
            "`AutoTokenizer.from_pretrained(path, use_fast=True)`, or put a tokenizer.json beside the model."
        )


def _build_vocab_table(tokenizer: PreTrainedTokenizerBase) -> _VocabTable:
    pieces = token_bytes(tokenizer)
    lengths = np.array([NO_SPAN if piece is None else len(piece) for piece in pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]])
    flat = np.frombuffer(b"".join(piece for piece in pieces if piece), dtype=np.uint8)
    trimmed_end = np.zeros(len(pieces), dtype=np.int64)
    if _trims_offsets(json.loads(tokenizer.backend_tokenizer.to_str())["post_processor"]):
        strings = tokenizer.convert_ids_to_tokens(list(range(len(pieces))))
        trimmed_end[:] = [_trailing_spaces(string or "") for string in strings]
    return _VocabTable(lengths, starts, flat, trimmed_end)


def _trims_offsets(processor: dict | None) -> bool:
    if processor is None:
        return False
    if processor["type"] == "Sequence":
        return any(_trims_offsets(p) for p in processor["processors"])
    return processor["type"] in ("ByteLevel", "RobertaProcessing") and processor.get("trim_offsets", False)


def _trailing_spaces(string: str) -> int:
    """Spaces trim_offsets cuts off a token's end offset; an all-space token keeps its end (its start moves there)."""
    spaced = string.replace(BYTE_LEVEL_SPACE, " ")
    return 0 if not spaced.strip() else len(spaced) - len(spaced.rstrip())


def token_pieces(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes each token stands for; b"" for special tokens."""
    table = _vocab_table(tokenizer)
    return [table.flat[table.starts[i] : table.starts[i] + max(table.lengths[i], 0)].tobytes() for i in ids]


def _char_to_byte(text: str) -> np.ndarray:
    """Byte position in text.encode() of every character position 0..len(text)."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)])


def token_byte_spans(
    text: str, offsets: Sequence[tuple[int, int]], ids: Sequence[int], tokenizer: PreTrainedTokenizerBase
) -> np.ndarray:
    """[start, end) in bytes of text.encode() of every token: int64 [n, 2], (-1, -1) where a token has no span.

    `offsets` are the fast tokenizer's character offsets for `ids` (`return_offsets_mapping=True`). Only their ends
    are used: trim_offsets moves starts past leading spaces. A token's span runs from the previous token's end to its
    own. Tokens that split one character share its end; such a run is split by the tokens' byte lengths. Special
    tokens, and tokens whose bytes are not the text's bytes at their span (normalised text), get no span. The first
    token may carry one space the text lacks (SentencePiece's dummy prefix).
    """
    table = _vocab_table(tokenizer)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    char_ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
    if len(char_ends) != len(ids) or (len(ids) and char_ends.max() > len(text)):
        raise ValueError(f"{len(offsets)} offsets for {len(ids)} tokens of a {len(text)}-character text do not match")
    spans = np.full((len(ids), 2), NO_SPAN, dtype=np.int64)
    lengths = table.lengths[ids]
    text_tokens = np.flatnonzero(lengths > 0)
    if not len(text_tokens):
        return spans
    ends = _char_to_byte(text)[char_ends]
    ends[text_tokens] += table.trimmed_end[ids[text_tokens]]
    covered_before = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]])
    prefix_space = bool(table.flat[table.starts[ids[text_tokens[0]]]] == ord(" "))
    starts, ends = _split_runs(ends[text_tokens], lengths[text_tokens], covered_before[text_tokens], prefix_space)
    text_bytes = np.frombuffer(text.encode(), dtype=np.uint8)
    kept = _matches_text(starts, ends, ids[text_tokens], table, text_bytes, prefix_space)
    spans[text_tokens[kept]] = np.stack([starts[kept], ends[kept]], axis=1)
    return spans


def _split_runs(
    ends: np.ndarray, lengths: np.ndarray, covered_before: np.ndarray, prefix_space: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of text tokens; a run of tokens sharing one end is cut by byte length, walking back from it.

    A run whose lengths do not add up to the bytes since the previous token's end gets start == end (no span); the
    first run may hold one byte more, the first token's dummy-prefix space (Llama: "3" → "▁", "3", both ending at 1).
    """
    new_run = np.concatenate([[True], ends[1:] != ends[:-1]])
    run_first = np.flatnonzero(new_run)
    run_last = np.concatenate([run_first[1:], [len(ends)]]) - 1
    run_of_token = np.cumsum(new_run) - 1
    through = np.cumsum(lengths)
    token_ends = ends - (through[run_last[run_of_token]] - through)
    token_starts = token_ends - lengths
    single = (run_first == run_last)[run_of_token]
    token_starts[single] = covered_before[single]
    run_fits = token_starts[run_first] == covered_before[run_first]
    run_fits[0] |= prefix_space and token_starts[0] == covered_before[0] - 1
    token_starts[0] = max(token_starts[0], covered_before[0])
    broken = ~run_fits[run_of_token]
    token_starts[broken] = token_ends[broken]
    return token_starts, token_ends


def _matches_text(
    starts: np.ndarray, ends: np.ndarray, ids: np.ndarray, table: _VocabTable, text_bytes: np.ndarray,
    prefix_space: bool,
) -> np.ndarray:
    """Which tokens' bytes equal the text's bytes at their span (the first may have one extra leading space)."""
    span_lengths = ends - starts
    skip = np.zeros_like(ids)
    skip[0] = prefix_space and table.lengths[ids[0]] == span_lengths[0] + 1
    candidates = np.flatnonzero((span_lengths > 0) & (span_lengths == table.lengths[ids] - skip))
    sizes = span_lengths[candidates]
    token_of_byte = np.repeat(np.arange(len(candidates)), sizes)
    within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    in_text = text_bytes[starts[candidates][token_of_byte] + within]
    in_token = table.flat[(table.starts[ids] + skip)[candidates][token_of_byte] + within]
    mismatches = np.bincount(token_of_byte, weights=in_text != in_token, minlength=len(candidates))
    kept = np.zeros(len(ids), dtype=bool)
    kept[candidates[mismatches == 0]] = True
    return kept


def align_spans(teacher_spans: np.ndarray, student_spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(teacher index, student index) int64 arrays of the tokens whose spans are equal and valid.

    A merge-join: each side's valid spans tile the text in order, so their (start, end) keys are strictly increasing.
    """
    teacher_index, teacher_keys = _span_keys(teacher_spans)
    student_index, student_keys = _span_keys(student_spans)
    _, in_teacher, in_student = np.intersect1d(teacher_keys, student_keys, assume_unique=True, return_indices=True)
    return teacher_index[in_teacher], student_index[in_student]


def _span_keys(spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    index = np.flatnonzero(spans[:, 0] >= 0)
    return index, (spans[index, 0] << 32) | spans[index, 1]


@dataclass(frozen=True)
class Alignment:
    """Both tokenisations of one text and their aligned (teacher index, student index) pairs.

    `teacher_alignable` / `student_alignable`: the tokens that could be aligned (those covering text, plus an
    appended EOS), the denominators of the aligned fractions.
    """

    teacher_ids: list[int]
    student_ids: list[int]
    pairs: list[tuple[int, int]]
    teacher_alignable: int
    student_alignable: int

    @property
    def aligned_fraction(self) -> float:
        """Aligned share of the student tokens that could be aligned."""
        return len(self.pairs) / max(self.student_alignable, 1)

    @property
    def teacher_aligned_fraction(self) -> float:
        return len(self.pairs) / max(self.teacher_alignable, 1)


def align_texts(
    text: str,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    add_special_tokens: bool = False,
    eos: bool = False,
) -> Alignment:
    """Tokenise `text` with both tokenizers and align the tokens covering the same bytes.

    With `eos`, each side's EOS id is appended after the full text, and the two EOS tokens are aligned.
    """
    teacher_ids, teacher_spans, teacher_alignable = _encode(text, teacher_tokenizer, add_special_tokens)
    student_ids, student_spans, student_alignable = _encode(text, student_tokenizer, add_special_tokens)
    teacher_index, student_index = align_spans(teacher_spans, student_spans)
    pairs = list(zip(teacher_index.tolist(), student_index.tolist()))
    if eos:
        pairs.append((len(teacher_ids), len(student_ids)))
        teacher_ids, student_ids = teacher_ids + [_eos_id(teacher_tokenizer)], student_ids + [_eos_id(student_tokenizer)]
    return Alignment(teacher_ids, student_ids, pairs, teacher_alignable + eos, student_alignable + eos)


def _encode(text: str, tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool):
    """Token ids, byte spans and the number of tokens that cover text."""
    _require_fast(tokenizer)
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
    ids = encoding["input_ids"]
    spans = token_byte_spans(text, encoding["offset_mapping"], ids, tokenizer)
    return ids, spans, int((_vocab_table(tokenizer).lengths[ids] > 0).sum())


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{tokenizer.name_or_path!r} has no eos_token: set one in its tokenizer_config.json.")
    return tokenizer.eos_token_id


def render_alignment(
    text: str, teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> str:
    """Both tokenisations side by side, one row per aligned pair (`=`) or per stretch of unaligned tokens (`·`)."""
    alignment = align_texts(text, teacher_tokenizer, student_tokenizer)
    teacher_cells = _token_cells(alignment.teacher_ids, teacher_tokenizer)
    student_cells = _token_cells(alignment.student_ids, student_tokenizer)
    rows = [
        (" ".join(teacher_cells[j] for j in teacher_group), " ".join(student_cells[i] for i in student_group), mark)
        for teacher_group, student_group, mark in _row_groups(alignment)
    ]
    width = min(max([len(left) for left, _, _ in rows] + [len("teacher")]), 60)
    lines = [f"{'teacher':<{width}}   student", *(f"{left:<{width}} {mark} {right}" for left, right, mark in rows)]
    return "\n".join(lines + [_coverage_line(alignment)])


def _row_groups(alignment: Alignment) -> list[tuple[range, range, str]]:
    """Unaligned stretches between aligned pairs, then the pair itself: (teacher indices, student indices, mark)."""
    groups, next_teacher, next_student = [], 0, 0
    ends = (len(alignment.teacher_ids), len(alignment.student_ids))
    for teacher_index, student_index in [*alignment.pairs, ends]:
        if teacher_index > next_teacher or student_index > next_student:
            groups.append((range(next_teacher, teacher_index), range(next_student, student_index), "·"))
        if (teacher_index, student_index) != ends:
            groups.append((range(teacher_index, teacher_index + 1), range(student_index, student_index + 1), "="))
        next_teacher, next_student = teacher_index + 1, student_index + 1
    return groups


def _token_cells(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each token as readable text: quoted, with newlines and tabs escaped; split characters as hex bytes."""
    names = tokenizer.convert_ids_to_tokens(ids)
    return [
        _readable(piece) if piece else name for piece, name in zip(token_pieces(ids, tokenizer), names, strict=True)
    ]


def _readable(piece: bytes) -> str:
    try:
        return json.dumps(piece.decode(), ensure_ascii=False)
    except UnicodeDecodeError:
        return f"<{piece.hex(' ')}>"


def _coverage_line(alignment: Alignment) -> str:
    pairs = len(alignment.pairs)
    return (
        f"aligned: {pairs} of {alignment.teacher_alignable} teacher tokens "
        f"({alignment.teacher_aligned_fraction:.1%}), {pairs} of {alignment.student_alignable} student tokens "
        f"({alignment.aligned_fraction:.1%})"
    )


def alignment_summary(
    text: str, teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> dict:
    """The alignment as JSON-able data: each side's tokens and aligned fraction, and the aligned index pairs."""
    alignment = align_texts(text, teacher_tokenizer, student_tokenizer)

    def side(ids, tokenizer, alignable, fraction):
        return {
            "tokenizer": tokenizer.name_or_path,
            "ids": ids,
            "tokens": _token_cells(ids, tokenizer),
            "alignable": alignable,
            "aligned_fraction": fraction,
        }

    return {
        "teacher": side(
            alignment.teacher_ids, teacher_tokenizer, alignment.teacher_alignable, alignment.teacher_aligned_fraction
        ),
        "student": side(
            alignment.student_ids, student_tokenizer, alignment.student_alignable, alignment.aligned_fraction
        ),
        "pairs": [list(pair) for pair in alignment.pairs],
    }


def edit_distance_pairs(
    teacher_pieces: Sequence[bytes | str], student_pieces: Sequence[bytes | str]
) -> tuple[np.ndarray, np.ndarray]:
    """MinED's pairs: the 1-to-1 steps of the dynamic-time-warping path with edit distance between tokens as cost.

    A step (j, i) is kept when no other step of the path uses teacher token j or student token i. Ties on the path
    prefer the diagonal step, then the teacher's, then the student's. Returns int64 (teacher index, student index).
    """
    if not len(teacher_pieces) or not len(student_pieces):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    teacher_steps, student_steps = _warping_path(edit_distances(teacher_pieces, student_pieces))
    alone = (np.bincount(teacher_steps)[teacher_steps] == 1) & (np.bincount(student_steps)[student_steps] == 1)
    return teacher_steps[alone], student_steps[alone]


def _warping_path(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotone path from (0, 0) to the last cell, steps (+1, +1), (+1, 0) or (0, +1)."""
    total = np.empty_like(cost)
    total[0] = np.cumsum(cost[0])
    never = np.iinfo(np.int64).max // 2
    for row in range(1, len(cost)):
        above = total[row - 1]
        diagonal = np.concatenate([[never], above[:-1]])
        through_row = np.cumsum(cost[row])
        entered = cost[row] + np.minimum(diagonal, above)
        # Moving along the row adds each cell's cost: total = min over entry k of entered[k] + Σ cost(k, here].
        total[row] = through_row + np.minimum.accumulate(entered - through_row)
    return _backtrack(total)


def _backtrack(total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    row, column = total.shape[0] - 1, total.shape[1] - 1
    steps = [(row, column)]
    while row or column:
        moves = []
        if row and column:
            moves.append((total[row - 1, column - 1], row - 1, column - 1))
        if row:
            moves.append((total[row - 1, column], row - 1, column))
        if column:
            moves.append((total[row, column - 1], row, column - 1))
        _, row, column = min(moves, key=lambda move: move[0])  # min keeps the first of equals: diagonal first
        steps.append((row, column))
    path = np.array(steps[::-1], dtype=np.int64)
    return path[:, 0], path[:, 1]


def edit_distances(rows: Sequence[bytes | str], columns: Sequence[bytes | str]) -> np.ndarray:
    """Levenshtein distance between every row piece and every column piece: int64 [len(rows), len(columns)].

    Pieces are compared symbol by symbol (bytes by byte, str by character). Computed once per distinct pair, with
    Myers' bit-parallel algorithm vectorised over all pairs.
    """
    row_pieces, row_of = _distinct_by_length(rows)
    column_pieces, column_of = _distinct_by_length(columns)
    return _bit_parallel_distances(row_pieces, column_pieces)[np.ix_(row_of, column_of)]


def _distinct_by_length(pieces: Sequence[bytes | str]) -> tuple[list[list[int]], np.ndarray]:
    """The distinct pieces as symbol lists, longest first, and each input piece's index among them."""
    distinct = sorted(set(pieces), key=len, reverse=True)
    index = {piece: position for position, piece in enumerate(distinct)}
    symbols = [list(piece) if isinstance(piece, bytes) else [ord(char) for char in piece] for piece in distinct]
    return symbols, np.array([index[piece] for piece in pieces], dtype=np.int64)


def _bit_parallel_distances(patterns: list[list[int]], texts: list[list[int]]) -> np.ndarray:
    """Hyyrö's form of Myers' algorithm: one bit per pattern symbol in 64-bit words, all (pattern, text) at once.

    Both lists are sorted longest first, so the patterns still needing word w and the texts still having a symbol
    at step i are leading slices of the state arrays.
    """
    pattern_lengths = np.array([len(p) for p in patterns], dtype=np.int64)
    text_lengths = np.array([len(t) for t in texts], dtype=np.int64)
    distances = np.repeat(pattern_lengths[:, None], len(texts), axis=1)
    distances[pattern_lengths == 0] = text_lengths
    words = max(1, -(-int(pattern_lengths.max()) // WORD_BITS))
    alphabet, pattern_masks = _pattern_masks(patterns, texts, words)
    text_symbols = np.zeros((len(texts), max(int(text_lengths.max()), 1)), dtype=np.int64)
    for position, text in enumerate(texts):
        text_symbols[position, : len(text)] = np.searchsorted(alphabet, text)
    rows_for_word = [int((pattern_lengths > w * WORD_BITS).sum()) for w in range(words + 1)]
    last_bit = np.left_shift(np.uint64(1), ((pattern_lengths - 1) % WORD_BITS).astype(np.uint64))[:, None]
    positive = np.full((words, len(patterns), len(texts)), np.iinfo(np.uint64).max, dtype=np.uint64)
    negative = np.zeros_like(positive)
    for step in range(int(text_lengths.max())):
        columns = int((text_lengths > step).sum())
        symbols = text_symbols[:columns, step]
        carries = (np.ones((rows_for_word[0], columns), np.uint64), np.zeros((rows_for_word[0], columns), np.uint64),
                   np.zeros((rows_for_word[0], columns), np.uint64))
        for word in range(words):
            rows = rows_for_word[word]
            if not rows:
                break
            ends_here = slice(rows_for_word[word + 1], rows)
            carries = _advance_word(
                pattern_masks[word, :rows][:, symbols], positive[word, :rows, :columns],
                negative[word, :rows, :columns], [carry[:rows] for carry in carries],
                distances[ends_here, :columns], last_bit[ends_here], ends_here,
            )
    return distances


def _pattern_masks(patterns: list[list[int]], texts: list[list[int]], words: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted alphabet and, per word, pattern and symbol, the bits of the positions holding that symbol."""
    alphabet = np.unique(np.array([s for piece in (*patterns, *texts) for s in piece], dtype=np.int64))
    masks = np.zeros((words, len(patterns), len(alphabet)), dtype=np.uint64)
    pattern_of = np.repeat(np.arange(len(patterns)), [len(p) for p in patterns])
    position = np.concatenate([np.arange(len(p)) for p in patterns]).astype(np.int64)
    symbol = np.searchsorted(alphabet, np.array([s for p in patterns for s in p], dtype=np.int64))
    bits = np.left_shift(np.uint64(1), (position % WORD_BITS).astype(np.uint64))
    np.bitwise_or.at(masks, (position // WORD_BITS, pattern_of, symbol), bits)
    return alphabet, masks


def _advance_word(equal, positive, negative, carries, distances, last_bit, ends_here):
    """One text symbol through one 64-bit word of the vertical deltas (updated in place); returns the carries out.

    carries: (horizontal +1 shifted in, horizontal -1 shifted in, the addition's carry), each [rows, columns].
    `distances` / `last_bit` are the rows of patterns whose last symbol is in this word.
    """
    plus_in, minus_in, add_in = carries
    vertical = equal | negative
    matched = equal & positive
    partial = matched + positive
    total = partial + add_in
    add_out = ((partial < matched) | (total < partial)).astype(np.uint64)
    horizontal = ((total ^ positive) | equal)
    plus = negative | ~(horizontal | positive)
    minus = positive & horizontal
    distances += ((plus[ends_here] & last_bit) != 0).astype(np.int64) - ((minus[ends_here] & last_bit) != 0)
    plus_out, minus_out = plus >> np.uint64(WORD_BITS - 1), minus >> np.uint64(WORD_BITS - 1)
    plus = (plus << np.uint64(1)) | plus_in
    minus = (minus << np.uint64(1)) | minus_in
    positive[:] = minus | ~(vertical | plus)
    negative[:] = plus & vertical
    return plus_out, minus_out, add_out
