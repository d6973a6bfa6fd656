"""Processes and parallelism: the only module that touches torch.distributed.

`torchrun` starts one process per device and puts the topology in the environment; a plain `python`
run is rank 0 of 1 and takes the same code path, with every collective below a no-op. Parallelism is
applied to a plain model from outside: `wrap` returns it under DDP (gradients averaged across ranks,
synchronised only on the last micro-step of an accumulation) or FSDP2 (`fully_shard`: parameters,
gradients and optimizer state sharded across ranks, for models that do not fit one device). The state
helpers gather full, unsharded state on rank 0 for saving and scatter it back on loading, so a
checkpoint written under DDP, FSDP or a single process loads under any of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as tdist

from gptforge.device import pick_device
from gptforge.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                            "use --nproc_per_node no larger than the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise UserError("multi-process training on mps is not supported; use one process")
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size), device


def cleanup() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (a no-op in a single process)."""
    if tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable Python objects from our own processes)."""
    if not tdist.is_initialized():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The element-wise maximum over ranks (the values themselves in a single process): how ranks agree
    on decisions each takes alone, such as stopping (any rank's flag) or a clock-based schedule."""
    if not tdist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


# ---------------------------------------------------------------------------------------------
# Wrapping


def wrap(model: torch.nn.Module, mode: str, info: DistInfo, device: torch.device,
         dtype: torch.dtype) -> torch.nn.Module:
    """The module to train: `model` itself in a single process, else under DDP or FSDP2."""
    if not info.is_distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # our only buffers (RoPE tables) are constants: no need to broadcast them at every forward
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if dtype == torch.float16:
            raise UserError("FSDP training here uses bfloat16 or float32; set --train.dtype bfloat16")
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:  # one unit per block: gather a block's weights only while it runs
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise UserError(f"unknown --dist {mode!r}; use ddp or fsdp")


def set_grad_sync(model: torch.nn.Module, mode: str, enabled: bool) -> None:
    """Reduce gradients across ranks only on the last micro-step of an accumulation."""
    if not tdist.is_initialized():
        return
    if mode == "ddp":
        model.require_backward_grad_sync = enabled
    elif mode == "fsdp":
        model.set_requires_gradient_sync(enabled)


def eval_module(model: torch.nn.Module, raw: torch.nn.Module, mode: str) -> torch.nn.Module:
    """What to run evaluation forwards on: the plain model, except under FSDP where only the wrapper has weights."""
    return model if (mode == "fsdp" and tdist.is_initialized()) else raw


# ---------------------------------------------------------------------------------------------
# Full state for checkpoints


def _sharded(mode: str) -> bool:
    return mode == "fsdp" and tdist.is_initialized()


def full_model_state(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The complete weights on CPU; on rank 0 only under FSDP (other ranks get {}). Collective under FSDP."""
    if _sharded(mode):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the index keys of optimizer.state_dict())."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> dict[str, Any]:
    """optimizer.state_dict() of the unsharded model (parameters by index); collective under FSDP."""
    if not _sharded(mode):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:  # ranks other than 0
        return {}
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: s for n, s in full["state"].items() if n in index}
    groups, start = [], 0
    for group in optimizer.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str,
                         state: dict[str, Any]) -> None:
    """Load an index-keyed, unsharded optimizer state (as saved) into a plain, DDP or FSDP optimizer."""
    if not _sharded(mode):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

