"""An output checkpoint's decoder layers decoded from their stored bytes, read the way vLLM reads them.

Every stored GEMM weight is one of: NVFP4 (either layout, engine.formats.nvfp4.names), FP8 block-128 (`weight` +
`weight_scale_inv`) or plain (BF16, kept). `OutputModel.read(i)` (a prefetch thread) reads layer i's stored
tensors as they lie; `OutputModel.build(raw)` uploads them and decodes them on the device into the parameters of
transformers' own decoder layer, in float32 then cast to the parameter's dtype, and says how each GEMM's input is
quantized (engine.eval.actquant).

The scales of GEMMs that a serving engine fuses are reduced as vLLM reduces them: engine.eval.fused_scales.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from engine.calibrate.layer_plan import coalesce, final_dtype
from engine.calibrate.layer_reader import DeviceRing, read_ranges
from engine.checkpoint.reader import CheckpointReader
from engine.core.errors import CheckpointError, about
from engine.eval.actquant import ActQuant, ExpertsActQuant
from engine.eval.fused_scales import InputScale, experts_quant, input_scale, merged_scales, multipliers, weight_scale_2
from engine.formats.fp8_block.helpers import dequant_fp8_block
from engine.formats.grid import NVFP4_BLOCK, infer_block
from engine.formats.nvfp4.helpers import blocks_times
from engine.formats.nvfp4.names import StoredNames, find_nvfp4, nvfp4_base
from engine.formats.nvfp4.stored import as_multiplier

FP8_STORED = ("F8_E4M3",)
_FUSED = re.compile(r"^(.*experts)\.(gate_up_proj|down_proj)$")
READ_THREADS = 6
DECODE_CHUNK = 1 << 22  # decoded float32 elements per batched expert decode: small ones stay in cache on a host
# and bound the transient memory on a GPU (larger batches measured slower on the host)


@dataclass(frozen=True)
class Stored:
    """One stored GEMM weight (or a plain tensor) of the output, under its decoded name `<module>.weight`."""

    kind: str  # "nvfp4", "fp8" or "plain"
    name: str  # the decoded tensor's name
    tensors: tuple[str, ...]  # the stored tensors it is read from
    nvfp4: StoredNames | None = None
    scale: str | None = None  # fp8: its weight_scale_inv


@dataclass
class RawOutputLayer:
    index: int
    buf: torch.Tensor  # the layer's stored bytes (host or device), runs of adjacent tensors read as one
    bytes_read: int = 0
    ready: "torch.cuda.Event | None" = None  # a device buffer's uploads done (DeviceRing)
    views: dict[str, tuple[int, int]] = field(default_factory=dict)  # stored name -> (offset, bytes) in `buf`
    metas: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)  # stored dtype, shape


@dataclass
class BuiltLayer:
    params: dict[str, torch.Tensor]
    linears: dict[str, ActQuant] = field(default_factory=dict)  # module (relative) -> its input's quantization
    experts: dict[str, ExpertsActQuant] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    encodings: dict[str, int] = field(default_factory=dict)  # kind -> GEMM weights decoded


class OutputModel:
    """The output checkpoint `path`, read layer by layer (see the module docstring)."""

    def __init__(self, path, family, hf_config, dtype: torch.dtype, device: torch.device, keep_fp32: list[str]):
        self.reader = CheckpointReader(path)
        self.family, self.hf_config, self.dtype, self.device = family, hf_config, dtype, device
        self.keep_fp32 = keep_fp32
        self.stored = index_stored(self.reader)
        self.names = set(self.stored)  # decoded names: what source_map sees
        self.bytes_read = 0
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="eval-out-read")
        self._ring: DeviceRing | None = None

    @property
    def config(self) -> dict:
        return self.reader.config

    def layer_stored(self, i: int) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
        return self.family.source_map(i, self.names)

    # -- reading (prefetch thread) --------------------------------------------------------------------
    def read(self, i: int) -> RawOutputLayer:
        """Layer i's stored tensors in one fresh buffer, laid out and read as the calibration's layer reader does
        (engine.calibrate.layer_plan.coalesce: file order, large positioned reads over a few threads; thousands of
        expert tensors cost a few reads, not one each). On a GPU the buffer is on the device, filled through the
        reader's page-locked ring (engine.calibrate.layer_reader.DeviceRing) as the reads land; on the host `build`
        uploads it in one copy."""
        plain, experts = self.layer_stored(i)
        wanted = [t for n in list(plain.values()) + list(experts.values()) for t in self.stored[n].tensors]
        metas = [self.reader.meta(t) for t in set(wanted)]
        ranges, where, size = coalesce(metas)
        ready = None
        if self.device.type == "cuda":
            if self._ring is None:
                self._ring = DeviceRing(self.device, self._pool)
            buf, got, ready = self._ring.read(self.reader, ranges, size)
        else:
            buf = torch.empty(size, dtype=torch.uint8)
            got = read_ranges(self.reader, self._pool, ranges, buf)
        raw = RawOutputLayer(i, buf, bytes_read=got, ready=ready)
        for m in metas:
            raw.views[m.name] = (where[m.name], m.nbytes)
            raw.metas[m.name] = (m.dtype, tuple(m.shape))
        self.bytes_read += raw.bytes_read
        return raw

    def get(self, name: str) -> torch.Tensor:
        """One decoded tensor (the embedding, the final norm, the head), float32 for GEMM weights."""
        s = self.stored[name]
        tensors = {t: self.reader.get(t) for t in s.tensors}
        return self._decode(s, tensors, None)

    # -- building (main thread) -----------------------------------------------------------------------
    def build(self, raw: RawOutputLayer) -> BuiltLayer:
        i = raw.index
        plain, experts = self.layer_stored(i)
        with torch.device("meta"):
            shapes = {k: (tuple(v.shape), v.dtype) for k, v in
                      self.family.layer_class()(self.hf_config, i).state_dict().items()}
        dev = self._upload(raw)
        out = BuiltLayer({})
        prefix = self.family.layer_prefix(i)
        merged = merged_scales(plain, self.stored, dev, self.device, prefix, out.warnings)
        for pname, (shape, dt) in shapes.items():
            want = final_dtype(pname, dt, self.dtype, self.keep_fp32)
            if pname in plain:
                s = self.stored[plain[pname]]
                mod = pname[: -len(".weight")] if pname.endswith(".weight") else None
                s2, inp = merged.get(mod, (None, None))
                with about(s.name):
                    t = self._decode(s, dev, s2)
                out.params[pname] = self._fit(t, shape, want, prefix + pname, s)
                if s.kind != "plain":
                    out.encodings[s.kind] = out.encodings.get(s.kind, 0) + 1
                    q = self._act_quant(s, dev, inp)
                    if q is not None and mod is not None:
                        out.linears[mod] = q
                continue
            m = _FUSED.match(pname)
            if not (m and experts):
                raise CheckpointError(f"tensor for {prefix + pname} not found in the output", at=prefix + pname,
                                      hint="is this a checkpoint of the model --against names?")
            out.params[pname] = self._experts(i, pname, m.group(2), shape, want, experts, dev, out)
        return out

    def _upload(self, raw: RawOutputLayer) -> dict[str, torch.Tensor]:
        """The layer's stored tensors on the device, each a view of the layer's buffer (uploaded in one copy when it
        was read on the host); one not aligned for its dtype is a copy of its own."""
        if raw.ready is not None:  # read through the ring: its uploads (copy stream) come before any use here
            torch.cuda.current_stream(self.device).wait_event(raw.ready)
            raw.buf.record_stream(torch.cuda.current_stream(self.device))
        whole = raw.buf.to(self.device, non_blocking=True)
        dev = {}
        for k, (o, n) in raw.views.items():
            dtype, shape = raw.metas[k]
            if not n:
                dev[k] = torch.empty(shape, dtype=dtype, device=self.device)
                continue
            t = whole[o:o + n]
            dev[k] = (t.clone() if o % dtype.itemsize else t).view(dtype).reshape(shape)
        return dev

    def _fit(self, t: torch.Tensor, shape: tuple, want: torch.dtype, full: str, s: Stored) -> torch.Tensor:
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{full}: the output's {s.name} decodes to shape {tuple(t.shape)}, the model "
                                  f"wants {tuple(shape)}", at=f"{self.reader.dir}:{s.tensors[0]}",
                                  hint="is this a checkpoint of the model --against names?")
        r = t.to(want)
        # a plain tensor as stored is a view of the uploaded layer buffer: a copy of its own frees the buffer
        return r.clone() if r is t and s.kind == "plain" else r

    def _experts(self, i, pname, which, shape, want, experts, dev, out: BuiltLayer) -> torch.Tensor:
        fast = self._experts_nvfp4(i, pname, which, shape, want, experts, dev, out)
        if fast is not None:
            return fast
        n = shape[0]
        prefix = self.family.layer_prefix(i)
        param = torch.empty(shape, dtype=want, device=self.device)
        roles = ("down",) if which == "down_proj" else ("gate", "up")
        inputs: list[torch.Tensor] = []
        kinds = set()
        for e in range(n):
            stored = []
            for role in roles:
                name = experts.get((e, role))
                if name is None:
                    raise CheckpointError(f"layer {i}: expert {e}'s {role} weight is missing from the output",
                                          at=prefix + pname, hint="is the output complete?")
                stored.append(self.stored[name])
            s2 = None
            if roles == ("gate", "up") and stored[0].kind == "nvfp4":
                g, u = (weight_scale_2(s, dev, self.device) for s in stored)
                s2 = g  # vLLM: w13_weight_scale_2[:, 0], w1's global scale for both
                if float(g) != float(u):
                    out.warnings.append(f"{stored[1].nvfp4.base}: its global scale differs from w1's "
                                        f"({float(u):.6g} vs {float(g):.6g}); read with w1's, as vLLM does")
            rows = [self._decode(s, dev, s2) for s in stored]
            value = torch.cat(rows, 0) if len(rows) > 1 else rows[0]
            if tuple(value.shape) != tuple(shape[1:]):
                raise CheckpointError(f"{prefix}{pname}[{e}]: the output's {stored[0].name} decodes to shape "
                                      f"{tuple(value.shape)}, the model wants {tuple(shape[1:])}",
                                      at=f"{self.reader.dir}:{stored[0].tensors[0]}",
                                      hint="is this a checkpoint of the model --against names?")
            param[e].copy_(value)
            for s in stored:
                kinds.add(s.kind)
                if s.kind != "plain":
                    out.encodings[s.kind] = out.encodings.get(s.kind, 0) + 1
                if s.kind == "nvfp4" and s.nvfp4.input_scale:
                    inputs.append(input_scale(s, dev, self.device))
        mod = pname.rsplit(".", 1)[0]
        q = experts_quant(kinds, inputs)
        if q is not None:
            cur = out.experts.get(mod, ExpertsActQuant())
            out.experts[mod] = (ExpertsActQuant(q, cur.w2) if which == "gate_up_proj" else ExpertsActQuant(cur.w13, q))
        return param

    def _experts_nvfp4(self, i, pname, which, shape, want, experts, dev, out: BuiltLayer) -> torch.Tensor | None:
        """The routed experts' fused parameter where every expert's weights are NVFP4 of one layout and one shape:
        every scale checked and reduced at once (one host sync per call, not several per expert) and the weights
        decoded a few experts at a time, with the same float32 ops as `_decode` (so the same bits). None where
        the experts are not all alike (the expert-by-expert path then decodes them and says what is wrong)."""
        n = shape[0]
        roles = ("down",) if which == "down_proj" else ("gate", "up")
        names = [experts.get((e, role)) for role in roles for e in range(n)]
        if None in names:
            return None
        stored = [[self.stored[experts[(e, role)]] for e in range(n)] for role in roles]
        first = stored[0][0]
        if first.kind != "nvfp4":
            return None
        rec = first.nvfp4.names.reciprocal
        geo = []
        for col in stored:
            p0, b0 = dev[col[0].nvfp4.packed], dev[col[0].nvfp4.block_scale]
            geo.append((tuple(p0.shape), tuple(b0.shape)))
            for s in col:
                nv = s.nvfp4
                if (s.kind != "nvfp4" or nv.names.reciprocal != rec or dev[nv.packed].shape != p0.shape
                        or dev[nv.packed].dtype != p0.dtype or dev[nv.block_scale].shape != b0.shape
                        or dev[nv.block_scale].dtype != torch.float8_e4m3fn or dev[nv.global_scale].numel() != 1
                        or (nv.input_scale and dev[nv.input_scale].numel() != 1)):
                    return None
        if any(len(p0) != 2 or b0 != (p0[0], p0[1] * 2 // NVFP4_BLOCK) or p0[1] * 2 != shape[2] for p0, b0 in geo):
            return None
        rows = [p0[0] for p0, _ in geo]
        if sum(rows) != shape[1]:
            return None
        # every scale as a multiplier (as_multiplier's rule, applied to all at once; a bad one raises its error)
        s2 = [multipliers([s.nvfp4.global_scale for s in col], dev, rec, self.device) for col in stored]
        ins = [s for col in stored for s in col if s.nvfp4.input_scale]
        inputs = multipliers([s.nvfp4.input_scale for s in ins], dev, False, self.device) if ins else None
        if roles == ("gate", "up"):
            g, u = s2
            s2 = [g, g]  # vLLM: w13_weight_scale_2[:, 0], w1's global scale for both
            gl, ul = torch.stack((g, u)).tolist()  # the one host sync
            for e in range(n):
                if gl[e] != ul[e]:
                    out.warnings.append(f"{stored[1][e].nvfp4.base}: its global scale differs from w1's "
                                        f"({ul[e]:.6g} vs {gl[e]:.6g}); read with w1's, as vLLM does")
        param = torch.empty(shape, dtype=want, device=self.device)
        per = max(1, DECODE_CHUNK // (shape[1] * shape[2]))
        top = 0
        for col, sc, r in zip(stored, s2, rows, strict=True):
            for a in range(0, n, per):
                b = min(n, a + per)
                packed = torch.stack([dev[s.nvfp4.packed].view(torch.uint8) for s in col[a:b]]) if b - a > 1 \
                    else dev[col[a].nvfp4.packed].view(torch.uint8).unsqueeze(0)
                bs = torch.stack([dev[s.nvfp4.block_scale] for s in col[a:b]]) if b - a > 1 \
                    else dev[col[a].nvfp4.block_scale].unsqueeze(0)
                param[a:b, top:top + r].copy_(_decode_nvfp4(packed, bs, sc[a:b].to(packed.device)))
            top += r
        out.encodings["nvfp4"] = out.encodings.get("nvfp4", 0) + n * len(roles)
        mod = pname.rsplit(".", 1)[0]
        q = experts_quant({"nvfp4"}, [InputScale(v, rec) for v in inputs.unbind()] if inputs is not None else [])
        if q is not None:
            cur = out.experts.get(mod, ExpertsActQuant())
            out.experts[mod] = (ExpertsActQuant(q, cur.w2) if which == "gate_up_proj" else ExpertsActQuant(cur.w13, q))
        return param

    def _act_quant(self, s: Stored, dev, merged_input: "InputScale | None") -> ActQuant | None:
        if s.kind == "fp8":
            return ActQuant("fp8-group")
        if s.kind == "nvfp4" and s.nvfp4.input_scale:
            inp = merged_input if merged_input is not None else input_scale(s, dev, self.device)
            return ActQuant("nvfp4", inp.global_scale, inp.multiplier)
        return None

    def _decode(self, s: Stored, tensors: dict[str, torch.Tensor], scale_2: torch.Tensor | None) -> torch.Tensor:
        """float32 values of a stored GEMM weight (`scale_2` overrides its global scale); a plain tensor as is."""
        if s.kind == "plain":
            return tensors[s.tensors[0]]
        if s.kind == "fp8":
            w, sc = tensors[s.tensors[0]], tensors[s.scale]
            return dequant_fp8_block(w, sc, infer_block(tuple(w.shape), tuple(sc.shape)))
        n = s.nvfp4
        packed, bs = tensors[n.packed].view(torch.uint8), tensors[n.block_scale]
        if bs.dtype != torch.float8_e4m3fn or packed.dim() != 2 or tuple(bs.shape) != (
                packed.shape[0], packed.shape[1] * 2 // NVFP4_BLOCK):
            raise CheckpointError(f"{n.block_scale} is {bs.dtype} {list(bs.shape)}, which does not fit "
                                  f"{n.packed} {list(packed.shape)}", at=f"{self.reader.dir}:{n.block_scale}",
                                  hint="the output is damaged; re-export it")
        s2 = scale_2 if scale_2 is not None else as_multiplier(n.global_scale, tensors[n.global_scale],
                                                               n.names.reciprocal)
        return _decode_nvfp4(packed, bs, s2.to(packed.device))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        close = getattr(self.reader, "close", None)
        if close:
            close()


def _decode_nvfp4(packed: torch.Tensor, bs: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """float32 values of NVFP4 codes `packed` [..., r, c/2] with block scales `bs` [..., r, c/16] and global scale
    `s2` (0-d, or one per leading index: several experts decoded at once, each with its own)."""
    s2 = s2.reshape(s2.shape + (1,) * (bs.dim() - s2.dim()))
    return blocks_times(packed, bs.to(torch.float32) * s2)


def index_stored(reader: CheckpointReader) -> dict[str, Stored]:
    """Decoded name -> how it is stored, for every tensor of the checkpoint (scale companions folded in)."""
    names = set(reader.names())
    out: dict[str, Stored] = {}
    used: set[str] = set()
    for n in sorted(names):
        base = nvfp4_base(n)
        found = find_nvfp4(base, names) if base else None
        if found is not None and n == found.packed:
            out[f"{base}.weight"] = Stored("nvfp4", f"{base}.weight", found.all, nvfp4=found)
            used.update(found.all)
    for n in sorted(names - used):
        if n.endswith(".weight") and reader.meta(n).dtype_name in FP8_STORED:
            scale = n[: -len("weight")] + "weight_scale_inv"
            if scale not in names:
                raise CheckpointError(f"FP8 tensor {n} has no {scale}", at=n,
                                      hint="the output is incomplete; re-convert it")
            out[n] = Stored("fp8", n, (n, scale), scale=scale)
            used.update((n, scale))
    for n in sorted(names - used):
        if n.endswith(".weight_scale_inv") and n[: -len("_scale_inv")] in used:
            continue
        out.setdefault(n, Stored("plain", n, (n,)))
    return out
