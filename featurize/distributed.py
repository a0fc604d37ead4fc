"""torchrun plumbing: rank and world from the environment, a gloo process group for coordination,
and torch threads per rank.

Only small control messages cross ranks (barriers, the pending-shard list, per-rank timings), never
tensors, so the process group is always gloo (CPU), also on GPU nodes: it needs no CUDA device and
keeps NCCL out of the control path. Without torchrun's variables the run is a single process.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import TypeVar, cast

import torch

from imgfeat.preprocess.loader import available_cores

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class DistContext:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that claims the output folder."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.initialized:
            torch.distributed.barrier()

    def broadcast(self, obj: T) -> T:
        """``obj`` from rank 0, on every rank."""
        if not self.initialized:
            return obj
        box: list[T | None] = [obj if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return cast(T, box[0])  # rank 0's obj, received into the box

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.initialized:
            return [obj]
        out: list[T | None] | None = [None] * self.world_size if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return cast("list[T] | None", out)  # gather_object filled every slot on rank 0

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.initialized:
            return [obj]
        out: list[T | None] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return cast("list[T]", out)  # all_gather_object filled every slot


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when the thread that started it exits."""


def stop_with_launcher() -> bool:
    """Under torchrun (on Linux): ask the kernel to send this rank SIGTERM when its launcher dies.

    torchrun starts each rank in a session of its own, so a SIGKILL of torchrun (a scheduler's or the OOM
    killer's) reaches no rank: they would run on, holding their GPUs, and race a rerun over the same
    shards. torchrun's agent starts ranks from its main thread, which lives as long as the agent.
    Returns whether the request was made."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not os.uname().sysname == "Linux":
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # A launcher that died before this request goes unnoticed; its pid cannot be told from a subreaper's
    # or from torchrun's as PID 1 of a container, so the parent is not checked.
    return True


def init_distributed(timeout_s: float | None = None) -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; join a gloo group when world > 1.
    Under torchrun, the rank also stops when torchrun dies (``stop_with_launcher``)."""
    stop_with_launcher()
    ctx = DistContext(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
    )
    if ctx.world_size > 1 and not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("IMGFEAT_DIST_TIMEOUT_S", 1800)))
        store = _attempt_store(ctx, timeout)
        if store is not None:
            torch.distributed.init_process_group("gloo", store=store, rank=ctx.rank, world_size=ctx.world_size,
                                                 timeout=timeout)
        else:
            torch.distributed.init_process_group("gloo", timeout=timeout)
        ctx.initialized = True
        log.info("rank %d of %d (local %d of %d) joined the gloo group", ctx.rank, ctx.world_size,
                 ctx.local_rank, ctx.local_world_size)
    elif torch.distributed.is_initialized():
        ctx.initialized = True
    return ctx


def _attempt_store(ctx: DistContext, timeout: datetime.timedelta) -> torch.distributed.Store | None:
    """On one node under torchrun: the agent's store, with a prefix per restart attempt.

    torchrun shares its rendezvous TCPStore with the workers, and ``init_process_group`` keys it with a
    constant ``default_pg`` prefix, so after a ``--max-restarts`` restart a new rank can read the address
    a dead rank published and wait on it forever (pytorch/pytorch#135712). One agent's restart count is
    the same for all its workers, so on one node a per-attempt prefix is safe. Across nodes the agents'
    counts can differ: there, launch with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` to restart safely
    (or rerun the command, which resumes)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    from torch.distributed import PrefixStore, TCPStore

    base = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ctx.world_size, is_master=False,
                    timeout=timeout)
    attempt = f"imgfeat/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return PrefixStore(attempt, base)


def set_threads(ctx: DistContext, device: torch.device) -> int:
    """torch intra-op threads for this rank: its share of the cores (cores // ranks on this node), so
    ranks do not oversubscribe the CPU. Returns the count set. (``device`` is kept for future policies.)"""
    threads = max(1, available_cores() // max(1, ctx.local_world_size))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    return threads


def shutdown(ctx: DistContext) -> None:
    """Leave the process group this run joined (no-op in a single process)."""
    if ctx.initialized and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
