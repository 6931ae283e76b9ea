"""A streamed layer's batches with each expert decoded once per gang of batches, not once per batch.

A layer whose routed experts are kept as stored (engine.calibrate.expert_store) decodes an expert when a batch
reaches it. Batch by batch, that is one decode of the whole layer per batch. `expert_major` runs the batches in
gangs (`gang_size`) so that every expert is decoded once per gang:

1. Each batch's forward runs on a thread of its own, one thread at a time, up to its experts call, where it
   parks: the experts module's `forward` is, for the duration, a stand-in that records the call's arguments
   and waits.
2. Once every batch of the gang is parked, one call of the module's own forward (modelopt's quantized wrapper,
   so the quantizers see every GEMM) computes all the recorded calls together: window by window of decoded
   experts, every batch's tokens of those experts (engine.calibrate.fastexperts.streamed_forward).
3. The batches resume one at a time, in order, each with its own result, and run to the end of the layer.

Every batch makes the same calls on the same tensors as batch by batch, and adds its experts' outputs in the
same (ascending) order, so its output is bit-for-bit the same; the quantizers see the same tensors in another
order, which leaves a max unchanged (the caller uses gangs only for max calibration). Only one thread runs at a
time: modelopt's calibrators are never used by two running threads. Grad mode and the CUDA device are per
thread, so each thread sets them; each thread's cuBLAS workspace is released after its gang.

A gang holds its batches' activations at the experts call at once (`PARKED_ACTS` copies of a batch's hidden
states each, plus a cuBLAS workspace on a GPU), so its size is bounded by `GANG_MAX` and by half of the free
device memory.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

GANG_MAX = 16  # batches parked at once at most
PARKED_ACTS = 5  # a parked batch's hidden-sized tensors: layer input, residual, normed, MoE input, experts output
CUBLAS_WORKSPACE = 33 << 20  # a thread's cuBLAS + cuBLASLt workspace on a GPU
_EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def parked_bytes(hidden_elements: int, itemsize: int, on_gpu: bool) -> int:
    """What one parked batch holds, for `hidden_elements` in a batch's hidden states (see the module docstring)."""
    return PARKED_ACTS * hidden_elements * itemsize + (CUBLAS_WORKSPACE if on_gpu else 0)


def gang_size(batches: int, per_batch: int, device: torch.device) -> int:
    """Batches per gang: at most GANG_MAX, and on a GPU what half of its free memory holds (at least one)."""
    n = min(batches, GANG_MAX)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = min(n, (free // 2) // max(per_batch, 1))
    return max(1, n)


class _Parked(BaseException):
    """Raised in a parked batch when the gang stops (another batch or the experts call failed)."""


class _Batch:
    def __init__(self, j: int, run: Callable[[], Any], device: torch.device):
        self.j, self.run, self.device = j, run, device
        self.go = threading.Semaphore(0)  # the coordinator lets the batch go on
        self.back = threading.Semaphore(0)  # the batch parked or finished
        self.args: tuple | None = None  # its experts call, once parked
        self.result: Any = None  # the experts call's result, then the batch's
        self.error: BaseException | None = None
        self.done = False
        self.stop = False
        self.thread = threading.Thread(target=self._main, name=f"calib-batch-{j}", daemon=True)

    def _main(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            with torch.no_grad():
                self.result = self.run()
        except _Parked:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the coordinator, which raises it
            self.error = e
        self.done = True
        self.back.release()

    def park(self, args: tuple) -> Any:
        """On the batch's thread: record the experts call, wait for its result."""
        self.args = args
        self.back.release()
        self.go.acquire()
        if self.stop:
            raise _Parked
        return self.result


def expert_major(module: torch.nn.Module, store, runs: list[Callable[[], Any]], device: torch.device,
                 beat: Callable[[int], None] | None = None) -> list[Any]:
    """The results of `runs` (one gang: each a batch's layer forward) with `module` (the streamed experts module
    whose `store` decodes its experts) called once for all of them (see the module docstring). `beat(batches
    done)` after each batch parks (0 done) and after each one ends: the stage's heartbeat."""
    batches = [_Batch(j, run, device) for j, run in enumerate(runs)]
    state = {"batch": None, "parking": True, "stopping": False}
    own_forward = type(module).forward

    def parked_forward(*args, **kwargs):
        if state["stopping"]:
            raise _Parked
        if not state["parking"]:  # a batch calling the experts again once resumed: the module's own forward
            return own_forward(module, *args, **kwargs)
        if kwargs:  # (hidden_states, top_k_index, top_k_weights) in order
            args = args + tuple(kwargs[k] for k in _EXPERTS_ARGS[len(args):])
        return state["batch"].park(args)

    def turn(b: _Batch, let_go: Callable[[], None], done: int) -> None:
        """Let batch `b` run (alone) until it parks or ends; raise what it raised."""
        state["batch"] = b
        let_go()
        b.back.acquire()
        if b.error is not None:
            raise b.error
        if beat is not None:
            beat(done)

    module.forward = parked_forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        for b in batches:  # 1. every batch up to its experts call, one at a time
            turn(b, b.thread.start, 0)
        state["parking"] = False
        parked = [b for b in batches if not b.done]
        if parked:  # 2. one experts call for all (the module's own forward: its hooks ran in each batch's call)
            store.requests = [b.args for b in parked]
            try:
                own_forward(module, *parked[0].args)
                results = store.results
            finally:
                store.requests = store.results = None
            for b, r in zip(parked, results, strict=True):
                b.result, b.args = r, None
            del results
        for k, b in enumerate(parked):  # 3. each batch to its end, in order
            turn(b, b.go.release, len(batches) - len(parked) + k + 1)
        return [b.result for b in batches]
    finally:
        state["stopping"] = True
        for b in batches:
            if b.thread.is_alive() and not b.done:
                b.stop = True
                b.go.release()
        for b in batches:
            if b.thread.ident is not None:
                b.thread.join()
        module.__dict__.pop("forward", None)
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if device.type == "cuda" and clear is not None:
            clear()  # the gang's threads are gone; their workspaces would stay cached
        for b in batches:  # an exception's traceback keeps this frame: let go of the batches' tensors
            b.args = b.error = b.run = b.result = None


def in_gangs(module: torch.nn.Module, store, n: int, forward: Callable[[int], Any], keep: Callable[[int, Any], None],
             device: torch.device, per_batch: int, beat: Callable[[int, int], None] | None = None) -> None:
    """Batches 0..n-1 (`forward(j)`, each result given to `keep(j, result)` in order) in gangs of `gang_size`
    through `expert_major`; `beat(batches done, n)` now and then (also as each window of experts is decoded)."""
    size = gang_size(n, per_batch, device)
    try:
        for g in range(0, n, size):
            runs = [lambda j=j: forward(j) for j in range(g, min(g + size, n))]
            tick = None if beat is None else (lambda done, g=g: beat(g + done, n))
            store.on_window = None if beat is None else (lambda g=g: beat(g, n))
            for k, out in enumerate(expert_major(module, store, runs, device, tick)):
                keep(g + k, out)
    finally:
        store.on_window = None
