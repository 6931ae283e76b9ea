"""Whether the heavy stages fit the nodes they run on, and the fix where they do not.

`check_memory` compares the needs engine.runs.memory_plan computes (what one rank of each heavy stage needs in
host RAM and GPU memory), times the ranks of each node, with what the node has (`NodeMemory`), and says what
cannot fit, with the numbers and the fix: fewer ranks per node, fewer or shorter samples, a smaller batch, or
other hardware (`Knobs`: the recipe key that sets ranks per node, and the batch size in use). A calibrated layer
that fits its GPU only with its routed experts kept as stored (RankNeed.streamed_parts) gets a note saying so,
not a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.runs.memory_plan import PART_LABELS, STREAMED, MemoryPlan, RankNeed, gb


@dataclass(frozen=True)
class NodeMemory:
    """What a node has: host RAM (total, available now) and each GPU's free memory; None where unknown."""

    node: str
    ram_total: int | None = None
    ram_available: int | None = None
    gpu_free: tuple[int, ...] | None = None
    gpu_from: str = "probed"  # or "recipe" ([cluster] gpu_memory_gb)


@dataclass(frozen=True)
class Knobs:
    """What the fixes point at: the recipe key that sets ranks per node, and the batch size in use."""

    ranks_key: str = "[cluster] gpus_per_node"
    batch_size: int = 1


def check_memory(plan: MemoryPlan, nodes: dict[str, NodeMemory], knobs: Knobs = Knobs()) -> tuple[list[str], list[str]]:
    """(failures, notes): each stage's need per rank × its ranks on a node against the node's RAM, and against
    each GPU it uses. A node or GPU whose memory is unknown is not checked, and a note says so."""
    fails: list[str] = []
    notes: list[str] = []
    for need in plan.needs:
        have = nodes.get(need.node)
        where = f"{need.stage} on {need.node}"
        if have is None or have.ram_total is None:
            notes.append(f"memory: {where}: host RAM unknown, not checked (needs {gb(need.host)} GB per rank "
                         f"× {need.ranks} = {gb(need.host * need.ranks)} GB)")
        else:
            total = need.host * need.ranks
            if total > have.ram_total:
                fails.append(f"memory: {where}: host RAM: need {gb(need.host)} GB per rank × {need.ranks} "
                             f"rank{'s' if need.ranks != 1 else ''} = {gb(total)} GB, the node has "
                             f"{gb(have.ram_total)} GB (per rank: {_terms(need.host_parts)}) "
                             f"(fix: {_host_fix(need, have.ram_total, knobs)})")
            elif have.ram_available is not None and total > have.ram_available:
                notes.append(f"memory: {where}: needs {gb(total)} GB of host RAM; {gb(have.ram_available)} GB "
                             f"of the node's {gb(have.ram_total)} GB is available now")
        if need.gpu is None:
            continue
        if have is None or not have.gpu_free:
            notes.append(f"memory: {where}: GPU memory unknown, not checked (needs {gb(need.gpu)} GB per GPU; "
                         "[cluster] gpu_memory_gb states it where it cannot be probed)")
            continue
        short = [(i, f) for i, f in enumerate(have.gpu_free[:need.ranks]) if need.gpu > f]
        streamed = need.gpu_streamed
        if short and streamed is not None and all(streamed <= f for f in have.gpu_free[:need.ranks]):
            i, free = min(short, key=lambda x: x[1])
            notes.append(f"memory: {where}: layer {need.sizes.get('params_layer')} built whole needs {gb(need.gpu)} "
                         f"GB per rank and GPU {i} has {gb(free)} GB: its routed experts stay as stored and are "
                         f"decoded as they run ({gb(streamed)} GB: {_terms(need.streamed_parts)}), at the cost of "
                         "decoding them twice per layer and once more per gang of batches")
            continue
        if short:
            i, free = min(short, key=lambda x: x[1])
            what = "free" if have.gpu_from == "probed" else "([cluster] gpu_memory_gb)"
            gpus = f"GPU {i} has" if len(short) == 1 else f"{len(short)} GPUs have as little as"
            fails.append(f"memory: {where}: GPU memory: need {gb(need.gpu)} GB per rank, {gpus} {gb(free)} GB "
                         f"{what} (per rank: {_terms(need.gpu_parts)}) (fix: {_gpu_fix(need, free, knobs)})")
    return fails, notes


def _sum(parts: dict[str, int], prefix: str) -> int:
    return sum(v for k, v in parts.items() if k.startswith(prefix))


def _host_fix(need: RankNeed, ram: int, knobs: Knobs) -> str:
    acts = need.host_parts.get("activations", 0)
    fixed = need.host - acts  # per rank whatever the samples; the node's share of the samples stays with it
    out = []
    fit = next((r for r in range(need.ranks - 1, 0, -1) if r * fixed + acts * need.ranks <= ram), None)
    if fit:
        out.append(f"fewer ranks per node: {fit} fit ({knobs.ranks_key})")
    if acts:
        out.append(f"a smaller calibration.seq_len or num_samples (this node's samples take "
                   f"{gb(acts * need.ranks)} GB), or more nodes to share them")
    if _sum(need.host_parts, "batch_") and need.sizes.get("batch_size", 1) > 1:
        out.append("a smaller calibration.batch_size")
    if fixed > ram:
        out.append("a node with more memory, or GPUs (run.device = \"cuda\"): a GPU rank keeps the layer "
                   "off the host")
    return "; ".join(out) or "a node with more memory"


def _gpu_fix(need: RankNeed, free: int, knobs: Knobs) -> str:
    layer = need.gpu_parts.get("layer_params", 0) + need.gpu_parts.get("next_layer_stored", 0)
    base = need.gpu - layer - _sum(need.gpu_parts, "batch_")
    if need.stage not in STREAMED:
        return "free the GPU, or run.device = \"cpu\" for this stage"
    if base + layer > free:
        streamed = need.gpu_streamed
        kept = "" if streamed is None else \
            f", nor with its routed experts kept as stored ({gb(streamed)} GB per rank in all)"
        return (f"layer {need.sizes.get('params_layer')} alone ({gb(layer)} GB: its parameters and the next "
                f"layer's stored bytes) does not fit one GPU{kept}; its routed experts would have to be split over "
                "the node's GPUs (expert split), which this version does not do: use GPUs with more memory, or "
                "run.device = \"cpu\"")
    ws = need.gpu - base - layer
    per = ws / max(knobs.batch_size, 1)
    fits = int((free - base - layer) // per) if per else 0
    tip = "a smaller calibration.batch_size" + (f" ({fits} fits)" if 1 <= fits < knobs.batch_size else "")
    return tip + " or seq_len"


def _terms(parts: dict[str, int]) -> str:
    return " + ".join(f"{PART_LABELS.get(k, k)} {gb(v)}" for k, v in parts.items() if gb(v))
