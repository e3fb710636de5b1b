"""Collectives across training processes; each is the identity in a single process."""

from __future__ import annotations

import copy
import gc
from contextlib import contextmanager

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


@contextmanager
def gathered_for_reading(parameters):
    """The parameters whole on every rank for the block (DeepSpeed ZeRO-3 shards gathered, read only); every rank
    must enter it together. Parameters that are not sharded are left as they are."""
    sharded = [parameter for parameter in parameters if hasattr(parameter, "ds_id")]
    if not sharded:
        yield
        return
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(sharded):
        yield


def keep_whole_under_zero3(model, parameters) -> None:
    """DeepSpeed ZeRO-3: these parameters of `model` (an LM head, whose weight the loss reads after the forward and
    again in the backward) registered as used outside their own module: the model's forward gathers them whole on
    every rank and no module releases them, until the optimizer step re-partitions everything. Their gradients are
    still reduce-scattered and their optimizer states partitioned. Call before the model's next forward."""
    from deepspeed.runtime.zero import register_external_parameter

    for parameter in parameters:
        if hasattr(parameter, "ds_id") and not parameter.is_external_param:
            parameter.is_external_param = True
            register_external_parameter(model, parameter)


def zero3_teacher_engine(teacher, deepspeed_plugin):
    """DeepSpeed ZeRO-3 for the frozen teacher: an inference engine (no optimizer) whose hooks gather each layer's
    shard for its forward pass, with the LM head kept whole on every rank. The teacher module is called as before."""
    import deepspeed

    config = copy.deepcopy(deepspeed_plugin.deepspeed_config)
    for training_only in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(training_only, None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    keep_whole_under_zero3(teacher, teacher.get_output_embeddings().parameters())
    teacher.eval()
    return engine


def end_distributed() -> None:
    """Waits for every rank, then closes the process groups: a gloo rank left open can abort at interpreter exit.
    What the run left unreachable (a trainer and its DeepSpeed engines, which hold communication handles) is freed
    first, while the interpreter and the groups are still whole; call this once the trainer is out of scope."""
    gc.collect()
    if world_size() > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
