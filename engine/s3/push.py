"""Push: a local directory to `s3://bucket/prefix`, safetensors shards first and the index and configs last,
so that a half-pushed checkpoint never looks complete to whoever reads the bucket."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from engine.core.errors import TransferError
from engine.core.events import EventSink, NullSink, Progress
from engine.s3.checksum import META_SHA256, FileDigest, clean_etag, digest_file, upload_part_size
from engine.s3.client import S3Session, error_code, make_session, translate
from engine.s3.manifest import TransferManifest, local_stat
from engine.s3.pull import list_objects
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
from engine.s3.verify import Expected

LAST_NAMES = {"config.json", "generation_config.json", "hf_quant_config.json", "manifest.json",
              "quantization_config.json"}


def default_push_manifest(src: Path, url: str) -> Path:
    tag = hashlib.sha256(url.encode()).hexdigest()[:10]
    return src.parent / f".{src.name}.push-{tag}.json"


def push_phase(rel: str) -> int:
    """0: weight shards; 1: everything else; 2: the index and configs, which make a checkpoint look whole."""
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".safetensors"):
        return 0
    if name.endswith(".index.json") or name in LAST_NAMES or name.endswith("config.json"):
        return 2
    return 1


def local_files(src: Path, skip: set[Path]) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.absolute() not in skip:
            out.append((p.relative_to(src).as_posix(), p))
    return out


def check_bucket(sess: S3Session, u: S3Url) -> None:
    """The bucket exists and may be listed (s3:ListBucket, which a push needs anyway to resume)."""
    try:
        sess.client.list_objects_v2(Bucket=u.bucket, MaxKeys=1)
    except Exception as e:
        raise translate(e, sess, at=f"s3://{u.bucket}", op="check bucket") from e


def push(src: str | os.PathLike, url: str, *, endpoint_url: str | None = None, part_size: int = DEFAULT_PART_SIZE,
         concurrency: int = DEFAULT_CONCURRENCY, part_concurrency: int = DEFAULT_PART_CONCURRENCY,
         retries: int = DEFAULT_RETRIES, manifest: str | os.PathLike | None = None, profile: str | None = None,
         sink: EventSink = NullSink()) -> TransferResult:
    """Upload every file under `src` to `url`; resumable and verified; returns what was moved."""
    t0 = time.monotonic()
    u = parse_url(url)
    src = Path(src).absolute()
    if not src.is_dir():
        raise TransferError(f"nothing to push: {src} is not a directory", at=str(src),
                            hint="give the checkpoint directory")
    opts = TransferOptions(part_size=part_size, concurrency=concurrency, part_concurrency=part_concurrency,
                           retries=retries)
    mpath = Path(manifest).absolute() if manifest else default_push_manifest(src, str(u))
    files = local_files(src, {mpath})
    if not files:
        raise TransferError(f"nothing to push: {src} is empty", at=str(src), hint="give the checkpoint directory")
    sess = make_session(endpoint_url, profile=profile, pool=opts.pool_size, attempts=retries + 1)
    check_bucket(sess, u)
    man = TransferManifest.load(mpath, direction="push", url=str(u), local=str(src))
    jobs = [Job(rel=rel, key=u.key_for(rel), size=p.stat().st_size, local=p) for rel, p in files]
    result = TransferResult("push", str(u), str(src), objects=len(jobs), bytes=sum(j.size for j in jobs),
                            manifest=str(mpath))
    _warn_extra_objects(sess, u, {j.key for j in jobs}, sink)
    todo = _unverified(sess, u, man, jobs, opts)
    result.skipped = len(jobs) - len(todo)
    progress = Progress(sink, "objects", len(todo), bytes_total=sum(j.size for j in todo))
    sink.emit("log", level="info", msg=f"push {src} → {u}: {len(jobs)} objects, {result.bytes} bytes; "
                                       f"{result.skipped} already verified there, {len(todo)} to upload "
                                       f"(shards first, index and configs last)")
    tc = opts.transfer_config()

    def work_one(job: Job, counter: ByteCounter) -> str:
        st = local_stat(job.local)
        if st is None:
            raise TransferError(f"{job.local} vanished during the push", at=str(job.local), hint="rerun the push")
        d = _digest(man.get(job.rel), job.local, st, opts.part_size)
        if _remote_matches(sess, u, job, d):
            _record(man, job, d, st, "remote already matches")
            return "skipped"
        sess.client.upload_file(str(job.local), u.bucket, job.key, ExtraArgs={"Metadata": {META_SHA256: d.sha256}},
                                Config=tc, Callback=counter)
        head = sess.client.head_object(Bucket=u.bucket, Key=job.key)
        exp = Expected.from_head(head)
        if exp.size != d.size or exp.sha256 != d.sha256 or (not exp.kms and exp.etag != d.etag):
            raise ChecksumMismatchError(f"{u.url_for(job.key)}: stored object (size {exp.size}, ETag {exp.etag}) "
                                        f"!= local (size {d.size}, ETag {d.etag})")
        if local_stat(job.local) != st:
            raise ChecksumMismatchError(f"{job.local} changed while it was pushed")
        _record(man, job, d, st, "etag+sha256" if not exp.kms else "size+sha256")
        return "transferred"

    before = sess.retries
    try:
        for phase in (0, 1, 2):
            run_jobs([j for j in todo if push_phase(j.rel) == phase], work_one, sess=sess, opts=opts,
                     progress=progress, sink=sink, url_of=lambda j: u.url_for(j.key), op="push", result=result)
    finally:
        result.retries += sess.retries - before
    progress.advance(0, force=True)
    man.mark_complete(str(src))
    result.seconds = time.monotonic() - t0
    sink.emit("log", level="info", msg=f"pushed {src} → {u}: {result.transferred} uploaded, {result.skipped} skipped "
                                       f"(already verified), {result.bytes_transferred} bytes in "
                                       f"{result.seconds:.1f}s, {result.retries} retries")
    sink.emit("metric", name="s3.retries", value=result.retries)
    return result


def _warn_extra_objects(sess: S3Session, u: S3Url, keys: set[str], sink: EventSink) -> None:
    """Objects under the prefix that SRC does not have (an older push?) are left alone, but said."""
    try:
        extra = sorted(j.key for j in list_objects(sess, u) if j.key not in keys)
    except TransferError:  # no s3:ListBucket: only this warning is lost
        return
    if extra:
        sink.emit("log", level="warning", msg=f"{len(extra)} object(s) under {u} are not in the local directory and "
                                              f"are left as they are (e.g. {u.url_for(extra[0])})")


def _unverified(sess: S3Session, u: S3Url, man: TransferManifest, jobs: list[Job],
                opts: TransferOptions) -> list[Job]:
    """Jobs still to do: those the manifest vouches for (untouched local file) and whose object still matches
    (one HEAD each, in parallel) are left out without reading the file."""
    from concurrent.futures import ThreadPoolExecutor

    def vouched(job: Job) -> bool:
        entry, st = man.get(job.rel), local_stat(job.local)
        if not (entry and st and entry.get("size") == st[0] and entry.get("mtime_ns") == st[1]
                and entry.get("key") == job.key and entry.get("sha256")):
            return False
        try:
            return _remote_matches(sess, u, job, _digest(entry, job.local, st, opts.part_size))
        except Exception as e:
            raise translate(e, sess, at=u.url_for(job.key), op="check object") from e

    with ThreadPoolExecutor(max_workers=opts.concurrency) as pool:
        done = list(pool.map(vouched, jobs))
    return [j for j, ok in zip(jobs, done, strict=True) if not ok]


def _digest(entry: dict | None, path: Path, st: tuple[int, int], part_size: int) -> FileDigest:
    """SHA-256 and the ETag boto3's upload will produce; reused from the manifest while the file is untouched."""
    ps = upload_part_size(st[0], part_size)
    if entry and entry.get("size") == st[0] and entry.get("mtime_ns") == st[1] and entry.get("part_size") == ps \
            and entry.get("sha256") and entry.get("etag"):
        return FileDigest(size=st[0], sha256=entry["sha256"], etag=entry["etag"], part_size=ps)
    return digest_file(path, ps)


def _remote_matches(sess: S3Session, u: S3Url, job: Job, d: FileDigest) -> bool:
    try:
        head = sess.client.head_object(Bucket=u.bucket, Key=job.key)
    except Exception as e:
        if error_code(e) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    exp = Expected.from_head(head)
    if exp.size != d.size:
        return False
    return exp.sha256 == d.sha256 if exp.sha256 else clean_etag(exp.etag) == d.etag


def _record(man: TransferManifest, job: Job, d: FileDigest, st: tuple[int, int], verified: str) -> None:
    man.record(job.rel, {"key": job.key, "size": d.size, "etag": d.etag, "sha256": d.sha256, "mtime_ns": st[1],
                         "part_size": d.part_size, "verified": verified})
