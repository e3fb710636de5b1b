"""Collectives across training processes; each is the identity in a single process."""

from __future__ import annotations

import torch


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@torch.no_grad()
def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed elementwise over all ranks (every rank must call this the same number of times)."""
    if world_size() == 1:
        return values
    total = values.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def average_gradients_over_ranks(parameters) -> None:
    """Averages the gradients of parameters that DDP does not manage (a missing gradient counts as zeros)."""
    size = world_size()
    if size == 1:
        return
    for parameter in parameters:
        if parameter.requires_grad:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= size


def end_distributed() -> None:
    """Waits for every rank, then closes the process group (a gloo rank left open can abort at interpreter exit)."""
    if world_size() > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
