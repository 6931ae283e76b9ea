"""`evaluate()`: the source and the output run side by side through the whole model, one decoder layer of each on
the device at a time.

The source's layers come from the calibration's layer reader (engine.calibrate.layer_reader: stored bytes read
once, FP8 / MXFP4 decoded on the device); the output's are decoded from their stored bytes by engine.eval.decode,
with each quantized GEMM's input fake-quantized as served (engine.eval.actquant). Both are transformers' own decoder
layer, fed as the whole model feeds it (engine.calibrate.family). Per layer i, for every batch:

    h_src[i] = src_i(h_src[i-1])      h_out[i] = out_i(h_out[i-1])      own[i] = out_i(h_src[i-1])

`rel_err` is ||h_out − h_src|| / ||h_src|| (what the output has become by then), `own_err` the same for `own`
(what layer i alone adds, fed the source's inputs): the layer with the largest `own_err` is the worst. The
embedding, the final norm and the head are loaded alone. Activations live on the host between layers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from engine.calibrate.batches import plan_batches
from engine.calibrate.dist import resolve_device
from engine.calibrate.family import LayerFamily
from engine.calibrate.fastexperts import one_sync_experts
from engine.calibrate.layer import TensorSource, compute_dtype, keep_fp32, materialize_layer
from engine.calibrate.layer_reader import LayerReader
from engine.calibrate.samples import load_samples, read_samples_file
from engine.calibrate.streaming import HEARTBEAT_S, mtp_layers
from engine.checkpoint.consistency import refuse_other_model
from engine.core.errors import CheckpointError
from engine.core.events import SCOPE_ALL, EventSink, NullSink, Progress
from engine.core.gcpause import imports_without_gc
from engine.eval import actquant, resume
from engine.eval.decode import OutputModel
from engine.eval.metrics import HiddenError, TokenMetrics
from engine.eval.report import verdict

DEFAULT_NUM_SAMPLES = 64
HEAD_NAMES = {"norm": ("model.norm.weight", "norm.weight"), "head": ("lm_head.weight", "head.weight")}


def evaluate(output: str | os.PathLike, against: str | os.PathLike, samples: str | os.PathLike,
             num_samples: int | None = None, seq_len: int = 2048, batch_size: int = 1, device: str = "auto",
             max_kld_mean: float = 0.1, min_top1: float = 0.9, sink: EventSink = NullSink(),
             state_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Compare `output` with its source `against` on `samples` (see the module docstring); the report, verdict
    included. `num_samples` None: the first DEFAULT_NUM_SAMPLES, or every sample of a shorter file. With
    `state_dir`, the state after every layer is kept there and a killed run resumes at the layer it was on
    (engine.eval.resume).

    Raises SamplesError (a bad samples file), CheckpointError (a missing shard, another model, an unreadable
    tensor); a failed gate is the report's verdict, not an exception."""
    t0 = time.monotonic()
    raw = read_samples_file(samples, num_samples)  # a bad file fails before any model is touched
    n = num_samples if num_samples is not None else min(len(raw.items), DEFAULT_NUM_SAMPLES)
    refuse_other_model(output, against)
    src = TensorSource(against, dtype=torch.bfloat16)
    dtype = compute_dtype(src.config)
    src.dtype = dtype
    family = LayerFamily.for_config(src.config)
    with imports_without_gc():  # transformers' modeling import (engine.core.gcpause)
        hf_config = family.hf_config(src.config)
        hf_config._attn_implementation = family.attn_implementation()
    hf_config._experts_implementation = "eager"
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    out = OutputModel(output, family, hf_config, dtype, dev, keep_fp32(family, dtype))
    _refuse_other_layers(out, src, family)
    n_layers = family.num_layers(hf_config)
    mtp = mtp_layers(src.config, src.names)
    heads = {k: _head_name(src.names, k, against) for k in HEAD_NAMES}
    for k in HEAD_NAMES:
        _head_name(out.names, k, output)
    loaded = load_samples(samples, n, tokenizer=against, seq_len=seq_len)
    pad_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    batches = plan_batches(loaded.input_ids, batch_size, 1, 0, pad_id)
    sink.emit("log", level="info", msg=f"eval: {len(loaded.input_ids)} samples, {loaded.tokens} tokens, "
              f"{n_layers} layers on {dev}" + (f"; MTP layer(s) {', '.join(mtp)} skipped" if mtp else ""))
    key = resume.state_key(output=str(output), against=str(against), samples=loaded.sha256, n=len(loaded.input_ids),
                           seq_len=seq_len, batch_size=batch_size, dtype=str(dtype), layers=n_layers,
                           files=[resume.files_stamp(output), resume.files_stamp(against)]) if state_dir else ""
    st = resume.load(state_dir, key)
    start = st.next_layer if st is not None else 0
    if start:
        sink.emit("log", level="info", msg=f"eval: resuming at layer {start} of {n_layers}")
    layers = LayerReader(src.reader, family, hf_config, dtype, dev, range(start, n_layers))
    pool = ThreadPoolExecutor(2, thread_name_prefix="eval-read",
                              **(dict(initializer=torch.cuda.set_device, initargs=(dev,)) if dev.type == "cuda"
                                 else {}))
    st = st or resume.EvalState()
    per_layer, notes, encodings, act = st.per_layer, st.notes, st.encodings, st.act
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            # the family's layer arguments use the keyword older transformers releases take
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            h_src, h_out, kwargs = _first_inputs(family, hf_config, src, out, batches, dtype, dev, embed=not start)
            if start:
                h_src, h_out = st.h_src, st.h_out
            nxt = (pool.submit(layers.read, start), pool.submit(out.read, start)) if start < n_layers else None
            prog = Progress(sink, unit="layers", total=n_layers + 1, interval_s=0.0, scope=SCOPE_ALL)
            prog.done = start
            last_beat = [time.monotonic()]
            for i in range(start, n_layers):
                t = time.monotonic()
                raw_src, raw_out = nxt[0].result(), nxt[1].result()
                t_wait = time.monotonic() - t
                src_layer = materialize_layer(family, hf_config, i, layers.assemble(raw_src), dev)
                t_src = time.monotonic() - t - t_wait
                built = out.build(raw_out)
                del raw_src, raw_out
                nxt = (pool.submit(layers.read, i + 1), pool.submit(out.read, i + 1)) if i + 1 < n_layers else None
                out_layer = materialize_layer(family, hf_config, i, built.params, dev)
                actquant.install(out_layer, built.linears, built.experts)
                notes += built.warnings
                for k, v in built.encodings.items():
                    encodings[k] = encodings.get(k, 0) + v
                act.update(q.kind for q in built.linears.values())
                act.update(q.kind for e in built.experts.values() for q in (e.w13, e.w2) if q is not None)
                del built
                t_build = time.monotonic() - t
                rel, own = HiddenError(), HiddenError()
                # the routed experts find their tokens with one host sync a call (same ops, same bits as eager)
                with one_sync_experts(src_layer), one_sync_experts(out_layer):
                    for j, (b, kw) in enumerate(zip(batches, kwargs, strict=True)):
                        hs_in = h_src[j].to(dev, non_blocking=True)
                        hs = _call(src_layer, hs_in, kw, family, hf_config)
                        ho = _call(out_layer, h_out[j].to(dev, non_blocking=True), kw, family, hf_config)
                        mask = b.attention_mask
                        rel.add(ho, hs, mask)
                        own.add(_call(out_layer, hs_in, kw, family, hf_config), hs, mask)
                        h_src[j], h_out[j] = hs.to("cpu"), ho.to("cpu")
                        if time.monotonic() - last_beat[0] >= HEARTBEAT_S:  # never silent (stall watch)
                            last_beat[0] = time.monotonic()
                            prog.advance(0, label=f"layer {i + 1}/{n_layers}: batch {j + 1}/{len(batches)}",
                                         force=True)
                for m in (src_layer, out_layer):
                    m.to_empty(device="meta")
                del src_layer, out_layer
                gc.collect(0)
                entry = {"layer": i, "rel_err": rel.rel, "own_err": own.rel}
                per_layer.append(entry)
                seconds = round(time.monotonic() - t, 3)
                st.next_layer, st.h_src, st.h_out = i + 1, h_src, h_out
                resume.save(state_dir, key, st)  # before the event: a resumed run does not report a layer twice
                sink.emit("metric", name="eval.layer", value=i, tags={
                    **entry, "layers": n_layers, "seconds": seconds, "build_s": round(t_build, 3),
                    "wait_s": round(t_wait, 3), "source_build_s": round(t_src, 3)})
                prog.advance(1, label=f"layer {i + 1}/{n_layers}: rel. error {rel.rel:.3g}", force=True)
            metrics = _head(family, hf_config, src, out, heads, batches, h_src, h_out, dtype, dev)
            prog.advance(1, label="head", force=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        layers.close()
        src.close()
        out.close()
    report: dict[str, Any] = {
        "output": str(output), "against": str(against), "samples": loaded.path, "num_samples": len(loaded.input_ids),
        "seq_len": seq_len, "truncated": loaded.truncated, **metrics, "layers": per_layer,
        "worst_layer": max(per_layer, key=lambda e: e["own_err"])["layer"] if per_layer else None,
        "mtp_skipped": mtp, "device": str(dev), "weights": encodings, "activations": sorted(act),
        "warnings": list(dict.fromkeys(notes)),
        "emulates": _emulates(act),
        "seconds": round(time.monotonic() - t0, 3),
    }
    report.update(verdict(report, max_kld_mean=max_kld_mean, min_top1=min_top1))
    return report


def _emulates(act: set[str]) -> list[str]:
    notes = ["weights decoded from the stored bytes; fused gate/up of routed experts read with w1's global scale, "
             "merged Linears with one scale (vLLM)"]
    if "nvfp4" in act:
        notes.append("W4A4: GEMM inputs fake-quantized to NVFP4 with the stored input scale as the global scale and "
                     "dynamic per-16 E4M3 block scales; routed experts share one input scale, the max over all "
                     "experts (vLLM's FlashInfer MoE path)")
    if "fp8-group" in act:
        notes.append("FP8 block: GEMM inputs fake-quantized per token in 1x128 groups with dynamic scales")
    return notes


def _call(layer, h, kw, family, hf_config) -> torch.Tensor:
    cache = family.fresh_cache(hf_config)
    if cache is not None:
        kw = dict(kw, past_key_values=cache)
    o = layer(h, **kw)
    return o[0] if isinstance(o, tuple) else o


def _first_inputs(family, hf_config, src, out, batches, dtype, dev, embed: bool = True):
    """Both models' embeddings of every batch (on the host; not computed when `embed` is false: a resumed run
    has its layer inputs) and the per-batch layer arguments."""
    h_src, h_out = [], []
    if embed:
        h_src, h_out = _embed(family, hf_config, src, out, batches, dtype, dev)
    rotary = family.make_rotary(hf_config, dev)
    kwargs = [family.layer_kwargs(hf_config, rotary, b, torch.empty((*b.input_ids.shape, 1), dtype=dtype,
                                                                     device=dev)) for b in batches]
    return h_src, h_out, kwargs


def _embed(family, hf_config, src, out, batches, dtype, dev):
    emb_src = src.get(family.embed_source(src.names)).to(dev, dtype)
    emb_out = out.get(family.embed_source(out.names)).to(dev, dtype)
    h_src, h_out = [], []
    for b in batches:
        ids = b.input_ids.to(dev)
        h_src.append(family.initial_hidden(hf_config, torch.nn.functional.embedding(ids, emb_src)).cpu())
        h_out.append(family.initial_hidden(hf_config, torch.nn.functional.embedding(ids, emb_out)).cpu())
    del emb_src, emb_out
    return h_src, h_out


def _head(family, hf_config, src, out, heads, batches, h_src, h_out, dtype, dev) -> dict[str, Any]:
    """The final norm and the head of each model, loaded alone, and the token figures."""
    with torch.device("meta"):
        norm_cls = type(family.layer_class()(hf_config, 0).input_layernorm)

    def parts(model_get, names):
        norm = norm_cls(hf_config.hidden_size, eps=hf_config.rms_norm_eps).to_empty(device=dev).to(dtype)
        norm.weight.data.copy_(model_get(names["norm"]).to(dev, dtype))
        return norm, model_get(names["head"]).to(dev, dtype)

    norm_s, head_s = parts(src.get, heads)
    norm_o, head_o = parts(out.get, heads)
    tm = TokenMetrics()
    for j, b in enumerate(batches):
        ls = torch.nn.functional.linear(norm_s(h_src[j].to(dev)), head_s)
        lo = torch.nn.functional.linear(norm_o(h_out[j].to(dev)), head_o)
        for r in range(b.input_ids.shape[0]):
            tm.add(ls[r], lo[r], b.input_ids[r], b.attention_mask[r])
    return tm.summary()


def _head_name(names: set[str], which: str, where) -> str:
    for n in HEAD_NAMES[which]:
        if n in names:
            return n
    raise CheckpointError(f"{where}: no {' or '.join(HEAD_NAMES[which])} in the checkpoint", at=str(where),
                          hint="eval reads DeepSeek-V3-style checkpoints (model.norm, lm_head)")


def _refuse_other_layers(out: OutputModel, src: TensorSource, family) -> None:
    """Both checkpoints hold the same decoder layers with the same tensor names (once decoded)."""
    skip = tuple(p + "." for p in mtp_layers(src.config, src.names))
    a = {n for n in src.names if not n.startswith(skip) and not n.endswith((".weight_scale_inv", ".scale"))}
    b = {n for n in out.names if not n.startswith(skip)}
    missing = sorted(a - b)
    if missing:
        raise CheckpointError(f"the output lacks {len(missing)} tensor(s) of the source (first: {missing[0]})",
                              at=f"{out.reader.dir}:{missing[0]}",
                              hint="is this output converted from the --against source, and complete?")
