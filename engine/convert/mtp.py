"""inject-mtp: give each MTP layer the shared embedding and LM head it lacks.

DeepSeek's MTP layer k (V3: `model.layers.{N+k}`, V4: `mtp.{k}`) uses the main model's embedding and head;
releases store copies of them inside the layer (`embed_tokens` / `shared_head.head`, V4 `embed` / `head`),
and exporters that only see the main model drop them. `inject_mtp(src, dst)` writes `dst` = `src` plus the
missing copies (and, with `mtp_from`, the MTP layer's other tensors from the original checkpoint,
dequantized to BF16 where they were FP8), streaming tensor by tensor through the resumable writer.
Every other tensor is a byte copy (HostArray, no torch): torch is imported only to dequantize, so the
inject-mtp stage's worker starts fast when there is nothing to dequantize.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.checkpoint.host import HostArray
from engine.checkpoint.paths import refuse_overlap
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.safetensors_format import TensorSpec
from engine.checkpoint.shard_plan import plan_shards
from engine.checkpoint.writer import CheckpointWriter
from engine.convert.extras import copy_extras
from engine.core.errors import CheckpointError
from engine.core.events import EventSink, NullSink, Progress
from engine.core.fsutil import atomic_write_json

if TYPE_CHECKING:
    import torch

_V4_MTP = re.compile(r"^(?:model\.)?mtp\.\d+\.")
_V3_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def mtp_prefixes(config: dict[str, Any], names: list[str]) -> list[str]:
    """Name prefixes of the MTP layers, e.g. ['model.layers.61.'] (V3) or ['mtp.0.'] (V4)."""
    n_layers = int(config.get("num_hidden_layers") or 0)
    n_mtp = int(config.get("num_nextn_predict_layers") or 0)
    v4 = any(".ffn." in n or n.startswith(("mtp.", "model.mtp.")) for n in names) or \
        str(config.get("model_type", "")) == "deepseek_v4"
    if v4:  # the MTP layers where they are (transformers' names keep them at the top, beside model.layers)
        found = sorted({m.group(0) for n in names if (m := _V4_MTP.match(n))})
        pre = "model." if any(n.startswith("model.layers.") for n in names) else ""
        return found or [f"{pre}mtp.{k}." for k in range(n_mtp)]
    return [f"model.layers.{n_layers + k}." for k in range(n_mtp)]


def shared_sources(prefix: str, names: set[str]) -> dict[str, str]:
    """MTP tensor name → the main-model tensor it copies, for this layer prefix."""
    if prefix.startswith(("mtp.", "model.mtp.")):
        top = "model." if prefix.startswith("model.") else ""
        embeds = (top + "embed.weight", top + "embed_tokens.weight", "model.embed_tokens.weight", "embed.weight")
        heads = (top + "head.weight", "lm_head.weight", "head.weight", "model.head.weight")
        return {prefix + "embed.weight": next((c for c in embeds if c in names), top + "embed.weight"),
                prefix + "head.weight": next((c for c in heads if c in names), top + "head.weight")}
    return {prefix + k: v for k, v in _V3_SHARED.items()}


def _scale_of(reader: CheckpointReader, name: str) -> str | None:
    """The block-scale companion of an FP8 or MXFP4 weight, or None for a plain tensor."""
    if not name.endswith(".weight") or reader.meta(name).dtype_name not in ("F8_E4M3", "U8", "I8"):
        return None
    base = name[: -len(".weight")]
    return next((sc for sc in (base + ".weight_scale_inv", base + ".scale") if sc in reader), None)


def _bf16_shape(reader: CheckpointReader, name: str) -> tuple[int, ...]:
    m = reader.meta(name)
    return (m.shape[0], m.shape[1] * 2) if m.dtype_name in ("U8", "I8") else m.shape


def _to_bf16(reader: CheckpointReader, name: str) -> HostArray | torch.Tensor:
    """The tensor as stored (a byte copy) or, with a block scale, dequantized to BF16 (imports torch)."""
    sc = _scale_of(reader, name)
    if sc is None:
        return reader.get_host(name)
    import torch

    from engine.formats.fp8_block.helpers import dequant_fp8_block, infer_block
    from engine.formats.mxfp4.helpers import dequant_mxfp4

    t, s = reader.get(name), reader.get(sc)
    if t.dtype == torch.float8_e4m3fn:
        return dequant_fp8_block(t, s, infer_block(tuple(t.shape), tuple(s.shape))).to(torch.bfloat16)
    return dequant_mxfp4(t, s).to(torch.bfloat16)


def inject_mtp(src: str | os.PathLike, dst: str | os.PathLike, *, mtp_from: str | os.PathLike | None = None,
               sink: EventSink = NullSink()) -> dict[str, Any]:
    """Write `dst` = `src` + the MTP tensors it lacks; returns {"injected": [...], "dst": ...}."""
    src, dst = Path(src), Path(dst)
    refuse_overlap(src, dst, src_name="SRC", dst_name="DST")  # inject-mtp writes a new checkpoint
    reader = CheckpointReader(src)
    names = set(reader.names())
    origin = CheckpointReader(mtp_from) if mtp_from else None
    prefixes = mtp_prefixes(reader.config, sorted(names | (set(origin.names()) if origin else set())))
    if not prefixes:
        raise CheckpointError(f"{src} has no MTP layer (num_nextn_predict_layers is 0 or missing)",
                              at=str(src / "config.json"), hint="nothing to inject")
    extra: dict[str, tuple[str, str]] = {}  # new name -> (where from: "self"|"origin", source name)
    if origin is not None:
        for n in origin.names():
            if n.startswith(tuple(prefixes)) and n not in names and not n.endswith((".weight_scale_inv", ".scale")):
                extra[n] = ("origin", n)
    for p in prefixes:
        for new, shared in shared_sources(p, names).items():
            if new in names or new in extra:
                continue
            if shared not in names:
                raise CheckpointError(f"cannot inject {new}: {shared} is not in {src}", at=f"{src}:{shared}",
                                      hint="the source lacks the shared embedding/head")
            extra[new] = ("self", shared)

    def spec(n: str) -> TensorSpec:
        where, s = extra.get(n, ("self", n))
        if where == "origin":  # MTP layer taken from the original: FP8 weights become BF16
            if _scale_of(origin, s):
                return TensorSpec(n, "BF16", _bf16_shape(origin, s))
            m = origin.meta(s)
            return TensorSpec(n, m.dtype_name, m.shape)
        m = reader.meta(s)
        return TensorSpec(n, m.dtype_name, m.shape)

    units = [[spec(n) for n in reader.names_in(sh)] for sh in reader.shards()]
    if extra:
        units.append([spec(n) for n in sorted(extra)])
    plans = plan_shards(units, shard_size=1)  # one output shard per source shard, plus one for the MTP copies
    writer = CheckpointWriter(dst, plans, source_fingerprint=reader.fingerprint(),
                              args={"op": "inject-mtp", "mtp_from": origin.fingerprint() if origin else None},
                              sink=sink)
    todo = writer.prepare()
    progress = Progress(sink, "tensors", total=sum(len(p.tensors) for p in todo))
    for plan in todo:
        sf = writer.open_shard(plan)
        for t in plan.tensors:
            where, s = extra.get(t.name, ("self", t.name))
            sf.write(t.name, _to_bf16(origin, s) if where == "origin" else reader.get_host(s))
            progress.advance(1, label=t.name)
        sf.close()
    if not writer.already_complete:
        copy_extras(src, writer.partial_dir, sink=sink)
        if (src / "hf_quant_config.json").exists():
            import shutil

            shutil.copy2(src / "hf_quant_config.json", writer.partial_dir / "hf_quant_config.json")
        if origin is not None and extra:
            _exclude_mtp(writer.partial_dir, reader.config, prefixes)
    writer.finalize()
    sink.emit("log", level="info", msg=f"injected {len(extra)} MTP tensor(s) into {dst}")
    return {"src": str(src), "dst": str(dst), "injected": sorted(extra), "mtp_layers": prefixes}


def _exclude_mtp(out: Path, config: dict[str, Any], prefixes: list[str]) -> None:
    """Add the injected MTP layers (kept BF16) to the quantization exclude / ignore lists."""
    import json

    pats = [p + "*" for p in prefixes]
    cfg = dict(config)
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        for key in ("ignore", "exclude_modules"):
            if isinstance(qc.get(key), list):
                plain = key == "exclude_modules" or qc.get("quant_method") == "modelopt"
                new = pats if plain else ["re:^" + p.replace(".", r"\.") for p in prefixes]
                qc[key] = sorted(set(qc[key]) | set(new))
        atomic_write_json(out / "config.json", cfg)
    hq = out / "hf_quant_config.json"
    if hq.exists():
        obj = json.loads(hq.read_text())
        q = obj.get("quantization", {})
        q["exclude_modules"] = sorted(set(q.get("exclude_modules", [])) | set(pats))
        atomic_write_json(hq, obj)
