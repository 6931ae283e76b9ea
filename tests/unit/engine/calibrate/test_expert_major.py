"""The batches of a streamed layer parked at the experts call, computed together, resumed in order; errors in a
batch or in the shared call reach the caller and leave no thread behind."""

import threading
from types import SimpleNamespace

import pytest
import torch

from engine.calibrate.expert_major import expert_major


class Experts(torch.nn.Module):
    """Its own forward serves every parked call at once, as streamed_forward does with store.requests."""

    def __init__(self, store, fail: bool = False):
        super().__init__()
        self.store, self.fail, self.calls = store, fail, 0

    def forward(self, x):
        self.calls += 1
        if self.fail:
            raise RuntimeError("experts failed")
        if self.store.requests is None:  # a call made after the shared one
            return x * 10
        self.store.results = [args[0] * 2 for args in self.store.requests]
        return self.store.results[0]


def _batches(experts, order, fail_at=None):
    def run(j):
        order.append(("before", j))
        if j == fail_at:
            raise ValueError(f"batch {j} failed")
        y = experts(torch.full((2,), float(j)))
        order.append(("after", j))
        return y + 1

    return [lambda j=j: run(j) for j in range(4)]


def test_every_batch_gets_its_own_result_from_one_shared_call():
    store = SimpleNamespace(requests=None, results=None)
    experts, order, beats = Experts(store), [], []
    before = threading.active_count()
    out = expert_major(experts, store, _batches(experts, order), torch.device("cpu"), beats.append)
    assert [o.tolist() for o in out] == [[2 * j + 1.0] * 2 for j in range(4)]
    assert experts.calls == 1 and store.requests is None and "forward" not in experts.__dict__
    assert order == [("before", j) for j in range(4)] + [("after", j) for j in range(4)]
    assert beats == [0, 0, 0, 0, 1, 2, 3, 4]
    assert threading.active_count() == before
    assert experts(torch.ones(1)).item() == 10  # the module's own forward again


@pytest.mark.parametrize("where", ["batch", "experts"])
def test_a_failure_reaches_the_caller_and_no_thread_is_left(where):
    store = SimpleNamespace(requests=None, results=None)
    experts = Experts(store, fail=where == "experts")
    before = threading.active_count()
    with pytest.raises(ValueError if where == "batch" else RuntimeError, match="failed"):
        expert_major(experts, store, _batches(experts, [], fail_at=2 if where == "batch" else None),
                     torch.device("cpu"))
    assert threading.active_count() == before and "forward" not in experts.__dict__ and store.requests is None
