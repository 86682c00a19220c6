"""Multi-process training on torch's distributed engine: the plumbing `train-world` needs under `torchrun`.

    torchrun --nproc_per_node=N $(which melodjinn) train-world ...      # one machine, N processes
    torchrun --nnodes=M --node_rank=i --rdzv_endpoint=HOST:PORT ...    # M machines (same command on each)

Design: every rank holds the same replica and draws the same random numbers. A step's *global* batch of
`batch_size` clips is drawn once from one seeded generator (identical on every rank) and each rank trains on
its contiguous shard; DistributedDataParallel averages the gradients. Randomness per example (frame masks,
action dropout) is drawn for the whole global batch and sliced, and the LAM's non-gradient state (VQ usage
EMA, dead-code restarts) is computed from global-batch statistics. So N processes with batch B/N each follow
the 1-process run with batch B to float rounding, and a checkpoint (written by rank 0 alone) is independent of
the number of processes: a run resumes on any number of them.

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op on one process.
Backends: NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU. Multi-node runs need `out=` on
storage every node sees (all ranks read the checkpoint when resuming; rank 0 writes it).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.runtime import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int = 0  # global rank, 0 .. world_size - 1
    world_size: int = 1
    local_rank: int = 0  # rank on this machine (picks the GPU)
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context created the process group (and destroys it in `close`)

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT), or return a one-process context. `device`: the run's `device=` setting."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if device not in ("auto", "cuda"):
            raise ConfigError(f"device={device!r} under torchrun: use device=auto or device=cuda; each process takes cuda:LOCAL_RANK")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here; run at most that many processes per node")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, resolved, owns)


def shard(global_batch: int, ctx: DistContext) -> slice:
    """This rank's rows of a global batch: contiguous, equal shards in rank order."""
    if global_batch % ctx.world_size:
        raise ConfigError(f"train.batch_size={global_batch} (the global batch) must be divisible by the {ctx.world_size} processes")
    per_rank = global_batch // ctx.world_size
    return slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Endless batches of dataset indices for one rank: each global batch of `batch_size` indices is drawn
    uniformly (with replacement) from `generator`, identically on every rank, and this rank takes its `shard`.
    As a DataLoader `batch_sampler` it shards any map-style dataset (a token cache's windows, say).
    `generator`'s state is the sampler's state: save and restore it to resume, on any number of processes."""

    def __init__(self, dataset_size: int, batch_size: int, generator: torch.Generator, ctx: DistContext = DistContext()):
        if dataset_size < 1:
            raise ConfigError("no training examples to sample from")
        self.dataset_size, self.batch_size, self.generator, self.ctx = dataset_size, batch_size, generator, ctx
        self.rows = shard(batch_size, ctx)

    def global_batch(self) -> torch.Tensor:
        """The next global batch (batch_size,) of indices, the same on every rank."""
        return torch.randint(self.dataset_size, (self.batch_size,), generator=self.generator)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.global_batch()[self.rows].tolist()


# ---- collectives (no-ops on one process) ------------------------------------------------------------------------


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (it must live on the backend's device)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` (equal shapes) along dim 0 in rank order: with `shard`'s contiguous
    shards that is the global batch in its original order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def mean_over_ranks(logs: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar logs over ranks (one collective), so rank 0 logs the global batch's figures."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not logs:
        return logs
    keys = sorted(logs)
    values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


@contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a data cache); the others run it after, when it exists."""
    if not ctx.is_main:
        barrier(ctx)
    yield
    if ctx.is_main:
        barrier(ctx)


# ---- model wrapping ---------------------------------------------------------------------------------------------


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel over `module` when distributed, `module` itself otherwise. Buffers are not
    broadcast from rank 0: the model keeps them equal itself (global-batch statistics), which
    `check_replicas_in_sync` verifies."""
    if not ctx.distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # torch >= 2.13 renamed the switch; either way buffers still agree at wrap time (they are the same everywhere)
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=device_ids, **no_buffer_sync)


def gradient_sync(module: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradients are all-reduced only when `sync` (the last
    micro-batch of an accumulated step)."""
    if sync or not isinstance(module, DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def tensor_digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """A SHA-256 per tensor of its exact bytes."""
    return {name: hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in state.items()}


def drifted(per_rank: Sequence[dict[str, str]]) -> list[str]:
    """Names of tensors whose digests differ between ranks."""
    return sorted(name for name in per_rank[0] if any(d.get(name) != per_rank[0][name] for d in per_rank[1:]))


def check_replicas_in_sync(module: nn.Module, ctx: DistContext) -> None:
    """Raise if any parameter or buffer differs (bitwise) between ranks: replicas that drift apart would make
    rank 0's checkpoint a model no rank trained."""
    if not ctx.distributed:
        return
    per_rank: list = [None] * ctx.world_size
    dist.all_gather_object(per_rank, tensor_digests(module.state_dict()))
    names = drifted(per_rank)
    if names:
        raise CheckpointError(f"ranks hold different parameters or buffers: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; "
                              "this is a bug in the distributed training path, please report it")
