"""Distributed data-parallel set-up: join the ``torchrun`` process group, gather state dicts (engineering).

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set) :func:`init_distributed` initialises the process group (NCCL on
CUDA, gloo on CPU); every global batch is sharded over the ranks (each rank takes every ``world_size``-th index, as
``DistributedSampler`` does) and only rank 0 writes files. Batch-norm statistics are per rank during the forward
pass; :func:`gather_state_dict` averages them over the ranks when a checkpoint is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from trustmae_lib.errors import TrustMAEError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed() -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); otherwise single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if "RANK" not in os.environ:
        raise TrustMAEError("WORLD_SIZE is set but RANK is not; launch distributed runs with torchrun")
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, owns_group=owns)


def gather_state_dict(module: nn.Module, ddp: DistContext | None = None, apply: bool = False) -> dict:
    """CPU copy of ``module.state_dict()``; under DDP with batch-norm running statistics averaged over the ranks.

    DDP keeps parameters identical but every rank updates its own running mean/variance (rank 0's are broadcast
    before each forward). The saved -- and with ``apply`` the live -- statistics are the mean over the ranks, so
    every rank ends with identical weights. Training-mode forwards use batch statistics, so this does not change
    the optimisation. Collective: call it on every rank.
    """
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if ddp is None or not ddp.active:
        return state
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
            for buf in ("running_mean", "running_var"):
                live = getattr(sub, buf)
                mean = live.detach().clone()
                dist.all_reduce(mean)
                mean /= ddp.world_size
                state[f"{name}.{buf}" if name else buf] = mean.cpu()
                if apply:
                    live.copy_(mean)
    return state
