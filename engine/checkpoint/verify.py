"""Whether a checkpoint tree holds what it says it holds, file by file.

Three checks, each naming the file and what disagrees:

* every shard the directory's `model.safetensors.index.json` names (or its lone `model.safetensors`) exists,
  its header parses, holds exactly the tensors the index maps to that shard, and the file is exactly as long as
  the header says (it ends where the last tensor ends); other files are not the checkpoint's and are left alone;
* where a directory has quantdeck's `manifest.json`, each shard it lists has the size and digest recorded
  there (`digests=False` skips this, the only check that reads the tensor data).

`check_tree(root)` runs them over `root` and every directory below it (a push of several output layouts is
one tree). It reads, never writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint.digest import matches
from engine.checkpoint.manifest import MANIFEST_NAME
from engine.checkpoint.safetensors_format import ITEMSIZE, parse_header

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Disagreement:
    """One file that is not what the checkpoint says: its path relative to the tree's root, and why."""

    rel: str
    what: str

    def line(self) -> str:
        return f"{self.rel}: {self.what}"


def check_tree(root: str | os.PathLike, *, digests: bool = True) -> list[Disagreement]:
    """Every disagreement in `root` and the directories below it, by file ([] when the tree is consistent)."""
    root = Path(root)
    dirs = sorted({p.parent for pat in ("*.safetensors", INDEX_NAME, MANIFEST_NAME) for p in root.rglob(pat)})
    out: list[Disagreement] = []
    for d in dirs:
        out += check_dir(d, root=root, digests=digests)
    return sorted(out, key=lambda x: x.rel)


def check_dir(d: Path, *, root: Path | None = None, digests: bool = True) -> list[Disagreement]:
    """The disagreements of one checkpoint directory (paths relative to `root`, default `d`)."""
    root = root or d

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    out: list[Disagreement] = []
    expected: dict[str, set[str]] = {}
    index = d / INDEX_NAME
    if index.exists():
        weight_map = _weight_map(index)
        if weight_map is None:
            out.append(Disagreement(rel(index), "not a valid index (no weight_map object)"))
        for name, shard in (weight_map or {}).items():
            expected.setdefault(shard, set()).add(name)
        for shard, names in sorted(expected.items()):
            if not (d / shard).is_file():
                out.append(Disagreement(rel(d / shard), f"missing; the index maps {len(names)} tensor(s) to it "
                                                        f"(first: {min(names)})"))
    bad = {x.rel for x in out}
    shards = sorted(expected) if index.exists() else ["model.safetensors"]
    for f in [d / s for s in shards if (d / s).is_file()]:
        problems = header_problems(f, expected.get(f.name) if index.exists() else None)
        out += [Disagreement(rel(f), p) for p in problems]
        if problems:
            bad.add(rel(f))
    if digests:
        out += [x for x in _manifest_problems(d, rel) if x.rel not in bad]
    return out


def header_problems(path: Path, expected: set[str] | None = None) -> list[str]:
    """What is wrong with one safetensors file: an unparseable header, tensors other than `expected` (when the
    index names them), a length other than the header's. [] when it is sound."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header, data_start = parse_header(fh, path.name)
    except (OSError, ValueError) as e:
        return [f"header does not parse ({e})"]
    header.pop("__metadata__", None)
    problems: list[str] = []
    end = 0
    for name, info in header.items():
        try:
            a, b = (int(x) for x in info["data_offsets"])
            n = ITEMSIZE.get(str(info["dtype"]), 0)
            for dim in info["shape"]:
                n *= int(dim)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"malformed header entry for {name} ({e})")
            continue
        if n and b - a != n:
            problems.append(f"{name}: data_offsets [{a}, {b}) do not hold {info['dtype']}{list(info['shape'])}")
        end = max(end, b)
    if expected is not None:
        missing, extra = sorted(expected - set(header)), sorted(set(header) - expected)
        if missing:
            problems.append(f"header lacks {len(missing)} tensor(s) the index maps to it (first: {missing[0]})")
        if extra:
            problems.append(f"header holds {len(extra)} tensor(s) the index does not map to it (first: {extra[0]})")
    want = data_start + end
    if size != want:
        how = "truncated" if size < want else "longer than its header says"
        problems.append(f"{how}: {size} bytes, the header says {want}")
    return problems


def _manifest_problems(d: Path, rel) -> list[Disagreement]:
    """Shards of quantdeck's manifest.json whose size or digest differ from what it records."""
    try:
        man = json.loads((d / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return []  # no manifest (or someone else's file of that name): nothing recorded to compare with
    shards = man.get("shards") if isinstance(man, dict) and "manifest_version" in man else None
    out: list[Disagreement] = []
    for shard, rec in sorted((shards or {}).items()):
        f = d / shard
        rec = rec if isinstance(rec, dict) else {"sha256": rec}
        if not f.is_file():
            out.append(Disagreement(rel(f), f"missing; {MANIFEST_NAME} lists it"))
        elif "size" in rec and f.stat().st_size != rec["size"]:
            out.append(Disagreement(rel(f), f"{f.stat().st_size} bytes, {MANIFEST_NAME} records {rec['size']}"))
        elif (rec.get("digest") or rec.get("sha256")) and not matches(f, rec):
            out.append(Disagreement(rel(f), f"same size, but its sha256 differs from the one {MANIFEST_NAME} "
                                            f"records (the bytes changed)"))
    return out


def _weight_map(index: Path) -> dict[str, str] | None:
    try:
        wm = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return None
    return {str(k): str(v) for k, v in wm.items()} if isinstance(wm, dict) else None
