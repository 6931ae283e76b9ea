"""The conversion plan: every source tensor turned into work items with known output tensors.

An `Item` is the unit of compute: one fused group (members share one NVFP4 global scale), one weight, or
one preserved tensor. Every output tensor's name, dtype and shape is fixed here, before any data is
read, so the writer can plan its shards and headers up front. An NVFP4 source module (either layout,
engine.formats.nvfp4.names) is decoded for `bf16` / `fp8-block` and re-laid as it is for `nvfp4`: its codes,
block scales, global scale and input scale carried over, so either output layout holds the same bytes. Output
specs come from the output layouts (engine.formats.layout): an NVFP4 module's canonical ones are modelopt's, which
each output layout re-labels as it writes (`Layout.out_spec`). The plan depends only on the source's
names, dtypes, shapes and config and on the options: it is deterministic, which makes resumed runs
byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.safetensors_format import TensorSpec
from engine.core.errors import CheckpointError, FormatError, UsageError
from engine.core.names import OutputLayout, TargetFormat
from engine.formats.layout import Layout, Modules, layout_for, natural_key
from engine.formats.nvfp4.names import StoredNames, find_nvfp4, nvfp4_base
from engine.models.scales import check_scales, companion

FLOAT = "float"  # BF16 / F16 / F32 values
FP8 = "fp8"  # float8_e4m3fn codes with a block scale companion
MXFP4 = "mxfp4"  # E2M1 packed two per byte with an E8M0 scale per 32 inputs
NVFP4 = "nvfp4"  # E2M1 packed two per byte, an E4M3 scale per 16 inputs and a global scale (either NVFP4 layout)

COPY, TO_BF16, TO_NVFP4, TO_FP8 = "copy", "bf16", "nvfp4", "fp8-block"
NVFP4_GROUP = 16  # input values per NVFP4 block scale: a weight's in_features must be a multiple to be quantized


@dataclass(frozen=True)
class Member:
    """One source weight (and its scale companion) inside an item."""

    name: str  # source weight name
    scale: str | None  # source scale companion, if any
    encoding: str  # FLOAT | FP8 | MXFP4
    shape: tuple[int, ...]  # logical [out, in] (MXFP4: unpacked)
    out_base: str  # output module name (name without `.weight`)
    global_scale: str | None = None  # NVFP4: the stored global scale (`weight_scale_2` / `weight_global_scale`)
    input_scale: str | None = None  # NVFP4 W4A4: the stored input scale (`input_scale` / `input_global_scale`)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source tensor this member reads."""
        return tuple(n for n in (self.name, self.scale, self.global_scale, self.input_scale) if n)


@dataclass(frozen=True)
class Item:
    action: str  # COPY | TO_BF16 | TO_NVFP4 | TO_FP8
    members: tuple[Member, ...]
    outputs: tuple[TensorSpec, ...]  # canonical (modelopt-named) outputs
    src_bytes: int

    @property
    def key(self) -> str:
        return self.members[0].name


@dataclass
class ItemResult:
    """An item's canonical output tensors (torch tensors, or HostArrays on the torch-free CPU path), and
    notes for the operator."""

    tensors: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class ConvertPlan:
    items: list[Item]
    target: str
    family: str
    kept_modules: list[str]  # GEMM modules not quantized (the ignore / exclude list), sorted
    quantized_modules: list[str]
    mtp_modules: list[str]
    fp8_scale_suffix: str = ".weight_scale_inv"
    notes: list[str] = field(default_factory=list)
    w4a4: bool = False  # NVFP4 re-laid from a calibrated (W4A4) source: input scales carried over

    @property
    def modules(self) -> Modules:
        """The output's GEMM modules, as the output layouts' configs take them."""
        return Modules(tuple(self.kept_modules), tuple(self.quantized_modules), tuple(self.mtp_modules))


def _base(name: str) -> str:
    for suf in (".weight", ".weight_packed"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def _refuse_scale_problems(reader: CheckpointReader, layout, names: list[str]) -> None:
    """A weight without its scale, or with one that does not fit, would convert to wrong values without an error:
    refuse it as `quantdeck inspect` reports it (engine.models.scales)."""
    _, problems = check_scales(layout, names, {n: reader.meta(n) for n in names})
    if problems:
        p = problems[0]
        more = f" (and {len(problems) - 1} more: `quantdeck inspect SRC` lists them)" if len(problems) > 1 else ""
        raise FormatError(f"{p.msg}{more}", at=p.at, hint=p.hint)


def _stored_nvfp4(reader: CheckpointReader, name: str, present: set[str]) -> StoredNames | None:
    """`name` as the codes of a stored NVFP4 module (either layout; engine.formats.nvfp4.names), else None."""
    base = nvfp4_base(name)
    found = find_nvfp4(base, present) if base else None
    if found is None or found.packed != name:
        return None
    m = reader.meta(name)
    return found if m.dtype_name in ("U8", "I8") and len(m.shape) == 2 else None


def _encoding(reader: CheckpointReader, name: str, scale: str | None) -> tuple[str, tuple[int, ...]]:
    m = reader.meta(name)
    if m.dtype_name in ("BF16", "F16", "F32", "F64"):
        return FLOAT, m.shape
    if m.dtype_name == "F8_E4M3" and len(m.shape) == 2:
        return FP8, m.shape
    if m.dtype_name in ("U8", "I8") and len(m.shape) == 2 and scale is not None:
        s = reader.meta(scale)
        cols = m.shape[1] * 2
        if s.dtype_name in ("F8_E8M0", "U8") and s.shape == (m.shape[0], -(-cols // 32)):
            return MXFP4, (m.shape[0], cols)
        if s.dtype_name == "F8_E4M3" and s.shape == (m.shape[0], cols // NVFP4_GROUP) and not cols % NVFP4_GROUP:
            return NVFP4, (m.shape[0], cols)
    return "other", m.shape


def _fp8_outputs(base: str, shape, family: str) -> list[TensorSpec]:
    """A module cast to FP8 block-128, as the family's FP8 layout writes it (V4: UE8M0 `.scale`)."""
    return list(layout_for(TO_FP8, family=family).module_specs(base, shape).values())


def _nvfp4_outputs(base: str, shape, input_scale: bool = False) -> list[TensorSpec]:
    """A module's canonical NVFP4 outputs: modelopt's (each output layout re-labels them as it writes)."""
    return list(Layout.get(OutputLayout.MODELOPT).module_specs(base, shape, input_scale).values())


def build_plan(reader: CheckpointReader, layout, target: str, *, quantize_attention: bool = False) -> ConvertPlan:
    """Decide, for every source tensor, what the output holds (see the module docstring)."""
    target = str(TargetFormat(target))
    names = reader.names()
    present = set(names)
    v4 = str(layout.family) == "deepseek-v4"
    _refuse_scale_problems(reader, layout, names)
    stored = {n: found for n in names if (found := _stored_nvfp4(reader, n, present))}
    scale_of = {n: s for n in names if n.endswith(".weight") and (s := companion(layout, n, present))}
    scale_of.update({n: found.block_scale for n, found in stored.items()})
    companions = set(scale_of.values()) | {x for found in stored.values() for x in found.all[2:]}
    groups: dict[str, list[Member]] = {}
    items: list[Item] = []
    kept, quantized, mtp_mods = set(), set(), set()
    unaligned: list[str] = []

    def add(action: str, members: list[Member], outputs: list[TensorSpec]) -> None:
        nbytes = sum(reader.meta(n).nbytes for m in members for n in m.sources)
        items.append(Item(action, tuple(members), tuple(outputs), nbytes))

    for n in names:
        if n in companions:
            continue
        scale = scale_of.get(n)
        enc, shape = _encoding(reader, n, scale)
        info = layout.classify(n, shape, quantize_attention=quantize_attention)
        nv = stored.get(n) if enc == NVFP4 else None
        if enc == NVFP4 and nv is None:
            enc = "other"  # E4M3 block scales but no global scale: refused below as any unknown encoding
        mem = Member(n, scale, enc, tuple(shape), _base(n), nv.global_scale if nv else None,
                     nv.input_scale if nv else None)
        if (info.gemm or n in stored) and len(shape) == 2 and enc not in (FLOAT, FP8, MXFP4, NVFP4):
            m = reader.meta(n)
            raise FormatError(f"dtype {m.dtype_name} of this weight{f' (scale {scale})' if scale else ''} "
                              "is not an encoding quantdeck converts: BF16/F16/F32, F8_E4M3 with a block scale, "
                              "V4's MXFP4 (packed I8/U8 with E8M0 scales) or NVFP4 (packed U8 with an E4M3 scale per "
                              "16 inputs and a global scale, modelopt or compressed-tensors names)",
                              at=f"{m.shard}:{n}",
                              hint="the shard is damaged, or the checkpoint is not a DeepSeek FP8/BF16/NVFP4 "
                                   "checkpoint; `quantdeck inspect SRC` shows its tensors")
        gemm = info.gemm and len(shape) == 2
        if info.mtp and gemm:
            mtp_mods.add(mem.out_base)
        # NVFP4 already: re-laid as it is (same codes and scales), whatever the layout would quantize
        nvfp4 = target == TO_NVFP4 and len(shape) == 2 and (enc == NVFP4 or (
            gemm and layout.should_quantize(n, shape, quantize_attention=quantize_attention)))
        if nvfp4 and shape[1] % NVFP4_GROUP:
            unaligned.append(f"{n} {list(shape)}")
        elif nvfp4:
            quantized.add(mem.out_base)
            if info.fused_group and gemm:
                groups.setdefault(info.fused_group, []).append(mem)
            else:
                add(TO_NVFP4, [mem], _nvfp4_outputs(mem.out_base, shape, mem.input_scale is not None))
            continue
        if target == TO_FP8 and gemm:
            quantized.add(mem.out_base)
            if enc == FP8 and scale is not None:
                add(COPY, [mem], [_spec(reader, n), _spec(reader, scale)])
            else:
                add(TO_FP8, [mem], _fp8_outputs(mem.out_base, shape, str(layout.family)))
            continue
        if (n.endswith(".weight") or enc == NVFP4) and len(shape) == 2 and str(info.kind) not in ("norm", "scale"):
            kept.add(mem.out_base)  # a Linear / Embedding left unquantized: it goes in ignore / exclude lists
        if target == TO_FP8 and enc == FP8 and scale is not None:
            add(COPY, [mem], [_spec(reader, n), _spec(reader, scale)])
        elif enc in (FP8, MXFP4, NVFP4):
            add(TO_BF16, [mem], [TensorSpec(mem.out_base + ".weight", "BF16", tuple(shape))])
        else:
            outs = [_spec(reader, n)] + ([_spec(reader, scale)] if scale else [])
            add(COPY, [mem], outs)

    for key, members in groups.items():
        members.sort(key=lambda m: natural_key(m.name))
        encs = {m.encoding == NVFP4 for m in members}
        if len(encs) > 1:
            raise FormatError(f"fused group {key} mixes NVFP4 and other weights ({', '.join(m.name for m in members)})",
                              at=members[0].name, hint="its members share one global scale: a checkpoint holds them "
                                                       "all in NVFP4 or none; `quantdeck inspect SRC` shows them")
        outs = [s for m in members for s in _nvfp4_outputs(m.out_base, m.shape, m.input_scale is not None)]
        add(TO_NVFP4, members, outs)

    items.sort(key=lambda it: natural_key(it.key))
    if not items:
        raise CheckpointError(f"{reader.dir} holds no tensors", at=str(reader.dir))
    notes = []
    if unaligned:
        notes.append(f"{len(unaligned)} weight(s) whose in_features is not a multiple of {NVFP4_GROUP} stay in BF16 "
                     f"(first: {unaligned[0]}): NVFP4 packs whole {NVFP4_GROUP}-value groups, "
                     "and vLLM and transformers load only those")
    if target == TO_NVFP4 and not quantized:
        notes.append("no tensor qualifies for NVFP4 quantization; the output only re-encodes")
    relaid = [m for it in items if it.action == TO_NVFP4 for m in it.members if m.encoding == NVFP4]
    with_input = sum(m.input_scale is not None for m in relaid)
    if with_input and with_input != len(relaid):
        notes.append(f"{with_input} of {len(relaid)} NVFP4 module(s) carry an input scale: the output keeps them "
                     "as they are, but its label says W4A4 for all")
    return ConvertPlan(items, target, str(layout.family), sorted(kept, key=natural_key),
                       sorted(quantized, key=natural_key), sorted(mtp_mods, key=natural_key),
                       ".scale" if v4 else ".weight_scale_inv", notes, w4a4=with_input > 0)


def _spec(reader: CheckpointReader, name: str) -> TensorSpec:
    m = reader.meta(name)
    return TensorSpec(name, m.dtype_name, m.shape)


# -- output layouts ------------------------------------------------------------------------------------
def check_layouts(layouts, target: str) -> list[str]:
    out = []
    for lay in layouts:
        try:
            out.append(str(OutputLayout(str(lay))))
        except ValueError:
            known = ", ".join(x.value for x in OutputLayout)
            raise UsageError(f"unknown output layout {lay!r}", at="--format",
                             hint=f"use one of: {known}, both") from None
    if target != TO_NVFP4:
        return [str(OutputLayout.MODELOPT)]  # FP8-block / BF16 have one layout (DeepSeek's / plain)
    return sorted(set(out), key=out.index) or [str(OutputLayout.MODELOPT)]
