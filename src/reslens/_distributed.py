"""Data-parallel data-set work on ``torch.distributed``: which units a rank reads, and the merges.

Every data-set pass (lens statistics, trigger mining, key statistics, learned lenses, the PCA
experiment, tracing many facts) reads a corpus as numbered *units* (windows, sentences, prompts).
Under a process group, rank ``r`` of ``W`` reads the units whose number ``i`` has ``i % W == r``
(a deterministic shard: no unit is split or read twice), computes locally, and the results are
merged with collectives, in float64 for sums, so the merged result equals a one-process run up to
the order of float64 additions. Without a process group everything is today's one-process run.

``group=None`` (every public function's default) means: the default group when
``torch.distributed`` is initialised, else one process; under ``torchrun`` (its environment
variables set, no group started yet) reslens starts the default group itself — gloo on CPUs,
NCCL with one GPU per local rank — so a script runs data-parallel without a code change. A
``ProcessGroup`` means that group; ``group=False`` forces one process even under ``torchrun``.
Collectives run on the CPU for gloo and on the current CUDA device for NCCL.
"""

from __future__ import annotations

import operator
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["Shard", "shard_of", "merge_top_k", "units_of", "local_device"]

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run: ``rank`` of ``world`` in ``group`` (None: one process)."""

    group: Any
    rank: int
    world: int

    @property
    def primary(self) -> bool:
        """Rank 0: the one that shows progress bars and writes files."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def take(self, units: Iterable[T], first: int = 0) -> Iterator[tuple[int, T]]:
        """``(index, unit)`` for this rank's units of ``units``, numbered in corpus order from ``first``.

        The one place the sharding rule is written: rank ``r`` of ``W`` takes the units whose number
        ``i`` has ``i % W == r``.
        """
        for index, unit in enumerate(units, start=first):
            if index % self.world == self.rank:
                yield index, unit

    def _device(self) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor of the same dtype and device; as is alone)."""
        if not self.parallel:
            return tensor
        import torch.distributed as dist

        buffer = tensor.detach().to(self._device(), copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer.to(tensor.device)

    def cat(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order (sizes along ``dim`` may vary)."""
        if not self.parallel:
            return tensor
        import torch.distributed as dist

        device = self._device()
        moved = tensor.detach().to(device).movedim(dim, 0).contiguous()
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([moved.shape[0]], device=device), group=self.group)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros((longest, *moved.shape[1:]), dtype=moved.dtype, device=device)
        padded[: moved.shape[0]] = moved
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        out = torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])
        return out.movedim(0, dim).to(tensor.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (``[obj]`` alone)."""
        if not self.parallel:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def same(self, value: Any, name: str) -> None:
        """Refuse (on every rank) a run whose ranks disagree on ``value`` (options, corpus length...)."""
        values = self.gather_objects(value)
        if any(v != values[0] for v in values):
            raise ValueError(f"the ranks disagree on {name}: {values}; every rank must be given the same")

    def same_model(self, arch: Any, lenses: Sequence[Any] = ()) -> None:
        """Refuse (on every rank) a run whose ranks hold different weights or were given different lenses.

        Compares the model's :attr:`~reslens.arch.Arch.fingerprint` and each lens's ``fingerprint``
        (before any merge: a merge of different models' numbers would be a silent mixture).
        """
        if not self.parallel:
            return
        name = arch.checkpoint_name or type(arch.model).__name__
        held = self.gather_objects((name, arch.fingerprint))
        if any(h[1] != held[0][1] for h in held):
            ranks = ", ".join(f"rank {r}: {n} (fingerprint {f[:12]})" for r, (n, f) in enumerate(held))
            raise ValueError(f"the ranks hold different models ({ranks}); every rank must load the same "
                             "weights")
        given = self.gather_objects([(lens.name, lens.fingerprint) for lens in lenses])
        if any(g != given[0] for g in given):
            ranks = "; ".join(f"rank {r}: " + ", ".join(f"{n} (fingerprint {f[:12]})" for n, f in g)
                              for r, g in enumerate(given))
            raise ValueError(f"the ranks were given different lenses ({ranks}); every rank must be given "
                             "the same lens= values")

    @contextmanager
    def together(self) -> Iterator[None]:
        """Run the block on every rank, and fail on every rank if it fails on one.

        Wrap what a rank does alone before a collective (checking its arguments, reading its corpus,
        its share of the batches): on exit every rank tells the others whether its block raised (one
        ``all_gather_object``), and if any did, every rank raises the first failing rank's error (its
        type, and its message led by ``"on rank r of W: "``), instead of the others waiting in the next
        collective until the process group times out. Alone it is the block as it is.
        """
        if not self.parallel:
            yield
            return
        try:
            yield
        except Exception as error:
            self._fail_together(error)
            raise
        self._fail_together(None)

    def _fail_together(self, error: BaseException | None) -> None:
        """Raise on every rank the first failing rank's error (``error``: this rank's, or None)."""
        told = None if error is None else (_sendable(type(error)), str(error))
        failed = [(rank, e) for rank, e in enumerate(self.gather_objects(told)) if e is not None]
        if not failed:
            return
        rank, (cls, message) = failed[0]
        text = f"on rank {rank} of {self.world}: {message}"
        if len(failed) > 1:
            text += f" (ranks {', '.join(str(r) for r, _ in failed)} failed; this is rank {rank}'s error)"
        try:
            raised = cls(text)
        except Exception:  # an error class that does not take one message
            raised = RuntimeError(f"{cls.__name__}: {text}")
        raise raised from error

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def _sendable(cls: type) -> type:
    """``cls`` if another process finds it by its module and name (as it is sent), else ``RuntimeError``."""
    try:
        found = operator.attrgetter(cls.__qualname__)(sys.modules[cls.__module__])
    except (AttributeError, KeyError):
        return RuntimeError
    return cls if found is cls else RuntimeError


def shard_of(group: Any = None) -> Shard:
    """The :class:`Shard` of this process for ``group`` (see the module docstring for ``None``/``False``)."""
    if group is False:
        return Shard(None, 0, 1)
    import torch.distributed as dist

    if group is None:
        if dist.is_available() and not dist.is_initialized() and _under_torchrun():
            _start_default_group()
        if not (dist.is_available() and dist.is_initialized()):
            return Shard(None, 0, 1)
        group = dist.group.WORLD
    elif group is True or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be None, False or a torch.distributed ProcessGroup; got {group!r}")
    return Shard(group, dist.get_rank(group), dist.get_world_size(group))


def _under_torchrun() -> bool:
    """Whether ``torchrun`` (or ``torch.distributed.run``) launched this process as one of several."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in env


def local_device(device: Any) -> Any:
    """``device`` with a plain ``"cuda"`` made this process's GPU (``cuda:LOCAL_RANK``) under ``torchrun``.

    Without it every rank would put its model on GPU 0 (the current device until the process group
    starts, which may be later). Anything else, and everything outside ``torchrun``, is returned as is.
    """
    if device is None or not _under_torchrun():
        return device
    wanted = torch.device(device)
    if wanted.type == "cuda" and wanted.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _start_default_group() -> None:
    """The default process group from ``torchrun``'s environment: NCCL when CUDA is there, else gloo."""
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def merge_top_k(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``values`` along the last dim, ties broken by the smaller id (as one process would).

    ``values``, ``ids``: ``[..., n]`` (ids ``-1`` = empty slot, never chosen over a real one).
    """
    # Sort by id first, then stably by value: equal values keep ascending id order.
    order = torch.argsort(torch.where(ids < 0, torch.iinfo(ids.dtype).max, ids), dim=-1, stable=True)
    values, ids = values.gather(-1, order), ids.gather(-1, order)
    keyed = torch.where(ids < 0, torch.full_like(values, -torch.inf), values)
    top = torch.argsort(keyed, dim=-1, descending=True, stable=True)[..., :k]
    return values.gather(-1, top), ids.gather(-1, top)


def units_of(shard: Shard, units: Sequence[T]) -> list[T]:
    """This rank's units of a sequence, in corpus order."""
    return [unit for _, unit in shard.take(units)]
