"""The decoder-block check on a CPU decodes layer 0 with validate's host decoders: the torch reference's values,
bit for bit, for the FP8-block source and the NVFP4 output, with the C kernels and without."""

from __future__ import annotations

import numpy as np
import pytest

from engine.checkpoint import CheckpointReader
from engine.convert.block_check import _host_decoded
from engine.convert.validate_ref import decode_module


@pytest.fixture(scope="module")
def pair(tiny_nvfp4):
    return tiny_nvfp4("fp8")


def _layer0_modules(r: CheckpointReader) -> dict[str, int]:
    """Layer 0's 2-D weights (base -> columns), and one routed expert of layer 1 (an odd one out: not layer 0)."""
    bases = {}
    for n in r.names():
        for suf in (".weight", ".weight_packed"):
            if n.startswith(("model.layers.0.", "model.layers.1.mlp.experts.3.")) and n.endswith(suf):
                base = n[: -len(suf)]
                m = decode_module(r, base)
                if m is not None and m.dim() == 2:
                    bases[base] = m.shape[1]
    return bases


@pytest.mark.parametrize("kernels", ["c", "numba"])
@pytest.mark.parametrize("side", ["src", "out"])
def test_layer_0_decoded_on_the_host_is_the_torch_references_bit_for_bit(pair, monkeypatch, kernels, side):
    monkeypatch.setenv("QUANTDECK_KERNELS", kernels)
    r = CheckpointReader(pair[0] if side == "src" else pair[1])
    wanted = _layer0_modules(r)
    got = _host_decoded(r, wanted, "cpu")
    quantized = [b for b in wanted if b + ".weight_scale_inv" in r or b + ".weight_scale" in r]
    assert quantized and set(quantized) <= set(got)  # every FP8-block / NVFP4 module decoded on the host
    for base, t in got.items():
        ref = decode_module(r, base, cols=wanted[base])
        assert t.dtype == ref.dtype and t.shape == ref.shape, base
        assert np.array_equal(t.numpy().view(np.uint32), ref.numpy().view(np.uint32)), base
    assert _host_decoded(r, wanted, "meta") == {}  # elsewhere than a CPU: the reference, on that device


def test_the_check_on_a_cpu_leaves_no_quantized_module_to_the_reference(pair, monkeypatch):
    """The whole decoder-block check on a CPU: every FP8-block and NVFP4 module of layer 0 decoded on the host (the
    torch reference sees only what the host decoders do not take), and the check passes."""
    from engine.convert import block_check

    seen = []

    def spy(reader, base, *a, **kw):
        seen.append((reader, base))
        return decode_module(reader, base, *a, **kw)

    monkeypatch.setattr(block_check, "decode_module", spy)

    class Rep:
        def __init__(self):
            self.calls = []

        def fail(self, *a):
            self.calls.append(("fail", *a))

        def row(self, *a):
            self.calls.append(("row", *a))

        def skip(self, *a):
            self.calls.append(("skip", *a))

    rep = Rep()
    src, out = (CheckpointReader(p) for p in pair)
    block_check.check_first_block(out, src, rep, "nvfp4", "cpu")
    assert [c[0] for c in rep.calls] == ["row"], rep.calls
    quantized = [(r, b) for r, b in seen if b + ".weight_scale_inv" in r or b + ".weight_scale" in r]
    assert quantized == []
