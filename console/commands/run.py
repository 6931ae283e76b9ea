"""Run commands: init, run, status, logs, cancel, resume, export-only, validate-only, history, note, preflight.

They talk to the engine only through engine.api (imported inside each command, so `quantdeck --help`
stays free of torch). stdout is for data (the run id line, --json, the history table, log text);
progress and chatter go to stderr.
"""

from __future__ import annotations

import json
import sys
import time

import click

from engine.core.names import StageState


def _engine():
    from engine.api import open_engine

    return open_engine()


def _fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _fmt_dur(a: float | None, b: float | None) -> str:
    if not a:
        return "-"
    s = int((b or time.time()) - a)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Printer:
    """Turns followed events into stderr lines (progress at most once a second per stage: a distributed
    stage's over all its ranks, engine.runs.progress_merge)."""

    def __init__(self) -> None:
        from engine.api import StageRanks

        self.last: dict[str, float] = {}
        self.ranks = StageRanks()

    def __call__(self, ev) -> None:
        merged = self.ranks.feed(ev)
        d = merged or ev.data
        tag = f"[{ev.stage}{'' if not ev.rank or merged else f' r{ev.rank}'}]"
        if ev.kind == "state":
            extra = f": {d.get('error_class')}: {d.get('error')}" if d.get("error_class") else ""
            hint = f" (hint: {d.get('hint')})" if d.get("hint") else ""
            click.echo(f"{tag} {d.get('state')}{extra}{hint}", err=True)
        elif ev.kind == "log" and d.get("level") in ("info", "warning", "error"):
            click.echo(f"{tag} {d.get('level')}: {d.get('msg')}", err=True)
        elif ev.kind == "progress":
            now = time.monotonic()
            key = str(ev.stage)
            if d.get("done") != d.get("total") and now - self.last.get(key, 0) < 1.0:
                return
            self.last[key] = now
            eta = d.get("eta_s")
            ranks = f" ({d['world']} ranks)" if d.get("world") else ""
            click.echo(f"{tag} {d.get('done')}/{d.get('total')} {d.get('unit', '')}{ranks}"
                       + (f", ETA {eta:.0f}s" if eta else "") + (f"  {d['label']}" if d.get("label") else ""),
                       err=True)


class _StallWatch:
    """Looks at the run every few seconds while it is followed and prints a line when a stage goes stalled
    (no event from a rank at work for the run's `[run] stall_after_s`: which ranks, pid and host) and when it
    reports again. Used as eng.follow's `stop` check; it never stops the following."""

    def __init__(self, eng, run_id: str, every_s: float = 2.0) -> None:
        self.eng, self.run_id, self.every_s = eng, run_id, every_s
        self.next = 0.0
        self.stalled: set[str] = set()

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            return False
        self.next = now + self.every_s
        for s in self.eng.status(self.run_id).stages:
            if s.stalled and s.name not in self.stalled:
                self.stalled.add(s.name)
                click.echo(f"[{s.name}] {stall_line(s)}", err=True)
            elif not s.stalled and s.name in self.stalled:
                self.stalled.discard(s.name)
                click.echo(f"[{s.name}] " + ("reporting again" if s.state == StageState.RUNNING else s.state), err=True)
        return False


def stall_line(s) -> str:
    """"STALLED: no event for 912s from rank 1 (pid 4242 on node1)" for a stalled stage view (engine.api StageView)."""
    who = ", ".join(f"rank {q['rank']} (pid {q.get('pid') or '?'} on {q.get('host') or '?'})" for q in s.quiet_ranks)
    return f"STALLED: no event for {s.silent_s:.0f}s from {who or 'any rank'}"


def _follow(eng, run_id: str) -> int:
    """Follow a run until its driver ends, saying when a stage stalls. Ctrl-C stops following, never the run."""
    try:
        view = eng.follow(run_id, _Printer(), stop=_StallWatch(eng, run_id))
    except KeyboardInterrupt:
        click.echo(f"stopped following; run {run_id} goes on (quantdeck status {run_id}, "
                   f"quantdeck cancel {run_id})", err=True)
        return 0
    click.echo(f"run {run_id}: {view.result}", err=True)
    if view.result == StageState.PENDING:  # the driver ended before starting a stage: say why
        for line in eng.driver_log(run_id).strip().splitlines()[-3:]:
            click.echo(f"  {line}", err=True)
    for s in view.stages:
        if s.error_class:
            click.echo(f"  {s.name}: {s.state}: {s.error_class}: {s.error} (hint: {s.hint})", err=True)
    return 0 if view.result == StageState.SUCCEEDED else 1


@click.command("init")
@click.option("--family", type=click.Choice(["deepseek-v3", "deepseek-v4", "generic"]), default=None,
              help="Model family (default: auto-detected from the checkpoint).")
@click.option("--source", default="/path/to/checkpoint", help="Checkpoint dir or s3://bucket/prefix.")
@click.option("--workdir", default="./quantdeck-work", help="Where run dirs live.")
@click.option("--samples", default=None, help="Calibration samples file (turns calibration on).")
@click.option("--format", "fmt", type=click.Choice(["nvfp4", "fp8-block", "bf16"]), default="nvfp4")
def init_cmd(family, source, workdir, samples, fmt):
    """Print a commented recipe: quantdeck init > recipe.toml"""
    from engine.api import init_recipe

    click.echo(init_recipe(family, source=source, workdir=workdir, samples=samples, target_format=fmt,
                           calibrate=bool(samples) and fmt == "nvfp4"), nl=False)


@click.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--detach", is_flag=True, help="Start the run and return at once.")
@click.option("--no-preflight", is_flag=True, help="Skip the automatic preflight.")
@click.option("--launcher-factory", default=None, hidden=True,
              help="module:function building the launcher (default: local; remote ones for [cluster]).")
def run_cmd(recipe, detach, no_preflight, launcher_factory):
    """Plan and start a run from RECIPE; prints `run <id>` first, then follows it (Ctrl-C stops following only)."""
    eng = _engine()
    factory = launcher_factory or _factory_for(recipe)
    run_id = eng.start(recipe, preflight=False if no_preflight else None, launcher_factory=factory,
                       extra_checks=_remote_checks(recipe))
    click.echo(f"run {run_id}")
    sys.stdout.flush()
    if detach:
        return
    sys.exit(_follow(eng, run_id))


def _factory_for(recipe_path: str) -> str | None:
    """The launcher factory for a recipe: remote's when it has a [cluster], else the local one."""
    recipe = _engine().load_recipe(recipe_path)
    if recipe.cluster.is_local:
        return None
    try:
        import remote.launchers as rl  # noqa: F401
    except ImportError:
        return None
    return "remote.launchers:launcher_for" if hasattr(rl, "launcher_for") else None


def _remote_checks(recipe_path: str) -> tuple:
    """remote's per-node preflight checks for a recipe with a [cluster] (none for this machine alone)."""
    recipe = _engine().load_recipe(recipe_path)
    if recipe.cluster.is_local:
        return ()
    try:
        from remote.preflight import check_nodes
    except ImportError:
        return ()
    return (check_nodes,)


def quality_text(q: dict, lead: str = "") -> str:
    """The eval figures of a run in words ("" without any): `KLD 0.0123  top-1 98.40%`."""
    kld, top1 = q.get("kld_mean"), q.get("top1_agree")
    if kld is None and top1 is None:
        return ""
    return (f"{lead}KLD {kld:.4g}" if kld is not None else f"{lead}KLD -") + \
        (f"  top-1 {top1 * 100:.2f}%" if top1 is not None else "  top-1 -")


@click.command("status")
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (a list without RUN).")
def status_cmd(run, as_json):
    """Every stage's state, host, pid and attempt of RUN (all runs without RUN); a running stage's progress, over
    all its ranks (then also each rank's share), and whether it stalled (`stalled`, `silent_s`, `quiet_ranks`)."""
    from console.format import rank_line

    eng = _engine()
    if run is None:
        views = eng.runs()
        if as_json:
            click.echo(json.dumps([{**v.to_json(), **eng.quality(v.run_dir)} for v in views], indent=2, default=str))
            return
        for v in views:
            cur = next((s for s in v.stages if s.running), None)
            click.echo(f"{v.id}  {v.result:<9}  {v.meta.get('model', '-')}  {v.meta.get('target', '-')}"
                       + quality_text(eng.quality(v.run_dir), "  ")
                       + (f"  [{cur.name}{' STALLED' if cur.stalled else ''}]" if cur else ""))
        return
    v = eng.status(run)
    q = eng.quality(v.run_dir)
    if as_json:
        click.echo(json.dumps({**v.to_json(), **q}, indent=2, default=str))
        return
    click.echo(f"run {v.id}: {v.result}  ({v.meta.get('model')}, {v.meta.get('target')}) {v.run_dir}")
    if quality_text(q):
        click.echo(f"quality: {quality_text(q)}")
    click.echo(f"{'STAGE':<12} {'STATE':<13} {'ATT':>3}  {'HOST':<12} {'PID':>7}  {'TIME':>7}  PROGRESS / ERROR")
    for s in v.stages:
        prog, ranks = "", ""
        if s.progress and s.running:
            p = s.progress  # a distributed stage's: summed over its ranks, each rank's share in p["ranks"]
            prog = f"{p.get('done')}/{p.get('total')} {p.get('unit', '')}"
            if p.get("eta_s") is not None:
                prog += f", ETA {p['eta_s']:.0f}s"
            ranks = rank_line([(r.get("rank"), r.get("host"), r.get("done") or 0, r.get("total") or 0)
                               for r in p.get("ranks") or ()], int(p.get("world") or 0))
        if s.error_class:
            prog = f"{s.error_class}: {s.error}"
        if s.stalled:
            prog = f"{stall_line(s)}; {prog}" if prog else stall_line(s)
        click.echo(f"{s.name:<12} {s.state:<13} {s.attempt:>3}  {str(s.host or '-'):<12} {str(s.pid or '-'):>7}  "
                   f"{_fmt_dur(s.started_at, s.ended_at) if s.started_at else '-':>7}  {prog}")
        if ranks:
            click.echo(f"{'':<12} {ranks}")


@click.command("logs")
@click.argument("run")
@click.argument("stage", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing as the log grows.")
def logs_cmd(run, stage, follow):
    """Print a stage's log.txt (default: the current or last started stage)."""
    eng = _engine()
    if stage is None:
        v = eng.status(run)
        started = [s for s in v.stages if s.attempt > 0]
        live = [s for s in started if s.running]
        stage = (live or started or v.stages)[-1 if not live else 0].name
    text, off = eng.log(run, stage)
    sys.stdout.write(text)
    sys.stdout.flush()
    if not follow:
        return
    try:
        while True:
            time.sleep(0.5)
            text, off = eng.log(run, stage, off)
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
            elif eng.status(run).result != StageState.RUNNING:
                return
    except KeyboardInterrupt:
        return


@click.command("cancel")
@click.argument("run")
def cancel_cmd(run):
    """Stop RUN's driver and live workers (their process groups) and record CANCELLED."""
    stages = _engine().cancel(run)
    click.echo(f"cancelled {run}: " + (", ".join(stages) if stages else "no live stage"), err=True)


def _restart(kind: str, run: str, detach: bool) -> None:
    eng = _engine()
    fn = {"resume": eng.resume, "export-only": eng.export_only}[kind]
    run_id = fn(run, launcher_factory=_factory_for(str(eng.find(run).recipe_path)),
                on_wait=lambda line: click.echo(f"quantdeck: {line}", err=True))
    click.echo(f"run {run_id}")
    sys.stdout.flush()
    if not detach:
        sys.exit(_follow(eng, run_id))


@click.command("resume")
@click.argument("run")
@click.option("--detach", is_flag=True)
def resume_cmd(run, detach):
    """Continue RUN from its first stage not done, from that stage's first unit not done."""
    _restart("resume", run, detach)


@click.command("export-only")
@click.argument("run")
@click.option("--detach", is_flag=True)
def export_only_cmd(run, detach):
    """Re-run export → inject-mtp → copy-extras → validate from RUN's saved amax snapshot."""
    _restart("export-only", run, detach)


@click.command("validate-only")
@click.argument("run")
@click.option("--json", "as_json", is_flag=True)
def validate_only_cmd(run, as_json):
    """Check what RUN saved (amax snapshot, partial and finished outputs); runs nothing heavy, changes nothing."""
    from engine.api import raise_if_problems

    problems = _engine().validate_only(run)
    if as_json:
        click.echo(json.dumps({"run": run, "ok": not problems, "problems": problems}, indent=2))
    else:
        for p in problems:
            click.echo(p)
        if not problems:
            click.echo(f"run {run}: saved state is consistent", err=True)
    raise_if_problems(problems, f"run {run}")


@click.command("history")
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--rescan", type=click.Path(file_okay=False), default=None,
              help="Rebuild the store from the run dirs under DIR first.")
def history_cmd(run, as_json, rescan):
    """The run-history table (run, date, commit, model, target, calib, KLD, top-1, result, root cause, fix); with RUN,
    its attempts."""
    eng = _engine()
    if rescan:
        ids = eng.rescan(rescan)
        click.echo(f"rescanned {len(ids)} run(s) under {rescan}", err=True)
    if run:
        atts = eng.attempts(run)
        if as_json:
            click.echo(json.dumps([a.to_json() for a in atts], indent=2))
            return
        click.echo(f"{'STAGE':<12} {'ATT':>3} {'STATE':<13} {'HOST':<12} {'PID':>7} {'START':<16} {'DUR':>7}  ERROR")
        for a in atts:
            err = f"{a.error_class}: {a.error_text}" if a.error_class else ""
            click.echo(f"{a.stage:<12} {a.attempt:>3} {str(a.state):<13} {str(a.host or '-'):<12} "
                       f"{str(a.pid or '-'):>7} {_fmt_time(a.started_at):<16} "
                       f"{_fmt_dur(a.started_at, a.ended_at):>7}  {err}")
        return
    recs = eng.history()
    if as_json:
        click.echo(json.dumps([r.to_json() for r in recs], indent=2))
        return
    click.echo("| Run | Date | Commit | Model | Target | Calib | KLD | Top-1 | Result | Root Cause | Fix |")
    click.echo("|-----|------|--------|-------|--------|-------|-----|-------|--------|------------|-----|")
    for r in recs:
        cells = [r.id, _fmt_time(r.created), r.git_commit or "-", r.model or "-", r.target or "-",
                 str(r.calib_size) if r.calib_size else "-",
                 f"{r.kld_mean:.4g}" if r.kld_mean is not None else "-",
                 f"{r.top1_agree * 100:.2f}%" if r.top1_agree is not None else "-", r.result or "-",
                 r.root_cause or "—", r.fix_note or "—"]
        click.echo("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")


@click.command("note")
@click.argument("run")
@click.argument("text")
def note_cmd(run, text):
    """Record the fix for RUN (the history's Fix column)."""
    _engine().note(run, text)
    click.echo(f"noted on {run}", err=True)


@click.command("preflight")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: ok, failures, notes, and each heavy stage's memory per rank and node.")
def preflight_cmd(recipe, as_json):
    """Cheap checks of RECIPE before any GPU is held: one line per failure with its fix, and what each rank of
    calibrate, export and eval needs in host RAM and GPU memory."""
    from engine.api import PreflightError

    notes: list[str] = []
    report: dict = {}
    fails = _engine().preflight(recipe, notes=notes, extra_checks=_remote_checks(recipe), report=report)
    if as_json:
        click.echo(json.dumps({"recipe": recipe, "ok": not fails, "failures": fails, "notes": notes,
                               "memory": report.get("memory", [])}, indent=2))
    else:
        for n in notes:
            click.echo(f"  {n}", err=True)
        for m in report.get("memory", []):
            gpu = f", GPU {m['gpu_gb']} GB" if m["gpu_gb"] is not None else ""
            click.echo(f"  memory: {m['stage']} on {m['node']}: {m['ranks']} rank(s) × host {m['host_gb']} GB"
                       f"{gpu} per rank ({m['device']})", err=True)
        for f in fails:
            click.echo(f)
    if fails:
        raise PreflightError(f"{len(fails)} preflight check(s) failed", at=recipe, failures=fails,
                             hint="fix the lines above, then run preflight again")
    click.echo(f"preflight ok: {recipe}", err=True)


COMMANDS = (init_cmd, run_cmd, status_cmd, logs_cmd, cancel_cmd, resume_cmd, export_only_cmd, validate_only_cmd,
            history_cmd, note_cmd, preflight_cmd)
