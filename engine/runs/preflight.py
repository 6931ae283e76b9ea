"""Preflight: everything cheap, checked before any GPU is held. One line per failure, each with its fix.

Checks: the source is readable (local dir, or S3 reachable with objects); the model layout is recognized
and its config agrees with its tensors (layers, experts); free disk at the output ≥ estimated output ×
(1 + run.disk_margin) (and at the work dir for an S3 pull); the samples file is valid (calibrated
targets); GPUs are visible when the device asks for CUDA; versions of quantdeck, torch, modelopt and
transformers are importable; the S3 push target is reachable. Remote per-node checks are added by the caller
(`extra_checks`), so the engine never imports remote/; they may record what each node has
(`Facts.node_memory`). Last, after them: memory. What one rank of each heavy stage needs in host RAM and GPU
memory (engine.runs.memory_plan), times the ranks of each node, against what the node has (engine.runs.
memory_check): this machine's /proc/meminfo and its probed GPUs, a remote node's as its per-node check found
it, or [cluster] gpu_memory_gb where a GPU cannot be probed. `report["memory"]` gets the estimates whether or
not they fit.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from engine.calibrate.samples import validate_samples_file
from engine.checkpoint.reader import CheckpointReader
from engine.core.errors import QuantdeckError
from engine.core.fsutil import free_bytes
from engine.core.locks import this_host
from engine.core.meminfo import parse_meminfo
from engine.models.detect import config_mismatches, detect_layout
from engine.runs import memory_check as mc
from engine.runs import memory_plan as mp
from engine.runs.plan import build_plan, resolve_paths
from engine.runs.recipe import Recipe, load_recipe

GiB = 1 << 30
# output bytes per source element of a GEMM weight, by target (scales included)
_QUANT_BYTES = {"nvfp4": 0.5 + 1 / 16, "fp8-block": 1.0 + 4 / (128 * 128), "bf16": 2.0}


@dataclass
class Facts:
    """What earlier checks learned, for the later ones."""

    recipe: Recipe
    paths: dict[str, str]
    reader: Any = None
    layout: Any = None
    source_bytes: int = 0
    estimate: int = 0
    notes: list[str] = field(default_factory=list)
    gpus_free: list[int] | None = None  # this machine's GPUs, probed by check_gpus (None: not probed)
    node_memory: dict[str, Any] = field(default_factory=dict)  # node -> engine.runs.memory_check.NodeMemory (remote)
    memory: Any = None  # the engine.runs.memory_plan.MemoryPlan check_memory made


Check = Callable[[Facts], Iterable[str]]


def _fail(what: str, fix: str) -> str:
    return f"{what} (fix: {fix})"


def check_source(f: Facts) -> list[str]:
    r = f.recipe
    if r.source.is_s3:
        try:
            from engine.s3.reachable import check_reachable
        except ImportError:
            return []
        try:
            check_reachable(r.source.path, r.source.endpoint_url, need_objects=True)
        except QuantdeckError as e:
            return [_fail(f"source {r.source.path}: {e.msg}", e.hint or "check the URL and credentials")]
        return []
    src = Path(f.paths["source"])
    if not src.exists():
        return [_fail(f"source {src} does not exist", "set source.path to the checkpoint directory")]
    if not src.is_dir():
        return [_fail(f"source {src} is not a directory", "point source.path at the checkpoint directory")]
    if not os.access(src, os.R_OK | os.X_OK):
        return [_fail(f"source {src} is not readable", f"check permissions of {src}")]
    try:
        f.reader = CheckpointReader(src, strict=True)
    except QuantdeckError as e:
        return [_fail(f"source {src}: {e.msg}", e.hint or "fix the checkpoint")]
    f.source_bytes = sum(f.reader.meta(n).nbytes for n in f.reader.names())
    return []


def check_layout(f: Facts) -> list[str]:
    if f.reader is None:
        return []
    names = list(f.reader.names())
    config = f.reader.config or {}
    try:
        f.layout = detect_layout(config, names)
    except QuantdeckError as e:
        return [_fail(f"model layout: {e.msg}", e.hint or "check config.json")]
    out = []
    fam = getattr(f.layout, "family", None)
    want = f.recipe.model.family
    if want is not None and fam is not None and str(fam) != str(want) and str(fam) != "generic":
        out.append(_fail(f"model.family is {want} but the checkpoint looks like {fam}",
                         f"remove model.family or set it to \"{fam}\""))
    for m in config_mismatches(f.layout, names):
        out.append(_fail(f"model config and tensors disagree: {getattr(m, 'msg', m)}",
                         getattr(m, "hint", None) or "the checkpoint is incomplete or config.json is wrong"))
    return out


def estimate_output_bytes(f: Facts) -> int:
    """Estimated output size: GEMM weights at the target's bytes per element, everything else as is."""
    fmt = f.recipe.target.format.value
    if f.reader is None:
        return 0
    total = 0
    for name in f.reader.names():
        meta = f.reader.meta(name)
        numel = 1
        for d in meta.shape:
            numel *= d
        quant = False
        if f.layout is not None and len(meta.shape) == 2:
            try:
                quant = bool(f.layout.classify(name, meta.shape).quantize)
            except Exception:  # noqa: BLE001 - a name the layout does not know is kept as is
                quant = False
        elif len(meta.shape) == 2 and min(meta.shape) >= 16 and name.endswith(".weight"):
            quant = True
        if quant or fmt == "bf16":
            total += int(numel * _QUANT_BYTES[fmt]) if quant else numel * 2
        else:
            total += meta.nbytes
    return total * max(1, len(f.recipe.target.layouts))


def check_disk(f: Facts) -> list[str]:
    out_dir = Path(f.paths["output"])
    margin = f.recipe.run.disk_margin
    out: list[str] = []
    if f.reader is not None:
        f.estimate = estimate_output_bytes(f)
        already = _dir_bytes(out_dir) + _dir_bytes(Path(str(out_dir) + ".partial"))
        need = int(f.estimate * (1 + margin)) - already
        free = free_bytes(out_dir)
        if need > free:
            out.append(_fail(f"disk: {out_dir} needs ~{_h(need)} (output ~{_h(f.estimate)} + {margin:.0%} margin) "
                             f"but its filesystem has {_h(free)} free",
                             "free space there or set target.output on a larger filesystem"))
    if f.recipe.source.is_s3:
        try:
            from engine.s3.pull import remote_size

            size = remote_size(f.recipe.source.path, f.recipe.source.endpoint_url)
        except Exception:  # noqa: BLE001 - reachability is check_source's to report
            size = 0
        dst = Path(f.paths["source"])
        free = free_bytes(dst)
        need = int(size * (1 + margin)) - _dir_bytes(dst)
        if size and need > free:
            out.append(_fail(f"disk: the pull into {dst} needs ~{_h(need)} but {_h(free)} is free",
                             "free space there or set run.workdir on a larger filesystem"))
    return out


def check_output(f: Facts) -> list[str]:
    """A new run never writes over a finished output (resume of the same run is how to finish one)."""
    out = Path(f.paths["output"])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return [_fail(f"output {out} already exists", "set target.output to a new directory, or remove it; "
                      "to finish an interrupted run use `quantdeck resume RUN`")]
    return []


def check_samples(f: Facts) -> list[str]:
    r = f.recipe
    if not r.target.calibrate:
        return []
    path = Path(f.paths["samples"])
    if not path.is_file():
        return [_fail(f"samples file {path} does not exist", "set calibration.samples to a JSON/JSONL file")]
    try:
        validate_samples_file(path, r.calibration.num_samples)
    except QuantdeckError as e:
        return [_fail(f"samples: {e.msg}", e.hint or "fix the samples file")]
    return []


def check_gpus(f: Facts) -> list[str]:
    dev = f.recipe.device
    if dev == "cpu":
        return []
    try:
        import torch
    except ImportError:
        return [_fail("torch is not importable", "install quantdeck's dependencies (make test creates .venv)")]
    if not torch.cuda.is_available():
        if dev == "cuda":
            return [_fail("device = \"cuda\" but no GPU is visible",
                          "run on a GPU node, check CUDA_VISIBLE_DEVICES, or set run.device = \"cpu\"")]
        f.notes.append("no GPU visible: stages run on CPU")
        return []
    f.gpus_free = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        f.gpus_free.append(int(free))
        f.notes.append(f"GPU {i}: {_h(free)} free of {_h(total)}")
    return []  # whether a stage fits them is check_memory's to say


def check_versions(f: Facts) -> list[str]:
    out = []
    for mod in ("torch", "transformers", "safetensors") + (("modelopt",) if f.recipe.target.calibrate else ()):
        try:
            m = importlib.import_module(mod)
            f.notes.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - any import failure is a preflight failure
            out.append(_fail(f"{mod} is not importable ({type(e).__name__}: {e})",
                             f"install it in this environment (pip install -c constraints.txt {mod})"))
    if (note := bytecode_note()) is not None:
        f.notes.append(note)
    return out


def bytecode_note(module: str = "torch") -> str | None:
    """A note where `module`'s compiled bytecode is not cached where this Python looks for it (None: it is, or
    the module is not installed). Python then compiles every imported file of it again in each process: with
    PYTHONDONTWRITEBYTECODE set on a read-only or uncompiled environment, torch, transformers and modelopt take
    4-9x longer to import, seconds in each stage's worker and in validate's decoder-block check."""
    import importlib.machinery
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader) or not spec.origin:
        return None  # not installed, or not from source files (a zip, compiled only): nothing compiled at import
    pyc = importlib.util.cache_from_source(spec.origin)
    if os.path.exists(pyc):
        return None
    return (f"{module}'s bytecode is not cached ({pyc} is missing): "
            "every stage compiles its imports again, seconds each; set PYTHONPYCACHEPREFIX to a writable "
            "directory and run `python -m compileall -q <site-packages>` once with it set, or compile the "
            "environment in place")


def check_push(f: Facts) -> list[str]:
    p = f.recipe.push
    if p is None:
        return []
    try:
        from engine.s3.reachable import check_reachable
    except ImportError:
        return []
    try:
        check_reachable(p.target, p.endpoint_url)
    except QuantdeckError as e:
        return [_fail(f"push target {p.target}: {e.msg}", e.hint or "check the bucket, endpoint and credentials")]
    return []


def check_memory(f: Facts) -> list[str]:
    """Each heavy stage's need per rank × its ranks on each node, against the node's RAM and GPUs."""
    r = f.recipe
    if f.reader is None:
        f.notes.append("memory: not estimated: the checkpoint is not readable here yet"
                       + (" (it is pulled first)" if r.source.is_s3 else ""))
        return []
    plan = build_plan(r, run_id="preflight", run_dir=Path(f.paths.get("workdir") or "."), base=Path("."))
    c = r.cluster
    declared = int(c.gpu_memory_gb * mp.GB) if c.gpu_memory_gb else None
    memory: dict[str, mc.NodeMemory] = {}
    if c.is_local:
        gpus = len(f.gpus_free or [])
        on_gpu = r.device == "cuda" or (r.device == "auto" and gpus > 0)
        head = mp.NodeSlot(this_host(), 1, on_gpu)
        slots = [mp.NodeSlot(head.node, c.gpus_per_node or 1, on_gpu)]
        meminfo = _read_meminfo(parse_meminfo)
        probed = tuple(f.gpus_free or ())
        memory[head.node] = mc.NodeMemory(head.node, meminfo[1] if meminfo else None,
                                          meminfo[1] - meminfo[0] if meminfo else None,
                                          probed or _declared(declared, slots[0].ranks, on_gpu),
                                          "probed" if probed else "recipe")
        knobs_key = "[cluster] gpus_per_node"
    else:
        slots = []
        for n in c.nodes:
            gpus = n.gpus or c.gpus_per_node or 0
            slots.append(mp.NodeSlot(n.name, max(gpus, 1), gpus > 0 and r.device != "cpu"))
            have = f.node_memory.get(n.name) or mc.NodeMemory(n.name)
            if not have.gpu_free and declared:
                have = mc.NodeMemory(n.name, have.ram_total, have.ram_available,
                                     _declared(declared, max(gpus, 1), True), "recipe")
            memory[n.name] = have
        head = next(s for s in slots if s.node == c.head_node.name)
        knobs_key = "the node's gpus, or [cluster] gpus_per_node"
    cal = r.calibration
    f.memory = mp.plan_memory([(s.name, s.distributed) for s in plan.stages], slots, head, f.reader.config or {},
                              f.reader, f.layout, num_samples=cal.num_samples, seq_len=cal.seq_len,
                              batch_size=cal.batch_size, target=r.target.format.value)
    fails, notes = mc.check_memory(f.memory, memory, mc.Knobs(knobs_key, cal.batch_size))
    f.notes.extend(f.memory.notes + notes)
    return fails


def _declared(declared: int | None, ranks: int, on_gpu: bool) -> tuple[int, ...] | None:
    return (declared,) * ranks if declared and on_gpu else None


def _read_meminfo(parse) -> tuple[int, int] | None:
    try:
        with open("/proc/meminfo") as fh:
            return parse(fh.read())
    except OSError:
        return None


CHECKS: tuple[Check, ...] = (check_source, check_layout, check_output, check_disk, check_samples, check_gpus,
                             check_versions, check_push)
LATE_CHECKS: tuple[Check, ...] = (check_memory,)  # after the caller's extra checks, which may learn the nodes' memory


def run_preflight(recipe_path: str | os.PathLike, extra_checks: Iterable[Check] = (),
                  notes: list[str] | None = None, report: dict[str, Any] | None = None) -> list[str]:
    """Run every check; returns one line per failure ([] = ready). Raises RecipeError for a bad recipe.
    `notes` gets what the checks learned; `report["memory"]` each heavy stage's estimate per rank and node."""
    path = Path(recipe_path).resolve()
    recipe = load_recipe(path)
    facts = Facts(recipe=recipe, paths=resolve_paths(recipe, path.parent))
    failures: list[str] = []
    for check in (*CHECKS, *extra_checks, *LATE_CHECKS):
        try:
            failures.extend(check(facts))
        except QuantdeckError as e:
            failures.append(_fail(f"{check.__name__.removeprefix('check_')}: {e.msg}", e.hint or "see above"))
    if notes is not None:
        notes.extend(facts.notes)
    if report is not None:
        report["memory"] = facts.memory.to_json() if facts.memory is not None else []
    return failures


def _dir_bytes(p: Path) -> int:
    if not p.is_dir():
        return 0
    return sum(x.stat().st_size for x in p.rglob("*") if x.is_file())


def _h(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
