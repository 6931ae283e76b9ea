"""`export_checkpoint`: a calibrated W4A4 NVFP4 checkpoint from a source checkpoint and an amax snapshot.

It is the streaming convert (engine.convert: plan, NVFP4 compute, sharded resumable writer)
with activation scales added to every quantized module: a canonical `input_scale`, which each output layout
writes as it stores it (modelopt `input_scale`, compressed-tensors `input_global_scale = 1 / input_scale`) and
labels W4A4 in its config (engine.formats).
The modules quantized are exactly those whose quantizers the snapshot's config enabled.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from engine.calibrate.family import LayerFamily
from engine.checkpoint.paths import layout_dirs, refuse_overlap
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.safetensors_format import TensorSpec
from engine.checkpoint.shard_plan import ShardPlan, shard_name
from engine.checkpoint.write_errors import make_output_dir
from engine.checkpoint.writer import CheckpointWriter, ShardFile
from engine.convert.compute import compute_item
from engine.convert.extras import copy_extras
from engine.convert.plan import COPY, TO_NVFP4, build_plan, check_layouts
from engine.convert.ranks import Ranks, finish_writers, over_ranks, prepare_writers
from engine.convert.streaming import parse_size, partition, resolve_device
from engine.core.errors import CheckpointError
from engine.core.events import EventSink, NullSink, Progress
from engine.core.fsutil import atomic_write_json
from engine.export.names import to_checkpoint_names
from engine.export.scales import ModuleAmax, check_scales, module_amax, plan_input_scales
from engine.export.source import load_any_amax
from engine.formats.layout import layout_for
from engine.formats.nvfp4.layout import CANONICAL
from engine.models import detect_layout

INPUT_SCALE = "." + CANONICAL.input_scale


def _keep_fp32_patterns(config: dict) -> list[str]:
    """Tensors transformers keeps in fp32 (router bias): modelopt's export writes them as F32, so do we."""
    try:
        mc = LayerFamily.for_config(config).model_class()
    except CheckpointError:
        return []
    return list(getattr(mc, "_keep_in_fp32_modules_strict", None) or [])


def _with_input_scales(plan, fp32: list[str]):
    """Plan items with one `<module>.input_scale` F32 scalar more per NVFP4 member; fp32-kept tensors as F32."""
    items = []
    for it in plan.items:
        if it.action == TO_NVFP4:
            extra = tuple(TensorSpec(m.out_base + INPUT_SCALE, "F32", ()) for m in it.members)
            it = replace(it, outputs=it.outputs + extra)
        elif it.action == COPY and any(p in s.name for s in it.outputs for p in fp32):
            it = replace(it, outputs=tuple(TensorSpec(s.name, "F32", s.shape)
                                           if any(p in s.name for p in fp32) and s.dtype in ("BF16", "F16") else s
                                           for s in it.outputs))
        items.append(it)
    return replace(plan, items=items)


def _quantize_attention(ma: ModuleAmax) -> bool:
    return any(".self_attn." in k or ".attn." in k for k in ma.weight)


class _SnapshotLayout:
    """The checkpoint's model layout, quantizing exactly the modules the snapshot has a weight quantizer for."""

    def __init__(self, base, allowed: set[str]):
        self._base, self._allowed = base, allowed

    def __getattr__(self, name):
        return getattr(self._base, name)

    def classify(self, name, shape=None, *, quantize_attention=False):
        return self._base.classify(name, shape, quantize_attention=True)

    def should_quantize(self, name, shape=None, *, quantize_attention=False, include_mtp=False):
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        return base in self._allowed and self._base.should_quantize(name, shape, quantize_attention=True,
                                                                    include_mtp=include_mtp)


@over_ranks
def export_checkpoint(src: str | os.PathLike, amax_dir: str | os.PathLike, dst: str | os.PathLike,
                      layouts: Sequence[str] = ("modelopt",), sink: EventSink = NullSink(), device: str = "auto",
                      shard_size: int | str = 5 * 10**9, ranks: Ranks | None = None) -> dict[str, Any]:
    """Write `dst` (or `dst/<layout>` for several layouts); resumable; returns a report. Under torchrun the
    shards are split over the ranks (engine.convert.ranks)."""
    t0 = time.monotonic()
    src, dst = Path(src), Path(dst)
    layouts = check_layouts(list(layouts), "nvfp4")
    dsts = layout_dirs(dst, layouts)
    refuse_overlap(src, dst, dsts.values())
    amax, origin = load_any_amax(amax_dir, src)
    reader = CheckpointReader(src)
    ma = to_checkpoint_names(module_amax(amax), reader.config, set(reader.names()))
    layout = _SnapshotLayout(detect_layout(reader.config, reader.names()), set(ma.weight))
    qattn = _quantize_attention(ma)
    fp32 = _keep_fp32_patterns(reader.config)
    plan = _with_input_scales(build_plan(reader, layout, "nvfp4", quantize_attention=qattn), fp32)
    quantized = list(plan.quantized_modules)
    present = {n[: -len(".weight")] for n in reader.names() if n.endswith(".weight")}
    extra = sorted(set(ma.weight) - set(quantized))
    unknown = [m for m in extra if m not in present]
    if unknown:
        raise CheckpointError(f"the snapshot has {len(unknown)} module(s) this checkpoint lacks, e.g. {unknown[:3]}",
                              at=str(amax_dir), hint="is the amax snapshot from this model?")
    for m in extra:  # e.g. V4 compressor / indexer: the model layout keeps them in source precision
        sink.emit("log", level="info", msg=f"{m}: calibrated, but kept unquantized by the {plan.family} layout")
    groups: dict[str, list[str]] = {}
    for it in plan.items:
        if it.action == TO_NVFP4 and len(it.members) > 1:
            groups[it.key] = [m.out_base for m in it.members]
    sp = plan_input_scales(quantized, groups, ma)  # MTP is never calibrated, so never quantized here
    check_scales(sp)
    dev = ranks.device(resolve_device(device))
    groups_items = partition(plan.items, parse_size(shard_size))
    if len(layouts) > 1:
        make_output_dir(dst)
    writers, shard_plans = {}, {}
    outs = {lay: layout_for("nvfp4", lay) for lay in layouts}  # the output layouts, by name
    for lay in layouts:
        shard_plans[lay] = [ShardPlan(shard_name(i + 1, len(groups_items)),
                                      tuple(outs[lay].out_spec(s, it.action == TO_NVFP4) for it in g
                                            for s in it.outputs))
                            for i, g in enumerate(groups_items)]
        args = {"export": "w4a4", "layout": lay, "amax": origin["sha256"], "shard_size": parse_size(shard_size)}
        writers[lay] = CheckpointWriter(dsts[lay], shard_plans[lay], source_fingerprint=reader.fingerprint(),
                                        args=args, sink=sink)
    todo = prepare_writers(writers, ranks)
    mine = set(ranks.share([i for i in range(len(groups_items))
                            if any(shard_plans[lay][i].name in todo[lay] for lay in layouts)]))
    prog = Progress(sink, "tensors", total=sum(len(groups_items[i]) for i in mine))
    for i, g in enumerate(groups_items):
        if i not in mine:
            continue
        files = [(lay, ShardFile(writers[lay].partial_dir, shard_plans[lay][i]))
                 for lay in layouts if shard_plans[lay][i].name in todo[lay]]
        try:
            for it in g:
                srcs = {}
                for m in it.members:
                    srcs[m.name] = reader.get(m.name)
                    if m.scale:
                        srcs[m.scale] = reader.get(m.scale)
                res = compute_item(it, srcs, dev, v4_fp8=plan.family == "deepseek-v4")
                tensors = {k: (v.float() if v.is_floating_point() and any(p in k for p in fp32) else v).cpu()
                           for k, v in res.tensors.items()}
                if it.action == TO_NVFP4:
                    for m in it.members:
                        tensors[m.out_base + INPUT_SCALE] = sp.scale(m.out_base)
                for lay, sf in files:
                    for name, t in tensors.items():
                        sf.write(*outs[lay].out_tensor(name, t, it.action == TO_NVFP4))
                prog.advance(1, label=it.key)
            for _, sf in files:
                sf.close()
        except BaseException:
            for _, sf in files:
                sf.abort()
            raise

    def write_extras(lay: str, partial: Path) -> None:
        copy_extras(src, partial, sink=sink)
        pieces = outs[lay].config(plan.modules, w4a4=True)
        atomic_write_json(partial / "config.json", outs[lay].output_config(reader.config, pieces))
        for fname, obj in pieces.files.items():
            atomic_write_json(partial / fname, obj)

    outputs = finish_writers(writers, ranks, write_extras)
    reader.close()
    report = {"src": str(src), "dst": str(dst), "outputs": outputs, "amax": origin, "family": plan.family,
              "quantized_modules": len(quantized), "quantize_attention": qattn,
              "filled_from_siblings": sp.filled, "mtp_kept": list(plan.mtp_modules),
              "calibrated_but_kept": extra,
              "wall_s": round(time.monotonic() - t0, 3)}
    for mod, why in sp.filled.items():
        sink.emit("log", level="warning", msg=f"{mod}: {why}")
    return report
