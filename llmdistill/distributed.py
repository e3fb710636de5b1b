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


def is_sharded(model) -> bool:
    """Whether the model's parameters are split over the ranks (FSDP2, DeepSpeed ZeRO-3): each forward pass then
    gathers them, so every rank must run the same number of forward passes."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules()) or any(
        hasattr(parameter, "ds_id") for parameter in model.parameters()
    )


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (one scalar all-reduce)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def shard_keeping_head_whole(model, mesh=None):
    """FSDP2: each decoder layer and the rest sharded over the ranks and gathered only for its forward pass, but the
    LM head whole on every rank, since the loss reads its weight outside the forward. The trainer shards the frozen
    teacher with it; a trained model's head gradient is then the caller's to average over the ranks."""
    from torch.distributed.fsdp import fully_shard

    head = set(model.get_output_embeddings().parameters())
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=True, ignored_params=head)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=head)
    return model


def end_distributed() -> None:
    """Waits for every rank, then closes the process group (a gloo rank left open can abort at interpreter exit)."""
    if world_size() > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
