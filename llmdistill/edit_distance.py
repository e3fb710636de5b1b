"""MinED's pairing (METHODS §3.4): dynamic time warping between two token sequences with the Levenshtein distance
between token strings as the cost; the 1-to-1 steps of the cheapest path are the pairs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WORD_BITS = 64
ALL_BITS = np.uint64(2**64 - 1)


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
    """Hyyrö's form of Myers' algorithm: each pattern's column of the edit-distance table as +1 / -1 bit vectors
    (64-bit words), all (text, pattern) pairs advanced one text symbol at a time.

    Both lists are sorted longest first, so the texts still having a symbol at a step and the patterns still needing
    a word are leading slices of the state; a finished text's state stays as it ended. The distance is then the
    text's length plus the pattern's +1 bits minus its -1 bits.
    """
    pattern_lengths = np.array([len(p) for p in patterns], dtype=np.int64)
    text_lengths = np.array([len(t) for t in texts], dtype=np.int64)
    words = max(1, -(-int(pattern_lengths.max()) // WORD_BITS))
    alphabet, masks = _pattern_masks(patterns, texts, words)
    text_symbols = np.zeros((len(texts), max(int(text_lengths.max()), 1)), dtype=np.int64)
    for position, text in enumerate(texts):
        text_symbols[position, : len(text)] = np.searchsorted(alphabet, text)
    rows_for_word = [int((pattern_lengths > word * WORD_BITS).sum()) for word in range(words)]
    plus = np.full((words, len(texts), len(patterns)), ALL_BITS, dtype=np.uint64)
    minus = np.zeros_like(plus)
    scratch = np.empty((4, len(texts), len(patterns)), dtype=np.uint64)  # reused: fresh large arrays cost 8x more
    for step in range(int(text_lengths.max())):
        columns = int((text_lengths > step).sum())
        carries = (np.uint64(1), np.uint64(0), np.uint64(0))  # the top row of the table grows by 1 per symbol
        for word, rows in enumerate(rows_for_word):
            state = scratch[:, :columns, :rows]
            np.take(masks[word, :, :rows], text_symbols[:columns, step], axis=0, out=state[0])
            carries = _advance_word(
                plus[word, :columns, :rows],
                minus[word, :columns, :rows],
                state,
                [carry if carry.ndim == 0 else carry[:, :rows] for carry in carries],
                more_words=word + 1 < words,
            )
    in_pattern = _low_bits(pattern_lengths[None, :] - WORD_BITS * np.arange(words)[:, None])[:, None, :]
    ups = np.bitwise_count(plus & in_pattern).sum(axis=0, dtype=np.int64)
    downs = np.bitwise_count(minus & in_pattern).sum(axis=0, dtype=np.int64)
    return (text_lengths[:, None] + ups - downs).T


def _low_bits(counts: np.ndarray) -> np.ndarray:
    """uint64 words with the lowest `counts` bits set (counts clipped to 0..64)."""
    counts = np.clip(counts, 0, WORD_BITS).astype(np.uint64)
    return np.where(counts == WORD_BITS, ALL_BITS, (np.uint64(1) << (counts % WORD_BITS)) - np.uint64(1))


def _pattern_masks(patterns: list[list[int]], texts: list[list[int]], words: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted alphabet and, per word, symbol and pattern, the bits of the positions holding that symbol."""
    alphabet = np.unique(np.array([s for piece in (*patterns, *texts) for s in piece], dtype=np.int64))
    masks = np.zeros((words, len(alphabet), len(patterns)), dtype=np.uint64)
    pattern_of = np.repeat(np.arange(len(patterns)), [len(p) for p in patterns])
    position = np.concatenate([np.arange(len(p)) for p in patterns]).astype(np.int64)
    symbol = np.searchsorted(alphabet, np.array([s for p in patterns for s in p], dtype=np.int64))
    bits = np.left_shift(np.uint64(1), (position % WORD_BITS).astype(np.uint64))
    np.bitwise_or.at(masks, (position // WORD_BITS, symbol, pattern_of), bits)
    return alphabet, masks


def _advance_word(plus_vertical, minus_vertical, state, carries, more_words: bool):
    """One text symbol through one 64-bit word of the vertical deltas, updated in place.

    state: [4, columns, rows] scratch whose first plane holds the pattern bits equal to the text symbol. carries:
    what the word below passes up (horizontal +1, horizontal -1, the addition's carry); returns this word's, for
    the word above, when there is one.
    """
    equal, vertical, horizontal, partial = state
    plus_in, minus_in, add_in = carries
    np.bitwise_or(equal, minus_vertical, out=vertical)
    np.bitwise_and(equal, plus_vertical, out=horizontal)
    np.add(horizontal, plus_vertical, out=partial)
    if more_words:
        add_out = ((partial < horizontal) | ((partial == ALL_BITS) & (add_in == 1))).astype(np.uint64)
    partial += add_in
    np.bitwise_xor(partial, plus_vertical, out=horizontal)
    horizontal |= equal
    plus, minus = partial, equal  # their old contents are no longer needed
    np.bitwise_or(horizontal, plus_vertical, out=plus)
    np.invert(plus, out=plus)
    plus |= minus_vertical
    np.bitwise_and(plus_vertical, horizontal, out=minus)
    carries_out = None
    if more_words:
        carries_out = (plus >> np.uint64(WORD_BITS - 1), minus >> np.uint64(WORD_BITS - 1), add_out)
    plus <<= np.uint64(1)
    plus |= plus_in
    minus <<= np.uint64(1)
    minus |= minus_in
    np.bitwise_or(vertical, plus, out=plus_vertical)
    np.invert(plus_vertical, out=plus_vertical)
    plus_vertical |= minus
    np.bitwise_and(plus, vertical, out=minus_vertical)
    return carries_out
