"""The one-sync experts forward: the eager forward's bits, and modelopt's amax, with one host sync per call."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.calibrate.fastexperts import KEY, one_sync_experts, supported


def _experts(family: str, n_experts: int = 8, hidden: int = 48, inter: int = 24):
    if family == "v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts as cls

        cfg = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=n_experts)
    else:
        from transformers import DeepseekV4Config
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts as cls

        cfg = DeepseekV4Config(hidden_size=hidden, intermediate_size=inter, n_routed_experts=n_experts,
                               num_local_experts=n_experts, swiglu_limit=0.5)
    cfg._experts_implementation = "eager"
    torch.manual_seed(1)
    mod = cls(cfg)
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, 0.2)
        mod.down_proj.normal_(0, 0.2)
    return mod.to(torch.bfloat16)


def _routing(n_tokens: int, n_experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    # distinct experts per token, as a router gives; expert 3 gets no token; some pairs go to no expert (index
    # n_experts: the eager forward's skipped last bin)
    choices = torch.tensor([e for e in range(n_experts + 1) if e != 3])
    idx = torch.stack([choices[torch.randperm(len(choices), generator=g)[:top_k]] for _ in range(n_tokens)])
    w = torch.rand(n_tokens, top_k, generator=g).to(torch.bfloat16)
    x = (torch.randn(n_tokens, 48, generator=g) * 3).to(torch.bfloat16)
    return x, idx, w


def _run(mod, x, idx, w, fast: bool):
    with torch.no_grad(), (one_sync_experts(mod) if fast else _null()) as n:
        assert not fast or n == 1
        return mod(x, idx, w)


class _null:
    def __enter__(self):
        return 0

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("family", ["v3", "v4"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.requires_gpu)])
def test_same_bits_as_the_eager_forward(family, device, monkeypatch):
    from engine.calibrate import fastexperts

    calls = []
    real = fastexperts.one_sync_forward
    monkeypatch.setattr(fastexperts, "one_sync_forward", lambda *a: calls.append(1) or real(*a))
    mod = _experts(family).to(device)
    assert supported(type(mod))  # a transformers upgrade that changes the eager forward shows here
    for seed, (n_tokens, top_k) in enumerate([(37, 3), (1, 1), (200, 8), (64, 2)]):
        x, idx, w = (t.to(device) for t in _routing(n_tokens, 8, top_k, seed))
        want = _run(mod, x, idx, w, fast=False)
        got = _run(mod, x, idx, w, fast=True)
        assert torch.equal(want.view(torch.int16), got.view(torch.int16)), (family, n_tokens, top_k)
        assert want.abs().sum() > 0
    assert len(calls) == 4  # the fast forward really ran, once per case
    assert mod.config._experts_implementation == "eager"  # restored


@pytest.mark.parametrize("family", ["v3", "v4"])
def test_modelopt_quantizers_see_the_same_inputs(family):
    """modelopt's _QuantFusedExperts intercepts F.linear by the weight view's storage offset: the per-expert
    weight quantizers and the shared input quantizers get the same amax under both forwards."""
    import modelopt.torch.quantization as mtq

    from engine.calibrate.layer_pass import layer_amax

    base = _experts(family)
    x, idx, w = _routing(150, 8, 4, 7)
    amax = {}
    for fast in (False, True):
        m = torch.nn.Sequential(copy.deepcopy(base))
        mtq.quantize(m, mtq.NVFP4_DEFAULT_CFG, lambda mm, fast=fast: _run(mm[0], x, idx, w, fast))
        amax[fast] = layer_amax(m)
    assert amax[True].keys() == amax[False].keys() and len(amax[True]) > 4
    for k in amax[False]:
        assert torch.equal(amax[False][k], amax[True][k]), k


def test_an_unknown_experts_class_keeps_its_forward():
    class Other(torch.nn.Module):
        gate_up_proj = torch.zeros(1)

    assert not supported(Other)
    with one_sync_experts(Other()) as n:
        assert n == 0


def test_turned_off_by_env(monkeypatch):
    mod = _experts("v3")
    monkeypatch.setenv("QUANTDECK_EAGER_EXPERTS", "1")
    with one_sync_experts(mod) as n:
        assert n == 0 and mod.config._experts_implementation == "eager"
    monkeypatch.delenv("QUANTDECK_EAGER_EXPERTS")
    with one_sync_experts(mod) as n:
        assert n == 1 and mod.config._experts_implementation == KEY
