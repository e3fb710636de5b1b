"""Learning rates of the objectives' projectors (DSKD, DSKD-ETA, CMA): scaled to each layer's weights by default.

Adam's first steps move every weight by about the learning rate, with the sign of its gradient. For a linear layer
y = W h the gradient of W is an outer product δ hᵀ, so those signs line up and each output moves by lr · ‖h‖₁, the
L1 norm of the input. Real hidden states are wide and large (Qwen2.5-0.5B's last states: ‖h‖₁ ≈ 3,300 over 896
dimensions), while the ideal-initialised projector's outputs are small (rms ≈ 0.9): the DSKD papers' 1e-3 moves
them by 3.5 times their own size at the first step, and the projector's terms blow up before they recover. On the
toy models this project trained first, ‖h‖₁ was a few dozen and 1e-3 was safe.

The default rate bounds that first move relative to the layer's outputs: with rms(W h) ≈ rms(W) · ‖h‖₂ and
‖h‖₁ ≤ √fan_in · ‖h‖₂, lr = c · rms(W) / √fan_in moves the outputs by at most c times their rms, whatever the
models' width and hidden-state scale. It is read from the weights at set-up (no data), so a resumed run gets the
same rates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# c: the first step moves a projector's outputs by at most this fraction of their rms (benchmarks/dskd_stability.py).
FIRST_STEP_FRACTION = 0.3


def scaled_learning_rate(weight: torch.Tensor, fraction: float = FIRST_STEP_FRACTION) -> float:
    """c · rms(W) / √fan_in for a [fan_out, fan_in] weight (see the module's docstring)."""
    rms = weight.detach().float().pow(2).mean().sqrt().item()
    return fraction * rms / math.sqrt(weight.shape[1])


def projector_param_groups(projectors: nn.Module, learning_rate: float | None) -> list[dict]:
    """Optimizer groups for the trainable parameters of `projectors`, each tagged `projectors`: one group at
    `learning_rate` when it is given, else one per linear layer (weight and bias) at its scaled rate."""
    trainable = [p for p in projectors.parameters() if p.requires_grad]
    if not trainable:
        return []
    if learning_rate is not None:
        return [_group(trainable, learning_rate)]
    groups, grouped = [], set()
    for layer in projectors.modules():
        if isinstance(layer, nn.Linear) and layer.weight.requires_grad:
            params = [p for p in layer.parameters() if p.requires_grad]
            groups.append(_group(params, scaled_learning_rate(layer.weight)))
            grouped.update(params)
    rest = [p for p in trainable if p not in grouped]
    if rest:
        raise TypeError(
            f"{len(rest)} projector parameter(s) outside a linear layer have no scaled learning rate: set "
            "projector_learning_rate."
        )
    return groups


def _group(params: list[torch.Tensor], learning_rate: float) -> dict:
    return {"params": params, "lr": learning_rate, "weight_decay": 0.0, "projectors": True}
