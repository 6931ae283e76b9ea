"""Output shards split over torchrun ranks: convert, dequant, cast-fp8 and export on every rank of every node.

Under torchrun (WORLD_SIZE > 1) every rank plans the same output shards from the source (the plan is
deterministic); rank 0 alone creates or resumes each `<dst>.partial/` (`prepare_writers`); every rank then
writes the shards still to do at positions rank, rank + world, … of that list into the shared directory
(each finished shard is recorded in manifest.json under its flock, so ranks never lose each other's
entries, and a run killed anywhere keeps every recorded shard); once every rank has written its share,
rank 0 writes config and index and renames `.partial` to the destination (`finish_writers`).

Every step ends in `Ranks.sync`: each rank posts its outcome (rank, host, error, payload) under the step's
key in torchrun's own store (the TCP key-value store its agent keeps, reached through the env:// rendezvous)
and waits for every rank's, so a failure anywhere is known everywhere. The failing rank raises its own
error; every other rank raises a RankFailedError naming the failing rank, its host and its error (rank 0
records it as the stage's error), and nothing is finalized. No process group is made: the steps carry a few
small objects, never tensors, and a group's worker threads, still releasing the last collective's tensors
while the interpreter exits, abort the process after its work is done ("terminate called without an
active exception"). Steps are numbered per process; every rank makes the same steps in the same order.
Without torchrun (WORLD_SIZE unset or 1) nothing changes: one rank, no store, no step.

Test hook (documented, honest): QUANTDECK_FAULTS=fail_rank=N (engine.core.settings) makes rank N (of several) raise
before it writes any of its shards.
"""

from __future__ import annotations

import functools
import itertools
import os
import pickle
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from engine.core.errors import QuantdeckError, RankFailedError
from engine.core.settings import settings

T = TypeVar("T")

_STEPS = itertools.count()  # this process's steps, numbered alike on every rank


@functools.cache
def _torchrun_store(rank: int, world: int) -> Any:
    """torchrun's store (its agent's, through the env:// rendezvous) under this module's prefix; reached once per
    process, its timeout QUANTDECK_RANK_TIMEOUT_S."""
    import torch.distributed as dist

    timeout = timedelta(seconds=settings().rank_timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return dist.PrefixStore("quantdeck/ranks", store)


def _describe(exc: BaseException) -> tuple[str, str, str | None]:
    """(class name, first line of the message, hint) of an exception, to send to the other ranks."""
    if isinstance(exc, QuantdeckError):
        msg = f"{exc.at}: {exc.msg}" if exc.at and exc.at not in exc.msg else exc.msg
        hint = exc.hint
    else:
        msg, hint = str(exc), None
    return type(exc).__name__, (msg.splitlines() or [""])[0][:500], hint


def _mark_told(exc: BaseException) -> BaseException:
    """Every rank knows of this failure (engine.runs.worker then lets rank 0 record it before this rank exits)."""
    try:
        exc.ranks_told = True  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - an exception type with __slots__
        pass
    return exc


@dataclass
class Ranks:
    """This process's place among the ranks of a torchrun job (one rank, world 1, without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    host: str = ""
    store: Any = None  # torchrun's store under this module's prefix (None: one rank)
    finished: bool = False  # a step failed somewhere: this rank takes part in no further collective

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(rank=int(os.environ.get("RANK") or 0), world=int(os.environ.get("WORLD_SIZE") or 1),
                   local_rank=int(os.environ.get("LOCAL_RANK") or 0),
                   host=settings().node or socket.gethostname())

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def head(self) -> bool:
        return self.rank == 0

    def open(self) -> "Ranks":
        if self.active and self.store is None:
            self.store = _torchrun_store(self.rank, self.world)
        return self

    def device(self, dev):
        """A bare "cuda" becomes this rank's GPU (cuda:LOCAL_RANK) when there are several ranks."""
        if self.active and dev.type == "cuda" and dev.index is None:
            import torch

            dev = torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(dev)
        return dev

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: positions rank, rank + world, … (all of them on one rank)."""
        if self.active and settings().faults.fail_rank == self.rank:
            raise RuntimeError(f"test hook QUANTDECK_FAULTS fail_rank: rank {self.rank} fails before writing its "
                               "shards")
        return list(items)[self.rank::self.world]

    def sync(self, payload: Any = None) -> list[Any]:
        """Wait for every rank to finish the step; every rank's payload, in rank order. Raises
        RankFailedError when another rank reports a failure of this step."""
        return self._gather(None, payload)

    def report(self, exc: BaseException) -> None:
        """This rank failed: tell the others, at the step they wait in (unless a step already failed)."""
        if self.active and not self.finished and isinstance(exc, Exception):
            try:
                self._gather(exc, None)
            except Exception:  # noqa: BLE001 - the store itself broke: this rank's own error is what counts
                return
            _mark_told(exc)

    def _gather(self, exc: BaseException | None, payload: Any) -> list[Any]:
        if not self.active:
            return [payload]

        try:
            step = f"{next(_STEPS)}/"
            self.store.set(step + str(self.rank), pickle.dumps((self.rank, self.host, exc and _describe(exc),
                                                                payload)))
            keys = [step + str(r) for r in range(self.world)]
            self.store.wait(keys)  # the store's timeout: QUANTDECK_RANK_TIMEOUT_S
            out = [pickle.loads(self.store.get(k)) for k in keys]
        except BaseException:
            self.finished = True
            raise
        failed = [o for o in out if o[2] is not None]
        if failed:
            self.finished = True
            if exc is None:
                rank, host, (cls, msg, hint), _ = failed[0]
                others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
                err = RankFailedError(f"rank {rank} of {self.world} on {host} failed{others}: {cls}: {msg}",
                                      at=f"rank {rank} of {self.world} on {host}", rank=rank, host=host,
                                      error_class=cls,
                                      hint=hint or f"read rank {rank}'s log on {host}; finished shards are kept "
                                                   f"and a rerun writes the rest")
                raise _mark_told(err)
        return [o[3] for o in out]


def over_ranks(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: call `fn(..., ranks=Ranks)` as this process's rank (see the module doc). Under torchrun it
    reaches the store, waits at the end until rank 0 finalized, and reports a failure to the other ranks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, ranks: Ranks | None = None, **kw: Any) -> T:
        if ranks is not None:
            return fn(*args, ranks=ranks, **kw)
        ranks = Ranks.from_env()
        if not ranks.active:
            return fn(*args, ranks=ranks, **kw)
        ranks.open()
        try:
            result = fn(*args, ranks=ranks, **kw)
            ranks.sync()  # rank 0's finalize is done (or failed) for everyone
            return result
        except BaseException as e:
            ranks.report(e)
            raise

    return wrapper


def prepare_writers(writers: dict, ranks: Ranks) -> dict[str, set[str]]:
    """Rank 0 creates or resumes every layout's `.partial` dir (CheckpointWriter.prepare); every rank learns
    the names of the shards still to write, per layout."""
    todo = {lay: [p.name for p in w.prepare()] for lay, w in writers.items()} if ranks.head else None
    return {lay: set(names) for lay, names in ranks.sync(todo)[0].items()}


def finish_writers(writers: dict, ranks: Ranks, write_extras: Callable[[str, Path], None]) -> dict[str, str]:
    """Once every rank wrote its shards: rank 0 adds each unfinished layout's extras (`write_extras(layout,
    partial_dir)`: config, tokenizer, …) and finalizes it (index, rename). Returns {layout: output dir}."""
    ranks.sync()
    if not ranks.head:
        return {lay: str(w.dst) for lay, w in writers.items()}
    outputs = {}
    for lay, w in writers.items():
        if not w.already_complete:
            write_extras(lay, w.partial_dir)
        outputs[lay] = str(w.finalize())
    return outputs
