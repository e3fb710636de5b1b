"""Which teacher and student tokens stand for the same text, for cross-tokenizer distillation.

Exact Token Alignment (ETA): both tokenizers encode the same text; a teacher token and a student token are aligned
when they cover exactly the same bytes of it (`token_byte_spans`, `align_spans`, `align_texts`, `align_batch`).
MinED's pairing by edit distance is in `llmdistill.edit_distance`.

Spans are in bytes of the UTF-8 text, so tokens that split one character (byte-level BPE, byte fallback) get spans too.
A span is kept only when the token's own bytes are the text's bytes there, so an aligned pair always predicts the same
bytes after the same text prefix; tokens whose text a normaliser changed (NFC) are left unaligned.
"""

from __future__ import annotations

import itertools
import json
import unicodedata
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from transformers import PreTrainedTokenizerBase

from .vocab import token_bytes

NO_SPAN = -1
BYTE_LEVEL_SPACE = "\u0120"  # Ġ


class _VocabTable(NamedTuple):
    """Per-id arrays of one tokenizer: byte length (-1 for special tokens), where its bytes start in `flat`, and how
    many trailing spaces the tokenizer trims off its end offset (ByteLevel post-processing with trim_offsets)."""

    lengths: np.ndarray
    starts: np.ndarray
    flat: np.ndarray
    trimmed_end: np.ndarray
    normal_forms: tuple[str, ...] | None  # Unicode forms the normaliser applies; None: it may change text otherwise


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
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if _trims_offsets(backend["post_processor"]):
        strings = tokenizer.convert_ids_to_tokens(list(range(len(pieces))))
        trimmed_end[:] = [_trailing_spaces(string or "") for string in strings]
    return _VocabTable(lengths, starts, flat, trimmed_end, _normal_forms(backend["normalizer"]))


def _normal_forms(normalizer: dict | None) -> tuple[str, ...] | None:
    """The Unicode normal forms a normaliser applies, if that is all it does to the text (SentencePiece's `▁` for
    spaces and its prefix `▁` decode back to spaces, so they count as keeping it); None for anything else."""
    if normalizer is None:
        return ()
    kind = normalizer["type"]
    if kind == "Sequence":
        forms = [_normal_forms(part) for part in normalizer["normalizers"]]
        return None if None in forms else tuple(form for part in forms for form in part)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return (kind,)
    marks_spaces = kind == "Replace" and normalizer["pattern"].get("String") == " " and normalizer["content"] == "▁"
    return () if marks_spaces or (kind == "Prepend" and normalizer["prepend"] == "▁") else None


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
    char_ends = _offset_ends(offsets)
    if len(char_ends) != len(ids) or (len(ids) and char_ends.max() > len(text)):
        raise ValueError(
            f"{len(char_ends)} offsets for {len(ids)} tokens of a {len(text)}-character text: they do not match"
        )
    spans = np.full((len(ids), 2), NO_SPAN, dtype=np.int64)
    lengths = table.lengths[ids]
    text_tokens = np.flatnonzero(lengths > 0)
    if not len(text_tokens):
        return spans
    ends = char_ends if text.isascii() else _char_to_byte(text)[char_ends]
    ends[text_tokens] += table.trimmed_end[ids[text_tokens]]
    covered_before = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]])
    prefix_space = bool(table.flat[table.starts[ids[text_tokens[0]]]] == ord(" "))
    starts, ends = _split_runs(ends[text_tokens], lengths[text_tokens], covered_before[text_tokens], prefix_space)
    text_bytes = np.frombuffer(text.encode(), dtype=np.uint8)
    kept = _matches_text(starts, ends, ids[text_tokens], table, text_bytes, prefix_space)
    spans[text_tokens[kept]] = np.stack([starts[kept], ends[kept]], axis=1)
    return spans


def align_batch(
    texts: Sequence[str],
    teacher_encoding,
    student_encoding,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`align_spans(token_byte_spans(...), token_byte_spans(...))` of many texts, in one pass over all of them.

    Each encoding is what the tokenizer returned for `texts` with `return_offsets_mapping=True`: lists per text, or
    padded arrays (`return_tensors="np", padding=True`, with their attention mask). Each text's spans are moved
    into a byte range of its own, so one join aligns every text; the pairs come back per text as (teacher index,
    student index) arrays.
    """
    if not texts:
        return []
    text_bytes = np.array([len(text.encode()) for text in texts], dtype=np.int64)
    text_starts = np.concatenate([[0], np.cumsum(text_bytes + 1)[:-1]])
    sides = [
        _flat_byte_spans(texts, _FlatTokens.of(encoding), tokenizer, text_bytes, text_starts)
        for encoding, tokenizer in ((teacher_encoding, teacher_tokenizer), (student_encoding, student_tokenizer))
    ]
    (teacher_spans, teacher_first), (student_spans, student_first) = sides
    teacher_index, student_index = align_spans(teacher_spans, student_spans)
    text_of_pair = np.searchsorted(teacher_first, teacher_index, side="right") - 1
    teacher_index = teacher_index - teacher_first[text_of_pair]
    student_index = student_index - student_first[text_of_pair]
    bounds = np.searchsorted(text_of_pair, np.arange(len(texts) + 1)).tolist()
    return [(teacher_index[a:b], student_index[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


class _FlatTokens(NamedTuple):
    """One side of a batch: every text's ids end to end, how many each text has, and a text's own offsets."""

    ids: np.ndarray
    counts: np.ndarray
    offsets_of: Callable[[int], Sequence[tuple[int, int]]]

    @classmethod
    def of(cls, encoding) -> _FlatTokens:
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        if isinstance(ids, np.ndarray):
            mask = np.asarray(encoding["attention_mask"], dtype=bool)
            return cls(ids[mask].astype(np.int64), mask.sum(1), lambda k: offsets[k][mask[k]])
        counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(counts.sum()))
        return cls(flat, counts, lambda k: offsets[k])


def _flat_byte_spans(texts, tokens: _FlatTokens, tokenizer, text_bytes: np.ndarray, text_starts: np.ndarray):
    """All texts' token spans in one [Σ n_k, 2] array, text k's shifted by text_starts[k]; and each text's first row.

    Where the tokenizer keeps a text as it is (no normaliser, or only a Unicode normal form the text already has)
    and its tokens' bytes add up to the text's (one more for SentencePiece's dummy prefix space), the tokens tile
    the text: their spans are running sums of their byte lengths, for all such texts in a few array operations.
    Any other text goes through `token_byte_spans` and its offsets.
    """
    table = _vocab_table(tokenizer)
    flat_ids, counts = tokens.ids, tokens.counts
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lengths = np.maximum(table.lengths[flat_ids], 0)
    through = np.cumsum(lengths)
    before_text = np.concatenate([[0], through])[first]
    totals = np.concatenate([before_text[1:], through[-1:] if len(through) else [0]]) - before_text
    opens_with_space = table.flat.take(table.starts[flat_ids.take(first, mode="clip")], mode="clip") == ord(" ")
    prefix = (totals == text_bytes + 1) & opens_with_space & (counts > 0)
    ends = through - np.repeat(before_text + prefix - text_starts, counts)
    spans = np.stack([np.maximum(ends - lengths, np.repeat(text_starts, counts)), ends], axis=1)
    spans[spans[:, 1] <= spans[:, 0]] = NO_SPAN  # special tokens, and a dummy-prefix space standing alone
    tiles = (totals == text_bytes) | prefix
    for k in np.flatnonzero(~tiles | ~np.array([_keeps_text(text, table) for text in texts])).tolist():
        text_ids = flat_ids[first[k] : first[k] + counts[k]]
        own = token_byte_spans(texts[k], tokens.offsets_of(k), text_ids, tokenizer)
        spans[first[k] : first[k] + counts[k]] = np.where(own >= 0, own + text_starts[k], NO_SPAN)
    return spans, first


def _keeps_text(text: str, table: _VocabTable) -> bool:
    return table.normal_forms is not None and all(unicodedata.is_normalized(form, text) for form in table.normal_forms)


def _offset_ends(offsets: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    if isinstance(offsets, np.ndarray):
        return offsets.reshape(-1, 2)[:, 1].astype(np.int64)
    return np.array([end for _, end in offsets], dtype=np.int64)  # 4x faster than np.array(list of tuples)


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
    starts: np.ndarray,
    ends: np.ndarray,
    ids: np.ndarray,
    table: _VocabTable,
    text_bytes: np.ndarray,
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

    Each side's valid spans tile the text in order, so their (start, end) keys are strictly increasing: a vectorised
    join of the two sorted key arrays (binary search, which costs less per call than a merge at these lengths).
    """
    teacher_index, teacher_keys = _span_keys(teacher_spans)
    student_index, student_keys = _span_keys(student_spans)
    if not len(student_keys):
        return teacher_index[:0], student_index
    position = np.searchsorted(student_keys, teacher_keys)
    found = student_keys.take(position, mode="clip") == teacher_keys
    return teacher_index[found], student_index[position[found]]


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
        teacher_ids = teacher_ids + [_eos_id(teacher_tokenizer)]
        student_ids = student_ids + [_eos_id(student_tokenizer)]
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
