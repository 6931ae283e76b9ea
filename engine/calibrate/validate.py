"""`validate_amax`: check an amax snapshot without running anything heavy (what `quantdeck validate --amax` calls).

Checks: layer files contiguous and as many as the model's decoder layers; every amax finite and > 0;
with the model directory, every quantizer that the snapshot's config enables is present (the expected
names come from modelopt's own insertion into each layer built on the meta device: no weights read)
and nothing unexpected; a coverage summary (experts that saw no token).

The expected names take importing modelopt and transformers' modeling, seconds that the calibration has already
spent: it writes them into the snapshot (`expected_quantizers.json`, `write_expected_memo`) with the key of what
they depend on (config.json's bytes, the config's name and quantdeck's presets, the layers, the versions of
modelopt, transformers and torch), and a check whose own key equals it reads them from there. A snapshot's layer
files are read with numpy, so such a check imports none of torch, modelopt or transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engine.calibrate import qconfig  # light: the presets' definitions (modelopt is imported when one is resolved)
from engine.calibrate import snapshot as snap
from engine.calibrate.amax_dict import amax_dict_files, load_amax_dict
from engine.core.errors import ValidationFailedError
from engine.core.fsutil import atomic_write_json, read_json
from engine.core.packages import installed_version

EXPECTED_MEMO_FORMAT = 1
# what inserts the quantizers: modelopt's rules, transformers' layer classes, torch's modules
EXPECTED_MEMO_PACKAGES = ("nvidia-modelopt", "transformers", "torch")


def expected_quantizers(model_dir: str | os.PathLike, quant_cfg: str | dict,
                        layers: list[int] | None = None) -> set[str]:
    """`<quantizer>.amax` names modelopt enables with `quant_cfg` in each decoder layer of the model."""
    import torch

    from engine.calibrate.family import LayerFamily
    from engine.calibrate.layer_pass import Skeleton
    from engine.calibrate.modelopt_import import quantization

    mtq = quantization()  # first, so that modelopt comes without the plugins it has no use for here
    from modelopt.torch.quantization.nn import TensorQuantizer

    config = read_json(Path(model_dir) / "config.json") or {}
    family = LayerFamily.for_config(config)
    hf = family.hf_config(config)
    hf._experts_implementation, hf._attn_implementation = "eager", family.attn_implementation()
    out: set[str] = set()
    # a named config's patterns match module names within a layer, never a layer's index: layers of one structure
    # (modules, classes, parameter shapes) get the same quantizers, so modelopt inserts them once per structure
    # (a dense and a MoE layer for DeepSeek-V3: 61 layers of 256 experts would take minutes one by one)
    by_structure: dict[tuple, set[str]] = {}
    for i in layers if layers is not None else range(family.num_layers(hf)):
        with torch.device("meta"):
            layer = family.layer_class()(hf, i)
        pre = f"model.layers.{i}."
        key = (tuple((n, type(m).__name__) for n, m in layer.named_modules()),
               tuple((n, tuple(p.shape), str(p.dtype)) for n, p in layer.named_parameters()))
        if isinstance(quant_cfg, str) and key in by_structure:
            out |= {pre + n for n in by_structure[key]}
            continue
        root = Skeleton(hf, i, layer)
        with contextlib.redirect_stdout(sys.stderr):
            mtq.quantize(root, qconfig.resolve_quant_cfg(quant_cfg), None)
        names = {f"{n}.amax" for n, m in root.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}
        by_structure[key] = {n[len(pre):] for n in names if n.startswith(pre)}
        out |= names
    return out


def expected_key(model_dir: str | os.PathLike, quant_cfg: str, layers: list[int]) -> dict[str, Any]:
    """What `expected_quantizers(model_dir, quant_cfg, layers)` depends on, found without importing any of it:
    the model's config.json bytes (layers are built from it alone), the config's name and the source of
    quantdeck's presets (engine.calibrate.qconfig), the layers and the installed versions of the packages that
    build and quantize them."""
    versions = {pkg: installed_version(pkg) for pkg in EXPECTED_MEMO_PACKAGES}
    return {"config_sha256": hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest(),
            "quant_cfg": quant_cfg, "presets_sha256": hashlib.sha256(Path(qconfig.__file__).read_bytes()).hexdigest(),
            "layers": [int(i) for i in layers], "versions": versions}


def write_expected_memo(amax_dir: str | os.PathLike, model_dir: str | os.PathLike, quant_cfg: str,
                        layers: list[int]) -> int:
    """Write `expected_quantizers(model_dir, quant_cfg, layers)` into the snapshot with its key; the number of
    names. The calibration calls it once it has finished, with modelopt and transformers imported already."""
    key = expected_key(model_dir, quant_cfg, layers)
    names = sorted(expected_quantizers(model_dir, quant_cfg, layers))
    atomic_write_json(Path(amax_dir) / snap.EXPECTED, {"format": EXPECTED_MEMO_FORMAT, "key": key,
                                                       "quantizers": names})
    return len(names)


def read_expected_memo(amax_dir: str | os.PathLike, key: dict[str, Any]) -> set[str] | None:
    """The snapshot's memo of expected names when it was written for `key`; None when it is missing, unreadable,
    of another format or written for other inputs (then the names are computed again, never an error)."""
    try:
        memo = read_json(Path(amax_dir) / snap.EXPECTED)
    except (OSError, ValueError):
        return None
    if not isinstance(memo, dict) or memo.get("format") != EXPECTED_MEMO_FORMAT or memo.get("key") != key:
        return None
    names = memo.get("quantizers")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return set(names)


def expected_names(amax_dir: str | os.PathLike, model_dir: str | os.PathLike, quant_cfg: str,
                   layers: list[int]) -> tuple[set[str], str]:
    """The names a snapshot of `layers` must hold, and where they came from: "memo" (the snapshot's own, for
    these inputs) or "modelopt" (inserted here)."""
    try:
        memo = read_expected_memo(amax_dir, expected_key(model_dir, quant_cfg, layers))
    except OSError:  # no config.json: expected_quantizers says what is wrong
        memo = None
    if memo is not None:
        return memo, "memo"
    return expected_quantizers(model_dir, quant_cfg, layers), "modelopt"


def validate_amax(amax_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                  strict: bool = False) -> dict[str, Any]:
    """A report dict; `report["ok"]` is False when any problem was found (listed in `report["problems"]`).

    With strict=True a problem raises ValidationFailedError instead. A directory of modelopt DeepSeek
    `amax_dict_rank*-mp*.pt` files is checked for values only (no layer files there)."""
    p = Path(amax_dir)
    problems: list[str] = []
    report: dict[str, Any] = {"amax_dir": str(p), "problems": problems}
    dict_files = amax_dict_files(p) if p.exists() else []
    man = snap.read_manifest(p) or {}
    if dict_files:
        amax = {k: v.numpy() for k, v in load_amax_dict(dict_files).items()}
        report.update(kind="modelopt-amax-dict", files=len(dict_files))
    else:
        done = snap.done_layers(p)
        report.update(kind="quantdeck-snapshot", layers_done=len(done), num_layers=man.get("num_layers"),
                      status=man.get("status"), quant_cfg=man.get("quant_cfg"))
        if not p.is_dir():
            problems.append(f"{p}: no such directory")
        elif not done:
            problems.append(f"{p}: no layer_NNN.safetensors files")
        if done and done != list(range(len(done))):
            problems.append(f"layer files are not contiguous: {done[:10]}")
        n_model = None
        if model_dir is not None:
            cfg = read_json(Path(model_dir) / "config.json") or {}
            n_model = cfg.get("num_hidden_layers")
        n_expected = n_model or man.get("num_layers")
        if n_expected is not None and len(done) != n_expected:
            problems.append(f"{len(done)} of {n_expected} layers calibrated")
        amax = {}
        for i in done:
            try:
                amax.update(snap.read_layer_arrays(p, i))
            except Exception as e:  # a torn or foreign file
                problems.append(f"{snap.layer_path(p, i)}: unreadable ({e})")
        if model_dir is not None and done and man.get("quant_cfg") not in (None, "custom"):
            want, report["expected_from"] = expected_names(p, model_dir, man["quant_cfg"], done)
            missing, extra = sorted(want - set(amax)), sorted(set(amax) - want)
            report.update(missing=missing[:50], unexpected=extra[:50])
            if missing:
                problems.append(f"{len(missing)} expected quantizer(s) missing, e.g. {missing[:3]}")
            if extra:
                problems.append(f"{len(extra)} quantizer(s) the model does not have, e.g. {extra[:3]}")
        cov = (p / snap.COVERAGE)
        if cov.exists():
            import json

            c = json.loads(cov.read_text())
            report["experts_without_tokens"] = len(c.get("experts_without_tokens", []))
            report["coverage_layers"] = len(c.get("layers", {}))
    bad = [(k, float(v.max()) if v.size else math.nan) for k, v in amax.items()
           if v.size == 0 or not bool(np.isfinite(v).all()) or float(v.min()) <= 0]
    input_bad = [k for k, _ in bad if "input_quantizer" in k]
    weight_bad = [k for k, _ in bad if k not in input_bad]
    if weight_bad:
        problems.append(f"{len(weight_bad)} weight amax zero, negative or non-finite, e.g. {weight_bad[:3]}")
    if input_bad:
        problems.append(f"{len(input_bad)} activation amax zero, negative or non-finite, e.g. {input_bad[:3]} "
                        "(export fills experts from siblings; others fail)")
    report.update(quantizers=len(amax),
                  bad=[{"key": k, "value": v if math.isfinite(v) else str(v)} for k, v in bad[:50]],
                  ok=not problems)
    if strict and problems:
        raise ValidationFailedError(f"amax snapshot {p}: " + "; ".join(problems), at=str(p),
                                    hint="resume the calibration, or recalibrate into a fresh --out")
    return report
