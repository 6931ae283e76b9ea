"""transformers' eager fused-MoE forward with one host sync per call instead of two per expert.

The eager forward of `DeepseekV3Experts` / `DeepseekV4Experts` walks the experts hit by a batch with
`for expert_idx in hit` (a device tensor: its comparison with `num_experts` syncs the host) and finds each
expert's tokens with `torch.where` (a sync, its size being data-dependent). With 64-256 experts that is
130-500 syncs per batch and layer: on a GPU the host waits for the device before every expert, and the
device waits for the host's next launches, so neither works while the other does.

`one_sync_forward` makes the very same calls on the very same tensors in the very same order — `F.linear` on
`hidden_states[token_idx]` and the `gate_up_proj[e]` view (which modelopt's `_QuantFusedExperts` intercepts,
by storage offset), the same gate, the same weighting, one `index_add_` per expert in ascending order — but
finds every expert's tokens at once: a stable sort of the (position, token) pairs by expert lists each
expert's pairs in the order `torch.where` gives them, and one `bincount(...).tolist()` (the one sync) gives
where each expert's run starts. So each layer's output, and every amax, is bit-for-bit the eager forward's.

It is registered as a transformers experts implementation (`ExpertsInterface`, key `KEY`); `one_sync_experts`
switches a layer's config to it for a calibration forward, only for the expert classes whose eager forward
it was written against (a digest of their source; any other class or version keeps its own forward).
QUANTDECK_EAGER_EXPERTS=1 (engine.core.settings) turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
from typing import Iterator

import torch
import torch.nn.functional as F

from engine.calibrate.expert_store import store_of
from engine.core.errors import CheckpointError
from engine.core.settings import settings

KEY = "quantdeck_one_sync"
STREAMED_KEY = "quantdeck_streamed"
_FUSED = ("gate_up_proj", "down_proj")
# sha256[:16] of inspect.getsource(<class>.forward.__wrapped__) in the transformers releases this mirrors (5.23)
KNOWN_FORWARD = {
    "DeepseekV3Experts": {"1c60625a2da2dfba"},
    "DeepseekV4Experts": {"191cb7c8511c163a"},
}


def expert_groups(top_k_index: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, token indices, top-k positions) of every expert hit, ascending, each expert's pairs in the order
    `torch.where(mask[expert])` gives them in the eager loop — found with one host sync."""
    n_tokens = top_k_index.shape[0]
    with torch.no_grad():
        pairs = top_k_index.t().reshape(-1)  # index p * n_tokens + t: torch.where's (position, token) order
        order = torch.argsort(pairs, stable=True)  # grouped by expert, that order kept inside each group
        counts = torch.bincount(pairs, minlength=num_experts + 1).tolist()  # the one host sync
        top_k_pos_all = order // n_tokens
        token_idx_all = order % n_tokens
    start = 0
    for expert_idx, n in enumerate(counts[:num_experts]):  # the last bin: tokens sent to no expert
        if n == 0:
            continue
        yield expert_idx, token_idx_all[start:start + n], top_k_pos_all[start:start + n]
        start += n


def one_sync_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    final = torch.zeros_like(hidden_states)
    for expert_idx, token_idx, top_k_pos in expert_groups(top_k_index, self.num_experts):
        _add_expert(self, final, hidden_states, top_k_weights, token_idx, top_k_pos,
                    self.gate_up_proj[expert_idx], self.down_proj[expert_idx])
    return final


def _add_expert(self, final: torch.Tensor, hidden_states: torch.Tensor, top_k_weights: torch.Tensor,
                token_idx: torch.Tensor, top_k_pos: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """One expert's part of the eager forward: its tokens through gate‖up, the gate, down, weighted, added."""
    current = self._apply_gate(F.linear(hidden_states[token_idx], gate_up))
    current = F.linear(current, down) * top_k_weights[token_idx, top_k_pos, None]
    final.index_add_(0, token_idx, current.to(final.dtype))


def streamed_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """`one_sync_forward` on an experts module whose weights are kept as stored (engine.calibrate.expert_store):
    each expert's `gate_up_proj` and `down_proj` are the decoded window's views, of the same values. Several
    batches' calls at once where `store.requests` holds them (engine.calibrate.expert_major)."""
    store = store_of(self)
    reqs = store.requests or [(hidden_states, top_k_index, top_k_weights)]
    finals = _streamed_calls(self, store, reqs)
    if store.requests is not None:
        store.results = finals
    return finals[0]


def _streamed_calls(self, store, reqs: list[tuple]) -> list[torch.Tensor]:
    """The experts' outputs of every call in `reqs`, a window of decoded experts at a time: each call's experts in
    ascending order, as one by one, each expert decoded once for all the calls."""
    groups = [list(expert_groups(idx, self.num_experts)) for _, idx, _ in reqs]
    finals = [torch.zeros_like(h) for h, _, _ in reqs]
    at = [0] * len(reqs)
    while True:
        pending = [g[k][0] for g, k in zip(groups, at, strict=True) if k < len(g)]
        if not pending:
            return finals
        first = min(pending)
        end = min(store.load(p, first) for p in _FUSED)
        for j, (hidden_states, _, top_k_weights) in enumerate(reqs):
            g = groups[j]
            while at[j] < len(g) and g[at[j]][0] < end:
                expert_idx, token_idx, top_k_pos = g[at[j]]
                _add_expert(self, finals[j], hidden_states, top_k_weights, token_idx, top_k_pos,
                            *store.expert(expert_idx, _FUSED))
                at[j] += 1


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(KEY, one_sync_forward)
    ExpertsInterface.register(STREAMED_KEY, streamed_forward)


def _digest(fn) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def supported(cls: type) -> bool:
    """Is `cls` (or the transformers class it wraps, e.g. modelopt's quantized subclass) an experts class whose
    eager forward `one_sync_forward` reproduces?"""
    from transformers.integrations import moe

    for base in cls.__mro__:
        if base.__name__ in KNOWN_FORWARD and base.__module__.startswith("transformers."):
            eager = getattr(base.__dict__.get("forward"), "__wrapped__", None)
            if eager is None or _digest(eager) not in KNOWN_FORWARD[base.__name__]:
                return False
            # DeepseekV3's forward inlines the default gate (chunk, act_fn(gate) * up); V4 calls its own _apply_gate
            return base.__name__ != "DeepseekV3Experts" or base._apply_gate is moe._default_apply_gate
    return False


@contextlib.contextmanager
def one_sync_experts(layer: torch.nn.Module) -> Iterator[int]:
    """Within: the supported experts modules of `layer` run `one_sync_forward`, and those with streamed weights
    `streamed_forward` whatever QUANTDECK_EAGER_EXPERTS says (yields how many)."""
    streamed = [m for m in layer.modules() if store_of(m) is not None]
    for m in streamed:
        if not supported(type(m)):
            raise CheckpointError(f"{type(m).__name__}'s forward is not one quantdeck mirrors, so its streamed "
                                  "experts cannot run", at=type(m).__name__,
                                  hint="raise QUANTDECK_LAYER_BUDGET_GB on a device that holds the layer, or use "
                                       "the transformers release quantdeck pins")
    mods = streamed + ([] if settings().eager_experts else
                       [m for m in layer.modules() if hasattr(m, "gate_up_proj") and store_of(m) is None
                        and supported(type(m))])
    configs = {id(m.config): (m.config, STREAMED_KEY if store_of(m) is not None else KEY)
               for m in mods if hasattr(m, "config")}
    if not configs:
        yield 0
        return
    _register()
    old = {k: c._experts_implementation for k, (c, _) in configs.items()}
    for c, key in configs.values():
        c._experts_implementation = key
    try:
        yield len(mods)
    finally:
        for k, (c, _) in configs.items():
            c._experts_implementation = old[k]
