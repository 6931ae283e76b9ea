"""validate's pass beside the conversion: the shards of an output checked as the writer finishes them.

A run's validate stage is started ahead while convert still writes (on a machine of 8 cores or more, beside the
conversion: engine.runs.ahead). There it follows the output (`Follower`): each shard the writer has finished
(renamed into place in `<dst>.partial/` and recorded in its manifest, engine.checkpoint.writer) is read by the
pass's jobs at once, from the page cache the writer just filled, and their findings are kept. When the stage
begins, validate takes those findings (engine.convert.validate_pass.Earlier) where every tensor a job read still
lies where it lay, in the same unchanged file, and reads the rest itself: the shards finished last, any rewritten
since (a resumed conversion, inject-mtp), the checks over the whole checkpoint. So the report is the one validate
gives alone, and what is left after the conversion is about one shard's pass.

The follower uses half of validate's threads, beside the conversion's own, and never raises: on any error it
stops following (`Follower.error` says why), and validate reads what it did not check. On fewer than 8 cores the
worker is started ahead only beside the short stages after the conversion; it then checks the finished output
there, a head start of a fraction of a second.
"""

from __future__ import annotations

import threading
from pathlib import Path

from engine.checkpoint.manifest import MANIFEST_NAME, load_manifest
from engine.checkpoint.paths import partial_path
from engine.checkpoint.reader import CheckpointReader
from engine.convert import validate_read as host
from engine.convert.validate_pass import Earlier, Found, Pass, file_identity, has_digests, plan_pass, source_key
from engine.core.events import NullSink, Progress

POLL_S = 0.25  # between looks at the manifest


def _finished(out_dir: Path) -> tuple[Path, dict[str, str], bool] | None:
    """(the directory the output is in now, tensor -> shard of its finished shards, whether they have digests);
    None while there is neither `<out>.partial/` nor `<out>` with a manifest."""
    for d in (partial_path(out_dir), out_dir):
        man = load_manifest(d)
        if not man:
            continue
        done = {s for s, rec in (man.get("shards") or {}).items() if isinstance(rec, dict)}
        wm = {str(n): str(s) for n, s in (man.get("weight_map") or {}).items() if s in done}
        return d, wm, has_digests(man)
    return None


class Follower:
    """Checks the shards of `out_dir` as they are finished, against `src_dir` (None: no source), on a thread of
    its own; `stop` ends it and gives what it found."""

    def __init__(self, out_dir: str | Path, src_dir: str | Path | None, *, workers: int | None = None,
                 poll_s: float = POLL_S):
        self.out_dir = Path(out_dir).absolute()
        self.src_dir = Path(src_dir).absolute() if src_dir else None
        self.workers = workers or max(2, host.worker_count() // 2)
        self.poll_s = poll_s
        self.earlier = Earlier(source=source_key(self.src_dir))
        self.error: str | None = None  # why it stopped following early
        self.checked: list[tuple[str, Path]] = []  # (shard, the directory it was checked in), in order
        self._seen: set[tuple[str, tuple | None]] = set()  # (shard, its file's identity) checked
        self._looked: tuple | None = None  # the manifests' identities at the last step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="validate-follow", daemon=True)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> Earlier:
        """Stop following (the jobs under way end first) and return what was found."""
        self._stop.set()
        self._thread.join()
        return self.earlier

    def _loop(self) -> None:
        src = None
        try:
            if self.src_dir is not None:
                src = CheckpointReader(self.src_dir)
            while not self._stop.is_set():
                self.step(src)
                self._stop.wait(self.poll_s)
        except Exception as e:  # noqa: BLE001 - validate reads what was not checked here, and meets the error there
            self.error = f"{type(e).__name__}: {e}"

    def step(self, src: CheckpointReader | None) -> int:
        """Check the shards finished since the last step; how many there were."""
        looks = tuple(file_identity(d / MANIFEST_NAME) for d in (partial_path(self.out_dir), self.out_dir))
        if looks == self._looked:  # no shard recorded since the last step: not parsed again
            return 0
        self._looked = looks
        got = _finished(self.out_dir)
        if got is None:
            return 0
        d, wm, hashing = got
        idents = {s: file_identity(d / s) for s in set(wm.values())}
        new = sorted(s for s, ident in idents.items() if (s, ident) not in self._seen)  # a shard rewritten: again
        if not new:
            return 0
        fresh = set(new)
        for s in new:  # a shard checked before and changed since: nothing found in it then stands
            self.earlier.shards.pop(s, None)
        self.earlier.found = {k: f for k, f in self.earlier.found.items() if not {m.shard for m in f.reads} & fresh}
        # a reader over the new shards only: each shard's header is parsed once, not at every step
        r = CheckpointReader(d, strict=False, weight_map={n: s for n, s in wm.items() if s in fresh})
        p = Pass(r, src, plan_pass(r, src), hashing, Progress(NullSink(), "modules", total=0))
        found: dict[tuple, Found] = {}
        try:
            p.run(self.workers, on_found=lambda key, f: found.__setitem__(key, f), stop=self._stop)
        finally:
            p.close()
        self._seen.update((s, idents[s]) for s in new)  # stopped part-way, the jobs not begun are validate's
        self.checked.extend((s, d) for s in new)
        unchanged = {s for s in new if idents[s] is not None and file_identity(d / s) == idents[s]}
        for s in unchanged:
            self.earlier.shards[s] = idents[s]
        for key, f in found.items():
            if not f.io_error and f.reads and {m.shard for m in f.reads} <= unchanged:
                self.earlier.found[key] = f
        return len(new)
