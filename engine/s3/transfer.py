"""What pull and push share: options, the result, and the pool that moves objects with retries and progress.

Each object is one job. A worker thread runs it; a retryable failure (throttling, a dropped connection, a
checksum mismatch) is retried with exponential backoff up to `retries` times, then reported by name. An
error no retry can fix (no credentials, access denied, missing bucket, unreachable endpoint) stops the
whole transfer at once.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from engine.core.errors import DiskFullError, QuantdeckError, TransferError
from engine.core.events import EventSink, Progress
from engine.s3.client import S3Session, is_fatal, is_retryable, translate

MiB = 1 << 20
DEFAULT_PART_SIZE = 64 * MiB  # 80 parts for a 5 GB shard; S3 allows 5 MiB .. 5 GiB and 10,000 parts
DEFAULT_CONCURRENCY = 8  # objects at once
DEFAULT_PART_CONCURRENCY = 8  # parts of one object at once
DEFAULT_RETRIES = 4
MIN_PART_SIZE = 5 * MiB


@dataclass(frozen=True)
class TransferOptions:
    part_size: int = DEFAULT_PART_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    part_concurrency: int = DEFAULT_PART_CONCURRENCY
    retries: int = DEFAULT_RETRIES
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise TransferError(f"part size {self.part_size / MiB:g} MiB is below S3's minimum of 5 MiB",
                                at="part_size",
                                hint="use --part-size 5MiB or more (64MiB suits multi-GB shards)")
        if self.concurrency < 1 or self.part_concurrency < 1 or self.retries < 0:
            raise TransferError("concurrency must be >= 1 and retries >= 0", at="concurrency",
                                hint="e.g. --concurrency 8")

    @property
    def pool_size(self) -> int:
        return self.concurrency * self.part_concurrency + 4

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
                              max_concurrency=self.part_concurrency, use_threads=True)


@dataclass
class TransferResult:
    direction: str  # pull | push
    url: str
    local: str
    objects: int = 0
    transferred: int = 0
    skipped: int = 0
    bytes: int = 0
    bytes_transferred: int = 0
    retries: int = 0
    seconds: float = 0.0
    manifest: str = ""

    def summary(self) -> dict[str, Any]:
        return asdict(self)


class ChecksumMismatchError(Exception):
    """The bytes that arrived are not the bytes that were sent (retried, then reported by name)."""


@dataclass
class Job:
    rel: str  # path relative to the local directory (posix)
    key: str  # object key
    size: int
    local: Path
    etag: str = ""


class ByteCounter:
    """Feeds s3transfer's byte callbacks into Progress; takes them back when an attempt is retried."""

    def __init__(self, progress: Progress):
        self.progress, self.n = progress, 0
        self._lock = threading.Lock()  # s3transfer calls back from one thread per part

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.n += nbytes
        self.progress.advance(0, nbytes=nbytes)

    def rollback(self) -> None:
        with self._lock:
            n, self.n = self.n, 0
        if n:
            self.progress.advance(0, nbytes=-n)


def run_jobs(jobs: list[Job], work: Callable[[Job, ByteCounter], str], *, sess: S3Session, opts: TransferOptions,
             progress: Progress, sink: EventSink, url_of: Callable[[Job], str], op: str,
             result: TransferResult) -> None:
    """Run `work(job, counter)` (returns 'transferred' or 'skipped') for every job on a thread pool."""
    if not jobs:
        return
    stop = threading.Event()
    lock = threading.Lock()
    failures: list[tuple[Job, BaseException, int]] = []

    def one(job: Job) -> None:
        counter = ByteCounter(progress)
        attempt = 0
        while True:
            if stop.is_set():
                return
            attempt += 1
            try:
                outcome = work(job, counter)
            except BaseException as e:  # noqa: BLE001 - sorted below; the bug-kind keeps its traceback
                counter.rollback()
                if isinstance(e, TransferError) or is_fatal(e):
                    stop.set()
                    raise
                if not (isinstance(e, ChecksumMismatchError) or is_retryable(e)):
                    stop.set()
                    raise
                if attempt > opts.retries:
                    with lock:
                        failures.append((job, e, attempt))
                    return
                with lock:
                    result.retries += 1
                delay = opts.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random())
                sink.emit("log", level="warning", msg=sess.redact(
                    f"retry {attempt}/{opts.retries} of {url_of(job)} in {delay:.1f}s: {_reason(e)}"))
                time.sleep(delay)
                continue
            with lock:
                if outcome == "skipped":
                    result.skipped += 1
                else:
                    result.transferred += 1
                    result.bytes_transferred += job.size
            progress.advance(1, nbytes=(job.size - counter.n) if outcome != "skipped" else job.size,
                             label=job.rel)
            return

    with ThreadPoolExecutor(max_workers=min(opts.concurrency, len(jobs)), thread_name_prefix=f"s3-{op}") as pool:
        futures = {pool.submit(one, j): j for j in jobs}
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                stop.set()
                for g in futures:
                    g.cancel()
                exc = f.exception()
                err = boundary_error(exc, sess, at=url_of(futures[f]), op=op)
                if err is exc:
                    raise exc
                raise err from exc
    if failures:
        names = ", ".join(url_of(j) for j, _, _ in failures[:5]) + (" …" if len(failures) > 5 else "")
        job, exc, attempts = failures[0]
        raise TransferError(
            f"{len(failures)} object(s) failed after {attempts} attempts: {names} (first: {sess.redact(_reason(exc))})",
            at=url_of(job), hint="rerun to resume (verified objects are skipped); a persistent checksum "
                                 "mismatch means the stored object is corrupt — re-upload it") from exc


def boundary_error(exc: BaseException, sess: S3Session, *, at: str, op: str) -> BaseException:
    """Ours and boto's errors become TransferError (a full disk DiskFullError); anything else is a bug and is
    raised as it is, with its traceback."""
    import errno

    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError, S3UploadFailedError

    if isinstance(exc, QuantdeckError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFullError(f"no space left on the local disk during the {op}", at=getattr(exc, "filename", None)
                             or at, hint="free space there, then rerun: verified objects are kept")
    if isinstance(exc, (BotoCoreError, ClientError, Boto3Error, RetriesExceededError, S3DownloadFailedError,
                        S3UploadFailedError, ConnectionError, TimeoutError)):
        return translate(exc, sess, at=at, op=op)
    if isinstance(exc, OSError):
        return TransferError(f"local file error during the {op}: {exc.strerror or exc}", at=exc.filename or at,
                             hint="check the local directory's permissions and free space")
    return exc


def _reason(e: BaseException) -> str:
    if isinstance(e, ChecksumMismatchError):
        return str(e)
    code = getattr(e, "response", {}) or {}
    code = code.get("Error", {}).get("Code") if isinstance(code, dict) else None
    return f"{type(e).__name__}{f' {code}' if code else ''}: {e}"[:300]

