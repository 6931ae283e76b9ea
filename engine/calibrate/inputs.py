"""What every layer of a calibration is fed: the activations entering the first layer to calibrate (embeddings,
or the saved outputs of the layer before on a resume), in page-locked memory on CUDA with a second buffer set
for each layer's outputs, and the per-batch layer arguments (rotary embeddings, masks)."""

from __future__ import annotations

import contextlib
import time

import torch

from engine.calibrate import snapshot as snap


def prepare_inputs(family, hf_config, src, out, rank: int, batches, start: int, end: int, dtype, dev, warm):
    """(activations entering layer `start` and a second buffer set, per-batch layer arguments, seconds taken)."""
    t = time.monotonic()
    warm.join()
    hidden = first_hidden(family, hf_config, src, out, rank, batches, start, end, dtype, dev)
    hidden, bufs = pinned(hidden, dev)
    with torch.no_grad():
        rotary = family.make_rotary(hf_config, dev)
        kwargs = [family.layer_kwargs(hf_config, rotary, b, torch.empty((*b.input_ids.shape, 1), dtype=dtype,
                                                                         device=dev)) for b in batches]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return hidden, bufs, kwargs, time.monotonic() - t


def first_hidden(family, hf_config, src, out, rank: int, batches, start: int, end: int, dtype,
                 dev: torch.device) -> list[torch.Tensor]:
    """The activations entering layer `start`: embeddings, or the saved outputs of layer start-1."""
    if start >= end:
        return []
    if start > 0:
        return snap.read_acts(out, rank, start - 1, len(batches))
    emb = src.get(family.embed_source(src.names)).to(dev, dtype)
    acts: list[torch.Tensor] = []
    with torch.no_grad():
        for b in batches:
            h = family.initial_hidden(hf_config, torch.nn.functional.embedding(b.input_ids.to(dev), emb))
            if dev.type == "cuda":  # straight into page-locked memory (what the layer loop reads from)
                with contextlib.suppress(RuntimeError):
                    acts.append(torch.empty(h.shape, dtype=h.dtype, pin_memory=True).copy_(h, non_blocking=True))
                    continue
            acts.append(h.cpu())
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
    return acts


def pinned(hidden: list[torch.Tensor], dev: torch.device):
    """On CUDA: the activations in pinned host memory, plus a second pinned set for each layer's outputs."""
    if dev.type != "cuda" or not hidden:
        return hidden, None
    try:
        return ([h.pin_memory() for h in hidden],
                [torch.empty(h.shape, dtype=h.dtype, pin_memory=True) for h in hidden])
    except RuntimeError:  # pinning refused (locked-memory limits): pageable copies, synchronous
        return hidden, None
