"""A streaming, resumable, sharded safetensors writer.

Every output tensor (name, dtype, shape) is known before any data exists, so shards are planned up front
(engine.checkpoint.shard_plan): each shard's header is written first and tensors are written at their offsets as they
come, from any number of threads. Memory is the tensors in hand, never a shard. A shard is written as
`<shard>.partial`, each piece hashed from memory as it is written (engine.checkpoint.digest: nothing is
read back), fsynced, renamed into place and recorded in manifest.json with its digest. The whole
checkpoint is built in `<dst>.partial/` and renamed to `<dst>` only when complete (`finalize`).

Resume: `CheckpointWriter.prepare()` keeps the shards whose manifest digest matches the file and
returns the rest to redo. The plan, headers and data are deterministic, so a resumed run produces the
same bytes as an uninterrupted one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.checkpoint import digest as dg
from engine.checkpoint import manifest as mf
from engine.checkpoint.direct import DirectWriter
from engine.checkpoint.host import HostArray
from engine.checkpoint.paths import partial_path
from engine.checkpoint.reader import INDEX_NAME
from engine.checkpoint.safetensors_format import TensorSpec, build_shard_map, dtype_name
from engine.checkpoint.shard_plan import ShardPlan, plan_shards
from engine.checkpoint.write_errors import disk_full, make_output_dir, raise_write_error
from engine.core.errors import CheckpointError
from engine.core.events import EventSink, NullSink
from engine.core.fsutil import atomic_write_json, fsync_dir
from engine.core.libc import libc
from engine.core.settings import settings

DEFAULT_METADATA = {"format": "pt"}


def _writeback_starter():
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a range to disk without waiting."""
    try:
        import ctypes

        fn = libc().sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
        return lambda fd, off, n: fn(fd, off, n, 2)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return lambda fd, off, n: None


_start_writeback = _writeback_starter()
WRITEBACK_BYTES = 4 << 20  # writes at least this big are handed to the disk right away
# How shards reach the disk. By default as `cp`, `safetensors.save_file` and `fp8_to_nvfp4_streaming.py`
# write: through the page cache, no fsync, no early writeback (the run ends with its data on its way to the
# disk). A killed process loses nothing (the page cache outlives it). A machine that goes down can leave a
# shard torn: a resume finds it by its digest and writes it again, and a finished output written this way
# (`"synced": false` per shard in its manifest) has its shards' digests checked when the same command runs
# again, which moves it back to `.partial` and rewrites any shard that does not match. QUANTDECK_FSYNC=1:
# durable shards, written with O_DIRECT (QUANTDECK_DIRECT_IO=0: through the page cache) and fsynced before the
# manifest records them; a run's stages on other hosts than its driver's use it (engine.runs.worker), since a run
# skips a stage it has recorded as done (on the driver's machine the driver syncs behind them: engine.runs.durability).


def durable() -> bool:
    """Are shards fsynced before the manifest records them? (QUANTDECK_FSYNC=1; see above.)"""
    return settings().fsync


def _name_of(dtype) -> str | None:
    """safetensors name of a torch dtype; None for one safetensors cannot hold."""
    try:
        return dtype_name(dtype)
    except KeyError:
        return None


class ShardFile:
    """One shard being written: header first, then tensors at their offsets, in any order, from any threads
    (each tensor once)."""

    def __init__(self, directory: str | os.PathLike, plan: ShardPlan,
                 metadata: dict[str, str] | None = DEFAULT_METADATA):
        self.dir = Path(directory)
        self.plan = plan
        self.shard_map = build_shard_map(list(plan.tensors), metadata)
        self.specs = {t.name: t for t in plan.tensors}
        self.pending = set(self.specs)
        self.final = self.dir / plan.name
        self.path = self.dir / (plan.name + ".partial")
        self._lock = threading.Lock()
        self._digests: dict[str, bytes] = {}  # tensor name -> sha256 of its bytes
        self._header_digest = hashlib.sha256(self.shard_map.header).digest()
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise_write_error(e, self.path)
        self._direct: DirectWriter | None = None
        self._sync = durable()
        try:
            self._reserve(self.shard_map.total_size)
            if self._sync:
                self._direct = DirectWriter.open(self.path, self.shard_map.total_size)  # None: page cache
            self._pwrite(memoryview(self.shard_map.header), 0)
        except BaseException:
            self.abort()
            raise

    def _reserve(self, size: int) -> None:
        try:
            os.posix_fallocate(self.fd, 0, size) if size else None
        except OSError as e:
            full = disk_full(e, self.path)
            if full is not e:
                raise full from e
            try:
                os.ftruncate(self.fd, size)  # filesystems without fallocate
            except OSError as e2:
                if e2.errno != errno.EINVAL:  # EINVAL: not a regular file (a device); writes will tell
                    raise_write_error(e2, self.path, "write")

    def _pwrite(self, view: memoryview, offset: int) -> None:
        start, done, n = offset, 0, len(view)
        try:
            if self._direct is not None:
                self._direct.write(view, offset)
                return
            while done < n:
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            raise_write_error(e, self.path, "write")
        if n >= WRITEBACK_BYTES and self._sync:  # a big tensor: its pages go to disk now, not all at the fsync
            _start_writeback(self.fd, start, n)

    def write(self, name: str, tensor) -> None:
        """Write one planned tensor (a torch tensor or an engine.checkpoint.host.HostArray) at its offset."""
        spec = self.specs.get(name)
        if spec is None:
            raise CheckpointError(f"{name} is not planned for {self.plan.name}", at=f"{self.final}:{name}",
                                  hint="this is a bug in the conversion plan")
        host = isinstance(tensor, HostArray)
        got = (tensor.dtype if host else _name_of(tensor.dtype), tuple(tensor.shape))
        if got != (spec.dtype, spec.shape):
            raise CheckpointError(f"{name}: planned {spec.dtype}{list(spec.shape)}, got {got[0]}{list(got[1])}",
                                  at=f"{self.final}:{name}", hint="this is a bug in the conversion plan")
        if host:
            raw = tensor.raw()
        else:
            import torch

            t = tensor.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        with self._lock:
            if name not in self.pending:
                raise CheckpointError(f"{name} written twice to {self.plan.name}", at=f"{self.final}:{name}")
            self.pending.discard(name)
        start, _ = self.shard_map.offsets[name]
        view = memoryview(raw).cast("B") if raw.size else memoryview(b"")
        if raw.size:
            self._pwrite(view, start)
        d = hashlib.sha256(view).digest()  # from memory (the GIL is released while hashing)
        with self._lock:
            self._digests[name] = d

    def digest(self) -> str:
        """The shard's digest (engine.checkpoint.digest) once every tensor is written."""
        names = dg.piece_order(self.shard_map.offsets)
        return dg.combine([self._header_digest] + [self._digests[n] for n in names])

    def close(self) -> tuple[str, int]:
        """fsync, rename into place, record in the manifest; returns (sha256, size)."""
        if self.pending:
            missing = sorted(self.pending)
            raise CheckpointError(f"{self.plan.name} closed with {len(missing)} tensor(s) unwritten "
                                  f"(first: {missing[0]})", at=str(self.final))
        try:
            if self._direct is not None:
                if self._direct.unfinished():  # pragma: no cover - every byte was written
                    raise CheckpointError(f"{self.plan.name}: data does not cover the file", at=str(self.final))
                self._direct.close()
                os.ftruncate(self.fd, self.shard_map.total_size)  # the last block went out padded
            if self._sync:
                os.fsync(self.fd)
        except OSError as e:
            raise_write_error(e, self.path, "write")
        os.close(self.fd)
        self.fd = -1
        os.replace(self.path, self.final)
        fsync_dir(self.dir)
        digest = self.digest()
        mf.record_shard(self.dir, self.plan.name, digest, self.shard_map.total_size,
                        [t.name for t in self.plan.tensors], synced=self._sync)
        return digest, self.shard_map.total_size

    def abort(self) -> None:
        if self._direct is not None:
            self._direct.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


sha256_of = dg.sha256_file  # the plain sha256 of a file (kept for callers of the old name)


class CheckpointWriter:
    """The output checkpoint as a whole: `prepare()` → write the shards it returns → `finalize()`."""

    def __init__(self, dst: str | os.PathLike, shards: list[ShardPlan], *, source_fingerprint: str,
                 args: dict[str, Any], metadata: dict[str, str] | None = DEFAULT_METADATA,
                 sink: EventSink = NullSink()):
        self.dst = Path(dst)
        self.partial_dir = partial_path(self.dst)
        self.shards = list(shards)
        self.by_name = {s.name: s for s in self.shards}
        self.source_fingerprint = source_fingerprint
        self.args = dict(args)
        self.metadata = metadata
        self.sink = sink
        self.already_complete = False
        self.kept: list[str] = []

    @property
    def planned(self) -> list[str]:
        return [s.name for s in self.shards]

    def prepare(self) -> list[ShardPlan]:
        """Create or resume `<dst>.partial/`; returns the shards still to write (all, some, or none). A
        destination this process cannot write raises CheckpointError naming it."""
        try:
            return self._prepare()
        except OSError as e:
            raise_write_error(e, self.partial_dir)

    def _prepare(self) -> list[ShardPlan]:
        if self.dst.exists():
            m = mf.load_manifest(self.dst)
            if not (m and m.get("complete") and mf.same_job(m, self.source_fingerprint, self.args, self.planned)):
                raise CheckpointError(f"destination {self.dst} already exists", at=str(self.dst),
                                      hint="remove it or choose another --dst")
            if self._unsynced_intact(m):
                self.already_complete = True
                self.sink.emit("log", level="info", msg=f"{self.dst} is already complete; nothing to do")
                return []
            if self.partial_dir.exists():
                raise CheckpointError(f"{self.dst} has shards to write again, but {self.partial_dir} exists too",
                                      at=str(self.partial_dir), hint="remove one of the two, then run the same "
                                                                     "command again")
            os.rename(self.dst, self.partial_dir)  # unfinished again: the resume below redoes what does not match
        make_output_dir(self.partial_dir)
        with mf.locked(self.partial_dir):
            old = mf.load_manifest(self.partial_dir)
            if old is not None and not mf.same_job(old, self.source_fingerprint, self.args, self.planned):
                self.sink.emit("log", level="warning",
                               msg=f"{self.partial_dir} holds a different conversion; starting over")
                self._clear()
                old = None
            manifest = old or mf.new_manifest(self.source_fingerprint, self.args, self.planned)
            manifest["complete"] = False  # (a finished output moved back here to rewrite a torn shard said True)
            for p in self.partial_dir.glob("*.partial"):
                p.unlink()
            for p in self.partial_dir.glob(".*.tmp.*"):  # an atomic write (manifest, index) killed before its rename
                p.unlink(missing_ok=True)
            todo: list[ShardPlan] = []
            self.kept = []
            recs = {p.name: manifest["shards"].get(p.name) for p in self.shards}
            with ThreadPoolExecutor(2, thread_name_prefix="verify") as ex:  # each digest is parallel inside
                ok = dict(zip(recs, ex.map(lambda n: bool(recs[n]) and dg.matches(self.partial_dir / n, recs[n]),
                                           recs), strict=True))
            for plan in self.shards:
                rec = recs[plan.name]
                path = self.partial_dir / plan.name
                if ok[plan.name]:
                    self.kept.append(plan.name)
                    continue
                if rec:
                    del manifest["shards"][plan.name]
                    manifest["weight_map"] = {k: v for k, v in manifest["weight_map"].items() if v != plan.name}
                path.unlink(missing_ok=True)
                todo.append(plan)
            mf.save_manifest(self.partial_dir, manifest)
        if self.kept:
            self.sink.emit("log", level="info",
                           msg=f"resuming: kept {len(self.kept)} finished shard(s), {len(todo)} to write")
        return todo

    def _unsynced_intact(self, m: dict[str, Any]) -> bool:
        """Do the finished output's shards written without fsync still match their digests? Those that do are
        fsynced and recorded as synced, so the next run does not read them again."""
        todo = [n for n, rec in m["shards"].items() if not rec.get("synced", True)]
        if not todo:
            return True
        self.sink.emit("log", level="info", msg=f"{self.dst}: checking the digests of {len(todo)} shard(s) written "
                                                "without fsync")
        bad = [n for n in todo if not dg.matches(self.dst / n, m["shards"][n])]
        if bad:
            self.sink.emit("log", level="warning", msg=f"{self.dst}: {len(bad)} shard(s) written without fsync do not "
                                                        f"match their digest (first: {bad[0]}; the machine went down "
                                                        "before they reached the disk?): writing them again")
            return False
        try:  # on the disk now: the next run need not read them again (where this output can be written)
            for n in todo:
                fd = os.open(self.dst / n, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for n in todo:
                m["shards"][n]["synced"] = True
            mf.save_manifest(self.dst, m)  # atomic; no lock file left in a finished output
        except OSError:
            pass
        return True

    def _clear(self) -> None:
        for p in self.partial_dir.iterdir():
            if p.name == mf.LOCK_NAME:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def open_shard(self, plan: ShardPlan | str) -> ShardFile:
        plan = self.by_name[plan] if isinstance(plan, str) else plan
        return ShardFile(self.partial_dir, plan, self.metadata)

    def index(self) -> dict[str, Any]:
        weight_map = {t.name: s.name for s in self.shards for t in s.tensors}
        total = sum(s.nbytes for s in self.shards)
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}

    def finalize(self) -> Path:
        """Check every shard is recorded, write the index, mark complete, rename `.partial` → dst."""
        if self.already_complete:
            return self.dst
        m = mf.load_manifest(self.partial_dir)
        missing = [s for s in self.planned if not m or s not in m["shards"]]
        if missing:
            raise CheckpointError(f"{len(missing)} shard(s) not written (first: {missing[0]})",
                                  at=str(self.partial_dir / missing[0]), hint="run the same command again")
        try:
            atomic_write_json(self.partial_dir / INDEX_NAME, self.index())
            m["complete"] = True
            mf.save_manifest(self.partial_dir, m)
        except OSError as e:
            raise_write_error(e, self.partial_dir / INDEX_NAME, "write")
        (self.partial_dir / mf.LOCK_NAME).unlink(missing_ok=True)
        try:
            os.rename(self.partial_dir, self.dst)
        except OSError as e:
            raise CheckpointError(f"cannot rename {self.partial_dir} to {self.dst}: {e.strerror}",
                                  at=str(self.dst), hint="remove whatever is at the destination") from e
        fsync_dir(self.dst.parent)
        return self.dst


def write_checkpoint(dst: str | os.PathLike, tensors: dict, shard_size: int = 5 * 10**9,
                     source_fingerprint: str = "", args: dict[str, Any] | None = None) -> Path:
    """Small helper: write a whole dict of tensors as a sharded checkpoint (tests, fixtures, tiny models)."""
    units = [[TensorSpec.of(k, v.dtype, v.shape)] for k, v in sorted(tensors.items())]
    writer = CheckpointWriter(dst, plan_shards(units, shard_size), source_fingerprint=source_fingerprint,
                              args=args or {})
    for plan in writer.prepare():
        sf = writer.open_shard(plan)
        for spec in plan.tensors:
            sf.write(spec.name, tensors[spec.name])
        sf.close()
    return writer.finalize()
