"""Fill a layer's parameters on the compute device from its raw stored bytes (a `LayerPlan`'s buffer).

The parameters are allocated once, in their final dtypes, on the device. Plain pieces are copied byte for
byte when stored in the parameter's dtype (an asynchronous upload from page-locked memory on a GPU), else
cast on the device. FP8-block and MXFP4 pieces are staged on the device in runs of consecutive experts
(bounded staging memory), dequantized there in float32 with the maths of
engine.formats.fp8_block.helpers.dequant_fp8_block and engine.formats.mxfp4.helpers.dequant_mxfp4 (the
same float32 operations, batched over experts) and cast into the parameter slices, gate‖up straight into
`gate_up_proj[e]`. The result is bit for bit what dequantizing each tensor on the host and stacking gives.
On a CPU, FP8-block pieces of BF16 parameters skip the staging and the float32 copy: the fused C kernel writes
each one's BF16 values straight into its slice (mid-cpu, 2 cores: 0.53 s against 1.83 s a 0.62 GB layer), the
same bits (NaN codes aside: a NaN either way).

`assemble_layer` takes the whole layer buffer; `assemble_in_windows` (a host build without shared reads) takes the
pieces a window of stored bytes at a time, from a reader that fills one small reused buffer: the same code decodes
each piece from the same bytes either way.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from engine.calibrate.layer_plan import Encoding, LayerPlan, Piece
from engine.core.errors import CheckpointError, about
from engine.formats import cpu_kernels
from engine.formats.e2m1 import decode_packed
from engine.formats.fp8_block.helpers import infer_block, scale_to_fp32
from engine.formats.fp8_block.host import E4M3_LUT
from engine.formats.mxfp4.helpers import MX_BLOCK, mxfp4_exponents
from engine.formats.native import build

# staging bytes per decoded element (codes, float32 values, index / exponent temporaries)
DECODE_COST = {Encoding.FP8_BLOCK: 9, Encoding.MXFP4: 29}
STAGING_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}  # per run of experts decoded at once

WINDOW_BYTES = 64 << 20  # a host build's read window (assemble_in_windows)

ReadDirect = Callable[[list[Piece], dict[str, torch.Tensor]], None]
ReadWindow = Callable[[list], tuple[torch.Tensor, dict[str, int]]]  # metas -> (buffer, name -> offset in it)


def assemble_layer(plan: LayerPlan, raw: torch.Tensor, device: torch.device, where: Callable[[Piece], str],
                   read_direct: ReadDirect | None = None, stores: dict | None = None) -> dict[str, torch.Tensor]:
    """Layer `plan.index`'s state dict on `device`, built from `raw` (the filled layer buffer, host or device).

    `where(piece)` names a piece's file and tensor in errors; `read_direct` reads the plan's direct pieces
    straight into their parameter slices. The plan's streamed parameters are staged as stored into `stores`
    (experts module -> engine.calibrate.expert_store.ExpertStore) and stand in the state dict as placeholders."""
    streamed = _streamed(plan, stores)
    params = _allocate(plan, device, streamed, read_direct)
    for module, store in (stores or {}).items():
        params.update({f"{module}.{k}": v for k, v in store.placeholders().items()})
    _fill([p for p in plan.pieces if not p.direct], raw, plan.offsets, params, device, where, streamed)
    for store in (stores or {}).values():
        store.check()
    return params


def assemble_in_windows(plan: LayerPlan, read_window: ReadWindow, device: torch.device,
                        where: Callable[[Piece], str], read_direct: ReadDirect | None = None,
                        window: int = WINDOW_BYTES) -> dict[str, torch.Tensor]:
    """As assemble_layer, on a host, without the whole layer buffer: the plan's pieces taken in windows of about
    `window` stored bytes, each window's tensors read by `read_window(metas)` into one reused buffer (the buffer,
    and each tensor's offset in it). The same parameters, bit for bit: each piece is decoded from the same bytes
    by the same code."""
    if plan.streams:
        raise ValueError("a plan that streams experts keeps their stored bytes: assemble it from the whole buffer")
    params = _allocate(plan, device, {}, read_direct)
    for pieces in _windows(plan, window):
        metas = list({m.name: m for p in pieces for m in _stored(p)}.values())
        raw, offsets = read_window(metas)
        _fill(pieces, raw, offsets, params, device, where, {})
    return params


def _allocate(plan: LayerPlan, device: torch.device, streamed: dict,
              read_direct: ReadDirect | None) -> dict[str, torch.Tensor]:
    """The layer's parameters (streamed ones aside), its direct pieces read into them."""
    params = {name: torch.empty(shape, dtype=dt, device=device) for name, (shape, dt) in plan.params.items()
              if name not in streamed}
    direct = [p for p in plan.pieces if p.direct]
    if direct:
        if read_direct is None:
            raise ValueError("the plan has direct pieces but no reader for them")
        read_direct(direct, params)
    return params


def _fill(pieces: list[Piece], raw: torch.Tensor, offsets: dict[str, int], params: dict[str, torch.Tensor],
          device: torch.device, where: Callable[[Piece], str], streamed: dict) -> None:
    """`pieces` (none direct) decoded or copied from `raw` (their bytes at `offsets`) into `params`, or staged
    into their streamed parameter's store."""
    runs: list[list[Piece]] = []
    kept: list[list[Piece]] = []  # streamed pieces: runs of consecutive experts of one role
    open_runs: dict[tuple, list[Piece]] = {}
    for p in pieces:
        if p.param in streamed:
            run = open_runs.get(p.batch_key())
            if run is not None and p.expert is not None and p.expert == run[-1].expert + 1:
                run.append(p)
            else:
                open_runs[p.batch_key()] = run = [p]
                kept.append(run)
        elif p.source.encoding is Encoding.PLAIN:
            with about(where(p)):
                _copy_plain(p, raw, offsets, params, device)
        elif runs and _extends(runs[-1], p, device):
            runs[-1].append(p)
        else:
            runs.append([p])
    for run in runs:
        with about(where(run[0])):
            _decode_run(run, raw, offsets, params, device, where)
    for run in kept:
        with about(where(run[0])):
            streamed[run[0].param].add(run[0].param.rpartition(".")[2], run, raw, offsets, where(run[0]))


def _stored(p: Piece) -> list:
    """The stored tensors a piece is made from: its values, and its scales where it has them."""
    return [p.source.meta] if p.source.scale is None else [p.source.meta, p.source.scale]


def _windows(plan: LayerPlan, window: int) -> list[list[Piece]]:
    """The plan's buffered pieces, in its order, in groups of about `window` stored bytes (a piece larger than that
    is a group alone)."""
    out: list[list[Piece]] = []
    size = 0
    for p in plan.pieces:
        if p.direct:
            continue
        n = sum(m.nbytes for m in _stored(p))
        if out and size + n <= window:
            out[-1].append(p)
            size += n
        else:
            out.append([p])
            size = n
    return out


def _streamed(plan: LayerPlan, stores: dict | None) -> dict:
    """The plan's streamed parameters -> the store that keeps them."""
    out = {}
    for name in plan.streams:
        module, _, _ = name.rpartition(".")
        if stores is None or module not in stores:
            raise ValueError(f"the plan streams {name} but no store was given for {module}")
        out[name] = stores[module]
    return out


def dest_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (what a raw copy or read fills)."""
    return t.reshape(-1).view(torch.uint8)


def _copy_plain(p: Piece, raw: torch.Tensor, offsets: dict[str, int], params: dict[str, torch.Tensor],
                device: torch.device) -> None:
    m = p.source.meta
    dest = p.dest(params)
    if dest.numel() == 0:
        return
    b = raw[offsets[m.name]:offsets[m.name] + m.nbytes]
    if m.dtype == dest.dtype:
        dest_bytes(dest).copy_(b, non_blocking=True)
    else:
        dest.copy_(_typed(b, m.dtype, m.shape, device))


def _typed(b: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Raw bytes as a `dtype` tensor of `shape` on `device` (copied where they are elsewhere or misaligned)."""
    if b.device != device:
        b = b.to(device, non_blocking=True)
    elif b.storage_offset() % dtype.itemsize:
        b = b.clone()
    return b.view(dtype).view(shape)


def _extends(run: list[Piece], p: Piece, device: torch.device) -> bool:
    """Whether `p` decodes in one batch with `run`: the next expert of the same role, within the staging budget."""
    last = run[-1]
    if p.expert is None or last.expert is None or p.batch_key() != last.batch_key() or p.expert != last.expert + 1:
        return False
    elems = 1
    for d in p.source.value_shape:
        elems *= d
    budget = STAGING_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return (len(run) + 1) * elems * DECODE_COST[p.source.encoding] <= budget


def stage(metas, raw: torch.Tensor, offsets: dict[str, int], device: torch.device) -> torch.Tensor:
    """The stored bytes of `metas` (equal sizes) stacked into one new [n, nbytes] uint8 tensor on `device`."""
    nbytes = metas[0].nbytes
    out = torch.empty((len(metas), nbytes), dtype=torch.uint8, device=device)
    for k, m in enumerate(metas):
        out[k].copy_(raw[offsets[m.name]:offsets[m.name] + nbytes], non_blocking=True)
    return out


def _run_dest(run: list[Piece], params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parameter slices a run fills, with a leading dimension of one entry per piece."""
    first = run[0]
    if first.expert is None:
        return first.dest(params).unsqueeze(0)
    t = params[first.param][first.expert:first.expert + len(run)]
    return t if first.rows is None else t[:, first.rows[0]:first.rows[1]]


def _decode_run(run: list[Piece], raw: torch.Tensor, offsets: dict[str, int], params: dict[str, torch.Tensor],
                device: torch.device, where: Callable[[Piece], str]) -> None:
    src = run[0].source
    if src.encoding is Encoding.FP8_BLOCK and _fp8_to_bf16_on_host(run, raw, offsets, params, device, where):
        return
    n = len(run)
    codes = stage([p.source.meta for p in run], raw, offsets, device).view(n, *src.meta.shape)
    scale = stage([p.source.scale for p in run], raw, offsets, device).view(src.scale.dtype)
    scale = scale.view(n, *src.scale.shape)
    if src.encoding is Encoding.FP8_BLOCK:
        vals = fp8_block_values(codes, scale, src.meta.dtype_name, where(run[0]))
    else:
        vals = mxfp4_values(codes, scale, where(run[0]))
    _run_dest(run, params).copy_(vals)


def _fp8_to_bf16_on_host(run: list[Piece], raw: torch.Tensor, offsets: dict[str, int],
                         params: dict[str, torch.Tensor], device: torch.device, where: Callable[[Piece], str]) -> bool:
    """On a CPU, into BF16 parameters, with the C kernels built: each piece dequantized by the fused C kernel
    (engine.formats.cpu_kernels.fp8_dequant_bf16, on the kernel threads) from its bytes in `raw` straight into its
    parameter slice, with no staging and no float32 copy: the float32 product of fp8_block_values rounded to
    BF16 to nearest even, as the cast of that product gives (a NaN code gives a NaN either way, with other bits:
    the amax check then refuses the layer, as on a GPU). False where this does not apply."""
    dest = _run_dest(run, params)
    if device.type != "cpu" or dest.dtype != torch.bfloat16 or host_kernels() is None:
        return False
    if not all(d.is_contiguous() and d.numel() and tuple(d.shape) == tuple(p.source.meta.shape)
               for p, d in zip(run, dest, strict=True)):
        return False  # the kernel writes each piece's o × i values through a pointer: only into a slice just so
    _check_e4m3(run[0].source.meta.dtype_name, where(run[0]))
    for p, d in zip(run, dest, strict=True):
        m, sm = p.source.meta, p.source.scale
        codes = raw[offsets[m.name]:offsets[m.name] + m.nbytes].numpy().reshape(m.shape)
        s = scale_to_fp32(_typed(raw[offsets[sm.name]:offsets[sm.name] + sm.nbytes], sm.dtype, sm.shape, device))
        bo, bi = infer_block(tuple(m.shape), tuple(sm.shape))
        cpu_kernels.fp8_dequant_bf16(codes, s.contiguous().numpy(), bo, bi, E4M3_LUT,
                                     d.view(torch.int16).numpy().view(np.uint16))
    return True


def host_kernels():
    """The C kernels where they build, else None (QUANTDECK_KERNELS=numba, or no compiler): torch decodes."""
    try:
        return build.library()
    except build.BuildError:  # QUANTDECK_KERNELS=c where none builds: the conversion refuses; torch decodes here
        return None


def _check_e4m3(dtype_name: str, at: str) -> None:
    if dtype_name != "F8_E4M3":
        raise CheckpointError(f"FP8 block weights must be float8_e4m3fn, {at} is {dtype_name}", at=at,
                              hint="re-convert the checkpoint to DeepSeek's E4M3 block format")


def fp8_block_values(codes: torch.Tensor, scale: torch.Tensor, dtype_name: str, at: str) -> torch.Tensor:
    """float32 values of n stacked FP8-block tensors: codes uint8 [n, o, i], scales [n, go, gi] as stored.

    The float32 product fp32(code) × fp32(scale) of dequant_fp8_block, tile by tile."""
    _check_e4m3(dtype_name, at)
    n, o, i = codes.shape
    bo, bi = infer_block((o, i), tuple(scale.shape[1:]))
    s = scale_to_fp32(scale)
    x = codes.view(torch.float8_e4m3fn).to(torch.float32)
    go, gi = s.shape[1:]
    if o % bo == 0 and i % bi == 0:
        x.view(n, go, bo, gi, bi).mul_(s.view(n, go, 1, gi, 1))
    else:
        x.mul_(s.repeat_interleave(bo, dim=1)[:, :o].repeat_interleave(bi, dim=2)[:, :, :i])
    return x


def mxfp4_values(packed: torch.Tensor, scale: torch.Tensor, at: str) -> torch.Tensor:
    """float32 values of n stacked MXFP4 tensors: packed uint8 [n, o, i/2], E8M0 scales [n, o, ceil(i/32)].

    The maths of dequant_mxfp4: e2m1(code) × 2^k, as torch.ldexp."""
    n, o, c = packed.shape
    i = 2 * c
    if tuple(scale.shape) != (n, o, -(-i // MX_BLOCK)):
        raise CheckpointError(f"MXFP4 scale {tuple(scale.shape[1:])} does not fit packed weight {(o, c)} at {at}",
                              at=at, hint="expected packed [o, i/2] and scale [o, ceil(i/32)]")
    k = mxfp4_exponents(scale)
    vals = decode_packed(packed)
    return torch.ldexp(vals, k.repeat_interleave(MX_BLOCK, dim=-1)[..., :i])
