"""manifest.json of an output checkpoint: which shards are done, their digest, and what produced them.

Schema (version 1):

    {"manifest_version": 1, "quantdeck_version": "0.1.0", "source_fingerprint": "…", "args_hash": "…",
     "args": {...}, "planned_shards": ["model-00001-of-00002.safetensors", …], "complete": false,
     "shards": {"model-00001-of-00002.safetensors": {"digest": "…", "digest_kind": "sha256-pieces",
                                                      "size": 123, "tensors": 17, "synced": false}},
     "weight_map": {"tensor.name": "model-00001-of-00002.safetensors", …}}

`weight_map` holds the tensors of finished shards only. Several worker processes may finish shards at
once: every update is a read-modify-write under an flock on `manifest.lock`, written atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from engine import __version__
from engine.checkpoint.digest import KIND
from engine.core.fsutil import atomic_write_json, read_json

MANIFEST_NAME = "manifest.json"
LOCK_NAME = "manifest.lock"
MANIFEST_VERSION = 1


def args_hash(args: dict[str, Any]) -> str:
    """A stable digest of the options that decide the output bytes."""
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:32]


def new_manifest(source_fingerprint: str, args: dict[str, Any], planned: list[str]) -> dict[str, Any]:
    return {"manifest_version": MANIFEST_VERSION, "quantdeck_version": __version__,
            "source_fingerprint": source_fingerprint, "args_hash": args_hash(args), "args": args,
            "planned_shards": list(planned), "complete": False, "shards": {}, "weight_map": {}}


def load_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    try:
        obj = read_json(Path(directory) / MANIFEST_NAME)
    except ValueError:
        return None  # a torn manifest is as good as none: the shards are re-verified
    return obj if isinstance(obj, dict) else None


def save_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / MANIFEST_NAME, manifest)


def same_job(manifest: dict[str, Any] | None, source_fingerprint: str, args: dict[str, Any],
             planned: list[str]) -> bool:
    """True when `manifest` was written by the same conversion (same source, options and shard plan)."""
    return bool(manifest) and manifest.get("source_fingerprint") == source_fingerprint \
        and manifest.get("args_hash") == args_hash(args) and manifest.get("planned_shards") == list(planned)


@contextmanager
def locked(directory: str | os.PathLike) -> Iterator[None]:
    """Hold the manifest lock of `directory` (between processes)."""
    path = Path(directory) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def record_shard(directory: str | os.PathLike, shard: str, digest: str, size: int,
                 tensors: list[str], synced: bool = True) -> None:
    """Add a finished shard to the manifest (under the lock; atomic write). `digest`: engine.checkpoint.digest's
    (older manifests hold a plain "sha256" of the file instead; engine.checkpoint.digest.matches checks both)."""
    with locked(directory):
        m = load_manifest(directory)
        if m is None:  # pragma: no cover - the writer creates it before any shard
            raise RuntimeError(f"{Path(directory) / MANIFEST_NAME} vanished while writing")
        m["shards"][shard] = {"digest": digest, "digest_kind": KIND, "size": size,
                              "tensors": len(tensors), "synced": synced}
        for t in tensors:
            m["weight_map"][t] = shard
        m["weight_map"] = dict(sorted(m["weight_map"].items()))
        m["shards"] = dict(sorted(m["shards"].items()))
        save_manifest(directory, m)


def forget_shard(directory: str | os.PathLike, shard: str) -> None:
    with locked(directory):
        m = load_manifest(directory)
        if not m or shard not in m["shards"]:
            return
        del m["shards"][shard]
        m["weight_map"] = {k: v for k, v in m["weight_map"].items() if v != shard}
        save_manifest(directory, m)
