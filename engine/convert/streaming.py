"""`convert_checkpoint`: stream a checkpoint into NVFP4 (weight-only), FP8-block or BF16, resumably.

Plan (engine.convert.plan) → output shards planned up front → per output layout a CheckpointWriter in
`<dst>.partial/` → the shards still to write, run by the reader/compute/writer pipeline in this process or
split round-robin over `workers` processes (one GPU each, round-robin, on CUDA) → extras copied, config
written → renamed to `<dst>`. With two layouts (`--format both`) the math runs once and both
`<dst>/modelopt` and `<dst>/compressed-tensors` are written. A CPU run imports no torch unless an item needs
it (engine.convert.compute_host); the device is chosen by engine.convert.device.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from engine import __version__
from engine.checkpoint.paths import layout_dirs, refuse_overlap
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.shard_plan import ShardPlan, shard_name
from engine.checkpoint.write_errors import make_output_dir
from engine.checkpoint.writer import CheckpointWriter
from engine.convert.compute_host import native
from engine.convert.device import choose_device, needs_gpu_after_all, usable_cores
from engine.convert.extras import copy_extras
from engine.convert.kernels import warm_up
from engine.convert.pipeline import ShardTask, device_type, run_tasks
from engine.convert.plan import TO_NVFP4, Item, build_plan, check_layouts
from engine.convert.ranks import Ranks, finish_writers, over_ranks, prepare_writers
from engine.core import timeline
from engine.core.errors import UsageError
from engine.core.events import EventSink, NullSink, Progress
from engine.core.fsutil import atomic_write_json
from engine.core.libc import libc
from engine.core.names import TargetFormat
from engine.core.parent_watch import die_with_parent
from engine.core.settings import settings
from engine.formats.layout import Layout, layout_for
from engine.formats.native import build
from engine.models import detect_layout

PLAN_VERSION = 1


def reuse_heap() -> None:
    """Let glibc serve tensor-sized blocks (< 32 MiB) from its heap and keep them when freed, instead of a fresh
    mmap per tensor: every read buffer of the same size then reuses warm pages (a third fewer page faults, a
    measurable share of a 2-core machine). Memory stays bounded by the pipeline's in-flight budget. At most two
    arenas: a buffer is read on one thread, computed on another and freed by a writer, and with an arena per
    thread (glibc's default, up to 8 per core) each of ~30 threads kept its own freed blocks (peak RSS 1.5-2.0 GB
    against 0.8 GB on a 16-core box)."""
    try:
        c = libc()
        c.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        c.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        c.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def resolve_device(device: str):
    """torch.device for `device` ("auto": CUDA when torch sees it); for the torch-based paths (export)."""
    import torch

    if device in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked, but torch sees no CUDA device", at="--device",
                         hint="use --device cpu or auto")
    if str(device) not in ("cpu",) and not str(device).startswith("cuda"):
        raise UsageError(f"unknown device {device!r}", at="--device", hint="auto, cpu or cuda")
    return torch.device(device)


def parse_size(text: str | int | float) -> int:
    """'5GB' / '500MB' / '5e9' / 5000000000 → bytes (decimal units; GiB/MiB binary); more than 0."""
    n = _size(text)
    if n <= 0:
        raise UsageError(f"shard size must be more than 0, got {text!r}", at="--shard-size", hint="e.g. 5GB")
    return n


def _size(text: str | int | float) -> int:
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for u, mult in units.items():
        if s.endswith(u):
            try:
                return int(float(s[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise UsageError(f"cannot read size {text!r}", at="--shard-size", hint="e.g. 5GB, 500MB, 5e9") from None


def partition(items: list[Item], shard_size: int) -> list[list[Item]]:
    """Items into shards, greedily by canonical output bytes; an item is never split."""
    groups: list[list[Item]] = []
    cur: list[Item] = []
    size = 0
    for it in items:
        n = sum(s.nbytes for s in it.outputs)
        if cur and size + n > shard_size:
            groups.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    if cur:
        groups.append(cur)
    return groups


def layout_shards(groups: list[list[Item]], layout: type[Layout]) -> list[ShardPlan]:
    """The shards as `layout` writes them: each item's canonical outputs re-labelled by the layout."""
    n = len(groups)
    return [ShardPlan(shard_name(i + 1, n),
                      tuple(layout.out_spec(s, it.action == TO_NVFP4) for it in g for s in it.outputs))
            for i, g in enumerate(groups)]


def shard_tasks(groups: list[list[Item]], outs: dict[str, type[Layout]], writers: dict, plans: dict,
                todo: dict[str, set[str]]) -> list[ShardTask]:
    """The shards still to write (`todo`, per layout), each with the layouts that need it: what run_tasks takes."""
    tasks = []
    for i, g in enumerate(groups):
        targets = tuple((outs[lay], str(writers[lay].partial_dir), plans[lay][i]) for lay in outs
                        if plans[lay][i].name in todo[lay])
        if targets:
            tasks.append(ShardTask(i, tuple(g), targets))
    return tasks


def _cpu_kernels(sink: EventSink) -> str | None:
    """Which CPU kernels this process has run ("c", "numba"; None: none, e.g. every shard was kept, or
    `--workers` children did the math); where the C ones could not be built, says why. Builds nothing."""
    tech = build.used()
    if tech == "numba" and build.unavailable():
        sink.emit("log", level="info",
                  msg=f"CPU kernels: numba (the C kernels could not be built: {build.unavailable()})")
    return tech


def _worker_main(src: str, tasks: list[ShardTask], device: str, v4_fp8: bool, q, parent: int) -> None:
    """Entry of a `--workers N` child process: convert its share of the shards, report each item. It dies with
    `parent` (its pid): an orphan would write on into `<dst>.partial/` beside the parent's next run."""
    die_with_parent(parent)
    share = max(1, usable_cores() // settings().convert_workers)
    os.environ["OMP_NUM_THREADS"] = str(share)  # torch's pool, should an item import it
    os.environ.setdefault("QUANTDECK_COMPUTERS", str(share))  # CPU: one compute thread per core of its share
    os.environ.setdefault("QUANTDECK_KERNEL_THREADS", str(share))  # and a big item's parallel kernel (C or numba)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(share)
    reuse_heap()
    reader = CheckpointReader(src)

    def on_item(item: Item, notes: list[str]) -> None:
        q.put(("item", item.key, item.src_bytes, notes))

    try:
        run_tasks(reader, tasks, device=device, v4_fp8=v4_fp8, on_item=on_item)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        q.put(("error", e if _picklable(e) else RuntimeError(repr(e)), 0, []))
        raise SystemExit(1) from e
    q.put(("done", "", 0, []))


def _picklable(e: BaseException) -> bool:
    import pickle

    try:
        pickle.dumps(e)
        return True
    except Exception:  # noqa: BLE001
        return False


def _run_workers(src: str, tasks: list[ShardTask], workers: int, device, v4_fp8: bool,
                 progress: Progress, sink: EventSink) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n_gpu = 0
    if device_type(device) == "cuda":
        import torch

        n_gpu = torch.cuda.device_count()
    procs = []
    os.environ["QD_CONVERT_WORKERS"] = str(workers)
    for k in range(workers):
        share = tasks[k::workers]
        if not share:
            continue
        dev = f"cuda:{k % n_gpu}" if n_gpu else str(device)
        p = ctx.Process(target=_worker_main, args=(src, share, dev, v4_fp8, q, os.getpid()),
                        name=f"convert-worker-{k}")
        p.start()
        procs.append(p)
    alive = len(procs)
    error: BaseException | None = None
    while alive:
        try:
            kind, key, nbytes, notes = q.get(timeout=0.5)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) and error is None:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                error = RuntimeError(f"convert worker {dead[0].name} died (exit {dead[0].exitcode})")
                break
            continue
        if kind == "item":
            progress.advance(1, nbytes, label=key)
            for note in notes:
                sink.emit("log", level="warning", msg=note)
        elif kind == "done":
            alive -= 1
        else:
            error = key if isinstance(key, BaseException) else RuntimeError(str(key))
            break
    if error is not None:
        for p in procs:
            if p.is_alive():
                p.terminate()
    for p in procs:
        p.join()
    if error is not None:
        raise error


def _pick_device(device: str, target: str, ranks: Ranks, workers: int = 1):
    """(device, why auto chose it, the choice): "cpu" (a string: no torch) or a torch.device for CUDA."""
    choice = choose_device(device, target, split=max(ranks.world if ranks.active else 1, int(workers)))
    return _device_for(choice, ranks) + (choice,)


def _device_for(choice, ranks: Ranks):
    if choice.device == "cpu":
        return "cpu", choice.reason if choice.asked == "auto" else ""
    import torch

    if not torch.cuda.is_available():
        if choice.asked == "auto":
            return "cpu", "torch sees no CUDA device"
        raise UsageError(f"--device {choice.asked} asked, but torch sees no CUDA device", at="--device",
                         hint="use --device cpu or auto")
    return ranks.device(torch.device(choice.device)), choice.reason if choice.asked == "auto" else ""


@over_ranks
def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str = "nvfp4",
                       layouts: Sequence[str] = ("modelopt",), device: str = "auto", workers: int = 1,
                       shard_size: int | str = 5 * 10**9, quantize_attention: bool = False,
                       sink: EventSink = NullSink(), ranks: Ranks | None = None) -> dict[str, Any]:
    """Convert `src` into `dst`; returns a summary dict. Rerunning after a crash resumes (same bytes).
    Under torchrun the shards are split over the ranks (engine.convert.ranks)."""
    t0 = time.monotonic()
    reuse_heap()
    src, dst = Path(src), Path(dst)
    target = str(TargetFormat(str(to))) if str(to) in {t.value for t in TargetFormat} else None
    if target is None:
        raise UsageError(f"unknown target {to!r}", at="--to", hint="nvfp4, fp8-block or bf16")
    asked = [str(x) for x in layouts]
    layouts = check_layouts(asked, target)
    dropped = sorted(set(asked) - set(layouts))
    if dropped:
        sink.emit("log", level="warning", msg=f"--format {'/'.join(dropped)} applies to --to nvfp4 only: a {target} "
                                               f"output has one layout, written to {dst}")
    dsts = layout_dirs(dst, layouts)
    refuse_overlap(src, dst, dsts.values())
    shard_size = parse_size(shard_size)
    dev, why, choice = _pick_device(device, target, ranks, workers)
    timeline.begin("convert")
    reader = CheckpointReader(src)  # a missing or unreadable source fails here, before anything starts
    warm_up(target, dev)
    layout = detect_layout(reader.config, reader.names())
    plan = build_plan(reader, layout, target, quantize_attention=quantize_attention)
    torch_bytes = sum(it.src_bytes for it in plan.items if not native(it))
    if dev == "cpu" and needs_gpu_after_all(choice, torch_bytes, sum(it.src_bytes for it in plan.items)):
        gpu = replace(choice, device="cuda", gpu=False,
                      reason=f"NVIDIA GPU present and {torch_bytes / 1e9:.2f} GB of the source needs torch's math "
                             "(e.g. MXFP4 experts)")
        dev, why = _device_for(gpu, ranks)
        warm_up(target, dev)
    for note in plan.notes:
        sink.emit("log", level="warning", msg=note)
    groups = partition(plan.items, shard_size)
    if len(layouts) > 1:
        make_output_dir(dst)
    fingerprint = reader.fingerprint()
    writers, plans = {}, {}
    outs = {lay: layout_for(target, lay, plan.family) for lay in layouts}  # the output layouts, by name
    for lay in layouts:
        args = {"to": target, "layout": lay, "quantize_attention": bool(quantize_attention),
                "shard_size": shard_size, "plan_version": PLAN_VERSION, "quantdeck": __version__}
        plans[lay] = layout_shards(groups, outs[lay])
        writers[lay] = CheckpointWriter(dsts[lay], plans[lay], source_fingerprint=fingerprint, args=args, sink=sink)
    todo = prepare_writers(writers, ranks)
    tasks = shard_tasks(groups, outs, writers, plans, todo)
    mine = ranks.share(tasks)
    n_items = sum(len(t.items) for t in mine)
    bytes_total = sum(it.src_bytes for t in mine for it in t.items)
    progress = Progress(sink, "tensors", total=n_items, bytes_total=bytes_total)
    sink.emit("log", level="info", msg=f"{src} ({plan.family}) → {target} [{', '.join(layouts)}] on {dev}: "
              f"{len(plan.items)} items in {len(groups)} shard(s), {len(tasks)} to write"
              + (f" (device auto: {why})" if why else "")
              + (f", {len(mine)} of them by rank {ranks.rank} of {ranks.world}" if ranks.active else ""))
    v4_fp8 = plan.family == "deepseek-v4"
    notes_all: list[str] = []
    timings: dict[str, float] = {}
    if mine:
        workers = max(1, min(int(workers), len(mine)))
        if workers == 1:
            def on_item(item: Item, notes: list[str]) -> None:
                progress.advance(1, item.src_bytes, label=item.key)
                for note in notes:
                    notes_all.append(note)
                    sink.emit("log", level="warning", msg=note)

            timeline.mark("pipeline")
            timings = run_tasks(reader, mine, device=dev, v4_fp8=v4_fp8, on_item=on_item)
            timeline.mark("pipeline_done")
        else:
            _run_workers(str(src), mine, workers, dev, v4_fp8, progress, sink)
    progress.advance(0, force=True)

    def write_extras(lay: str, partial: Path) -> None:
        copy_extras(src, partial, sink=sink)
        # an NVFP4 W4A4 source re-laid (plan.w4a4) is labelled as quantdeck's export labels W4A4
        pieces = outs[lay].config(plan.modules, w4a4=plan.w4a4)
        atomic_write_json(partial / "config.json", outs[lay].output_config(reader.config, pieces))
        for fname, obj in pieces.files.items():
            atomic_write_json(partial / fname, obj)

    outputs = finish_writers(writers, ranks, write_extras)
    reader.close()
    timeline.mark("finalized")
    kernels = _cpu_kernels(sink) if mine and str(dev) == "cpu" else None
    wall = time.monotonic() - t0
    return {"src": str(src), "dst": str(dst), "outputs": outputs, "target": target, "family": plan.family,
            "device": str(dev), "cpu_kernels": kernels, "items": len(plan.items), "shards": len(groups),
            "shards_written": len(tasks),
            "shards_kept": len(groups) - len(tasks), "quantized_modules": len(plan.quantized_modules),
            "kept_modules": plan.kept_modules, "mtp_modules": plan.mtp_modules, "notes": notes_all,
            "bytes_read": bytes_total, "wall_s": round(wall, 3), "busy_s": timings,
            "timeline_s": timeline.since_start(),
            "read_mb_s": round(bytes_total / wall / 1e6, 1) if wall > 0 else None}
