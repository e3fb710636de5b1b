"""What cross-tokenizer objectives receive: each model's supervised positions and the pairs that link them.

Each model reads the same text through its own tokenizer, so the two sides have different positions. Positions are
flattened in batch order (row by row) as in the same-tokenizer path; pairs index into these flat positions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..data import IGNORE_INDEX, PAIR_COLUMNS
from ..models import LMHead


class Positions(NamedTuple):
    """One model's supervised positions (those that predict a response token)."""

    hidden: torch.Tensor  # [N, width] final hidden states
    head: LMHead
    inputs: torch.Tensor  # [N] the token read at each position
    targets: torch.Tensor  # [N] the gold token it predicts
    rows: torch.Tensor  # [N] the batch row it belongs to

    @classmethod
    def gather(cls, hidden: torch.Tensor, head: LMHead, input_ids: torch.Tensor, labels: torch.Tensor) -> Positions:
        """`hidden` [N, width] already gathered at the supervised positions of `labels` [B, T]."""
        supervised = labels[:, 1:] != IGNORE_INDEX
        rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(supervised)
        return cls(hidden, head, input_ids[:, :-1][supervised], labels[:, 1:][supervised], rows[supervised])

    def ranks(self) -> torch.Tensor:
        """[N] index of each position within its row's response: 0, 1, 2, ..."""
        first_of_row = torch.searchsorted(self.rows, self.rows)  # rows are sorted: row-major flattening
        return torch.arange(len(self.rows), device=self.rows.device) - first_of_row


class CrossTokenizerBatch(NamedTuple):
    student: Positions
    teacher: Positions
    aligned: torch.Tensor  # [K, 2] (teacher, student) flat positions that predict the same bytes after the same text
    mined: torch.Tensor | None = None  # [K', 2] MinED's 1-to-1 warping pairs, when the objective asked for them

    @classmethod
    def of(cls, inputs: dict, student_hidden: torch.Tensor, student_head: LMHead, teacher_hidden: torch.Tensor,
           teacher_head: LMHead) -> CrossTokenizerBatch:
        """A collated batch's supervised positions on both sides (each model's hidden states already gathered
        there, the teacher's on its own tokenisation) and the token pairs between them as flat positions."""
        teacher_labels = inputs["teacher_labels"]
        pairs = {
            key: token_pairs_to_positions(inputs[key], teacher_labels, inputs["labels"])
            for key in PAIR_COLUMNS
            if key in inputs
        }
        return cls(
            Positions.gather(student_hidden, student_head, inputs["input_ids"], inputs["labels"]),
            Positions.gather(teacher_hidden, teacher_head, inputs["teacher_input_ids"], teacher_labels),
            pairs["aligned_pairs"],
            pairs.get("mined_pairs"),
        )

    @property
    def aligned_fraction(self) -> torch.Tensor:
        """Share of the student's supervised positions that have an aligned teacher position."""
        return torch.tensor(len(self.aligned) / max(len(self.student.rows), 1))


def token_pairs_to_positions(
    pairs: torch.Tensor, teacher_labels: torch.Tensor, student_labels: torch.Tensor
) -> torch.Tensor:
    """[B, K, 2] (teacher token, student token) indices per row, -1 padded → [K', 2] flat position indices.

    The position that predicts token t is t - 1; its flat index counts the supervised positions before it.
    """
    valid = pairs[..., 0] >= 0
    rows = torch.arange(len(pairs), device=pairs.device)[:, None].expand_as(valid)[valid]
    flat = [
        _flat_index(labels)[rows, pairs[..., side][valid] - 1]
        for side, labels in enumerate((teacher_labels, student_labels))
    ]
    if any(bool((index < 0).any()) for index in flat):
        raise ValueError("a token pair points at a prompt or padding token: recompute the pairs with the labels.")
    return torch.stack(flat, dim=1)


def _flat_index(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: the flat index of each supervised position, -1 elsewhere."""
    supervised = labels[:, 1:] != IGNORE_INDEX
    index = supervised.flatten().cumsum(0).view_as(supervised) - 1
    return torch.where(supervised, index, -1)
