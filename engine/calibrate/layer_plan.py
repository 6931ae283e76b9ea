"""The plan of one decoder layer's build: which stored tensors fill which parameter, and where their bytes lie.

For every parameter of layer i (shapes from transformers' decoder layer built on the meta device, final
dtypes by `from_pretrained`'s rules) the plan lists the pieces that fill it: a plain tensor, or expert e's
gate / up rows of the fused `gate_up_proj[e]`, or `down_proj[e]`. Each piece names its stored tensor and
its encoding: plain (copied with a cast), FP8 block (+ its block-scale tensor) or MXFP4 (+ its E8M0 scale).

The stored bytes that go through the layer buffer are sorted by (shard, offset), merged across small gaps
into large ranges, and laid out in file order in one flat buffer: each range starts at a buffer offset
congruent to its file offset modulo ALIGN, so a tensor aligned in its file is aligned in the buffer too.
Pieces marked `direct` (plain, stored in the parameter's own dtype, on a host build) skip the buffer: they
are read straight into the parameter when the layer is assembled. A plan that `streams` the fused expert
parameters keeps their pieces in the buffer: they stay as stored (engine.calibrate.expert_store).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field

import torch

from engine.checkpoint.reader import CheckpointReader, TensorMeta
from engine.core.errors import CheckpointError

MERGE_GAP = 1 << 20  # stored tensors closer than this are read as one range (the gap is read too)
ALIGN = 64  # buffer offset ≡ file offset (mod ALIGN)
FP8_NAMES = ("F8_E4M3", "F8_E5M2")
PACKED_NAMES = ("U8", "I8")
_FUSED = re.compile(r"^(.*experts)\.(gate_up_proj|down_proj)$")


class Encoding(str, enum.Enum):
    PLAIN = "plain"
    FP8_BLOCK = "fp8-block"
    MXFP4 = "mxfp4"


@dataclass(frozen=True)
class Source:
    """One stored tensor and how its values are encoded (with the scale tensor that decodes them)."""

    meta: TensorMeta
    encoding: Encoding
    scale: TensorMeta | None = None

    @property
    def value_shape(self) -> tuple[int, ...]:
        """The shape of the decoded values (MXFP4 packs two values per byte)."""
        if self.encoding is Encoding.MXFP4:
            return (*self.meta.shape[:-1], 2 * self.meta.shape[-1])
        return self.meta.shape

    def where(self, reader: CheckpointReader) -> str:
        return f"{reader.dir / self.meta.shard}:{self.meta.name}"


@dataclass(frozen=True)
class Piece:
    """A stored tensor filling `param` (whole), or `param[expert]`, or rows [rows[0], rows[1]) of it."""

    param: str
    source: Source
    expert: int | None = None
    rows: tuple[int, int] | None = None
    direct: bool = False

    def dest(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        t = params[self.param]
        if self.expert is not None:
            t = t[self.expert]
        if self.rows is not None:
            t = t[self.rows[0]:self.rows[1]]
        return t

    def batch_key(self) -> tuple:
        """Pieces with equal keys decode as one batch (consecutive experts of one role)."""
        s = self.source
        return (self.param, self.rows, s.encoding, s.meta.dtype_name, s.meta.shape,
                s.scale.dtype_name if s.scale else None, s.scale.shape if s.scale else None)


@dataclass(frozen=True)
class ReadRange:
    """Bytes [start, end) of `shard`, read into the layer buffer at `offset`."""

    shard: str
    start: int
    end: int
    offset: int
    names: tuple[str, ...]  # the tensors it holds (for error messages)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def label(self) -> str:
        """The tensors it holds, as a short read error names them."""
        return ", ".join(self.names[:3]) + (", …" if len(self.names) > 3 else "")


@dataclass
class LayerPlan:
    index: int
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]  # parameter -> (shape, final dtype)
    pieces: list[Piece]
    ranges: list[ReadRange] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # buffered tensor -> its offset in the buffer
    nbytes: int = 0  # bytes of the layer buffer this plan fills
    streams: tuple[str, ...] = ()  # fused expert parameters kept as stored, decoded as they run
    streamable: tuple[str, ...] = ()  # those that could be (an experts module's fused parameters, stored per expert)

    @property
    def param_bytes(self) -> int:
        """Bytes of the layer's parameters built whole in their final dtypes."""
        return sum(math.prod(shape) * dt.itemsize for shape, dt in self.params.values())

    @property
    def source_bytes(self) -> int:
        """Stored bytes of every tensor the layer is built from (values and scales, buffered or direct)."""
        metas = {p.source.meta.name: p.source.meta for p in self.pieces}
        metas.update({p.source.scale.name: p.source.scale for p in self.pieces if p.source.scale})
        return sum(m.nbytes for m in metas.values())


def source_of(reader: CheckpointReader, names: set[str], name: str) -> Source:
    """The stored tensor `name` with its encoding: FP8 with a block scale, MXFP4 with an E8M0 scale, or plain."""
    meta = reader.meta(name)
    base = name[: -len("weight")] if name.endswith("weight") else name + "."
    if meta.dtype_name in FP8_NAMES:
        for sname in (base + "weight_scale_inv", base + "scale"):
            if sname in names:
                return Source(meta, Encoding.FP8_BLOCK, reader.meta(sname))
        raise CheckpointError(f"FP8 tensor {name} in {meta.shard} has no scale ({base}weight_scale_inv)",
                              at=f"{reader.dir / meta.shard}:{name}",
                              hint="the checkpoint is incomplete; re-download or re-convert it")
    if meta.dtype_name in PACKED_NAMES and name.endswith(".weight") and base + "scale" in names:
        return Source(meta, Encoding.MXFP4, reader.meta(base + "scale"))
    return Source(meta, Encoding.PLAIN)


def final_dtype(pname: str, model_dtype: torch.dtype, dtype: torch.dtype, keep_fp32: list[str]) -> torch.dtype:
    """What `from_pretrained` leaves a parameter in: fp32 where kept, else the compute dtype (non-floats as is)."""
    if any(k in pname for k in keep_fp32):
        return torch.float32
    return dtype if model_dtype.is_floating_point else model_dtype


def plan_layer(family, hf_config, i: int, reader: CheckpointReader, names: set[str], dtype: torch.dtype,
               keep_fp32: list[str], direct_ok: bool, stream: bool = False) -> LayerPlan:
    """Layer i's plan (see the module docstring); `direct_ok` lets plain same-dtype pieces skip the buffer;
    `stream` keeps the fused expert parameters as stored."""
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in family.layer_class()(hf_config, i).state_dict().items()}
    params = {k: (shape, final_dtype(k, dt, dtype, keep_fp32)) for k, (shape, dt) in shapes.items()}
    plain, experts = family.source_map(i, names)
    fused = [p for p in params if _FUSED.match(p)]
    held = {p.rpartition(".")[0] for p in fused if p in plain}  # experts modules stored fused: none of theirs
    streamable = tuple(p for p in fused if p.rpartition(".")[0] not in held)
    streams = streamable if stream else ()
    pieces: list[Piece] = []
    for pname, (shape, want) in params.items():
        for piece in _param_pieces(family, i, pname, shape, plain, experts, reader, names):
            direct = direct_ok and piece.source.encoding is Encoding.PLAIN and piece.source.meta.dtype == want \
                and pname not in streams
            pieces.append(Piece(piece.param, piece.source, piece.expert, piece.rows, direct))
    plan = LayerPlan(i, params, pieces, streams=streams, streamable=streamable)
    buffered = {p.source.meta.name: p.source.meta for p in pieces if not p.direct}
    buffered.update({p.source.scale.name: p.source.scale for p in pieces if p.source.scale})
    plan.ranges, plan.offsets, plan.nbytes = coalesce(list(buffered.values()))
    return plan


def _param_pieces(family, i: int, pname: str, shape: tuple[int, ...], plain: dict[str, str],
                  experts: dict[tuple[int, str], str], reader: CheckpointReader, names: set[str]) -> list[Piece]:
    """The pieces that fill parameter `pname` (checked against its shape)."""
    full = family.layer_prefix(i) + pname
    if pname in plain:
        src = source_of(reader, names, plain[pname])
        _check_shape(src, shape, full, reader)
        return [Piece(pname, src)]
    m = _FUSED.match(pname)
    if not (m and experts):
        raise CheckpointError(f"tensor for {full} not found in the checkpoint", at=full,
                              hint="is this the checkpoint the config describes?")
    n = shape[0]
    extra = sorted(e for e, _ in experts if e >= n)
    if extra:
        raise CheckpointError(f"layer {i}: the checkpoint has expert {extra[0]} but {full} holds {n} experts",
                              at=full, hint="does config.json match the weights?")
    roles = ("down",) if m.group(2) == "down_proj" else ("gate", "up")
    out: list[Piece] = []
    for e in range(n):
        row = 0
        for role in roles:
            name = experts.get((e, role))
            if name is None:
                raise CheckpointError(f"layer {i}: expert weight {(e, role)} missing for {full}", at=full,
                                      hint="is the checkpoint complete?")
            src = source_of(reader, names, name)
            rows = src.value_shape[0]
            _check_shape(src, shape[1:] if role == "down" else (rows, *shape[2:]), full, reader)
            out.append(Piece(pname, src, e, None if role == "down" else (row, row + rows)))
            row += rows
        if roles != ("down",) and row != shape[1]:
            gate, up = out[-2].source, out[-1].source
            raise CheckpointError(f"{full}[{e}]: checkpoint tensors {gate.meta.name} and {up.meta.name} "
                                  f"({up.meta.shard}) give {row} rows, the model wants {shape[1]}",
                                  at=up.where(reader), hint="does config.json match the weights?")
    return out


def _check_shape(src: Source, want: tuple[int, ...], full: str, reader: CheckpointReader) -> None:
    if tuple(src.value_shape) != tuple(want):
        raise CheckpointError(f"{full}: checkpoint tensor {src.meta.name} ({src.meta.shard}) has shape "
                              f"{tuple(src.value_shape)}, the model wants {tuple(want)}", at=src.where(reader),
                              hint="does config.json match the weights?")


def coalesce(metas: list[TensorMeta]) -> tuple[list[ReadRange], dict[str, int], int]:
    """File-ordered read ranges over `metas` (merged across gaps <= MERGE_GAP), each tensor's buffer offset,
    and the buffer size."""
    ranges: list[ReadRange] = []
    offsets: dict[str, int] = {}
    pos = end = 0
    group: list[TensorMeta] = []

    def close() -> None:
        nonlocal pos
        start = group[0].start
        offset = _aligned(pos, start)
        ranges.append(ReadRange(group[0].shard, start, end, offset, tuple(m.name for m in group)))
        offsets.update({m.name: offset + m.start - start for m in group})
        pos = offset + end - start
        group.clear()

    for m in sorted(metas, key=lambda m: (m.shard, m.start)):
        if group and (m.shard != group[0].shard or m.start - end > MERGE_GAP):
            close()
        end = max(end, m.end) if group else m.end
        group.append(m)
    if group:
        close()
    return ranges, offsets, pos


def _aligned(pos: int, file_offset: int) -> int:
    """The first buffer offset >= pos congruent to file_offset modulo ALIGN."""
    return pos + (file_offset - pos) % ALIGN


def buffer_bound(family, i: int, reader: CheckpointReader, names: set[str]) -> int:
    """An upper bound of any plan's buffer size for layer i, from the checkpoint alone (no model build)."""
    plain, experts = family.source_map(i, names)
    metas: dict[str, TensorMeta] = {}
    for name in list(plain.values()) + list(experts.values()):
        src = source_of(reader, names, name)
        metas[name] = src.meta
        if src.scale is not None:
            metas[src.scale.name] = src.scale
    _, _, nbytes = coalesce(list(metas.values()))
    return nbytes + ALIGN * (len(metas) + 1)
