"""A layer larger than the device: its routed experts kept as stored and decoded as they run.

A layer's resident build holds its parameters in the compute dtype, beside the next layer's stored bytes
being read. When that does not fit the device budget (`layer_budget`), the plan streams the fused expert
parameters (`experts.gate_up_proj`, `experts.down_proj`, engine.calibrate.layer_plan): their stored bytes
(FP8 codes and block scales, MXFP4 and E8M0, or plain values) are staged on the device as one stacked tensor
per run of consecutive experts of one role (`ExpertStore`), and the parameters themselves are zero-stride
placeholders of their shape that hold no memory. A window of consecutive experts is decoded on demand into
two reused buffers with the float32 maths of the resident build (engine.calibrate.layer_assemble), so every
expert weight has the same bits as there.

Calibration sees the same tensors as on the resident layer: modelopt's weight pass walks the experts a window
at a time (`calibration_weights`), and the forward (engine.calibrate.fastexperts.streamed_forward) makes the
same calls on the window's views. modelopt's fused-experts wrapper finds a weight's expert from its storage
offset in the fused parameter; `streamed_quantizers` tells it the expert instead, and gives its weight pass
the decoded windows. Both apply only to the modelopt release whose source they were written against.

Cost: the experts are decoded twice per layer (modelopt's weight pass, and the pass that promotes its static
block quantizers) and once per gang of batches in the forward (engine.calibrate.expert_major), for
a device footprint of the stored experts plus a window, instead of the experts in the compute dtype. Experts
stored in the compute dtype would not shrink, so they are not streamed (`worth_streaming`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from engine.calibrate.layer_assemble import DECODE_COST, fp8_block_values, mxfp4_values, stage
from engine.calibrate.layer_plan import Encoding, LayerPlan, Piece
from engine.core.errors import CheckpointError, about

ATTR = "_quantdeck_store"  # the experts module's attribute holding its store while it calibrates
# sha256[:16] of the source of the modelopt 0.47 `_QuantFusedExperts` members this stands in for
# (the wrapped F.linear of `functionals_to_replace` is what asks `_get_expert_idx_from_first_proj`)
KNOWN_MODELOPT = {
    "_get_expert_idx_from_first_proj": {"5cdaf9f235f2e3d2"},
    "iter_weights_for_calibration": {"19aac755ebcacc85"},
    "functionals_to_replace": {"855add1286972110"},
}


WINDOW_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}  # a window's decoded experts and decode temporaries
MAX_STORED_FRACTION = 0.75  # stream only experts whose stored bytes are at most this part of their built bytes


def expert_bytes(plan: LayerPlan) -> tuple[int, int]:
    """(bytes of the plan's streamable expert parameters built in their dtypes, their stored bytes)."""
    built = 0
    for name in plan.streamable:
        shape, dt = plan.params[name]
        built += math.prod(shape) * dt.itemsize
    stored = {}
    for p in plan.pieces:
        if p.param in plan.streamable:
            for m in (p.source.meta, p.source.scale):
                if m is not None:
                    stored[m.name] = m.nbytes
    return built, sum(stored.values())


def streamed_terms(params: int, experts_built: int, experts_stored: int, next_stored: int) -> dict[str, int]:
    """Device bytes of a layer whose routed experts stay as stored, term by term: its parameters less those
    experts built, the experts as stored, one decode window, and the next layer's stored bytes read beside it.
    The runtime's warning sums them; preflight's estimate (engine.runs.memory_plan) adds the batches and the CUDA
    context."""
    return {"layer_params": params - experts_built, "experts_as_stored": experts_stored,
            "expert_window": WINDOW_BYTES["cuda"], "next_layer_stored": next_stored}


def worth_streaming(plan: LayerPlan) -> bool:
    """Do the plan's experts shrink when kept as stored (FP8, MXFP4; not BF16 experts of a BF16 model)?"""
    built, stored = expert_bytes(plan)
    return built > 0 and stored <= MAX_STORED_FRACTION * built


def layer_budget(device: torch.device, budget_gb: float | None) -> int | None:
    """Device bytes a layer's build may hold: `budget_gb` (10^9 bytes) where set; else on a GPU 90 % of its
    free memory now (before the first layer), on the host no limit (None)."""
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    return None


@dataclass
class _Run:
    """The stored bytes of experts [first, first + n) of one role of a fused parameter, stacked."""

    first: int
    rows: tuple[int, int] | None
    encoding: Encoding
    dtype_name: str
    codes: torch.Tensor  # [n, *stored shape] uint8, or plain values [n, *shape]
    scale: torch.Tensor | None  # [n, *scale shape] as stored
    at: str  # the first piece's file and tensor, for errors

    @property
    def n(self) -> int:
        return self.codes.shape[0]


class ExpertStore:
    """One experts module's fused parameters (`params`: name -> (shape, dtype), e.g. `gate_up_proj`) as stored,
    decoded `window` experts at a time."""

    def __init__(self, params: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device):
        self.params, self.device = params, device
        self.num_experts = next(iter(params.values()))[0][0]
        self.runs: dict[str, list[_Run]] = {name: [] for name in params}
        self._window: int | None = None  # sized at first use (`window`)
        self.current = 0  # the expert whose weights the forward uses now
        self._bufs: dict[str, torch.Tensor] = {}
        self._first: dict[str, int] = {}  # parameter -> the first expert in its buffer
        self.decodes = 0  # experts decoded (for the summary and the tests)
        self.requests: list[tuple] | None = None  # several batches' experts calls computed at once (expert_major)
        self.results: list[torch.Tensor] | None = None
        self.on_window: Callable[[], None] | None = None  # called as each window is decoded (a heartbeat)

    @property
    def window(self) -> int:
        """Experts decoded at once: their decoded values and decode temporaries within WINDOW_BYTES (at least
        one; sized once the runs are staged, from their encodings)."""
        if self._window is None:
            per = sum(math.prod(shape[1:]) * dt.itemsize for shape, dt in self.params.values())
            per += max(math.prod(self.params[name][0][1:]) * DECODE_COST.get(r.encoding, 0)
                       for name, runs in self.runs.items() for r in runs) if any(self.runs.values()) else 0
            budget = WINDOW_BYTES["cuda" if self.device.type == "cuda" else "cpu"]
            self._window = max(1, min(self.num_experts, budget // max(per, 1)))
        return self._window

    @window.setter
    def window(self, n: int) -> None:
        self._window = n

    @property
    def nbytes(self) -> int:
        """Device bytes of the stored experts."""
        return sum(t.numel() * t.element_size() for runs in self.runs.values() for r in runs
                   for t in (r.codes, r.scale) if t is not None)

    def placeholders(self) -> dict[str, torch.Tensor]:
        """Zero-stride tensors of the parameters' shapes and dtypes (one element of memory each)."""
        return {name: torch.zeros((), dtype=dt, device=self.device).expand(shape)
                for name, (shape, dt) in self.params.items()}

    def add(self, param: str, run: list[Piece], raw: torch.Tensor, offsets: dict[str, int], at: str) -> None:
        """Stage the stored bytes of `run` (consecutive experts of one role of `param`) from the layer buffer."""
        src = run[0].source
        n = len(run)
        codes = stage([p.source.meta for p in run], raw, offsets, self.device)
        scale = None
        if src.encoding is Encoding.PLAIN:
            if codes.storage_offset() % src.meta.dtype.itemsize:
                codes = codes.clone()
            codes = codes.view(src.meta.dtype).view(n, *src.meta.shape)
        else:
            codes = codes.view(n, *src.meta.shape)
            scale = stage([p.source.scale for p in run], raw, offsets, self.device).view(src.scale.dtype)
            scale = scale.view(n, *src.scale.shape)
        self.runs[param].append(_Run(run[0].expert, run[0].rows, src.encoding, src.meta.dtype_name, codes, scale, at))

    def check(self) -> None:
        """Every expert of every parameter (every row of gate‖up) is in a run."""
        for name, (shape, _) in self.params.items():
            rows: dict[int, int] = {}
            for r in self.runs[name]:
                for e in range(r.first, r.first + r.n):
                    rows[e] = rows.get(e, 0) + (shape[1] if r.rows is None else r.rows[1] - r.rows[0])
            missing = [e for e in range(shape[0]) if rows.get(e) != shape[1]]
            if missing:
                raise ValueError(f"the stored experts of {name} miss expert {missing[0]}")

    def decode(self, param: str, first: int, out: torch.Tensor) -> None:
        """Experts [first, first + len(out)) of `param` decoded into `out`."""
        last = first + out.shape[0]
        rows = 0
        for r in self.runs[param]:
            a, b = max(first, r.first), min(last, r.first + r.n)
            if a >= b:
                continue
            dest = out[a - first:b - first]
            if r.rows is not None:
                dest = dest[:, r.rows[0]:r.rows[1]]
            rows += (b - a) * dest.shape[1]
            codes = r.codes[a - r.first:b - r.first]
            with about(r.at):
                if r.encoding is Encoding.PLAIN:
                    dest.copy_(codes)
                elif r.encoding is Encoding.FP8_BLOCK:
                    dest.copy_(fp8_block_values(codes, r.scale[a - r.first:b - r.first], r.dtype_name, r.at))
                else:
                    dest.copy_(mxfp4_values(codes, r.scale[a - r.first:b - r.first], r.at))
        if rows != out.shape[0] * out.shape[1]:  # e.g. a store already released
            raise ValueError(f"the stored experts of {param} do not cover experts {first}..{last - 1}")
        self.decodes += last - first

    def load(self, param: str, first: int) -> int:
        """Decode the window of `param` from expert `first`; the end of the window."""
        buf = self._bufs.get(param)
        if buf is None:
            shape, dt = self.params[param]
            buf = self._bufs[param] = torch.empty((self.window, *shape[1:]), dtype=dt, device=self.device)
        self.decode(param, first, buf[:min(self.window, self.num_experts - first)])
        self._first[param] = first
        if self.on_window is not None:
            self.on_window()
        return min(first + self.window, self.num_experts)

    def view(self, param: str, e: int) -> torch.Tensor:
        """Expert e's decoded `param` weight (valid until its window moves)."""
        first = self._first.get(param)
        if first is None or not first <= e < first + self.window:
            self.load(param, e)
            first = e
        return self._bufs[param][e - first]

    def expert(self, e: int, params: tuple[str, ...]) -> list[torch.Tensor]:
        """Expert e's weights of `params`, decoded; e becomes the current expert."""
        self.current = e
        return [self.view(p, e) for p in params]

    def weights(self, param: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(expert, its decoded `param` weight) for every expert in order, a window decoded at a time."""
        for e in range(self.num_experts):
            yield e, self.view(param, e)

    def release(self) -> None:
        self.runs = {name: [] for name in self.params}
        self._bufs.clear()
        self._first.clear()


def stores_for(plan_params: dict[str, tuple[tuple[int, ...], torch.dtype]], streams: tuple[str, ...],
               device: torch.device) -> dict[str, ExpertStore]:
    """One store per experts module (its layer-relative path) for the streamed parameters of a plan."""
    by_module: dict[str, dict] = {}
    for name in streams:
        module, _, param = name.rpartition(".")
        by_module.setdefault(module, {})[param] = plan_params[name]
    return {module: ExpertStore(params, device) for module, params in by_module.items()}


def attach(layer: torch.nn.Module, stores: dict[str, ExpertStore]) -> None:
    """Give each experts module of `layer` its store (before modelopt converts it)."""
    for module, store in stores.items():
        layer.get_submodule(module).__dict__[ATTR] = store


def detach(layer: torch.nn.Module, stores: dict[str, ExpertStore]) -> int:
    """Take the stores off `layer` and free their memory; the experts they decoded."""
    decoded = 0
    for module, store in stores.items():
        layer.get_submodule(module).__dict__.pop(ATTR, None)
        decoded += store.decodes
        store.release()
    return decoded


def store_of(module: torch.nn.Module) -> ExpertStore | None:
    return module.__dict__.get(ATTR)


def _digest(fn) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=1)
def _fused_experts_class():
    from modelopt.torch.quantization.plugins import huggingface

    cls = getattr(huggingface, "_QuantFusedExperts", None)
    if cls is None:
        return None
    for name, known in KNOWN_MODELOPT.items():
        member = cls.__dict__.get(name)
        if _digest(getattr(member, "fget", member)) not in known:
            return None
    return cls


def supported() -> bool:
    """Does this modelopt's fused-experts wrapper match the one `streamed_quantizers` stands in for?"""
    return _fused_experts_class() is not None


@contextlib.contextmanager
def streamed_quantizers() -> Iterator[None]:
    """Within: modelopt's fused-experts wrapper takes a streamed module's expert from its store (not from the
    weight's storage offset) and walks its decoded weights in its weight pass; other modules are unchanged."""
    cls = _fused_experts_class()
    if cls is None:
        import modelopt

        raise CheckpointError(
            f"a layer too large for the device needs its experts streamed, which quantdeck does for "
            f"nvidia-modelopt 0.47's fused experts, not {modelopt.__version__}'s", at="nvidia-modelopt",
            hint="install nvidia-modelopt 0.47, or raise QUANTDECK_LAYER_BUDGET_GB on a device that holds the layer")
    orig_idx: Callable = cls.__dict__["_get_expert_idx_from_first_proj"]
    orig_iter: Callable = cls.__dict__["iter_weights_for_calibration"]

    def expert_idx(self, weight):
        store = store_of(self)
        return orig_idx(self, weight) if store is None else store.current

    def calibration_weights(self):
        store = store_of(self)
        if store is None:
            yield from orig_iter(self)
            return
        for param, quantizers in ((self._first_proj_attr, self._first_proj_weight_quantizers_attr),
                                  ("down_proj", "down_proj_weight_quantizers")):
            qs = getattr(self, quantizers)
            for e, w in store.weights(param):
                yield w, qs[e]

    cls._get_expert_idx_from_first_proj = expert_idx
    cls.iter_weights_for_calibration = calibration_weights
    try:
        yield
    finally:
        cls._get_expert_idx_from_first_proj = orig_idx
        cls.iter_weights_for_calibration = orig_iter
