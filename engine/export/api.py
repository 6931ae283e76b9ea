"""`export_checkpoint`: a calibrated W4A4 NVFP4 checkpoint from a source checkpoint and an amax snapshot.

It is the streaming convert (engine.convert: plan, sharded resumable writer, and the same reader/compute/writer
pipeline, so on CPU the host arrays and C kernels of engine.convert.compute_host, no per-tensor torch math)
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
from engine.calibrate.names_memo import ModelNames, model_names, names_key, read_names_memo
from engine.checkpoint.host import HostArray
from engine.checkpoint.paths import layout_dirs, refuse_overlap
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.safetensors_format import TensorSpec
from engine.checkpoint.write_errors import make_output_dir
from engine.checkpoint.writer import CheckpointWriter
from engine.convert.extras import copy_extras
from engine.convert.kernels import warm_up
from engine.convert.pipeline import run_tasks
from engine.convert.plan import COPY, TO_NVFP4, Item, ItemResult, build_plan, check_layouts
from engine.convert.ranks import Ranks, finish_writers, over_ranks, prepare_writers
from engine.convert.streaming import (
    layout_shards,
    parse_size,
    partition,
    resolve_device,
    reuse_heap,
    shard_tasks,
)
from engine.core.errors import CheckpointError
from engine.core.events import EventSink, NullSink, Progress
from engine.core.fsutil import atomic_write_json
from engine.export.names import snapshot_layers, to_checkpoint_names
from engine.export.scales import ModuleAmax, check_scales, module_amax, plan_input_scales
from engine.export.source import load_any_amax
from engine.formats.layout import layout_for
from engine.formats.nvfp4.layout import CANONICAL
from engine.models import detect_layout

INPUT_SCALE = "." + CANONICAL.input_scale


def _model_names(src: Path, amax_dir, origin: dict[str, Any], config: dict, names: set[str],
                 layers: list[int]) -> tuple[ModelNames | None, str | None]:
    """What transformers says of the model (engine.calibrate.names_memo: the snapshot's names under the
    checkpoint's, the tensors kept in fp32, which modelopt's export writes as F32, as we do), and where it came
    from: "snapshot" (the calibration's memo, for this checkpoint and transformers) or "transformers"; (None,
    None) for a family without layer streaming (names and dtypes then stay as they are)."""
    try:
        LayerFamily.for_config(config)
    except CheckpointError:
        return None, None
    if origin.get("kind") == "quantdeck-snapshot":
        try:
            memo = read_names_memo(amax_dir, names_key(src, config, names), layers)
        except OSError:  # no config.json to key it by: transformers is asked (and says what is wrong)
            memo = None
        if memo is not None:
            return memo, "snapshot"
    return model_names(config, names, layers), "transformers"


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


def _as_fp32(t):
    """A floating tensor (torch, or a host array seen as torch) as float32, as transformers keeps it."""
    if isinstance(t, HostArray):
        t = t.torch()
    return t.float() if t.is_floating_point() else t


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
    reuse_heap()  # as convert: the pipeline's threads share two malloc arenas
    src, dst = Path(src), Path(dst)
    layouts = check_layouts(list(layouts), "nvfp4")
    dsts = layout_dirs(dst, layouts)
    refuse_overlap(src, dst, dsts.values())
    dev = ranks.device(resolve_device(device))
    dev = "cpu" if dev.type == "cpu" else dev  # the CPU pipeline's host arrays and C kernels (engine.convert)
    warm_up("nvfp4", dev)  # CUDA context and Triton, or the C kernels: beside the snapshot and transformers' imports
    amax, origin = load_any_amax(amax_dir, src)
    reader = CheckpointReader(src)
    ma = module_amax(amax)
    known, names_from = _model_names(src, amax_dir, origin, reader.config, set(reader.names()), snapshot_layers(ma))
    ma = to_checkpoint_names(ma, known)
    layout = _SnapshotLayout(detect_layout(reader.config, reader.names()), set(ma.weight))
    qattn = _quantize_attention(ma)
    fp32 = list(known.keep_fp32) if known is not None else []
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
    groups_items = partition(plan.items, parse_size(shard_size))
    if len(layouts) > 1:
        make_output_dir(dst)
    writers, shard_plans = {}, {}
    outs = {lay: layout_for("nvfp4", lay) for lay in layouts}  # the output layouts, by name
    for lay in layouts:
        shard_plans[lay] = layout_shards(groups_items, outs[lay])
        args = {"export": "w4a4", "layout": lay, "amax": origin["sha256"], "shard_size": parse_size(shard_size)}
        writers[lay] = CheckpointWriter(dsts[lay], shard_plans[lay], source_fingerprint=reader.fingerprint(),
                                        args=args, sink=sink)
    todo = prepare_writers(writers, ranks)
    mine = ranks.share(shard_tasks(groups_items, outs, writers, shard_plans, todo))
    prog = Progress(sink, "tensors", total=sum(len(t.items) for t in mine),
                    bytes_total=sum(it.src_bytes for t in mine for it in t.items))

    def finish(it: Item, res: ItemResult) -> ItemResult:
        """The convert pipeline's outputs as export writes them: fp32-kept tensors as F32, input scales added."""
        res.tensors = {k: _as_fp32(v) if any(p in k for p in fp32) else v for k, v in res.tensors.items()}
        if it.action == TO_NVFP4:
            for m in it.members:
                res.tensors[m.out_base + INPUT_SCALE] = sp.scale(m.out_base)
        return res

    if mine:  # the convert pipeline: reads, math and writes overlapped (engine.convert.pipeline)
        run_tasks(reader, mine, device=dev, v4_fp8=plan.family == "deepseek-v4",
                  on_item=lambda it, _notes: prog.advance(1, it.src_bytes, label=it.key), finish=finish)
    prog.advance(0, force=True)

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
              "calibrated_but_kept": extra, "names_from": names_from,
              "wall_s": round(time.monotonic() - t0, 3)}
    for mod, why in sp.filled.items():
        sink.emit("log", level="warning", msg=f"{mod}: {why}")
    return report
