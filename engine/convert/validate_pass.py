"""validate's pass: everything validate reads, on a pool of threads, one job per quantized module or other tensor.

Each job returns what it found (`Found`) instead of writing into the pass's tables, so the findings of a job run
earlier, on a shard the conversion had just finished (engine.convert.validate_follow), can be taken as they are:
a job's findings depend on which output tensors it reads and their bytes (`Found.reads`: the names it finds for the
module, where they lie), on the source (which a run does not write) and on how the job is asked (`Pass.job_key`).
`Earlier.take` gives such an earlier finding only where the job reads the same tensors now, lying where they lay,
in shard files that are the same files (device, inode, size, modification and change times) as when they were read,
against the same source; everything else is read again.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.checkpoint.reader import CheckpointReader, TensorMeta
from engine.convert import validate_read as host
from engine.convert.validate_modules import fp8_bases, fp8_host, nvfp4_bases, nvfp4_host, nvfp4_parts
from engine.convert.validate_source import compare_host, kept_floats, kept_host, shape_mismatches
from engine.core.errors import CheckpointError
from engine.core.events import Progress
from engine.core.threadprio import give_way
from engine.formats.nvfp4.names import NVFP4_NAMES

FLOATS = host.FLOAT_DTYPES


def file_identity(path: Path) -> tuple[int, ...] | None:
    """(device, inode, size, modification and change times in ns) of `path`: a shard rewritten or replaced gets
    another (the change time cannot be set back, and a rename of its directory keeps it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@dataclass
class Found:
    """One job's findings: module events and comparison, float tensors' finiteness, kept tensors' comparison; the
    output tensors it read and the digests of their bytes."""

    units: int
    label: str
    reads: tuple[TensorMeta, ...] = ()
    events: dict[str, list[tuple] | None] = field(default_factory=dict)
    floats: dict[str, bool] = field(default_factory=dict)
    source: dict[str, dict | None] = field(default_factory=dict)
    kept: dict[str, dict | None] = field(default_factory=dict)
    digests: dict[tuple[str, int, int], bytes] = field(default_factory=dict)
    io_error: bool = False  # a read failed: true of this pass only (a file moved while read), never kept


@dataclass
class Earlier:
    """Findings of jobs run before this pass (engine.convert.validate_follow), by job key, with the identity each
    shard they read had then."""

    source: str | None = None  # the source the findings compared with (None: none)
    found: dict[tuple, Found] = field(default_factory=dict)
    shards: dict[str, tuple[int, ...]] = field(default_factory=dict)
    taken: int = 0  # findings a pass took

    def take(self, key: tuple, job: tuple[str, str, str], r: CheckpointReader, idents: dict[str, Any]) -> Found | None:
        """The earlier finding of `job` (asked as `key`), where it reads the same tensors of `r` now, each lying
        where it lay, in the same file."""
        f = self.found.get(key)
        if f is None or job_reads(r, job) != f.reads:
            return None
        for m in f.reads:
            if m.shard not in idents:
                idents[m.shard] = file_identity(r.dir / m.shard)
            if idents[m.shard] is None or idents[m.shard] != self.shards.get(m.shard):
                return None
        self.taken += 1
        return f


def source_key(src: str | os.PathLike | None) -> str | None:
    """How findings name the source they were compared with (`Earlier.source`): its resolved path, None for none."""
    return str(Path(src).resolve()) if src is not None else None


@dataclass(frozen=True)
class PassPlan:
    """What a pass over an output checks, from the headers alone: its NVFP4 and FP8-block modules, against a source
    the quantized modules and kept float tensors whose shapes differ from it (`shape_fails`: their messages), the
    modules compared with it, and the kept float tensors with the module each is compared as."""

    nv: list[str]
    fp8: list[str]
    shape_fails: list[tuple[str, str]]
    misshapen: set[str]
    compare: set[str]
    kept: dict[str, str | None]


def plan_pass(r: CheckpointReader, src: CheckpointReader | None) -> PassPlan:
    """The plan of a pass over output `r` against `src` (None: nothing compared)."""
    nv, fp8 = nvfp4_bases(r.names()), fp8_bases(r)
    if src is None:
        return PassPlan(nv, fp8, [], set(), set(), {})
    quantized = set(nv) | set(fp8)
    shape_fails, misshapen = shape_mismatches(r, src, quantized)
    compare = {b for b in nv + fp8 if b + ".weight" in src and b not in misshapen}
    kept = {n: base for n, base in kept_floats(r, src, quantized) if n not in misshapen}
    return PassPlan(nv, fp8, shape_fails, misshapen, compare, kept)


def has_digests(man: dict | None) -> bool:
    """Whether manifest `man` records a digest of any shard (the pass then hashes every byte it reads)."""
    return bool(man) and any(isinstance(rec, dict) and rec.get("digest") for rec in (man.get("shards") or {}).values())


def pass_jobs(r: CheckpointReader, nv: list[str], fp8: list[str], hashing: bool) -> list[tuple[str, str, str]]:
    """The pass's jobs over reader `r`: ("module", base, encoding) per quantized module, ("tensor", name, "") per
    other tensor it reads (every one where the manifest has digests to check, else the float ones); the largest
    first, so that a pool ends together."""
    owned: set[str] = set()
    jobs = []
    for enc, bases in (("nvfp4", nv), ("fp8-block", fp8)):
        for base in bases:
            try:
                if enc == "nvfp4":
                    owned.update(nvfp4_parts(r, base))
                else:
                    owned.update({base + ".weight", base + ".weight_scale_inv", base + ".scale"})
            except host.Unsupported:
                pass
            jobs.append(("module", base, enc))
    for n in r.names():
        if n not in owned and (hashing or r.meta(n).dtype_name in FLOATS):
            jobs.append(("tensor", n, ""))
    jobs.sort(key=lambda j: -_job_bytes(r, j))
    return jobs


def _job_bytes(r: CheckpointReader, job: tuple[str, str, str]) -> int:
    kind, name, _ = job
    if kind == "module":
        name = next((n for n in (f"{name}.{lay.packed}" for lay in NVFP4_NAMES) if n in r), None)
    return r.meta(name).nbytes if name else 0


def job_reads(r: CheckpointReader, job: tuple[str, str, str]) -> tuple[TensorMeta, ...]:
    """The output tensors a job reads: a tensor job its tensor, a module job the module's tensors."""
    kind, name, enc = job
    if kind == "tensor":
        return (r.meta(name),)
    names = [name + s for s in (".weight", ".weight_scale_inv", ".scale")]
    if enc == "nvfp4":
        try:
            names = list(nvfp4_parts(r, name))
        except host.Unsupported:
            names = [n for n in r.names() if n.startswith(name + ".")]
    return tuple(r.meta(n) for n in names if n in r)


class Pass:
    """Everything validate reads, on a pool of threads: each module and tensor of the output once (hashed when a
    manifest has digests), and of the source what the comparison needs. Results are kept per name; the report is
    written afterwards, in the order of the checks. `earlier`: findings of jobs run before (taken where still
    true, see `Earlier.take`)."""

    def __init__(self, r: CheckpointReader, src: CheckpointReader | None, plan: PassPlan, hashing: bool,
                 progress: Progress, earlier: Earlier | None = None):
        self.files = host.Files()
        self.digests = host.Digests()
        self.out = host.HostReader(r, self.files, self.digests if hashing else None)
        self.src = host.HostReader(src, self.files) if src is not None else None
        self.r, self.nv, self.fp8, self.compare, self.kept = r, plan.nv, plan.fp8, plan.compare, plan.kept
        self.progress = progress
        self.hashing = hashing
        self.earlier = earlier
        self.events: dict[str, list[tuple] | None] = {}
        self.floats: dict[str, bool] = {}
        self.source: dict[str, dict | None] = {}  # module -> its comparison (None: the reference decodes it)
        self.kept_res: dict[str, dict | None] = {}

    def job_key(self, job: tuple[str, str, str]) -> tuple:
        """What a job's findings depend on besides the bytes it reads: its kind, name and encoding, whether it is
        compared with the source, and whether (and as which module) a kept tensor is."""
        kind, name, enc = job
        return kind, name, enc, name in self.compare, name in self.kept, self.kept.get(name)

    def _module(self, base: str, enc: str) -> Found:
        f = Found(2 if base in self.compare else 1, base, job_reads(self.r, ("module", base, enc)))
        try:
            ev, floats, decoded = (nvfp4_host if enc == "nvfp4" else fp8_host)(self.out, base)
            f.events[base] = ev
            f.floats.update(floats)
        except (host.Unsupported, OSError) as e:
            f.events[base], decoded = None, None
            f.io_error = isinstance(e, OSError)
        if base in self.compare:
            try:
                if decoded is None:
                    raise host.Unsupported(base)
                f.source[base] = compare_host(self.src, base, enc, decoded)
            except (host.Unsupported, OSError, CheckpointError) as e:
                f.source[base] = None
                f.io_error |= isinstance(e, OSError)
        return f

    def _tensor(self, name: str) -> Found:
        m = self.r.meta(name)
        f = Found(0, name, (m,))
        try:
            data = self.out.full(name, slot="tensor")
        except (host.Unsupported, OSError) as e:
            f.io_error = isinstance(e, OSError)
            return f
        if m.dtype_name in FLOATS:
            f.floats[name] = host.all_finite(data, m.dtype_name)
        if name in self.kept:
            try:
                f.kept[name] = kept_host(self.src, self.r, name, self.kept[name], data)
            except (host.Unsupported, OSError, CheckpointError) as e:
                f.kept[name] = None
                f.io_error = isinstance(e, OSError)
        return f

    def do(self, job: tuple[str, str, str], stop: threading.Event | None = None) -> Found | None:
        """Run one job; its findings, with the digests of what it read (None: `stop` was set before it began)."""
        if stop is not None and stop.is_set():
            return None
        f = self._module(job[1], job[2]) if job[0] == "module" else self._tensor(job[1])
        f.digests = self.digests.pieces((m.shard, m.start, m.end) for m in f.reads)
        return f

    def merge(self, f: Found) -> None:
        self.events.update(f.events)
        self.floats.update(f.floats)
        self.source.update(f.source)
        self.kept_res.update(f.kept)
        self.digests.update(f.digests)

    def run(self, workers: int | None = None, on_found: Callable[[tuple, Found], None] | None = None,
            stop: threading.Event | None = None, nice: int = 0) -> "Pass":
        """Run every job of the pass, taking earlier findings where they still hold; `on_found` hears each job's
        key and findings as it ends. Once `stop` is set, jobs not yet begun are left undone. `nice`: the pass's
        threads give way by that much to work beside them (engine.core.threadprio)."""
        todo = []
        idents: dict[str, Any] = {}
        for job in pass_jobs(self.r, self.nv, self.fp8, self.hashing):
            f = self.earlier.take(self.job_key(job), job, self.r, idents) if self.earlier is not None else None
            if f is None:
                todo.append(job)
                continue
            self.merge(f)
            if f.units:
                self.progress.advance(f.units, label=f.label)
        with ThreadPoolExecutor(workers or host.worker_count(), thread_name_prefix="validate",
                                initializer=give_way if nice else None, initargs=(nice,) if nice else ()) as ex:
            futures = {ex.submit(self.do, job, stop): job for job in todo}
            try:
                for fut in as_completed(futures):
                    f = fut.result()
                    if f is None:
                        continue
                    self.merge(f)
                    if on_found is not None:
                        on_found(self.job_key(futures[fut]), f)
                    if f.units:  # events leave from this thread only
                        self.progress.advance(f.units, label=f.label)
            except BaseException:  # the jobs not begun are dropped, not run on the way out
                ex.shutdown(wait=True, cancel_futures=True)
                raise
        return self

    def close(self) -> None:
        self.files.close()
