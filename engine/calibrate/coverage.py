"""Expert coverage: tokens routed to each expert of a layer, and the statistics-only all-experts pass.

Hooks go on the router (its top-k indices are counted) and on the fused experts module. With
`all_experts`, after the real forward the experts run once more on every token through every expert,
with zero routing weights and the output thrown away: the quantizers see every expert's inputs, the
layer's output is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch


def _is_router(m: torch.nn.Module) -> bool:
    n = type(m).__name__
    return n.endswith(("TopkRouter", "TopKRouter", "HashRouter"))


def _is_experts(m: torch.nn.Module) -> bool:
    return hasattr(m, "num_experts") and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)


def _device_of(m: torch.nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


class CoverageHooks:
    def __init__(self, layer: torch.nn.Module, all_experts: bool = False):
        self.counts: dict[str, torch.Tensor] = {}  # experts module path -> tokens per expert
        self._handles: list[Any] = []
        self._replaying = False
        self.all_experts = all_experts
        experts = {n: m for n, m in layer.named_modules() if _is_experts(m)}
        for name, mod in layer.named_modules():
            if _is_router(mod):
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                ename = next((e for e in experts if e.rsplit(".", 1)[0] == parent), None)
                if ename is None:
                    continue
                n = int(experts[ename].num_experts)
                self.counts[ename] = torch.zeros(n, dtype=torch.long, device=_device_of(mod))
                self._handles.append(mod.register_forward_hook(self._count_hook(ename, n)))
        if all_experts:
            for mod in experts.values():
                self._handles.append(mod.register_forward_hook(self._replay_hook(mod), with_kwargs=True))

    def _count_hook(self, ename: str, n: int):
        def hook(mod, args, out):
            if self._replaying:
                return
            idx = out[-1] if isinstance(out, tuple) else out
            if idx.dtype.is_floating_point:
                return
            idx = idx.reshape(-1).to(torch.long)  # index_add_, not bincount: no device sync per batch
            ok = (idx >= 0) & (idx < n)
            self.counts[ename].index_add_(0, idx.clamp(0, n - 1), ok.to(torch.long))

        return hook

    def _replay_hook(self, experts: torch.nn.Module):
        def hook(mod, args, kwargs, out):
            if self._replaying:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights")
            n = int(experts.num_experts)
            t = hidden.shape[0]
            idx = torch.arange(n, device=hidden.device).expand(t, n).contiguous()
            w = torch.zeros(t, n, device=hidden.device, dtype=weights.dtype if weights is not None else hidden.dtype)
            self._replaying = True
            try:
                mod(hidden, idx, w)
            finally:
                self._replaying = False
            return None

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
