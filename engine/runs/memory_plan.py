"""Memory per rank of the heavy stages, from the model's config and checkpoint index and the recipe.

`plan_memory` turns a recipe, its checkpoint and the nodes it runs on into what one rank of each heavy stage
of the plan needs in host RAM and GPU memory (engine.runs.memory_check compares those needs with what the
nodes have). The bounds are those of the calibration layer reader (engine.calibrate.layer_reader) and of the
streaming converter (engine.convert.pipeline):

calibrate (and eval, which streams two models the same way), one rank, layer-streamed:
  on a GPU   host = IMPORT_BASE + max(RING_SLOTS × READ_CHUNK, embedding) + 2 × acts
             gpu  = CUDA_CONTEXT + params(largest layer) + stored(largest layer) + batch workspace
  on a CPU   host = IMPORT_BASE + params(largest layer) + stored(largest layer) + 2 × acts + batch workspace
  where acts = ⌈num_samples / ranks in all⌉ × seq_len × hidden × hc_mult × 2 bytes (this rank's samples
  entering the layer, and leaving it: two buffers), params = the layer's parameters in the compute dtype (the
  transformers layer's own shapes, engine.calibrate.layer_plan.plan_layer), stored = the bytes the layer is
  read from, as stored (buffer_bound: FP8 + scales, MXFP4 + E8M0, BF16), the next layer being read while
  this one computes. The batch workspace is one batch's activations inside the layer: batch_size × seq_len
  tokens × (4 hidden-width copies + the larger of the MLP's intermediates and attention's q/k/v/out), plus
  attention scores batch × heads × seq_len² × 8 bytes where they are materialized (eager attention: V4) or
  the mask (batch × seq_len² bytes) where SDPA's fused kernels run (V3).
  A calibrated layer that does not fit its GPU so keeps its routed experts as stored (engine.calibrate.
  expert_store): gpu = CUDA_CONTEXT + params(largest layer) − its experts built + its experts as stored + the
  expert window + stored(largest layer) + a gang of batches parked at the experts call (engine.calibrate.
  expert_major: up to GANG_MAX batches × 5 × batch_size × seq_len × hidden × 2 bytes + a cuBLAS workspace each)
  + batch workspace; memory_check's note says so where only that fits.
export, convert, dequant, cast-fp8, one rank, tensor-streamed:
  host = IMPORT_BASE + max(in-flight budget, largest item)   gpu = CUDA_CONTEXT + compute threads × largest item
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from engine.convert.compute_host import workspace_bytes
from engine.convert.pipeline import INFLIGHT_BYTES, INFLIGHT_BYTES_CUDA
from engine.convert.plan import build_plan

GB = 10**9  # figures are reported in GB (10^9 bytes), as GPU and host memory are sold
IMPORT_BASE = 2 * GB  # a worker's resident memory once torch, transformers and modelopt are imported
CUDA_CONTEXT = 1 << 30  # the CUDA context, cuBLAS workspace and allocator slack of one process on its GPU
ACT_BYTES = 2  # activations live in the compute dtype (bf16)
SCORE_BYTES = 2 + 4 + 2  # eager attention: bf16 scores, fp32 softmax, its bf16 copy
STREAMED = ("calibrate", "eval")  # stages that stream decoder layers
SHARD_WRITERS = ("export", "convert", "dequant", "cast-fp8")  # stages that stream tensors into output shards
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ModelShape:
    """The widths that size activations, from config.json."""

    hidden: int
    hc_mult: int  # V4's hyper-connection streams per token (1 elsewhere)
    heads: int
    qk_head: int
    v_head: int
    intermediate: int  # dense MLP
    moe_inter: int
    top_k: int
    n_shared: int
    n_routed: int
    vocab: int
    layers: int
    sdpa: bool  # calibration runs the family's attention through SDPA (False: eager)

    @property
    def width(self) -> int:
        """Elements per token of the hidden state between layers."""
        return self.hidden * self.hc_mult


def model_shape(config: dict) -> ModelShape:
    """The activation widths of a DeepSeek V3 / V4 (or generic decoder) config.json."""
    def num(*keys: str, default: int = 0) -> int:
        for k in keys:
            v = config.get(k)
            if isinstance(v, (int, float)) and v > 0:
                return int(v)
        return default

    hidden = num("hidden_size", "dim")
    heads = num("num_attention_heads", "n_heads", default=1)
    head_dim = num("head_dim", default=hidden // max(heads, 1))
    qk = num("qk_nope_head_dim") + num("qk_rope_head_dim") if num("qk_nope_head_dim") else head_dim
    return ModelShape(
        hidden=hidden, hc_mult=num("hc_mult", default=1), heads=heads, qk_head=qk,
        v_head=num("v_head_dim", default=head_dim), intermediate=num("intermediate_size", "inter_dim"),
        moe_inter=num("moe_intermediate_size", "moe_inter_dim"),
        top_k=num("num_experts_per_tok", "n_activated_experts"),
        n_shared=num("n_shared_experts"), n_routed=num("n_routed_experts", "num_local_experts"),
        vocab=num("vocab_size"), layers=num("num_hidden_layers", "n_layers"),
        sdpa=_runs_sdpa(config))


def _runs_sdpa(config: dict) -> bool:
    """Whether calibration runs this family's attention through SDPA (what from_pretrained would pick)."""
    try:
        from engine.calibrate.family import LayerFamily

        return LayerFamily.for_config(config).attn_implementation() == "sdpa"
    except Exception:  # noqa: BLE001 - no streaming family, or no transformers: count the scores (eager)
        return False


@dataclass(frozen=True)
class LayerBytes:
    """The largest decoder layer's parameters (compute dtype) and stored bytes, and which layers they are."""

    params: int
    stored: int
    params_layer: int
    stored_layer: int
    embed: int = 0  # the embedding's stored bytes (read on the host once, at the start)
    largest_tensor: int = 0  # the largest stored tensor outside the decoder layers (embedding, head)
    expert_built: int = 0  # the params layer's routed experts, built (0: they would not stream)
    expert_stored: int = 0  # and as stored (engine.calibrate.expert_store)


def layer_bytes(reader, config: dict) -> LayerBytes:
    """Per distinct decoder layer (layers whose stored tensors have the same names, shapes and dtypes are
    planned once): its parameter bytes as calibration builds it (engine.calibrate.layer_plan.plan_layer) and
    the bytes it is read from (buffer_bound). Raises CheckpointError where a layer cannot be planned."""
    from engine.calibrate.expert_store import expert_bytes, worth_streaming
    from engine.calibrate.family import LayerFamily
    from engine.calibrate.layer import compute_dtype, keep_fp32
    from engine.calibrate.layer_plan import buffer_bound, plan_layer

    family = LayerFamily.for_config(config)
    hf_config = family.hf_config(config)
    dtype = compute_dtype(config)
    fp32 = keep_fp32(family, dtype)
    names = set(reader.names())
    kinds: dict[tuple, list[int]] = {}
    for i, sig in sorted(_layer_signatures(reader).items()):
        if i < family.num_layers(hf_config):
            kinds.setdefault(sig, []).append(i)
    best = LayerBytes(0, 0, 0, 0)
    experts = (0, 0)
    for layers in kinds.values():
        i = layers[0]
        plan = plan_layer(family, hf_config, i, reader, names, dtype, fp32, direct_ok=False)
        params = plan.param_bytes
        stored = buffer_bound(family, i, reader, names)
        if params > best.params:
            best = LayerBytes(params, best.stored, i, best.stored_layer)
            experts = expert_bytes(plan) if worth_streaming(plan) else (0, 0)
        if stored > best.stored:
            best = LayerBytes(best.params, stored, best.params_layer, i)
    outside = [reader.meta(n).nbytes for n in names if not _LAYER.match(n)]
    try:
        embed = reader.meta(family.embed_source(names)).nbytes
    except Exception:  # noqa: BLE001 - no embedding: nothing read at the start
        embed = 0
    return LayerBytes(best.params, best.stored, best.params_layer, best.stored_layer, embed, max(outside, default=0),
                      *experts)


def _layer_signatures(reader) -> dict[int, tuple]:
    """Each decoder layer's stored tensors (name within the layer, dtype, shape), as one hashable value."""
    by: dict[int, list] = {}
    for n in reader.names():
        if m := _LAYER.match(n):
            meta = reader.meta(n)
            by.setdefault(int(m.group(1)), []).append((m.group(2), meta.dtype_name, tuple(meta.shape)))
    return {i: tuple(sorted(v)) for i, v in by.items()}


@dataclass(frozen=True)
class NodeSlot:
    """Where a stage's ranks run: a node, its ranks of that stage, and whether they compute on GPUs."""

    node: str
    ranks: int
    on_gpu: bool


PART_LABELS = {  # the terms of a need, as messages name them
    "imports": "imports", "read_ring": "read ring", "embedding": "embedding", "activations": "activations",
    "layer_params": "layer parameters", "next_layer_stored": "next layer stored", "batch_hidden": "batch hidden",
    "batch_workspace": "batch workspace", "cuda_context": "CUDA context", "in_flight": "tensors in flight",
    "items_on_device": "items on the device", "experts_as_stored": "experts as stored",
    "expert_window": "expert window", "batches_parked": "batches parked at the experts",
}


@dataclass(frozen=True)
class RankNeed:
    """What one rank of `stage` needs on `node` (bytes), with the terms that add up to it (PART_LABELS) and
    the figures they come from (`sizes`: layers, samples per rank, seq_len, batch_size)."""

    stage: str
    node: str
    ranks: int  # of this stage on the node
    on_gpu: bool
    host: int
    gpu: int | None  # None: a CPU rank
    host_parts: dict[str, int] = field(default_factory=dict)
    gpu_parts: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    streamed_parts: dict[str, int] = field(default_factory=dict)  # calibrate's GPU need with its experts as stored

    @property
    def gpu_streamed(self) -> int | None:
        return sum(self.streamed_parts.values()) if self.streamed_parts else None

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "node": self.node, "ranks": self.ranks, "device": "cuda" if self.on_gpu else "cpu",
                "host_gb": gb(self.host), "host_node_gb": gb(self.host * self.ranks),
                "gpu_gb": None if self.gpu is None else gb(self.gpu),
                "host_bytes": self.host, "gpu_bytes": self.gpu,
                "host_parts_gb": {k: gb(v) for k, v in self.host_parts.items()},
                "gpu_parts_gb": {k: gb(v) for k, v in self.gpu_parts.items()},
                **({"gpu_streamed_gb": gb(self.gpu_streamed or 0),
                    "streamed_parts_gb": {k: gb(v) for k, v in self.streamed_parts.items()}}
                   if self.streamed_parts else {}), **self.sizes}


@dataclass(frozen=True)
class Workload:
    """The recipe's numbers that size activations."""

    num_samples: int
    seq_len: int
    batch_size: int
    world: int  # ranks of a layer-streamed stage, over every node

    @property
    def samples_per_rank(self) -> int:
        return -(-self.num_samples // max(self.world, 1))


def batch_workspace(shape: ModelShape, batch: int, seq: int, on_gpu: bool) -> dict[str, int]:
    """One batch's activations inside a decoder layer (see the module docstring)."""
    tokens = batch * seq
    dense = 3 * shape.intermediate
    moe = 3 * shape.moe_inter * (max(shape.top_k, 1) + shape.n_shared)
    mlp = tokens * max(dense, moe) * ACT_BYTES
    proj = tokens * shape.heads * (2 * shape.qk_head + 2 * shape.v_head) * ACT_BYTES
    fused = shape.sdpa  # SDPA's fused kernels (flash / memory-efficient on a GPU, flash on a CPU) keep no scores
    scores = batch * seq * seq if fused else batch * shape.heads * seq * seq * SCORE_BYTES
    return {"batch_hidden": 4 * tokens * shape.width * ACT_BYTES, "batch_workspace": max(mlp, proj + scores)}


def streamed_need(stage: str, slot: NodeSlot, shape: ModelShape, lb: LayerBytes, work: Workload,
                  models: int = 1) -> RankNeed:
    """One rank of a layer-streamed stage (calibrate; eval streams `models` = 2 side by side)."""
    from engine.calibrate.layer_reader import READ_CHUNK, RING_SLOTS

    acts = 2 * work.samples_per_rank * work.seq_len * shape.width * ACT_BYTES * models
    ws = {k: v * models for k, v in batch_workspace(shape, work.batch_size, work.seq_len, slot.on_gpu).items()}
    layer = {"layer_params": lb.params * models, "next_layer_stored": lb.stored * models}
    sizes = {"params_layer": lb.params_layer, "stored_layer": lb.stored_layer,
             "samples_per_rank": work.samples_per_rank, "seq_len": work.seq_len, "batch_size": work.batch_size}
    if slot.on_gpu:
        ring = RING_SLOTS * READ_CHUNK
        host = {"imports": IMPORT_BASE, **({"read_ring": ring} if ring >= lb.embed else {"embedding": lb.embed}),
                "activations": acts}
        gpu = {"cuda_context": CUDA_CONTEXT, **layer, **ws}
        streamed = {}
        if stage == "calibrate" and lb.expert_built:  # a layer over the budget keeps its experts as stored
            # a gang of batches parks at the experts call (engine.calibrate.expert_major)
            from engine.calibrate.expert_major import GANG_MAX, parked_bytes
            from engine.calibrate.expert_store import streamed_terms

            batches = -(-work.samples_per_rank // max(work.batch_size, 1))
            parked = min(batches, GANG_MAX) * parked_bytes(work.batch_size * work.seq_len * shape.width, ACT_BYTES,
                                                           True) if batches > 1 else 0
            streamed = {"cuda_context": CUDA_CONTEXT,
                        **streamed_terms(lb.params, lb.expert_built, lb.expert_stored, lb.stored),
                        "batches_parked": parked, **ws}
        return RankNeed(stage, slot.node, slot.ranks, True, sum(host.values()), sum(gpu.values()), host, gpu, sizes,
                        streamed)
    host = {"imports": IMPORT_BASE, **layer, "activations": acts, **ws}
    return RankNeed(stage, slot.node, slot.ranks, False, sum(host.values()), None, host, {}, sizes)


def shard_writer_need(stage: str, slot: NodeSlot, lb: LayerBytes, largest_item: int) -> RankNeed:
    """One rank of a stage streaming tensors into output shards (engine.convert.pipeline's budget)."""
    budget = INFLIGHT_BYTES_CUDA if slot.on_gpu else INFLIGHT_BYTES
    item = max(largest_item, lb.largest_tensor)
    host = {"imports": IMPORT_BASE, "in_flight": max(budget, item)}
    sizes = {"largest_item_bytes": item}
    if not slot.on_gpu:
        return RankNeed(stage, slot.node, slot.ranks, False, sum(host.values()), None, host, {}, sizes)
    gpu = {"cuda_context": CUDA_CONTEXT, "items_on_device": 3 * item}  # three compute threads (io_threads)
    return RankNeed(stage, slot.node, slot.ranks, True, sum(host.values()), sum(gpu.values()), host, gpu, sizes)


def largest_item_bytes(reader, layout, target: str) -> int:
    """The largest item the converter holds at once: its stored inputs or outputs, whichever is more, plus
    float32 working values of members that are not FP8 with a block scale."""
    plan = build_plan(reader, layout, target)
    return max((max(item.src_bytes, sum(s.nbytes for s in item.outputs)) + workspace_bytes(item)
                for item in plan.items), default=0)


@dataclass
class MemoryPlan:
    """Per stage and node, what one rank needs; `notes` say what was left out and why."""

    needs: list[RankNeed] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        return [n.to_json() for n in self.needs]


def plan_memory(stages: Iterable[tuple[str, bool]], slots: list[NodeSlot], head: NodeSlot, config: dict,
                reader, layout, *, num_samples: int, seq_len: int, batch_size: int, target: str) -> MemoryPlan:
    """The needs of every heavy stage in `stages` ((name, distributed) in plan order) on the nodes it runs on:
    a distributed stage on every slot, any other on `head` with one rank."""
    out = MemoryPlan()
    stages = [(s, d) for s, d in stages if s in STREAMED or s in SHARD_WRITERS]
    if not stages:
        return out
    shape = model_shape(config)
    lb: LayerBytes | None = None
    if any(s in STREAMED for s, _ in stages):
        lb = layer_bytes(reader, config)
    item = 0
    if any(s in SHARD_WRITERS for s, _ in stages):
        try:
            item = largest_item_bytes(reader, layout, "nvfp4" if target == "nvfp4" else target)
        except Exception as e:  # noqa: BLE001 - the converter's own plan errors are its preflight's to report
            out.notes.append(f"memory: the converter's plan failed ({type(e).__name__}), largest tensor used")
    lb_any = lb or LayerBytes(0, 0, 0, 0, 0, max((reader.meta(n).nbytes for n in reader.names()
                                                    if not _LAYER.match(n)), default=0))
    for stage, distributed in stages:
        where = slots if distributed else [NodeSlot(head.node, 1, head.on_gpu)]
        world = sum(s.ranks for s in where)
        work = Workload(num_samples, seq_len, batch_size, world)
        for slot in where:
            if stage in STREAMED:
                out.needs.append(streamed_need(stage, slot, shape, lb_any, work, models=2 if stage == "eval" else 1))
            else:
                out.needs.append(shard_writer_need(stage, slot, lb_any, item))
    return out


def gb(n: int | float) -> float:
    return round(n / GB, 1)
