"""The plan: a recipe turned into the ordered stages of a run, each with resolved inputs/outputs/options.

    pull → inspect → [dequant | cast-fp8 | convert | calibrate → export] → inject-mtp → copy-extras → validate
         → [eval] → push

Which middle stages a run gets is decided by the target (a table, not if/elif chains in the runner):
- format = "bf16"                       → dequant   (exact dequantization; writes the output)
- format = "fp8-block"                  → cast-fp8  (DeepSeek block-128 cast; writes the output)
- format = "nvfp4", calibrate = false   → convert   (weight-only NVFP4: one streaming pass, no calibration)
- format = "nvfp4", calibrate = true    → calibrate → export (W4A4 from the amax snapshot in <run>/amax)
`pull` only for s3:// sources (into <workdir>/sources/<bucket>/<prefix>); `push` only with [push].
`eval` (the quality gate: the output against its source, engine.stages.eval) is on by default for nvfp4 and
fp8-block targets (`[eval] enable`). Its samples are held out from calibration: `[eval] samples`, by default
calibration.samples after its first calibration.num_samples (`eval_samples`); a recipe that asks for eval and has
no held-out sample is refused here, naming the keys. Without any samples file and without `enable = true`, the
plan has no eval stage.
`calibrate` is always distributed (torchrun on every node); the stages that write output shards (dequant,
cast-fp8, convert, export) are too when the recipe has several nodes or several GPUs on a node
(`shards_spread`): each rank writes its share of the shards, rank 0 the index (engine.convert.ranks).

Modes (what a call of the runner executes):
- run / resume: every stage in order that is not done (SUCCEEDED/SKIPPED); a stage resumes from its
  first unit not done by construction (engine/stages/base.py).
- export-only: export → inject-mtp → copy-extras → validate (→ eval) again, from the saved amax snapshot.
- validate-only: no worker at all: each stage's Stage.check_saved on what is on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from engine import __version__
from engine.calibrate.samples import read_samples_file
from engine.core.errors import RecipeError, RunError, SamplesError
from engine.core.names import StageName, StageState, TargetFormat
from engine.runs.recipe import Recipe, source_basename

PLAN_VERSION = 1
MODES = ("run", "resume", "export-only", "validate-only")
EXPORT_ONLY = (StageName.EXPORT, StageName.INJECT_MTP, StageName.COPY_EXTRAS, StageName.VALIDATE, StageName.EVAL)


@dataclass(frozen=True)
class StagePlan:
    name: str
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    distributed: bool = False  # started under torchrun on every node
    nodes: tuple[str, ...] = ()  # () = the head (or this machine)

    @property
    def params(self) -> dict[str, Any]:
        """What the worker hands the stage as ctx.params: options, inputs and outputs merged into one flat
        dict (keys are distinct by construction: src/model/amax/samples in, dst/report/url out), plus the
        three groups under "inputs", "outputs", "options"."""
        flat: dict[str, Any] = {**self.options, **self.inputs, **self.outputs}
        flat.update({"inputs": dict(self.inputs), "outputs": dict(self.outputs), "options": dict(self.options)})
        return flat

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": self.inputs, "outputs": self.outputs, "options": self.options,
                "distributed": self.distributed, "nodes": list(self.nodes)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "StagePlan":
        return cls(name=obj["name"], inputs=dict(obj.get("inputs", {})), outputs=dict(obj.get("outputs", {})),
                   options=dict(obj.get("options", {})), distributed=bool(obj.get("distributed", False)),
                   nodes=tuple(obj.get("nodes", ())))


@dataclass(frozen=True)
class Plan:
    run_id: str
    stages: tuple[StagePlan, ...]
    workdir: str
    output: str
    source: str  # local dir the stages read (after pull for s3:// sources)
    created: float = field(default_factory=time.time)
    recipe_hash: str = ""
    version: str = __version__

    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == str(name):
                return s
        raise RunError(f"stage {name!r} is not in run {self.run_id}'s plan", at=str(name),
                       hint="stages: " + ", ".join(self.names()))

    def to_json(self) -> dict[str, Any]:
        return {"plan_version": PLAN_VERSION, "run_id": self.run_id, "created": self.created,
                "workdir": self.workdir, "output": self.output, "source": self.source,
                "recipe_hash": self.recipe_hash, "quantdeck_version": self.version,
                "stages": [s.to_json() for s in self.stages]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Plan":
        return cls(run_id=obj["run_id"], stages=tuple(StagePlan.from_json(s) for s in obj["stages"]),
                   workdir=obj.get("workdir", ""), output=obj.get("output", ""), source=obj.get("source", ""),
                   created=float(obj.get("created", 0.0)), recipe_hash=obj.get("recipe_hash", ""),
                   version=obj.get("quantdeck_version", ""))


def middle_stages(recipe: Recipe) -> tuple[StageName, ...]:
    """The stages that produce the output, by target (see the module docstring)."""
    table: dict[tuple[TargetFormat, bool], tuple[StageName, ...]] = {
        (TargetFormat.BF16, False): (StageName.DEQUANT,),
        (TargetFormat.FP8_BLOCK, False): (StageName.CAST_FP8,),
        (TargetFormat.NVFP4, False): (StageName.CONVERT,),
        (TargetFormat.NVFP4, True): (StageName.CALIBRATE, StageName.EXPORT),
    }
    return table[(recipe.target.format, recipe.target.calibrate)]


def resolve_paths(recipe: Recipe, base: Path) -> dict[str, str]:
    """Absolute work dir, source dir (local view), output dir, samples path; relative paths are taken
    from `base` (the recipe's directory)."""
    workdir = recipe.resolve_path(recipe.run.workdir, base)
    if recipe.source.is_s3:
        rest = recipe.source.path[len("s3://"):].strip("/")
        source = str(Path(workdir) / "sources" / rest)
    else:
        source = recipe.resolve_path(recipe.source.path, base)
    fmt = recipe.target.format.value
    output = (recipe.resolve_path(recipe.target.output, base) if recipe.target.output
              else str(Path(workdir) / "outputs" / f"{source_basename(recipe.source.path)}-{fmt}"))
    samples = recipe.resolve_path(recipe.calibration.samples, base) if recipe.calibration.samples else None
    return {"workdir": workdir, "source": source, "output": output, "samples": samples or ""}


@dataclass(frozen=True)
class EvalSamples:
    """The eval stage's held-out samples: `path` from its `skip`-th sample on (None: no samples file)."""

    path: str | None
    skip: int = 0
    available: int | None = None  # samples in the file after `skip` (None: the file is not readable here)


def eval_samples(recipe: Recipe, base: Path) -> EvalSamples:
    """Where the eval stage's samples come from; raises RecipeError when they would overlap the samples
    calibrated on, or when none is left after them."""
    e, c = recipe.eval, recipe.calibration
    cal_path = recipe.resolve_path(c.samples, base) if c.samples else None
    path = recipe.resolve_path(e.samples, base) if e.samples else cal_path
    if path is None:
        return EvalSamples(None)
    same = cal_path is not None and Path(path) == Path(cal_path)
    skip = e.skip if e.skip is not None else (c.num_samples if same else 0)
    if same and recipe.target.calibrate and skip < c.num_samples:
        raise RecipeError(
            f"eval.skip = {skip} would evaluate on samples calibrated on (calibration.num_samples = "
            f"{c.num_samples} of the same file, {path})", at="recipe.toml: eval.skip",
            hint=f"set eval.skip to at least {c.num_samples} (or leave it out), or point eval.samples at "
                 "another file")
    total = _count_samples(path)
    if total is not None and total <= skip:
        key = "eval.samples" if e.samples else "calibration.samples"
        why = (f"its first calibration.num_samples = {c.num_samples} are calibrated on" if same and e.skip is None
               else f"eval.skip = {skip}")
        raise RecipeError(
            f"eval has no held-out sample: {key} ({path}) holds {total} sample(s) and {why}",
            at=f"recipe.toml: {key}",
            hint="add samples after the calibration's to that file, set eval.samples to a held-out file, "
                 "lower calibration.num_samples, or set eval.enable = false")
    available = None if total is None else total - skip
    return EvalSamples(path, skip, available)


def _count_samples(path: str) -> int | None:
    """How many samples the file holds; None where it cannot be read here (preflight and the stage say why)."""
    if not Path(path).is_file():
        return None
    try:
        return len(read_samples_file(path).items)
    except SamplesError:
        return None


def shards_spread(recipe: Recipe) -> bool:
    """Whether the stages that write output shards (convert, dequant, cast-fp8, export) run as torchrun ranks
    sharing the shards (engine.convert.ranks): several nodes, or several GPUs (ranks) on a node."""
    c = recipe.cluster
    return len(c.nodes) > 1 or (c.gpus_per_node or 0) > 1 or any(n.gpus > 1 for n in c.nodes)


def build_plan(recipe: Recipe, *, run_id: str, run_dir: str | Path, base: str | Path,
               recipe_hash: str = "") -> Plan:
    """Resolve `recipe` (relative paths from `base`) into the stages of run `run_id` in `run_dir`."""
    run_dir = Path(run_dir)
    p = resolve_paths(recipe, Path(base))
    src, out = p["source"], p["output"]
    device = recipe.device
    family = recipe.model.family.value if recipe.model.family else None
    layouts = [x.value for x in recipe.target.layouts]
    amax = str(run_dir / "amax")
    common = {"family": family, "device": device}
    stages: list[StagePlan] = []

    if recipe.source.is_s3:
        stages.append(StagePlan(StageName.PULL.value, inputs={"url": recipe.source.path}, outputs={"dst": src},
                                options={"endpoint_url": recipe.source.endpoint_url}))
    stages.append(StagePlan(StageName.INSPECT.value, inputs={"model": src},
                            outputs={"report": str(run_dir / "stages" / "inspect" / "report.json")},
                            options={"family": family}))
    convert_opts = {**common, "layouts": layouts, "shard_mb": recipe.target.shard_mb}
    nodes = tuple(n.name for n in recipe.cluster.nodes)
    spread = {"distributed": True, "nodes": nodes} if shards_spread(recipe) else {}
    for name in middle_stages(recipe):
        if name == StageName.DEQUANT:
            stages.append(StagePlan(name.value, {"src": src}, {"dst": out}, {**convert_opts, "to": "bf16"}, **spread))
        elif name == StageName.CAST_FP8:
            stages.append(StagePlan(name.value, {"src": src}, {"dst": out}, {**convert_opts, "to": "fp8-block"},
                                    **spread))
        elif name == StageName.CONVERT:
            stages.append(StagePlan(name.value, {"src": src}, {"dst": out}, {**convert_opts, "to": "nvfp4"}, **spread))
        elif name == StageName.CALIBRATE:
            c = recipe.calibration
            stages.append(StagePlan(name.value, {"model": src, "samples": p["samples"]}, {"amax": amax},
                                    {**common, "num_samples": c.num_samples, "seq_len": c.seq_len,
                                     "batch_size": c.batch_size, "all_experts": c.all_experts,
                                     "quant_cfg": c.quant_cfg}, distributed=True, nodes=nodes))
        elif name == StageName.EXPORT:
            stages.append(StagePlan(name.value, {"src": src, "amax": amax}, {"dst": out},
                                    {**convert_opts, "to": "nvfp4"}, **spread))
    stages.append(StagePlan(StageName.INJECT_MTP.value, {"src": src}, {"dst": out},
                            {"family": family, "layouts": layouts}))
    stages.append(StagePlan(StageName.COPY_EXTRAS.value, {"src": src}, {"dst": out}, {"layouts": layouts}))
    stages.append(StagePlan(StageName.VALIDATE.value,
                            {"dst": out, "src": src, **({"amax": amax} if recipe.target.calibrate else {})},
                            {"report": str(run_dir / "stages" / "validate" / "report.json")},
                            {"format": recipe.target.format.value, "layouts": layouts, "device": device}))
    if recipe.eval_enabled:
        held = eval_samples(recipe, Path(base))
        if held.path is not None or recipe.eval.enable:
            stages.append(eval_stage(recipe, held, src, out, layouts, run_dir))
    if recipe.push is not None:
        stages.append(StagePlan(StageName.PUSH.value, {"src": out}, {"url": recipe.push.target},
                                {"endpoint_url": recipe.push.endpoint_url,
                                 "part_size": recipe.push.part_size_mb << 20,
                                 "concurrency": recipe.push.concurrency}))
    return Plan(run_id=run_id, stages=tuple(stages), workdir=p["workdir"], output=out, source=src,
                recipe_hash=recipe_hash)


def eval_stage(recipe: Recipe, held: EvalSamples, src: str, out: str, layouts: list[str],
               run_dir: Path) -> StagePlan:
    """The eval stage (the quality gate) on the held-out samples `held`; raises RecipeError without any."""
    e = recipe.eval
    if held.path is None:
        raise RecipeError("eval.enable = true but there are no samples to evaluate on: neither eval.samples nor "
                          "calibration.samples is set", at="recipe.toml: eval.samples",
                          hint="set eval.samples to a held-out samples file (JSON list or JSONL), or eval.enable = "
                               "false")
    return StagePlan(StageName.EVAL.value, {"dst": out, "src": src, "samples": held.path},
                     {"report": str(run_dir / "stages" / "eval" / "report.json")},
                     {"layouts": layouts, "skip": held.skip, "num_samples": e.num_samples, "seq_len": e.seq_len,
                      "batch_size": e.batch_size, "max_kld_mean": e.max_kld_mean, "min_top1": e.min_top1,
                      "device": e.device or recipe.device})


def stages_to_run(plan: Plan, states: dict[str, StageState | str], mode: str = "run") -> list[str]:
    """The stages a call of the runner executes, in order.

    run/resume: from the first stage not done onwards (stages already done are kept).
    export-only: export, inject-mtp, copy-extras, validate, eval where planned (all of them again); raises RunError
    when the plan has no export stage or its calibration is not done.
    """
    if mode not in MODES:
        raise RunError(f"unknown mode {mode!r}", at=mode, hint="one of: " + ", ".join(MODES))
    st = {k: StageState(v) for k, v in states.items()}
    if mode in ("run", "resume"):
        return [n for n in plan.names() if not st.get(n, StageState.PENDING).is_done()]
    if mode == "export-only":
        names = plan.names()
        if StageName.EXPORT.value not in names:
            raise RunError(f"run {plan.run_id} has no export stage (its target is not calibrated nvfp4)",
                           at=plan.run_id, hint="use `quantdeck resume` instead")
        cal = StageName.CALIBRATE.value
        if cal in names and not st.get(cal, StageState.PENDING).is_done():
            raise RunError(f"run {plan.run_id}: calibrate is not done, so there is no amax snapshot to export from",
                           at=plan.run_id, hint="`quantdeck resume` finishes calibration first")
        return [n for n in names if n in {s.value for s in EXPORT_ONLY}]
    return []  # validate-only runs no stage


def first_not_done(plan: Plan, states: dict[str, StageState | str]) -> str | None:
    todo = stages_to_run(plan, states, "resume")
    return todo[0] if todo else None


def stage_order(names: Iterable[str]) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}
