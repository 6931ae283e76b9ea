"""A fixed, in-memory Backend for snapshots only (deterministic rows, times and ids); Pilot tests of actions use
the real engine through console.api_backend instead."""

from __future__ import annotations

from console.backend import Backend
from console.models import AttemptView, HistoryRow, RunDetailView
from engine.api import CalibView, QualityView, RunView, StageView
from engine.core.names import StageState

T0 = 1_763_780_000.0  # 2025-11-22 02:53:20 UTC
NODES = ("node0", "node1", "node2", "node3")
META = {"model": "DeepSeek-V3 671B", "target": "nvfp4 W4A4"}


def stage(name: str, state: str, unit: str = "", done: float = 0, total: float = 0, *, rate: float | None = None,
          eta_s: float | None = None, label: str = "", ranks: int = 0, rank_parts: tuple = (), quiet: tuple = (),
          **kw) -> StageView:
    """A stage view as the engine builds one: these figures in its merged progress (world, each rank's share), the
    quiet ranks as the stall check names them."""
    p = {k: v for k, v in {"unit": unit, "done": done, "total": total, "rate": rate, "eta_s": eta_s, "label": label,
                           "world": ranks}.items() if v}
    if rank_parts:
        p["ranks"] = [{"rank": r, "host": h, "done": d, "total": t} for r, h, d, t in rank_parts]
    return StageView(name, StageState(state), progress=p or None, quiet_ranks=[{"rank": r} for r in quiet], **kw)


def snapshot_run() -> RunView:
    st = (
        stage("inspect", "SUCCEEDED", "tensors", 1830, 1830, host="node0", attempt=1),
        stage("dequant", "SUCCEEDED", "shards", 163, 163, nodes=NODES, ranks=32, attempt=2),
        stage("calibrate", "RUNNING", "layers", 17, 61, rate=0.011, eta_s=3987.0, nodes=NODES, ranks=32, attempt=1,
              label="layer 17"),
        stage("export", "PENDING"),
        stage("inject-mtp", "PENDING"),
        stage("copy-extras", "PENDING"),
        stage("validate", "PENDING"),
    )
    return RunView("r-20251122-0231-a1b2", "/shared/quantdeck/runs/r-20251122-0231-a1b2", StageState.RUNNING,
                   driver_alive=True, meta=META, stages=st,
                   calib=CalibView(layer=17, layers=61, samples=512, tokens_per_s=18432.0, eta_s=3987.0,
                                   experts_total=256, experts_low=9, min_tokens=8))


def stalled_run() -> RunView:
    """Later in the same run: validated (worst tensor known), eval on 32 ranks stalled with ranks 11 and 12 (node1's
    GPUs 3 and 4) quiet for 15 minutes."""
    parts = tuple((r, NODES[r // 8], 40 if r not in (11, 12) else 38, 61) for r in range(32))
    st = (
        stage("inspect", "SUCCEEDED", "tensors", 1830, 1830, host="node0", attempt=1),
        stage("dequant", "SUCCEEDED", "shards", 163, 163, nodes=NODES, ranks=32, attempt=2),
        stage("calibrate", "SUCCEEDED", "layers", 61, 61, nodes=NODES, ranks=32, attempt=1),
        stage("export", "SUCCEEDED", "shards", 163, 163, nodes=NODES, attempt=1),
        stage("inject-mtp", "SUCCEEDED", attempt=1, host="node0"),
        stage("copy-extras", "SUCCEEDED", attempt=1, host="node0"),
        stage("validate", "SUCCEEDED", attempt=1, host="node0"),
        stage("eval", "RUNNING", "layers", 38, 61, rate=0.02, eta_s=1150.0, nodes=NODES, ranks=32, attempt=1,
              rank_parts=parts, stalled=True, silent_s=912.0, quiet=(11, 12)),
    )
    return RunView("r-20251122-0231-a1b2", "/shared/quantdeck/runs/r-20251122-0231-a1b2", StageState.RUNNING,
                   driver_alive=True, meta=META, stages=st,
                   calib=CalibView(layer=61, layers=61, samples=512, tokens_per_s=None, experts_total=256,
                                   experts_low=9, min_tokens=8),
                   quality=QualityView(worst_tensor="model.layers.3.mlp.experts.17.down_proj", worst_rel_err=0.0912,
                                       validate_state="SUCCEEDED", eval_state="RUNNING"))


def snapshot_history() -> tuple[HistoryRow, ...]:
    return (
        HistoryRow("r-20251122-0231-a1b2", T0 - 60, "3f9c2a1d", "DeepSeek-V3", "nvfp4 W4A4", "512×2048", "RUNNING"),
        HistoryRow("r-20251121-2210-9c8d", T0 - 16_000, "3f9c2a1d", "DeepSeek-V3", "nvfp4 W4A4", "512×2048",
                   "FAILED", "CUDA OOM (calibrate, node2)", "batch 8 → 2"),
        HistoryRow("r-20251121-1502-77aa", T0 - 42_000, "1e0b77c4", "DeepSeek-V3", "nvfp4 W4A4", "128×512",
                   "FAILED", "NCCL timeout (calibrate)", "NCCL_TIMEOUT=3600, node3 NIC"),
        HistoryRow("r-20251120-0930-5e4f", T0 - 130_000, "1e0b77c4", "DeepSeek-V3", "nvfp4", "-", "SUCCEEDED",
                   kld=0.0102, top1=0.941),
        HistoryRow("r-20251119-1811-0d1e", T0 - 200_000, "a4d5e6f7", "DeepSeek-V4", "fp8-block", "-", "SUCCEEDED",
                   kld=0.0049, top1=0.964),
        HistoryRow("r-20251119-0744-c3b2", T0 - 240_000, "a4d5e6f7", "DeepSeek-V4", "nvfp4 W4A4", "128×512",
                   "FAILED", "disk full (export, /shared)", "moved outputs to /scratch"),
    )


class StaticBackend(Backend):
    def __init__(self, run: RunView | None = None, rows: tuple[HistoryRow, ...] | None = None,
                 log: list[str] | None = None):
        self.run = run or snapshot_run()
        self.rows = rows if rows is not None else snapshot_history()
        self.log = log if log is not None else [
            "02:52:58 calibrate rank 0: layer 16 amax all-reduced (MAX) over 32 ranks",
            "02:53:02 calibrate rank 0: layer 16 saved amax/layer_016.safetensors",
            "02:53:03 calibrate rank 0: layer 17 built on cuda:0 (experts 256, dequant fp8→bf16)",
            "02:53:11 calibrate rank 0: layer 17 512 samples, 18.4k tok/s",
            "02:53:18 calibrate rank 0: coverage: 9/256 experts saw <8 tokens (sibling max used)",
        ]
        self.notes: dict[str, str] = {}

    def history(self):
        return self.rows

    def attach_target(self):
        return self.run.id

    def read_run(self, run_id):
        return self.run

    def read_log(self, run_id, stage, offset):
        if stage != "calibrate":
            return [], offset
        return self.log[offset:], len(self.log)

    def detail(self, run_id):
        row = next(r for r in self.rows if r.run_id == run_id)
        atts = (AttemptView("inspect", 1, "node0", 4121, T0 - 15_900, T0 - 15_850, "SUCCEEDED"),
                AttemptView("calibrate", 1, "node2", 5230, T0 - 15_800, T0 - 12_000, "FAILED", "CUDA OOM",
                            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 7.00 GiB on cuda:3"))
        quality = QualityView(worst_tensor="model.layers.58.mlp.experts.201.down_proj", worst_rel_err=0.1043,
                              kld_mean=0.0213, kld_p99=0.31, top1_agree=0.9412, validate_state="SUCCEEDED",
                              eval_state="SUCCEEDED") if row.result == "SUCCEEDED" else None
        return RunDetailView(row, f"/shared/quantdeck/runs/{run_id}", atts,
                             ("amax/layer_000.safetensors … layer_033.safetensors",), quality)

    def set_note(self, run_id, text):
        self.notes[run_id] = text

    def start(self, recipe_path):
        return self.run.id

    def resume(self, run_id):
        return run_id

    export_only = validate_only = cancel = resume
