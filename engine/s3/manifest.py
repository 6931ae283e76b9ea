"""The transfer manifest: which objects are already verified, so a rerun skips them.

One JSON file, rewritten atomically (engine.core.fsutil) after every verified object:

    {"version": 1, "direction": "pull", "url": "s3://b/p", "local": "/data/ckpt", "complete": false,
     "part_size": 67108864,
     "objects": {"model-00001-of-00002.safetensors": {"key": "p/model-…", "size": 123, "etag": "…-3",
                 "sha256": "…", "mtime_ns": 1732…, "verified": "sha256"}}}

An entry is trusted only while the local file keeps its size and mtime and the object keeps its size and
ETag; anything else is checked again from the bytes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.fsutil import atomic_write_json, read_json

VERSION = 1


@dataclass
class TransferManifest:
    path: Path
    direction: str
    url: str
    local: str
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike, *, direction: str, url: str, local: str) -> "TransferManifest":
        """The manifest at `path` if it describes the same transfer; otherwise a fresh, empty one."""
        path = Path(path)
        raw = read_json(path, default=None)
        m = cls(path=path, direction=direction, url=url, local=local)
        if isinstance(raw, dict) and raw.get("version") == VERSION and raw.get("direction") == direction \
                and raw.get("url") == url and isinstance(raw.get("objects"), dict):
            m.objects = {str(k): dict(v) for k, v in raw["objects"].items() if isinstance(v, dict)}
            m.complete = bool(raw.get("complete")) and raw.get("local") == local
        return m

    def get(self, rel: str) -> dict[str, Any] | None:
        with self._lock:
            e = self.objects.get(rel)
            return dict(e) if e else None

    def record(self, rel: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self.objects[rel] = dict(entry)
            self._save_no_lock()

    def forget(self, rel: str) -> None:
        with self._lock:
            if self.objects.pop(rel, None) is not None:
                self._save_no_lock()

    def mark_complete(self, local: str) -> None:
        with self._lock:
            self.complete, self.local = True, local
            self._save_no_lock()

    def save(self) -> None:
        with self._lock:
            self._save_no_lock()

    def _save_no_lock(self) -> None:
        atomic_write_json(self.path, {"version": VERSION, "direction": self.direction, "url": self.url,
                                      "local": self.local, "complete": self.complete, "objects": self.objects})


def local_stat(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a local file, or None when it is missing."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns
