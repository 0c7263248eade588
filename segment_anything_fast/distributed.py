"""Data-parallel runs under ``torchrun``: process group setup, sharding, gathering, failures.

A script calls :func:`init_distributed`; launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` in the environment, world size > 1) it joins the process group (NCCL for CUDA,
gloo for CPU), otherwise it returns a single-process context whose collectives are local.
Each rank takes ``shard(items, ctx.rank, ctx.world_size)`` of the work, ranks meet at sync
points through :meth:`DistContext.check` (every rank reports ok or its error; if any failed,
all raise :class:`RankFailedError` naming the rank and the image), and rank 0 gathers results
with :meth:`DistContext.gather_object`.
"""
import datetime
import os
import socket
import sys
from typing import Any, List, Optional, Sequence

import torch

DEFAULT_TIMEOUT_S = 1800.0
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class RankFailedError(RuntimeError):
    """One or more ranks failed; raised on every rank at the same sync point."""

    def __init__(self, failures: Sequence[tuple], world_size: int, where: str):
        self.failures = list(failures)  # (rank, host, message)
        lines = [f"rank {r} of {world_size} (host {h}): {m}" for r, h, m in self.failures]
        super().__init__(
            f"{len(self.failures)} rank(s) failed{' during ' + where if where else ''}; the run "
            "stops on every rank:\n  " + "\n  ".join(lines))


def shard(items: Sequence[Any], rank: int, world_size: int) -> List[Any]:
    """Items ``rank``, ``rank + world_size``, ... of ``items`` (round robin).

    The shards of ranks 0..world_size-1 are disjoint, cover every item, differ in size by at
    most one (lower ranks get the extra items) and keep ``items``' order.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in 0..{world_size - 1}, got {rank!r}.")
    return list(items)[rank::world_size]


def shard_size(n: int, rank: int, world_size: int) -> int:
    """``len(shard(range(n), rank, world_size))`` without building the list."""
    return len(range(rank, n, world_size))


class DistContext:
    """Rank, world size and collectives of one process (a group of one when not distributed)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 backend: Optional[str] = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend = backend
        self.host = socket.gethostname()

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self):
        return (f"DistContext(rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, backend={self.backend})")

    def resolve_device(self, requested: Optional[str]) -> torch.device:
        """The device this rank runs on: ``cuda:LOCAL_RANK`` for a CUDA request when distributed."""
        if requested is None:
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(requested)
        if not self.is_distributed or dev.type != "cuda":
            return dev
        if dev.index is not None:
            raise ValueError(
                f"--device {requested!r}: under torchrun every rank uses cuda:LOCAL_RANK; pass "
                "--device cuda (choose GPUs with CUDA_VISIBLE_DEVICES).")
        return torch.device("cuda", self.local_rank)

    def all_gather_object(self, obj: Any) -> List[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_object(self, obj: Any) -> Optional[List[Any]]:
        """``obj`` of every rank in rank order on rank 0; None on the other ranks."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def check(self, error: Optional[str], where: str = "") -> None:
        """Sync point: each rank passes None (ok) or a message saying what failed (name the image).

        If any rank passed a message, every rank raises :class:`RankFailedError` listing them,
        so no rank is left waiting for the others. All ranks must call it the same number of times.
        """
        statuses = self.all_gather_object((self.rank, self.host, error))
        failed = [s for s in statuses if s[2] is not None]
        if failed:
            raise RankFailedError(failed, self.world_size, where)

    def barrier(self) -> None:
        if self.is_distributed:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        """Destroy the process group (idempotent)."""
        if self.is_distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.backend = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in ENV_VARS)


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise RuntimeError(f"Environment variable {name}={text!r} is not an integer; launch with "
                           "torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK.") from None


def init_distributed(device_type: str = "cpu",
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the torchrun process group, or return a single-process context.

    Args:
        device_type: "cuda" (NCCL backend; this process is pinned to GPU LOCAL_RANK) or "cpu"
            (gloo backend).
        timeout_s: how long a collective may wait for the other ranks before failing (a rank
            that died or hangs then stops the run instead of blocking it forever). Must cover
            the longest gap between sync points, e.g. a first batch with compilation.
    """
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}.")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}.")
    if not launched_by_torchrun():
        return DistContext()
    rank, world, local = (_env_int(v) for v in ENV_VARS)
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"Inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}.")
    if world == 1:
        return DistContext(0, 1, local)
    import torch.distributed as dist

    if device_type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise RuntimeError(
                f"rank {rank}: LOCAL_RANK={local} but this node has {n} visible CUDA GPU(s); "
                f"use --nproc-per-node {n} or fewer.")
        torch.cuda.set_device(local)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, backend)


def print_failure(ctx: DistContext, err: RankFailedError) -> None:
    """Full message on rank 0 and on the ranks that failed; a one-line pointer on the others."""
    if ctx.is_main or any(r == ctx.rank for r, _, _ in err.failures):
        print(f"\nerror: {err}", file=sys.stderr)
    else:
        print(f"error: rank {ctx.rank} stopped: another rank failed (see rank 0's log).",
              file=sys.stderr)


def finish(ctx: DistContext, code: int) -> int:
    """Flush output and wait for every rank before any returns ``code``.

    torchrun stops all workers as soon as one exits non-zero; waiting here lets rank 0 print its
    summary of the whole run first. A rank that cannot be reached is not waited for.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if ctx.is_distributed:
        try:
            ctx.barrier()
        except RuntimeError:
            pass
    return code
