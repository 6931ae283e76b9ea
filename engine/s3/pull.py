"""Pull: every object under `s3://bucket/prefix` into a local directory, built in `<dst>.partial/` and renamed
to `<dst>` only when every object is there and verified, and the checkpoint they make is consistent (manifest
digests, headers against the index: engine.checkpoint.verify)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine.checkpoint.verify import check_tree
from engine.core.errors import CheckpointError, TransferError
from engine.core.events import EventSink, NullSink, Progress
from engine.core.fsutil import free_bytes
from engine.s3.checksum import META_SHA256, etag_parts
from engine.s3.client import S3Session, make_session, translate
from engine.s3.manifest import TransferManifest, local_stat
from engine.s3.transfer import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_CONCURRENCY,
    DEFAULT_PART_SIZE,
    DEFAULT_RETRIES,
    ByteCounter,
    ChecksumMismatchError,
    Job,
    TransferOptions,
    TransferResult,
    run_jobs,
)
from engine.s3.url import S3Url, parse_url
from engine.s3.verify import Expected, verify_file

DISK_MARGIN = 64 << 20
TMP_SUFFIX = ".qd-download"


def default_pull_manifest(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.pull.json"


def list_objects(sess: S3Session, u: S3Url) -> list[Job]:
    """Every object under the prefix (directory markers left out), with size and ETag."""
    jobs: list[Job] = []
    try:
        pages = sess.client.get_paginator("list_objects_v2").paginate(Bucket=u.bucket, Prefix=u.list_prefix)
        for page in pages:
            for obj in page.get("Contents", []) or []:
                key = obj["Key"]
                if key.endswith("/"):
                    continue
                jobs.append(Job(rel=u.rel_of(key), key=key, size=int(obj["Size"]), local=Path(),
                                etag=str(obj.get("ETag", "")).strip('"')))
    except TransferError:
        raise
    except Exception as e:
        raise translate(e, sess, at=str(u), op="list objects") from e
    return jobs


def remote_size(url: str, endpoint_url: str | None = None) -> int:
    """Total bytes under an S3 prefix (for a disk-space preflight)."""
    u = parse_url(url)
    return sum(j.size for j in list_objects(make_session(endpoint_url, attempts=2), u))


def pull(url: str, dst: str | os.PathLike, *, endpoint_url: str | None = None, part_size: int = DEFAULT_PART_SIZE,
         concurrency: int = DEFAULT_CONCURRENCY, part_concurrency: int = DEFAULT_PART_CONCURRENCY,
         retries: int = DEFAULT_RETRIES, manifest: str | os.PathLike | None = None, profile: str | None = None,
         reserve_bytes: int = 0, sink: EventSink = NullSink()) -> TransferResult:
    """Download `url` (a prefix) into `dst`; resumable; returns what was moved. Raises TransferError.

    Before any byte moves, the filesystem of `dst` must hold what is left to download plus `reserve_bytes`
    (room the later stages need, e.g. the converted output)."""
    t0 = time.monotonic()
    u = parse_url(url)
    dst = Path(dst).absolute()
    opts = TransferOptions(part_size=part_size, concurrency=concurrency, part_concurrency=part_concurrency,
                           retries=retries)
    sess = make_session(endpoint_url, profile=profile, pool=opts.pool_size, attempts=retries + 1)
    jobs = list_objects(sess, u)
    if not jobs:
        raise TransferError(f"no objects under {u}", at=str(u), hint=_empty_hint(sess, u))
    mpath = Path(manifest) if manifest else default_pull_manifest(dst)
    man = TransferManifest.load(mpath, direction="pull", url=str(u), local=str(dst))
    result = TransferResult("pull", str(u), str(dst), objects=len(jobs), bytes=sum(j.size for j in jobs),
                            manifest=str(mpath))
    if dst.exists():
        return _already_there(jobs, dst, man, result, sink, t0)
    work = dst.with_name(dst.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(work)
    todo: list[Job] = []
    need = 0
    for j in jobs:
        j.local = work / j.rel
        st = local_stat(j.local)
        if _trusted(man.get(j.rel), j, st):
            result.skipped += 1
            continue
        todo.append(j)
        need += j.size - (st[0] if st and st[0] == j.size else 0)
    free = free_bytes(work)
    if need + reserve_bytes + DISK_MARGIN > free:
        keep = f" + {_gib(reserve_bytes)} to keep free" if reserve_bytes else ""
        raise TransferError(f"not enough disk for the pull: {_gib(need)} to download{keep}, {_gib(free)} free",
                            at=str(work),
                            hint="free space there or pull to another filesystem; nothing was transferred",
                            title="disk too small")
    sink.emit("log", level="info", msg=f"pull {u} → {dst}: {len(jobs)} objects, {_gib(result.bytes)}; "
                                       f"{result.skipped} already verified, {len(todo)} to fetch ({_gib(need)})")
    progress = Progress(sink, "objects", len(todo), bytes_total=sum(j.size for j in todo))
    tc = opts.transfer_config()

    def work_one(job: Job, counter: ByteCounter) -> str:
        head = sess.client.head_object(Bucket=u.bucket, Key=job.key)
        hint = 0
        has_sha = META_SHA256 in {k.lower() for k in (head.get("Metadata") or {})}
        if etag_parts(str(head.get("ETag", ""))) and not has_sha:
            try:  # no SHA-256 of ours: learn the uploader's part size to recompute its ETag
                hint = int(sess.client.head_object(Bucket=u.bucket, Key=job.key, PartNumber=1)["ContentLength"])
            except Exception:
                hint = 0
        exp = Expected.from_head(head, hint)
        job.local.parent.mkdir(parents=True, exist_ok=True)
        if job.local.exists() and job.local.stat().st_size == exp.size:
            v = verify_file(job.local, exp, opts.part_size)
            if v.ok:
                _record(man, job, exp, v.sha256, v.method)
                return "skipped"
        tmp = job.local.with_name(f".{job.local.name}{TMP_SUFFIX}")
        sess.client.download_file(u.bucket, job.key, str(tmp), Config=tc, Callback=counter)
        v = verify_file(tmp, exp, opts.part_size)
        if not v.ok:
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatchError(f"{u.url_for(job.key)}: {v.why}")
        if v.method == "size":
            sink.emit("log", level="warning", msg=f"{u.url_for(job.key)}: size verified only ({v.why})")
        os.replace(tmp, job.local)
        _record(man, job, exp, v.sha256, v.method)
        return "transferred"

    before = sess.retries
    try:
        run_jobs(todo, work_one, sess=sess, opts=opts, progress=progress, sink=sink,
                 url_of=lambda j: u.url_for(j.key), op="pull", result=result)
    finally:
        result.retries += sess.retries - before
    progress.advance(0, force=True)
    _remove_leftovers(work, keep={j.rel for j in jobs})
    _check_complete(jobs, work, u)
    verify_pulled(work, {j.rel: u.url_for(j.key) for j in jobs}, sink)
    os.replace(work, dst)
    man.mark_complete(str(dst))
    result.seconds = time.monotonic() - t0
    sink.emit("log", level="info", msg=f"pulled {u} → {dst}: {result.transferred} fetched, {result.skipped} skipped, "
                                       f"{_gib(result.bytes_transferred)} in {result.seconds:.1f}s, "
                                       f"{result.retries} retries")
    sink.emit("metric", name="s3.retries", value=result.retries)
    return result


def _empty_hint(sess: S3Session, u: S3Url) -> str:
    try:
        if u.prefix:
            sess.client.head_object(Bucket=u.bucket, Key=u.prefix)
            return f"{u} is a single object; pull takes the prefix of a checkpoint directory"
    except Exception:
        pass
    return "check the prefix (list it with `aws s3 ls`)"


def _trusted(entry: dict | None, job: Job, st: tuple[int, int] | None) -> bool:
    """A manifest entry still vouches for a file: same object (size, ETag) and untouched local file."""
    return bool(entry and st and entry.get("size") == job.size == st[0] and entry.get("etag") == job.etag
                and entry.get("mtime_ns") == st[1])


def _record(man: TransferManifest, job: Job, exp: Expected, sha256: str, method: str) -> None:
    st = local_stat(job.local)
    man.record(job.rel, {"key": job.key, "size": exp.size, "etag": exp.etag, "sha256": sha256,
                         "mtime_ns": st[1] if st else 0, "verified": method})


def _remove_leftovers(work: Path, keep: set[str] | None = None) -> None:
    """Half-downloaded temp files of a killed pull (ours and s3transfer's) never reach the checkpoint; with
    `keep`, neither do files of objects deleted from the bucket since an earlier, interrupted pull."""
    for p in work.rglob(f".*{TMP_SUFFIX}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
    if keep is not None:
        for p in [p for p in work.rglob("*") if p.is_file()]:
            if p.relative_to(work).as_posix() not in keep:
                p.unlink()


def _check_complete(jobs: list[Job], work: Path, u: S3Url) -> None:
    for j in jobs:
        st = local_stat(work / j.rel)
        if st is None or st[0] != j.size:
            raise TransferError(f"{j.rel} is missing or incomplete after the pull", at=u.url_for(j.key),
                                hint="rerun the pull to resume")


def verify_pulled(work: Path, url_of: dict[str, str], sink: EventSink) -> None:
    """The pulled tree is the checkpoint it claims to be (engine.checkpoint.verify: manifest digests, headers
    against the index, lengths against the headers), or CheckpointError naming the first bad object. Each
    object's bytes already equal the bucket's; what this catches is a bucket whose objects no longer agree
    with each other: one replaced or truncated by another tool since the push."""
    sink.emit("log", level="info", msg=f"verifying the checkpoint in {work}: headers against the index, "
                                       f"shard digests against manifest.json")
    bad = check_tree(work)
    if not bad:
        return
    for d in bad:
        sink.emit("log", level="error", msg=f"{url_of.get(d.rel, d.rel)}: {d.what}")
    first = bad[0]
    more = f"; … {len(bad) - 3} more" if len(bad) > 3 else ""
    raise CheckpointError(
        f"pulled checkpoint is inconsistent: {'; '.join(d.line() for d in bad[:3])}{more}",
        at=url_of.get(first.rel, str(work / first.rel)),
        hint="the object was replaced or truncated in the bucket since the push: re-push the checkpoint from its "
             "source (`quantdeck s3 push SRC URL`), or delete the bad object; nothing was renamed into place",
        title="checkpoint verification failed")


def _already_there(jobs: list[Job], dst: Path, man: TransferManifest, result: TransferResult, sink: EventSink,
                   t0: float) -> TransferResult:
    """`dst` exists: fine if the manifest vouches for every object in it; otherwise refuse to touch it."""
    stale = [j for j in jobs if not _trusted(man.get(j.rel), j, local_stat(dst / j.rel))]
    if stale:
        raise TransferError(f"{dst} already exists and differs from {result.url} "
                            f"({len(stale)} of {len(jobs)} objects not verified there, e.g. {stale[0].rel})",
                            at=str(dst), hint="pull into a new directory, or remove this one first")
    result.skipped = len(jobs)
    if not man.complete:  # killed between the rename and the manifest's last write
        man.mark_complete(str(dst))
    result.seconds = time.monotonic() - t0
    sink.emit("log", level="info", msg=f"{dst} is up to date with {result.url} ({len(jobs)} objects)")
    return result


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
