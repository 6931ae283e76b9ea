"""Layer-streaming, data-parallel calibration: `calibrate()`.

Per decoder layer: build transformers' own layer from the checkpoint on the device, calibrate it
(engine.calibrate.layer_pass: modelopt's `mtq.quantize` under the whole model's module names, with a forward
loop over this rank's cached layer inputs), all-reduce the amax (MAX) over ranks, save the layer's outputs (the
next layer's inputs) and then the amax file (the commit mark), free the layer. Memory: one layer plus this
rank's activations.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from engine.calibrate import expert_store
from engine.calibrate import snapshot as snap
from engine.calibrate.batches import plan_batches
from engine.calibrate.dist import DistContext, init_distributed, reduce_amax, reduce_coverage, resolve_device
from engine.calibrate.family import LayerFamily
from engine.calibrate.inputs import prepare_inputs
from engine.calibrate.layer import TensorSource, compute_dtype, materialize_layer
from engine.calibrate.layer_pass import calibrate_layer, say_streamed
from engine.calibrate.layer_reader import LayerReader, ReadShare
from engine.calibrate.phases import Phases
from engine.calibrate.qconfig import resolve_quant_cfg
from engine.calibrate.report import build_coverage
from engine.calibrate.samples import Samples, load_samples, read_samples_file, thin_expert_warning
from engine.core.errors import CheckpointError
from engine.core.events import SCOPE_ALL, EventSink, NullSink, Progress
from engine.core.fsutil import atomic_write_json
from engine.core.gcpause import imports_without_gc
from engine.core.packages import installed_version
from engine.core.settings import settings
from engine.models import detect_layout

HEARTBEAT_S = 30.0  # a working rank reports within a layer at least this often (a batch's forward permitting)
# oneDNN keeps a primitive for every CPU matrix product of a new shape (each expert's token count is one), up to
# 1024 by default: on 2 cores that grew a CPU calibration's RSS by 0.3-0.4 GB over its first layers. 128 keeps the
# shapes that repeat (peak 2.72 GB against 2.85 GB on mid-cpu, 16.1-16.2 s against 16.0 s); an operator's own value
# stands. Read by oneDNN when it makes its first primitive, so set before any layer runs.
ONEDNN_CACHE = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
RESUME_KEYS = ("samples_sha256", "num_samples", "seq_len", "batch_size", "world_size", "quant_cfg",
               "all_experts", "model_fingerprint")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "nvidia-modelopt", "quantdeck"):
        out[pkg] = installed_version(pkg) or "?"
    return out


def _check_resume(out: Path, manifest: dict[str, Any]) -> None:
    old = snap.read_manifest(out)
    if not old or not snap.done_layers(out):
        return
    diff = [k for k in RESUME_KEYS if old.get(k) != manifest.get(k)]
    if diff:
        raise CheckpointError(f"{out} holds a calibration made with other settings ({', '.join(diff)} differ)",
                              at=str(out), hint="resume with the same settings, or calibrate into a fresh --out")


def calibrate(model_dir: str | os.PathLike, samples: str | os.PathLike | Samples, out_dir: str | os.PathLike,
              num_samples: int | None = None, seq_len: int = 512, batch_size: int = 1,
              quant_cfg: str = "NVFP4_DEFAULT_CFG", all_experts: bool = False, device: str = "auto",
              sink: EventSink = NullSink(), layers: int | None = None) -> dict[str, Any]:
    """Calibrate `model_dir` on `samples` into the amax snapshot `out_dir`; resumes after the last saved layer.

    Runs as one process or under torchrun (every rank calls it). `layers` stops after that many layers
    (tests, kill-and-resume drills). Returns a summary (rank 0's view)."""
    ph = Phases()
    os.environ.setdefault(*ONEDNN_CACHE)
    with ph("setup_s"):
        if not isinstance(samples, Samples):
            read_samples_file(samples, num_samples)  # fail on a bad file before touching the model
    # the device's context is created on a thread while this one imports transformers and modelopt
    warm = threading.Thread(target=_warm_device, args=(device,), name="calib-device-init", daemon=True)
    warm.start()
    holder: list[DistContext] = []
    imports = contextlib.ExitStack()  # no garbage collection until transformers and modelopt are imported
    imports.enter_context(imports_without_gc())
    try:
        return _run(holder, warm, device, Path(model_dir), samples, Path(out_dir), num_samples, seq_len, batch_size,
                    quant_cfg, all_experts, sink, layers, ph, imports)
    finally:
        imports.close()
        if holder:
            holder[0].close()


def _warm_device(device: str) -> None:
    with contextlib.suppress(Exception):  # a real failure shows up again, with its message, in init_distributed
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            torch.empty(1, device=dev)


def _run(holder, warm, device, model_dir, samples, out, num_samples, seq_len, batch_size, quant_cfg, all_experts,
         sink, stop_after, ph: Phases, imports: contextlib.ExitStack):
    with ph("setup_s"):
        src = TensorSource(model_dir, dtype=torch.bfloat16)
        config = src.config
        dtype = compute_dtype(config)
        src.dtype = dtype
        family = LayerFamily.for_config(config)
    with ph("import_transformers_s"):
        hf_config = family.hf_config(config)
        hf_config._attn_implementation = family.attn_implementation()
        hf_config._experts_implementation = "eager"
        family.layer_class()  # import the modeling module here, not on the prefetch thread
    with ph("setup_s"):
        n_layers = family.num_layers(hf_config)
        start = snap.resume_point(out)
        end = n_layers if stop_after is None else min(n_layers, start + stop_after)
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    # helper threads work on this rank's GPU (a thread's current CUDA device is its own: left at 0, page-locking
    # or a kernel there would open a context on another rank's GPU)
    init = (dict(initializer=torch.cuda.set_device, initargs=(dev,)) if dev.type == "cuda" else {})
    reader_pool = ThreadPoolExecutor(1, thread_name_prefix="calib-prefetch", **init)
    writer_pool = ThreadPoolExecutor(1, thread_name_prefix="calib-acts", **init)
    layers = LayerReader(src.reader, family, hf_config, dtype, dev, range(start, end),
                         budget=expert_store.layer_budget(dev, settings().layer_budget_gb))
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    stack = contextlib.ExitStack()
    try:
        # one rank: the first layer is read, and the first activations and the layer arguments computed, while
        # modelopt is imported (torch.distributed is joined after: RANK / WORLD_SIZE give the batches); several
        # ranks share the reads, so theirs starts once the group is joined
        nxt = reader_pool.submit(layers.read, start) if start < end and world == 1 else None
        with ph("samples_s"):
            if not isinstance(samples, Samples):
                samples = load_samples(samples, num_samples, tokenizer=model_dir, seq_len=seq_len,
                                       batch_size=batch_size)
            pad_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
            batches = plan_batches(samples.input_ids, batch_size, world, rank, pad_id)
            importlib.import_module("transformers.masking_utils")  # imported here, not on the inputs thread
        inputs = writer_pool.submit(prepare_inputs, family, hf_config, src, out, rank, batches, start, end, dtype, dev,
                                    warm)
        with ph("import_s"):
            qcfg = resolve_quant_cfg(quant_cfg)
        imports.close()
        with ph("dist_init_s"):
            warm.join()
            ctx = init_distributed(device)
            holder.append(ctx)
            if ctx.active:
                layers.share_reads(ReadShare.for_node(ctx))
                nxt = reader_pool.submit(layers.read, start) if start < end else None
        local_tokens = sum(b.tokens for b in batches)
        manifest = {
            "format": snap.SNAPSHOT_FORMAT, "model": str(model_dir), "model_fingerprint": src.reader.fingerprint(),
            "family": family.registered_name, "model_type": config.get("model_type"), "num_layers": n_layers,
            "samples": samples.path, "samples_sha256": samples.sha256, "samples_kind": samples.kind,
            "num_samples": len(samples.input_ids), "seq_len": seq_len, "batch_size": batch_size,
            "tokens": samples.tokens, "truncated": samples.truncated, "world_size": ctx.world_size,
            "quant_cfg": quant_cfg if isinstance(quant_cfg, str) else "custom",
            "quant_cfg_resolved": json.loads(json.dumps(qcfg, default=str)),
            "all_experts": bool(all_experts), "dtype": str(dtype).replace("torch.", ""), "versions": _versions(),
            "status": "running", "warnings": [w for w in [thin_expert_warning(samples.tokens, config)] if w],
        }
        with ph("manifest_s"):
            _check_resume(out, manifest)
            ctx.barrier()
            if ctx.rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(out / snap.MANIFEST, manifest)
        for w in manifest["warnings"] if ctx.rank == 0 else []:
            sink.emit("log", level="warning", msg=w)
        sink.emit("log", level="info", msg=f"calibrating {n_layers} layers from layer {start}; rank {ctx.rank}/"
                  f"{ctx.world_size}: {len(batches)} batches, {local_tokens} tokens on {ctx.device}")
        mtp = mtp_layers(config, src.names)
        if mtp and ctx.rank == 0:
            sink.emit("log", level="info", msg=f"MTP layer(s) {mtp} not calibrated (modelopt's flows do not load "
                      "them either): export keeps them in BF16 and lists them as excluded")
        with ph("inputs_wait_s"):
            hidden, bufs, kwargs, t_inputs = inputs.result()
            ph.add("inputs_bg_s", t_inputs)  # overlapped with the imports
        prog = Progress(sink, unit="layers", total=n_layers, interval_s=0.0, scope=SCOPE_ALL)
        prog.done = start
        last_beat = [time.monotonic()]

        def beat(i: int, j: int, nb: int) -> None:
            """A progress event within a layer at most every HEARTBEAT_S, so that a working rank is never silent
            for a minute (engine.runs.runview shows a stage silent for `[run] stall_after_s` as stalled)."""
            if time.monotonic() - last_beat[0] >= HEARTBEAT_S:
                last_beat[0] = time.monotonic()
                prog.advance(0, label=f"layer {i + 1}/{n_layers}: batch {j}/{nb}", force=True)
        n_samples = sum(b.input_ids.shape[0] for b in batches)

        def commit(p: dict) -> None:
            """Once this rank's activations of layer i are on disk and every rank's are: rank 0 writes the layer."""
            t = time.monotonic()
            if p["acts"] is not None:
                p["acts"].result()  # also: its buffers may take the next layer's outputs
            if ctx.active:
                ctx.barrier()
                if ctx.rank == 0:
                    snap.write_layer(out, p["i"], p["amax"], p["cov"])
                ctx.barrier()
                _after_layer(out, ctx.rank, p["i"])
            else:  # one rank: the layer file is written on the writer thread, after the activations (in order)
                for job in [j for j in layer_jobs if j.done()]:  # a failed write (disk full) stops us here
                    job.result()
                layer_jobs.append(writer_pool.submit(_write_layer_job, out, p["i"], p["amax"], p["cov"]))
            tm = p["times"]
            tm["write_wait_s"] = time.monotonic() - t
            ph.merge({k: v for k, v in tm.items() if k != "calib_s"})  # calib_s is the sum of its parts
            dt = tm["read_wait_s"] + tm["assemble_s"] + tm["build_s"] + tm["calib_s"] + tm["write_wait_s"]
            sink.emit("metric", name="calibrate.layer", value=p["i"], tags={"bytes_read": p["bytes_read"],
                "layer": p["i"], "layers": n_layers, "samples": n_samples, "tokens": local_tokens,
                "tokens_per_s": local_tokens / max(p["times"]["calib_s"], 1e-9), "seconds": dt, "rank": ctx.rank,
                **{k: round(v, 3) for k, v in p["times"].items()}})
            prog.advance(1, label=f"layer {p['i'] + 1}/{n_layers}", force=True)

        pending = None
        layer_jobs: list = []
        streamed: list[int] = []  # layers whose experts were kept as stored
        decoded: list[int] = []  # expert weights each decoded
        stack.enter_context(ph.gc_watch())
        for i in range(start, end):
            times: dict[str, float] = {}
            t0 = time.monotonic()
            raw = nxt.result()
            t1 = time.monotonic()
            tensors = layers.assemble(raw)  # the previous layer is freed: at most one layer on the device
            times.update(raw.times)
            times["assemble_s"] = time.monotonic() - t1
            nxt = reader_pool.submit(layers.read, i + 1) if i + 1 < end else None  # into the buffer just freed
            t1b = time.monotonic()
            layer = materialize_layer(family, hf_config, i, tensors, dev)
            raw_bytes, stores = raw.bytes_read, raw.stores
            if stores:
                say_streamed(sink, raw.plan, layers.budget, stores)
                expert_store.attach(layer, stores)
            del tensors, raw
            t2 = time.monotonic()
            try:
                amax, outs, cov = calibrate_layer(family, hf_config, layer, i, qcfg, hidden, kwargs, all_experts,
                                                   dev, bufs, times, beat=lambda j, nb, i=i: beat(i, j, nb))
            finally:
                if stores:
                    decoded.append(expert_store.detach(layer, stores))
                    streamed.append(i)
            del stores
            t3 = time.monotonic()
            layer.to_empty(device="meta")  # free its device memory now, whatever modelopt's hooks still reference
            del layer
            gc.collect(0)
            t4 = time.monotonic()
            amax = reduce_amax(ctx, amax)
            cov = reduce_coverage(ctx, cov)
            t5 = time.monotonic()
            if pending is not None:
                commit(pending)
            # the last layer's outputs feed nothing (MTP layers are not calibrated): not written
            acts = writer_pool.submit(snap.write_acts, out, ctx.rank, i, outs) if i + 1 < n_layers else None
            times.update({"read_wait_s": t1 - t0, "build_s": t2 - t1b, "free_s": t4 - t3, "reduce_s": t5 - t4,
                          "calib_s": t5 - t2})
            pending = {"i": i, "amax": amax, "cov": cov, "acts": acts, "times": times, "bytes_read": raw_bytes}
            if bufs is not None:  # double buffering: this layer's inputs (their write is done) take the next outputs
                hidden, bufs = outs, hidden
            else:
                hidden = outs
        if pending is not None:
            commit(pending)
        with ph("write_wait_s"):
            for job in layer_jobs:
                job.result()
    finally:
        stack.close()
        reader_pool.shutdown(wait=True, cancel_futures=True)
        writer_pool.shutdown(wait=True)
        layers.close()
    with ph("finish_s"):
        finished = snap.resume_point(out) >= n_layers
        if finished:
            snap.prune_acts(out, ctx.rank, keep=n_layers)  # the last layer's outputs feed nothing
        bytes_per_rank = ctx.all_gather_object(layers.bytes_read)
        summary = _finish(ctx, out, manifest, n_layers, finished)
        summary.update({"layers_done": snap.resume_point(out), "started_at_layer": start, "rank": ctx.rank,
                        "mtp_layers_not_calibrated": mtp, "bytes_read": layers.bytes_read,
                        "bytes_read_per_rank": bytes_per_rank, "layer_source_bytes": layers.source_bytes,
                        "streamed_layers": streamed, "expert_weights_decoded": sum(decoded)})
        src.close()
    if finished and ctx.rank == 0:
        from engine.calibrate.names_memo import write_names_memo
        from engine.calibrate.validate import write_expected_memo

        every = list(range(n_layers))
        if isinstance(quant_cfg, str):
            with ph("expected_memo_s"):
                _memo(sink, "expected quantizer names", "`validate --amax` inserts them itself", write_expected_memo,
                      out, model_dir, quant_cfg, every)
        with ph("names_memo_s"):
            _memo(sink, "export's module names", "export asks transformers itself", write_names_memo, out, model_dir,
                  config, src.names, every)
    phases = ph.report()
    summary.update({"seconds": phases["total_s"], "phases": phases})
    return summary


def mtp_layers(config: dict, names: set[str]) -> list[str]:
    """Indices of the checkpoint's multi-token-prediction layers (DeepSeek V3 `model.layers.<n>.`, V4 `mtp.<k>.`).

    They are not calibrated: transformers' models do not load them (no module to run), modelopt's HF flow
    and its DeepSeek example leave them out (`mtp.*` disabled, `layers.<n>*` excluded), and what feeds them
    (the main model's last hidden states, normed by the serving engine) has no reference implementation to
    match. Export keeps them in BF16 and excluded."""
    import re

    layout = detect_layout(config, names)
    block = re.compile(r"^((?:model\.)?(?:layers|mtp)\.\d+)\.")
    return sorted({m.group(1) for n in names if (m := block.match(n)) and layout.is_mtp(n)},
                  key=lambda p: int(p.rsplit(".", 1)[1]))


def _after_layer(out: Path, rank: int, i: int) -> None:
    snap.prune_acts(out, rank, keep=i)
    if settings().faults.calibrate_die_after_layer == i:  # crash drills: die like kill -9
        os._exit(137)


def _write_layer_job(out: Path, i: int, amax: dict, cov: dict) -> None:
    snap.write_layer(out, i, amax, cov)
    _after_layer(out, 0, i)


def _memo(sink: EventSink, what: str, otherwise: str, write: Callable[..., Any], *args: Any) -> None:
    """A later stage's memo into the snapshot, written while modelopt and transformers are imported here (that
    stage would import them again, seconds: engine.calibrate.validate's expected names, engine.calibrate.names_memo's
    module names); a failure costs that stage the time, never the calibration."""
    try:
        write(*args)
    except Exception as e:  # noqa: BLE001 - the memo is an optimization of a later stage
        sink.emit("log", level="warning", msg=f"{what} not saved with the snapshot ({e}): {otherwise}")


def _finish(ctx, out: Path, manifest: dict, n_layers: int, finished: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"out": str(out), "finished": finished, "layers": n_layers,
                               "warnings": manifest.get("warnings", [])}
    if ctx.rank != 0 or not finished:
        return summary
    coverage = build_coverage(out, n_layers)
    atomic_write_json(out / snap.COVERAGE, coverage)
    manifest = dict(manifest, status="complete", quantizers=len(snap.load_amax(out)))
    atomic_write_json(out / snap.MANIFEST, manifest)
    summary.update({"quantizers": manifest["quantizers"], "experts_without_tokens": coverage["experts_without_tokens"]})
    return summary
