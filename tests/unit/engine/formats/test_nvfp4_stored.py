"""A stored NVFP4 module in either layout: found by its names, read with its scales checked, decoded as modelopt
decodes; compressed-tensors' reciprocal global scales inverted so that re-laying back gives the same bytes."""

from __future__ import annotations

import pytest
import torch

from engine.core.errors import FormatError
from engine.formats.nvfp4.helpers import dequant_nvfp4, global_scale, quantize_nvfp4
from engine.formats.nvfp4.names import find_nvfp4, nvfp4_base
from engine.formats.nvfp4.stored import as_multiplier, read_nvfp4


def _module(layout: str, base: str = "m", input_scale: float | None = None) -> dict[str, torch.Tensor]:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    s2 = global_scale(w.abs().amax())
    packed, bs = quantize_nvfp4(w, s2)
    if layout == "modelopt":
        sd = {f"{base}.weight": packed, f"{base}.weight_scale": bs, f"{base}.weight_scale_2": s2}
        if input_scale is not None:
            sd[f"{base}.input_scale"] = torch.tensor(input_scale)
    else:
        sd = {f"{base}.weight_packed": packed, f"{base}.weight_scale": bs,
              f"{base}.weight_global_scale": (1.0 / s2).reshape(1)}
        if input_scale is not None:
            sd[f"{base}.input_global_scale"] = (1.0 / torch.tensor(input_scale)).reshape(1)
    return sd


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
def test_found_read_and_decoded_alike_in_both_layouts(layout):
    sd = _module(layout, input_scale=0.5)
    names = find_nvfp4("m", set(sd))
    assert names is not None and names.names.layout == layout and names.input_scale is not None
    assert nvfp4_base(names.packed) == "m"
    t = read_nvfp4(names, sd.__getitem__)
    mo = _module("modelopt")
    assert torch.equal(t.packed, mo["m.weight"]) and torch.equal(t.block_scale.view(torch.uint8),
                                                                 mo["m.weight_scale"].view(torch.uint8))
    assert t.scale_2.shape == () and float(t.input_scale) == 0.5
    assert torch.equal(t.decode(), dequant_nvfp4(t.packed, t.block_scale, t.scale_2))


def test_not_found_without_a_global_scale():
    sd = _module("modelopt")
    del sd["m.weight_scale_2"]
    assert find_nvfp4("m", set(sd)) is None


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_global_scale_that_is_not_finite_and_positive_names_the_tensor(bad):
    sd = _module("compressed-tensors")
    sd["m.weight_global_scale"] = torch.tensor([bad])
    with pytest.raises(FormatError) as e:
        read_nvfp4(find_nvfp4("m", set(sd)), sd.__getitem__)
    assert e.value.at == "m.weight_global_scale"


def test_a_block_scale_that_does_not_fit_names_the_tensor():
    sd = _module("modelopt")
    sd["m.weight_scale"] = sd["m.weight_scale"][:, :2]
    with pytest.raises(FormatError) as e:
        read_nvfp4(find_nvfp4("m", set(sd)), sd.__getitem__)
    assert e.value.at == "m.weight_scale"
    with pytest.raises(FormatError):
        as_multiplier("x", torch.ones(2), False)


def test_reciprocal_of_a_stored_reciprocal_gives_it_back():
    """g = fp32(1/s) as the compressed-tensors layout stores it; s' = fp32(1/g) as a re-lay to modelopt stores it:
    fp32(1/s') is g again, always; s' is s itself except where fp32's reciprocal is not one-to-one."""
    s = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(torch.float32)
    s = (s * 3 + 1e-3) * torch.logspace(-8, 2, s.numel(), dtype=torch.float32)
    g = 1.0 / s
    back = 1.0 / g
    assert torch.equal(1.0 / back, g)
    differ = float((back != s).float().mean())
    assert 0.05 < differ < 0.3  # about one in six: those are one ulp away
    near = torch.nextafter(back, s)
    assert torch.equal(torch.where(back != s, near, s), s)
