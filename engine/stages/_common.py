"""Helpers shared by the stage adapters: output dirs per layout, calling library functions with a sink,
and cheap checks of a written checkpoint (manifest sha256s) for validate-only."""

from __future__ import annotations

import inspect as _inspect
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable

from engine.checkpoint.digest import matches
from engine.core.fsutil import read_json


def output_dirs(dst: str | Path, layouts: list[str] | tuple[str, ...] | None) -> list[Path]:
    """Where a converted checkpoint lands: `dst` for one layout, `dst/<layout>` for several (as
    engine.convert.convert_checkpoint writes them)."""
    layouts = list(layouts or ["modelopt"])
    dst = Path(dst)
    return [dst] if len(layouts) <= 1 else [dst / lay for lay in layouts]


def call_with_sink(fn: Callable[..., Any], *args: Any, sink: Any = None, **kw: Any) -> Any:
    """Call a library function, passing `sink` and keyword options only where its signature takes them."""
    try:
        params = _inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    call_kw = {k: v for k, v in kw.items() if takes_kw or k in params}
    if sink is not None and (takes_kw or "sink" in params):
        call_kw["sink"] = sink
    return fn(*args, **call_kw)


def jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    for attr in ("to_json", "to_dict", "summary"):
        f = getattr(obj, attr, None)
        if callable(f):
            return jsonable(f())
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    return str(obj)


def small(result: Any, limit: int = 8000) -> dict[str, Any]:
    """A summary small enough for status.json (long lists cut)."""
    res = jsonable(result)
    if not isinstance(res, dict):
        res = {"result": res}
    text = json.dumps(res, default=str)
    if len(text) <= limit:
        return res
    return {k: v for k, v in res.items() if len(json.dumps(v, default=str)) < limit // 8}


def check_checkpoint_dir(d: Path, *, hash_shards: bool = True) -> list[str]:
    """Problems of a finished or partial output checkpoint: missing index/shards, shards whose sha256
    differs from the manifest. Reads files, writes nothing."""
    problems: list[str] = []
    partial = Path(str(d) + ".partial")
    if not d.is_dir():
        if partial.is_dir():
            problems.append(f"{d} is not finished ({partial.name} holds a partial output; resume finishes it)")
            d = partial
        else:
            return [f"{d} does not exist"]
    for stray in sorted(d.glob(".*.tmp.*")):
        problems.append(f"{stray}: a stray temporary file (a write killed before its rename)")
    man = read_json(d / "manifest.json")
    if man is None:
        if not (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists():
            problems.append(f"{d}: no manifest.json and no safetensors index")
        return problems
    shards = man.get("shards") or {}
    for name, info in sorted(shards.items()):
        f = d / name
        rec = info if isinstance(info, dict) else {"sha256": info}
        if not f.exists():
            problems.append(f"{f}: listed in the manifest but missing")
        elif hash_shards and (rec.get("digest") or rec.get("sha256")) and not matches(f, rec):
            problems.append(f"{f}: sha256 differs from the manifest (corrupted or changed)")
    idx = read_json(d / "model.safetensors.index.json")
    if idx and d.name != partial.name:
        for shard in sorted(set(idx.get("weight_map", {}).values())):
            if not (d / shard).exists():
                problems.append(f"{d / shard}: named in the index but missing")
    return problems
