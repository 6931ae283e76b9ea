"""Recipe models and loader: what a run should do, read from TOML, validated field by field.

Every field has a default that serves one machine except `source.path`. A bad recipe fails at load with
a RecipeError naming the file and the key (`recipe.toml: target.format: …`); pydantic's ValidationError
never leaves this module. Writing recipes as TOML (`quantdeck init`, write_recipe) is engine.runs.recipe_toml.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from engine.core.errors import RecipeError
from engine.core.names import Family, OutputLayout, TargetFormat
from engine.runs.rundir import DEFAULT_STALL_AFTER_S

_CFG = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

DEFAULT_WORKDIR = "./quantdeck-work"

# A string key that must say something: "" and whitespace are refused with the key named.
NonEmpty = Annotated[str, StringConstraints(strip_whitespace=False, pattern=r"\S")]


class RunSection(BaseModel):
    model_config = _CFG
    workdir: NonEmpty = DEFAULT_WORKDIR  # run dirs live in <workdir>/runs/<run-id>/
    name: str | None = None  # a label shown in history (defaults to the source's basename)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    preflight: bool = True  # run preflight automatically before `run`
    # free disk needed = estimate × (1 + margin)
    disk_margin: float = Field(0.10, ge=0.0, le=10.0, allow_inf_nan=False)
    # a RUNNING stage whose ranks wrote no event this long is shown as stalled; a collective waiting this long
    # (torch.distributed's process-group timeout) fails the stage with a timeout that resume recovers from
    stall_after_s: float = Field(DEFAULT_STALL_AFTER_S, gt=0)


class SourceSection(BaseModel):
    model_config = _CFG
    path: str  # a local checkpoint dir, or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint (s3:// sources only)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @property
    def is_s3(self) -> bool:
        return self.path.startswith("s3://")


class ModelSection(BaseModel):
    model_config = _CFG
    family: Family | None = None  # None: auto-detected from config.json and tensor names


class TargetSection(BaseModel):
    model_config = _CFG
    format: TargetFormat = TargetFormat.NVFP4
    calibrate: bool = False  # nvfp4 only: true = W4A4 with calibrated activation scales; false = weight-only
    layouts: tuple[OutputLayout, ...] = (OutputLayout.MODELOPT,)
    output: str | None = None  # None: <workdir>/outputs/<source name>-<format>
    shard_mb: float = Field(5000, gt=0, allow_inf_nan=False)  # output shard size in MB (10^6 bytes)
    device: Literal["auto", "cpu", "cuda"] | None = None  # None: run.device

    @field_validator("layouts", mode="before")
    @classmethod
    def _layouts_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return (v,)
        return v

    @field_validator("layouts")
    @classmethod
    def _layouts_non_empty(cls, v: tuple[OutputLayout, ...]) -> tuple[OutputLayout, ...]:
        if not v:
            raise ValueError("needs at least one of: " + ", ".join(x.value for x in OutputLayout))
        if len(set(v)) != len(v):
            raise ValueError("lists a layout twice")
        return v

    @model_validator(mode="after")
    def _calibrate_needs_nvfp4(self) -> "TargetSection":
        if self.calibrate and self.format != TargetFormat.NVFP4:
            raise ValueError(f"calibrate: true needs format = \"nvfp4\" (got {self.format.value!r})")
        return self


class CalibrationSection(BaseModel):
    model_config = _CFG
    samples: NonEmpty | None = None  # JSON list of strings, or JSONL with {"text"} / {"messages"}
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=1)
    batch_size: int = Field(1, ge=1)
    all_experts: bool = False  # route every token through every expert for statistics only
    quant_cfg: NonEmpty = "NVFP4_DEFAULT_CFG"  # or "deepseek-experts"


class EvalSection(BaseModel):
    """The quality gate after validate (engine.stages.eval): the output against its source on held-out samples."""

    model_config = _CFG
    enable: bool | None = None  # None: on for nvfp4 and fp8-block targets, off for bf16
    samples: NonEmpty | None = None  # None: calibration.samples, after the samples calibrated on
    skip: int | None = Field(None, ge=0)  # samples skipped at the file's start; None: calibration.num_samples
    # when the file is calibration.samples, else 0
    num_samples: int = Field(16, ge=1)  # at most this many (fewer when fewer are left)
    seq_len: int = Field(512, ge=1)
    batch_size: int = Field(1, ge=1)
    max_kld_mean: float = Field(0.1, ge=0.0, allow_inf_nan=False)  # the gate: largest mean KL divergence
    min_top1: float = Field(0.9, ge=0.0, allow_inf_nan=False)  # the gate: smallest top-1 agreement (> 1 never
    # passes)
    device: Literal["auto", "cpu", "cuda"] | None = None  # None: the target's device


class NodeSpec(BaseModel):
    model_config = _CFG
    name: NonEmpty
    host: NonEmpty | None = None  # None: resolved through ~/.ssh/config by name
    user: str | None = None
    port: int = Field(22, ge=1, le=65535)
    key: str | None = None  # path of a private key file (never the key itself)
    gpus: int = Field(0, ge=0)  # 0: CPU-only node


class ClusterSection(BaseModel):
    model_config = _CFG
    nodes: tuple[NodeSpec, ...] = ()  # empty: this machine alone
    head: str | None = None  # runs single-node stages and the torchrun master; default: first node
    python: NonEmpty = "python3"  # python on the nodes
    workdir: str | None = None  # the shared work dir as the nodes see it; default: run.workdir
    host_key_policy: Literal["reject", "accept-new"] = "reject"
    gpus_per_node: int | None = Field(None, ge=1)  # default for nodes that do not say; without nodes: the
    # number of local ranks (torchrun --standalone) of distributed stages such as calibrate
    gpu_memory_gb: float | None = Field(None, gt=0, allow_inf_nan=False)  # each GPU's memory, for preflight where
    # it cannot be probed (None: probed; a GPU neither probed nor stated is not checked)
    env: dict[str, str] = Field(default_factory=dict)  # passed explicitly to every worker (PYTHONPATH, NCCL_*)
    known_hosts: str | None = None  # default ~/.ssh/known_hosts
    ssh_config: str | None = None  # default ~/.ssh/config
    master_addr: str | None = None  # the torchrun master as the nodes reach it; default: the head's host
    connect_timeout: float = Field(10.0, gt=0, le=600, allow_inf_nan=False)

    @field_validator("env")
    @classmethod
    def _no_secrets_in_env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not key or not key.replace("_", "A").isalnum() or key[0].isdigit():
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if any(word in key.upper() for word in ("TOKEN", "SECRET", "PASSWORD", "_KEY")):
                raise ValueError(f"{key} looks like a credential; recipes are copied into the run dir, so "
                                 "set it in the nodes' own environment instead")
        return v

    @model_validator(mode="after")
    def _head_is_a_node(self) -> "ClusterSection":
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"nodes: node names must be unique (got {names})")
        if self.head is not None and self.head not in names:
            raise ValueError(f"head: {self.head!r} is not one of the nodes: {', '.join(names) or '(none)'}")
        return self

    @property
    def is_local(self) -> bool:
        return not self.nodes

    @property
    def head_node(self) -> NodeSpec | None:
        if not self.nodes:
            return None
        name = self.head or self.nodes[0].name
        return next(n for n in self.nodes if n.name == name)


class PushSection(BaseModel):
    model_config = _CFG
    target: str  # s3://bucket/prefix
    endpoint_url: str | None = None
    part_size_mb: int = Field(64, ge=5)
    concurrency: int = Field(8, ge=1, le=256)

    @field_validator("target")
    @classmethod
    def _s3(cls, v: str) -> str:
        if not v.startswith("s3://") or len(v) <= len("s3://"):
            raise ValueError(f"must be an s3://bucket/prefix URL (got {v!r})")
        return v


class Recipe(BaseModel):
    model_config = _CFG
    run: RunSection = RunSection()
    source: SourceSection
    model: ModelSection = ModelSection()
    target: TargetSection = TargetSection()
    calibration: CalibrationSection = CalibrationSection()
    cluster: ClusterSection = ClusterSection()
    push: PushSection | None = None
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _calibration_needs_samples(self) -> "Recipe":
        if self.target.calibrate and not self.calibration.samples:
            raise ValueError("calibration.samples: required when target.calibrate = true")
        return self

    # --- resolved values -------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return self.target.device or self.run.device

    @property
    def eval_enabled(self) -> bool:
        """Whether the plan has an eval stage: [eval] enable, by default on for nvfp4 and fp8-block."""
        if self.eval.enable is not None:
            return self.eval.enable
        return self.target.format in (TargetFormat.NVFP4, TargetFormat.FP8_BLOCK)

    @property
    def label(self) -> str:
        return self.run.name or source_basename(self.source.path)

    def resolve_path(self, p: str, base: Path) -> str:
        if p.startswith("s3://"):
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())


def source_basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or "model"


def _loc(err: dict[str, Any]) -> str:
    parts = [str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-"))]
    out: list[str] = []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}[{p}]"
        elif p in ("function-after", "function-before"):
            continue
        else:
            out.append(p)
    return ".".join(out)


def _message(err: dict[str, Any]) -> str:
    msg = err.get("msg", "invalid")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    elif err.get("type") == "missing":
        msg = "required key is missing"
    elif err.get("type") == "enum":
        exp = (err.get("ctx") or {}).get("expected")
        msg = f"got {err.get('input')!r}; expected {exp}" if exp else msg
    elif err.get("type") == "string_pattern_mismatch":
        msg = "must not be empty"
    elif err.get("type") in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        msg = f"{msg} (got {err.get('input')!r})"
    return msg


_KEY_PREFIX = re.compile(r"^([a-z_][a-z0-9_.\[\]]*): (.*)$", re.S)


def _key_and_message(err: dict[str, Any]) -> tuple[str, str]:
    """The dotted key at fault and the reason; a validator's message may name a sub-key ('head: …')."""
    key, msg = _loc(err), _message(err)
    m = _KEY_PREFIX.match(msg)
    if m:
        key = f"{key}.{m.group(1)}" if key else m.group(1)
        msg = m.group(2)
    return key, msg


def recipe_from_dict(data: dict[str, Any], *, name: str = "recipe.toml") -> Recipe:
    """Validate an already-parsed recipe; errors name `name` and the key."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        first = errs[0]
        key, msg = _key_and_message(first)
        extra = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
        others = "; ".join("{}: {}".format(*_key_and_message(x)) for x in errs[1:4])
        hint = f"also: {others}" if others else "fix that key; `quantdeck init` writes a commented recipe"
        at = f"{name}: {key}" if key else name
        raise RecipeError(f"{name}: {key + ': ' if key else ''}{msg}{extra}", at=at, hint=hint) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a TOML recipe. Raises RecipeError (missing/unreadable file, bad TOML, bad key)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{p}: no such recipe file", at=str(p),
                          hint="write one with `quantdeck init > recipe.toml`") from None
    except OSError as e:
        raise RecipeError(f"{p}: cannot read recipe: {e.strerror}", at=str(p)) from e
    return loads_recipe(raw.decode("utf-8", errors="replace"), name=p.name)


def loads_recipe(text: str, *, name: str = "recipe.toml") -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{name}: not valid TOML: {e}", at=name,
                          hint="check quotes and brackets on that line") from None
    return recipe_from_dict(data, name=name)


def recipe_hash(text: str | bytes) -> str:
    """sha256 (first 16 hex) of the recipe's bytes: what the store and manifests call the recipe hash."""
    if isinstance(text, str):
        text = text.encode()
    return hashlib.sha256(text).hexdigest()[:16]
