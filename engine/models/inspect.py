"""What a checkpoint holds, from its headers alone: the report behind `quantdeck inspect`.

    report = inspect_checkpoint(path)     # reads index + safetensors headers + config.json; no tensor data
    print(render_text(report)); json.dumps(report.to_json())

It says which family and layout quantdeck detects; lists tensor-name patterns (layer and expert indices
collapsed) with count, dtype(s), shape(s) and role; detects the source's block formats from weight/scale
shapes (FP8 128×128, MXFP4 1×32, ...); counts GEMM weights to quantize, tensors to preserve, fused groups and
MTP tensors; sums bytes by dtype and estimates the size of NVFP4 and FP8-block outputs; and names every
anomaly (a scale companion missing, index and shards disagreeing, config and tensors disagreeing) with the
file or tensor at fault. No torch: dtypes are safetensors names, so the inspect stage's worker starts fast.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.checkpoint import CheckpointReader
from engine.checkpoint.consistency import hidden_size_disagreements
from engine.checkpoint.safetensors_format import ITEMSIZE
from engine.core.events import EventSink, NullSink
from engine.models import Kind, ModelLayout, Role, collapse_indices, config_mismatches, detect_layout
from engine.models.base import config_experts, config_layers
from engine.models.scales import PACKED_FP4_DTYPES, check_scales, companion, logical_shape

WIDE = ("F32", "F64")
INTEGER = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")


def kept_itemsize(dtype: str) -> int:
    """Bytes per element of a tensor the outputs keep unquantized: wide floats and integers as stored, every
    other float (FP8 dequantized) and int8/uint8 (packed FP4, counted unpacked) as BF16."""
    return ITEMSIZE[dtype] if dtype in WIDE or dtype in INTEGER and dtype not in PACKED_FP4_DTYPES else 2


@dataclass
class PatternRow:
    pattern: str
    count: int
    dtypes: list[str]
    shapes: list[list[int]]
    role: str
    kind: str
    bytes: int


@dataclass
class Anomaly:
    severity: str  # "error" | "warning"
    what: str  # short class: scale-missing, scale-orphan, scale-shape, index, config, unrecognized, no-config
    msg: str
    at: str
    hint: str = ""


@dataclass
class InspectReport:
    path: str
    family: str
    layout: str
    model_type: str | None
    config_layers: int | None
    config_experts: int | None
    config_mtp_layers: int
    quantization_config: dict | None
    tensors: int
    shards: int
    total_bytes: int
    patterns: list[PatternRow]
    block_formats: dict[str, int]  # "fp8 128x128 (scale float32)" -> tensors
    fp8_block: list[int] | None  # the FP8 block size most tensors use
    counts: dict[str, int]
    kinds: dict[str, int]  # tensors per part of the model (routed-expert, router, norm, hc, ...)
    bytes_by_dtype: dict[str, int]
    estimates: dict[str, int]
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(a.severity == "error" for a in self.anomalies)

    def to_json(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def inspect_checkpoint(path: str | os.PathLike, *, sink: EventSink = NullSink()) -> InspectReport:
    """Inspect the checkpoint in `path` (headers only). Raises CheckpointError when it cannot be read at all."""
    r = CheckpointReader(Path(path), strict=False)
    names = r.names()
    anomalies = [Anomaly("error", "index", p.msg, p.at or str(path), p.hint or "") for p in r.problems]
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        anomalies.append(Anomaly("warning", "no-config", "config.json is missing: family detected from tensor names "
                                 "only, layers and experts unchecked", str(cfg_path),
                                 "copy config.json from the source"))
    config = r.config
    layout = detect_layout(config, names)
    sink.emit("log", level="info", msg=f"inspecting {len(names)} tensors of {path} as {layout.family}")
    metas = {n: r.meta(n) for n in names}
    infos = {n: layout.classify(n, metas[n].shape) for n in names}

    blocks, block_anoms = _block_formats(layout, names, metas)
    anomalies += block_anoms
    anomalies += [Anomaly("error", "config", m.msg, m.at, m.hint) for m in config_mismatches(layout, names)]
    anomalies += [Anomaly("error", "config", e.msg, e.at or str(cfg_path), e.hint or "")
                  for e in hidden_size_disagreements(config, metas, str(cfg_path))]
    other = [n for n in names if infos[n].kind is Kind.OTHER]
    if other and layout.family.value != "generic":
        anomalies.append(Anomaly("warning", "unrecognized",
                                 f"{len(other)} tensor(s) the {layout.family} layout does not recognize (preserved as "
                                 f"they are): {', '.join(other[:5])}{' …' if len(other) > 5 else ''}",
                                 f"{metas[other[0]].shard}:{other[0]}", "check the family, or report the names"))

    fp8_blocks = Counter({k: v for k, v in blocks.items() if k.startswith("fp8 ")})
    fp8_block = None
    if fp8_blocks:
        bo, bi = fp8_blocks.most_common(1)[0][0].split()[1].split("x")
        fp8_block = [int(bo), int(bi)]
    by_dtype: Counter[str] = Counter()
    for m in metas.values():
        by_dtype[m.dtype_name] += m.nbytes
    return InspectReport(
        path=str(path), family=str(layout.family), layout=type(layout).__name__,
        model_type=config.get("model_type"), config_layers=config_layers(config), config_experts=config_experts(config),
        config_mtp_layers=int(config.get("num_nextn_predict_layers") or 0),
        quantization_config=config.get("quantization_config"),
        tensors=len(names), shards=len(r.shards()), total_bytes=r.total_bytes,
        patterns=_patterns(layout, names, metas, infos), block_formats=dict(sorted(blocks.items())),
        fp8_block=fp8_block, counts=_counts(layout, names, infos),
        kinds=dict(Counter(i.kind.value for i in infos.values()).most_common()),
        bytes_by_dtype=dict(sorted(by_dtype.items())),
        estimates=_estimates(layout, names, metas, infos), anomalies=anomalies,
    )


def _patterns(layout: ModelLayout, names, metas, infos) -> list[PatternRow]:
    rows: dict[str, dict] = {}
    for n in names:
        p = collapse_indices(n, mtp=infos[n].mtp)
        row = rows.setdefault(p, {"count": 0, "dtypes": Counter(), "shapes": [], "roles": Counter(), "kinds": Counter(),
                                  "bytes": 0})
        m = metas[n]
        row["count"] += 1
        row["dtypes"][m.dtype_name] += 1
        if list(m.shape) not in row["shapes"]:
            row["shapes"].append(list(m.shape))
        row["roles"][infos[n].role.value] += 1
        row["kinds"][infos[n].kind.value] += 1
        row["bytes"] += m.nbytes
    return [PatternRow(p, r["count"], sorted(r["dtypes"]), r["shapes"][:8], r["roles"].most_common(1)[0][0],
                       r["kinds"].most_common(1)[0][0], r["bytes"]) for p, r in sorted(rows.items(), key=_pattern_key)]


def _pattern_key(item):
    p = item[0]
    return ("{MTP}" in p, "{L}" in p, p)


def _block_formats(layout: ModelLayout, names, metas) -> tuple[Counter, list[Anomaly]]:
    blocks, problems = check_scales(layout, names, metas)
    return blocks, [Anomaly("error", p.what, p.msg, p.at, p.hint) for p in problems]


def _counts(layout: ModelLayout, names, infos) -> dict[str, int]:
    c = Counter(info.role.value for info in infos.values())
    quantize = [n for n in names if infos[n].converted()]
    attention = [n for n in names if infos[n].gemm and infos[n].attention and not infos[n].mtp]
    groups = {infos[n].fused_group for n in quantize if infos[n].fused_group}
    att_groups = {layout.classify(n, quantize_attention=True).fused_group for n in attention} - {None}
    return {
        "tensors": len(names),
        "quantize": len(quantize),  # default options: attention and MTP kept in BF16
        "quantize_attention_gemms": len(attention),
        "preserve": c[Role.PRESERVE.value] + len(attention),
        "scale_companions": c[Role.SCALE.value],
        "mtp": sum(1 for info in infos.values() if info.mtp),
        "mtp_layers": len({info.layer for info in infos.values() if info.mtp}),
        "routed_experts": sum(1 for info in infos.values() if info.kind is Kind.ROUTED_EXPERT),
        "fused_groups": len(groups),
        "fused_groups_with_attention": len(groups) + len(att_groups),
        "unrecognized": sum(1 for info in infos.values() if info.kind is Kind.OTHER),
    }


def _estimates(layout: ModelLayout, names, metas, infos) -> dict[str, int]:
    """Bytes of the outputs: NVFP4 weight-only (default options) and FP8 block-128 (every GEMM, MTP included)."""
    present = set(names)
    nv = fp8 = 0
    for n in names:
        info, m = infos[n], metas[n]
        if info.role is Role.SCALE:
            continue
        shape = logical_shape(m.shape, m.dtype_name) if companion(layout, n, present) else tuple(m.shape)
        numel = math.prod(shape)
        kept = numel * kept_itemsize(m.dtype_name)
        if info.converted() and len(shape) == 2:
            o, i = shape
            # codes (16-blocks padded), e4m3 scales, scale_2
            nv += o * math.ceil(i / 16) * 8 + o * math.ceil(i / 16) + 4
        else:
            nv += kept
        if info.gemm and len(shape) == 2:
            o, i = shape
            fp8 += o * i + math.ceil(o / 128) * math.ceil(i / 128) * 4
        else:
            fp8 += kept
    return {"nvfp4": nv, "fp8-block": fp8}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"


def render_text(rep: InspectReport) -> str:
    """The human report (what `quantdeck inspect` prints without --json)."""
    lines = [f"checkpoint   {rep.path}",
             f"family       {rep.family} ({rep.layout}; model_type {rep.model_type or '?'})",
             f"config       {rep.config_layers} layers, {rep.config_experts} routed experts, "
             f"{rep.config_mtp_layers} MTP layer(s)"
             + (f"; quantization {rep.quantization_config.get('quant_method')}" if rep.quantization_config else ""),
             f"tensors      {rep.tensors} in {rep.shards} shard(s), {_human(rep.total_bytes)}",
             "blocks       "
             + (", ".join(f"{k}: {v}" for k, v in rep.block_formats.items()) or "none (not block-quantized)"),
             ""]
    w = max([len(p.pattern) for p in rep.patterns] + [7])
    lines.append(f"{'pattern':<{w}}  {'count':>5}  {'role':<8}  {'kind':<13}  {'dtype':<9}  shape")
    for p in rep.patterns:
        shapes = " ".join("x".join(map(str, s)) or "scalar" for s in p.shapes[:3]) + (" …" if len(p.shapes) > 3 else "")
        lines.append(f"{p.pattern:<{w}}  {p.count:>5}  {p.role:<8}  {p.kind:<13}  {','.join(p.dtypes):<9}  {shapes}")
    c = rep.counts
    lines += ["",
              f"quantize     {c['quantize']} GEMM weights (attention +{c['quantize_attention_gemms']} with "
              f"--quantize-attention), {c['fused_groups']} fused groups sharing a global scale",
              f"preserve     {c['preserve']} tensors; {c['scale_companions']} scale companions; "
              f"{c['mtp']} MTP tensors in {c['mtp_layers']} layer(s)",
              "kinds        " + ", ".join(f"{k} {v}" for k, v in rep.kinds.items()),
              "bytes        " + ", ".join(f"{k} {_human(v)}" for k, v in rep.bytes_by_dtype.items()),
              "estimate     " + ", ".join(f"{k} {_human(v)} (x{v / max(rep.total_bytes, 1):.2f})"
                                          for k, v in rep.estimates.items())]
    if rep.anomalies:
        lines += ["", f"anomalies    {len(rep.anomalies)}"]
        lines += [f"  {a.severity}: [{a.what}] {a.msg} (at {a.at})" for a in rep.anomalies]
    else:
        lines += ["", "anomalies    none"]
    return "\n".join(lines)
