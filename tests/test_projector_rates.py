"""The projectors' default learning rate (llmdistill.projector_rates): c · rms(W) / √fan_in per layer, which bounds
Adam's first step on the layer's outputs whatever the scale of its inputs; the papers' fixed 1e-3 does not."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmdistill.projector_rates import FIRST_STEP_FRACTION, projector_param_groups, scaled_learning_rate

from test_dskd import make_trainer


def real_like_states(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Hidden states at a real model's scale: |h| ≈ 3.7 per dimension, a few outlier dimensions near 80."""
    generator = torch.Generator().manual_seed(seed)
    states = 4.5 * torch.randn(rows, width, generator=generator)
    states[:, :4] *= 18
    return states


def first_step_move(layer: nn.Linear, states: torch.Tensor, targets: torch.Tensor, learning_rate: float):
    """|Δ outputs| after one AdamW step on a CE loss, and the outputs' rms before it."""
    before = layer(states).detach()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=learning_rate, weight_decay=0.0)
    nn.functional.cross_entropy(layer(states), targets).backward()
    optimizer.step()
    return (layer(states).detach() - before).abs(), before.pow(2).mean().sqrt()


def test_scaled_rate_is_the_formula():
    weight = torch.randn(7, 50) * 0.01
    expected = FIRST_STEP_FRACTION * weight.pow(2).mean().sqrt().item() / math.sqrt(50)
    assert scaled_learning_rate(weight) == pytest.approx(expected, rel=1e-6)


def test_scaled_rate_bounds_the_first_step_where_the_papers_rate_does_not():
    torch.manual_seed(0)
    layer = nn.Linear(896, 64, bias=False)
    with torch.no_grad():
        layer.weight.mul_(0.004 / layer.weight.pow(2).mean().sqrt())  # an ideal-initialised projector's scale
    state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    states, targets = real_like_states(1, 896), torch.tensor([3])
    move, rms = first_step_move(layer, states, targets, scaled_learning_rate(layer.weight))
    bound = FIRST_STEP_FRACTION * layer.weight.detach().pow(2).mean().sqrt() * states.norm()
    assert move.max() <= bound * 1.01
    assert move.max() < rms  # a fraction of the outputs' size
    layer.load_state_dict(state)
    move, rms = first_step_move(layer, states, targets, 1e-3)
    assert move.max() > 2 * rms  # the cause of DSKD's first-step blow-up on real hidden states


def test_one_group_per_trainable_layer_unless_a_rate_is_set():
    projectors = nn.ModuleDict({"t2s": nn.Linear(32, 8, bias=False), "s2t": nn.Linear(8, 32), "frozen": nn.Linear(8, 8)})
    projectors["frozen"].requires_grad_(False)
    groups = projector_param_groups(projectors, None)
    assert [len(group["params"]) for group in groups] == [1, 2]
    assert [group["lr"] for group in groups] == [
        scaled_learning_rate(projectors["t2s"].weight), scaled_learning_rate(projectors["s2t"].weight)
    ]
    assert all(group["projectors"] and group["weight_decay"] == 0.0 for group in groups)
    (single,) = projector_param_groups(projectors, 3e-3)
    assert single["lr"] == 3e-3 and len(single["params"]) == 3


def test_parameters_outside_a_linear_layer_need_an_explicit_rate():
    projectors = nn.Module()
    projectors.scale = nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="projector_learning_rate"):
        projector_param_groups(projectors, None)
    assert len(projector_param_groups(projectors, 1e-3)) == 1


def test_trainer_default_scales_the_trained_projector(tmp_path, tokenizer, examples):
    trainer = make_trainer(tmp_path, tokenizer, examples, lr_scheduler_type="constant")
    trainer.train()
    (group,) = [group for group in trainer.optimizer.param_groups if group.get("projectors")]
    assert group["params"] == [trainer.projectors.t2s.weight]  # closed-form s2t is not trained
    initial = make_trainer(tmp_path / "again", tokenizer, examples).projectors.t2s.weight
    assert group["lr"] == pytest.approx(scaled_learning_rate(initial))
