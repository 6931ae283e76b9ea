"""One decoder layer's calibration pass, and the amax it gives.

`calibrate_layer` wraps the layer in a skeleton whose module names are the whole model's
(`model.layers.<i>....`), lets modelopt's `mtq.quantize` insert and calibrate its quantizers with a forward
loop over this rank's cached layer inputs (which also gives the layer's outputs), and returns the amax, the
outputs and the experts' coverage. A layer whose experts are kept as stored (engine.calibrate.expert_store)
runs its batches in gangs (engine.calibrate.expert_major) under max calibration; `say_streamed` is its log line.
The layer loop around it is engine.calibrate.streaming.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import torch

from engine.calibrate import expert_store
from engine.calibrate.coverage import CoverageHooks
from engine.calibrate.expert_major import in_gangs, parked_bytes
from engine.calibrate.fastcollect import WeightsOnce, check_amax, deferred_checks
from engine.calibrate.fastexperts import one_sync_experts
from engine.calibrate.modelopt_import import quantization
from engine.core.events import EventSink


class Skeleton(torch.nn.Module):
    """Just enough of the whole model that named_modules() gives `model.layers.<i>.<...>`."""

    def __init__(self, config, i: int, layer: torch.nn.Module):
        super().__init__()
        self.config = config
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(i)] + [layer])


def layer_amax(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`<quantizer module name>.amax` for every enabled TensorQuantizer that has an amax."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    out = {}
    for name, mod in root.named_modules():
        if isinstance(mod, TensorQuantizer) and mod.is_enabled:
            a = getattr(mod, "amax", None)
            if a is not None:
                out[f"{name}.amax"] = a.detach().float()
    return out


def calibrate_layer(family, hf_config, layer, i, qcfg, hidden: list[torch.Tensor], kwargs: list[dict],
                     all_experts: bool, dev: torch.device, bufs: list[torch.Tensor] | None = None,
                     times: dict[str, float] | None = None, beat: Callable[[int, int], None] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], dict[str, list[int]]]:
    """One pass: modelopt's quantizers in calibration mode pass their inputs through unchanged, so the
    forward that collects the amax also gives the next layer's inputs. `beat(batches done, batches)` after
    each batch: the stage's heartbeat."""
    mtq = quantization()

    root = Skeleton(hf_config, i, layer)
    streamed = [m for m in layer.modules() if expert_store.store_of(m) is not None]  # experts kept as stored
    outs: list[torch.Tensor] = []
    cov: dict[str, list[int]] = {}
    fwd = [0.0]

    def loop(model):
        t = time.monotonic()
        outs.clear()
        layer_i = model.model.layers[i]
        hooks = CoverageHooks(layer_i, all_experts=all_experts)
        weights = WeightsOnce(layer_i)  # each weight's amax collected once, not once per batch
        def forward(j: int) -> torch.Tensor:
            kw = kwargs[j]
            cache = family.fresh_cache(hf_config)
            if cache is not None:
                kw = dict(kw, past_key_values=cache)
            o = layer_i(hidden[j].to(dev, non_blocking=True), **kw)
            return o[0] if isinstance(o, tuple) else o

        def keep(j: int, o: torch.Tensor) -> None:
            if bufs is not None:  # pinned buffers: the copy back does not stall the device
                outs.append(bufs[j].copy_(o, non_blocking=True))
            else:
                outs.append(o.to("cpu"))

        try:
            with one_sync_experts(layer_i):  # same ops, same bits as eager; one host sync per batch
                if len(streamed) == 1 and not all_experts and len(hidden) > 1 and max_calibration(qcfg):
                    # experts kept as stored: a gang of batches' experts together, each expert decoded once a gang
                    weights.after_batch()  # the weight pass before the loop gave every weight amax
                    in_gangs(streamed[0], expert_store.store_of(streamed[0]), len(hidden), forward, keep, dev,
                             parked_bytes(hidden[0].numel(), hidden[0].element_size(), dev.type == "cuda"), beat)
                # activations live on the CPU, a batch at a time
                for j in range(len(outs), len(hidden)):
                    keep(j, forward(j))
                    weights.after_batch()
                    if beat is not None:
                        beat(j + 1, len(hidden))
                if dev.type == "cuda":
                    torch.cuda.current_stream(dev).synchronize()
        finally:
            weights.restore()
            hooks.remove()
        cov.update({f"{family.layer_prefix(i)}{k}": v.tolist() for k, v in hooks.counts.items()})
        fwd[0] += time.monotonic() - t

    t0 = time.monotonic()
    kept = expert_store.streamed_quantizers() if streamed else contextlib.nullcontext()
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), deferred_checks(), kept:
        mtq.quantize(root, qcfg, loop)
        if not outs:  # a config that needs no forward pass (weight-only): still compute the outputs
            mtq.disable_quantizer(root, "*")
            loop(root)
    amax = layer_amax(root)
    check_amax(amax)  # modelopt's per-batch NaN / inf / sign checks, once per layer
    if times is not None:
        times["forward_s"] = fwd[0]
        times["quantize_s"] = time.monotonic() - t0 - fwd[0]  # quantizer insertion, weight amax, finishing
    return amax, outs, cov


def max_calibration(qcfg: dict) -> bool:
    """Is `qcfg`'s algorithm modelopt's max calibration (whose statistics do not depend on the calls' order)?"""
    algo = qcfg.get("algorithm", "max")
    return (algo.get("method") if isinstance(algo, dict) else algo) == "max"


def say_streamed(sink: EventSink, plan, budget: int, stores: dict) -> None:
    """The log line of a layer whose experts stream; a warning where even that exceeds the budget."""
    kept = sum(s.nbytes for s in stores.values())
    built, _ = expert_store.expert_bytes(plan)
    need = sum(expert_store.streamed_terms(plan.param_bytes, built, kept, plan.nbytes).values())
    msg = (f"layer {plan.index}: {(plan.param_bytes + plan.nbytes) / 1e9:.1f} GB with the next layer's bytes exceeds "
           f"the device budget of {budget / 1e9:.1f} GB; its routed experts stay as stored ({kept / 1e9:.1f} GB) and "
           "are decoded as they run")
    if need > budget:
        sink.emit("log", level="warning", msg=f"{msg}, and even so it needs about {need / 1e9:.1f} GB: it may run "
                  "out of device memory (a GPU with more memory, or more nodes' GPUs for the experts, is the fix)")
    else:
        sink.emit("log", level="info", msg=msg)
