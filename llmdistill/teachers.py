"""Several teachers as one target: per-row routing by a dataset column, or the average of their distributions.

The trainer hands the loss one teacher "hidden state" per supervised position: every teacher's hidden state side by
side, then the position's K mixture weights (one-hot for a routed row, 1/K each for the average). `MixtureHead`
stands in for the teacher's LM head and turns that into logits τ·log Σ_k w_k·softmax(z_k/τ), so the loss's
softmax(z/τ) is the weighted mixture of the teachers' distributions, and every divergence works unchanged.
"""

from __future__ import annotations

import torch

from .data import TEACHER_INDEX_COLUMN
from .errors import DataError
from .models import LMHead, supervised_hidden_states

__all__ = ["TEACHER_INDEX_COLUMN", "MixtureHead", "mixture_signal", "route_indices"]


class MixtureHead:
    """The teachers' heads as one: logits over the ids every head has (`weight` is a shape stand-in, [V, ΣD + K])."""

    bias = None
    softcap = None

    def __init__(self, heads: list[LMHead], temperature: float):
        self.heads, self.temperature = heads, temperature
        self.widths = [head.weight.shape[1] for head in heads]
        rows = min(head.weight.shape[0] for head in heads)
        self.weight = torch.empty(rows, sum(self.widths) + len(heads), device="meta")

    def linear(self, packed: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        rows = self.weight.shape[0] if rows is None else min(rows, self.weight.shape[0])
        *hidden, weights = packed.split([*self.widths, len(self.heads)], dim=1)
        mixture = None
        for head, teacher_hidden, weight in zip(self.heads, hidden, weights.float().unbind(1)):
            logits = head.logits(teacher_hidden, rows).float() / self.temperature
            weighted = torch.log_softmax(logits, dim=-1) + weight.log().unsqueeze(1)  # log 0 = -inf: not this one
            mixture = weighted if mixture is None else torch.logaddexp(mixture, weighted)
        return mixture * self.temperature

    def logits(self, packed: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        return self.linear(packed, rows)

    def detached(self) -> MixtureHead:
        return MixtureHead([head.detached() for head in self.heads], self.temperature)


@torch.no_grad()
def mixture_signal(teachers: list, input_ids, attention_mask, supervised, routes: torch.Tensor | None = None):
    """[N, ΣD + K] at the N supervised positions: each teacher's hidden states (zeros at positions routed
    elsewhere), then the mixture weights. With `routes` ([B] teacher per row) each teacher runs on its rows only."""
    rows_of_positions = supervised.nonzero()[:, 0]
    count = len(rows_of_positions)
    if routes is None:
        weights = torch.full((count, len(teachers)), 1 / len(teachers), device=input_ids.device)
    else:
        weights = torch.nn.functional.one_hot(routes[rows_of_positions], len(teachers)).float()
    parts = []
    for index, teacher in enumerate(teachers):
        hidden = torch.zeros(count, LMHead.of(teacher).weight.shape[1], device=input_ids.device)
        rows = slice(None) if routes is None else routes == index
        if routes is None or rows.any():
            hidden[weights[:, index] > 0] = supervised_hidden_states(
                teacher, input_ids[rows], attention_mask[rows], supervised[rows]
            ).float()
        parts.append(hidden)
    return torch.cat([*parts, weights], dim=1)


def route_indices(values: list, teacher_names: list[str], column: str) -> list[int]:
    """Each row's teacher as a 0-based index, from a column holding either indices or the names listed in
    teacher_model_name_or_path; the rows that name no teacher are a DataError, counted from 1."""
    indices, problems = [], []
    for row, value in enumerate(values, start=1):
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(teacher_names):
            indices.append(value)
        elif isinstance(value, str) and value in teacher_names:
            indices.append(teacher_names.index(value))
        else:
            problems.append(f"row {row}: {value!r}")
    if problems:
        listed = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DataError(
            f"teacher_routing_column={column!r} must name a teacher in every row, as an index from 0 to "
            f"{len(teacher_names) - 1} or one of {teacher_names}; {len(problems)} rows do not ({listed})."
        )
    return indices
