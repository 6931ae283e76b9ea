"""Writing recipes as TOML: a validated recipe rendered in full, and the commented recipe `quantdeck init` prints.

The models and the loader are engine.runs.recipe; whatever is written here loads back through it (the tests
check the round trip and the template). write_recipe validates before it writes, so a bad key fails the same
way loading does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.fsutil import atomic_write_bytes
from engine.core.names import Family, TargetFormat
from engine.runs.recipe import DEFAULT_WORKDIR, Recipe, recipe_from_dict


def dump_recipe(recipe: Recipe) -> str:
    """A TOML rendering of a recipe (every field, resolved defaults included)."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    return _to_toml(data)


def write_recipe(path: str | Path, data: dict[str, Any]) -> Path:
    """Validate `data` (sections as in a recipe file) and write it as TOML: the one way code writes a recipe
    (`quantdeck demo`, tests, benchmarks). Raises RecipeError naming the key, like loading does."""
    path = Path(path)
    atomic_write_bytes(path, dump_recipe(recipe_from_dict(data, name=path.name)).encode())
    return path


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def _to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, body in data.items():
        lines.append(f"[{section}]")
        for k, v in body.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


INIT_TEMPLATE = """\
# quantdeck recipe. Every key but source.path has a default that serves this machine alone.
# Load it with `quantdeck preflight recipe.toml`, run it with `quantdeck run recipe.toml`.

[run]
workdir = "{workdir}"        # run dirs live in <workdir>/runs/<run-id>/
# name = "v3-nvfp4"              # label shown in `quantdeck history` (default: the source's name)
device = "auto"                  # auto | cpu | cuda
preflight = true                 # check disk, source, samples, GPUs before starting
disk_margin = 0.10               # free disk needed at the output = estimate x (1 + margin)
stall_after_s = 900              # a stage silent this long is shown stalled; collectives time out after it

[source]
path = "{source}"    # a checkpoint dir, or "s3://bucket/prefix"
# endpoint_url = "https://s3.example.com"   # S3-compatible store (s3:// sources only)

[model]
{family_line}

[target]
format = "{format}"                # nvfp4 | fp8-block | bf16
calibrate = {calibrate}              # nvfp4 only: true = W4A4 (calibrated), false = weight-only
layouts = ["modelopt"]           # and/or "compressed-tensors"
# output = "/shared/out/model-NVFP4"   # default: <workdir>/outputs/<source name>-<format>
shard_mb = 5000                  # output shard size

[calibration]                    # used when target.calibrate = true
{samples_line}
num_samples = 128
seq_len = 512
batch_size = 1
all_experts = false              # route every token through every expert (statistics only)
quant_cfg = "NVFP4_DEFAULT_CFG"  # or "deepseek-experts"

[eval]                           # the quality gate after validate: nothing is pushed unless it passes
# enable = true                  # default: on for nvfp4 and fp8-block
# samples = "/shared/held-out.json"  # default: calibration.samples, after its first num_samples
num_samples = 16
seq_len = 512
max_kld_mean = 0.1               # largest mean KL divergence of the output from the source that passes
min_top1 = 0.9                   # smallest top-1 agreement with the source that passes

# [cluster]                      # absent: this machine alone
# head = "node0"                 # runs single-node stages and the torchrun master
# python = "/opt/venv/bin/python"
# workdir = "/shared/quantdeck"  # the shared work dir as the nodes see it
# host_key_policy = "reject"     # or "accept-new" (explicit opt-in)
# env = {{ NCCL_NVLS_ENABLE = "0" }}  # passed to every worker explicitly (no credentials here)
# nodes = [
#   {{ name = "node0", host = "10.0.0.1", user = "ubuntu", port = 22, key = "~/.ssh/id_ed25519", gpus = 8 }},
#   {{ name = "node1", host = "10.0.0.2", gpus = 8 }},
# ]

# [push]
# target = "s3://bucket/prefix"
# endpoint_url = "https://s3.example.com"
# part_size_mb = 64
# concurrency = 8
"""


def init_recipe_text(family: str | None = None, source: str = "/path/to/checkpoint",
                     workdir: str = DEFAULT_WORKDIR, samples: str | None = None,
                     target_format: str = "nvfp4", calibrate: bool = False) -> str:
    """The commented recipe `quantdeck init` prints. It loads as is (checked by the tests)."""
    if family is not None:
        fam = Family(family).value
        family_line = f'family = "{fam}"            # deepseek-v3 | deepseek-v4 | generic (default: auto-detect)'
    else:
        family_line = '# family = "deepseek-v3"        # deepseek-v3 | deepseek-v4 | generic (default: auto-detect)'
    samples_line = (f'samples = "{samples}"' if samples
                    else '# samples = "/shared/samples.json"  # JSON list of strings, or JSONL {"text"}/{"messages"}')
    return INIT_TEMPLATE.format(workdir=workdir, source=source, family_line=family_line,
                                samples_line=samples_line, format=TargetFormat(target_format).value,
                                calibrate="true" if calibrate else "false")
