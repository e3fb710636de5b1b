"""What every objective returns for one micro-batch."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ObjectiveOutput(NamedTuple):
    loss: torch.Tensor  # the weighted, step-normalised loss to backpropagate
    ce: torch.Tensor  # Σ CE(student, gold) over the micro-batch's response tokens
    kd: torch.Tensor  # the KD term as a sum over those tokens (so kd / tokens is its per-token value)
    metrics: dict[str, torch.Tensor]  # extra values to log, already per token or in percent
