"""engine.runs.progress_merge over event files written as workers write them (JsonlSink, Progress): a distributed
stage's progress is the sum of its ranks' shares (calibrate's: its slowest rank), read by offset, per attempt."""

from __future__ import annotations

import pytest

from engine.core.events import SCOPE_ALL, JsonlSink, Progress, read_events
from engine.runs.progress_merge import StageProgress, merge_progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def rank_sink(stage_dir, rank: int, attempt: int = 1, host: str | None = None) -> JsonlSink:
    """A rank's sink as engine.runs.worker opens it, with the RUNNING state event it writes first."""
    name = "events.jsonl" if rank == 0 else f"events.rank{rank}.jsonl"
    sink = JsonlSink(stage_dir / name, stage="convert", rank=rank, host=host or f"node{rank}")
    sink.emit("state", state="RUNNING", attempt=attempt, pid=100 + rank, world_size=2)
    return sink


def test_two_ranks_shares_are_summed_with_rate_and_eta_from_the_sums(tmp_path):
    clock = Clock()
    s0, s1 = rank_sink(tmp_path, 0), rank_sink(tmp_path, 1)
    p0 = Progress(s0, "tensors", total=30, bytes_total=3000, interval_s=0.0, clock=clock)
    p1 = Progress(s1, "tensors", total=28, bytes_total=2000, interval_s=0.0, clock=clock)
    clock.t = 10.0
    p0.advance(12, nbytes=1200, label="a")  # 120 B/s
    p1.advance(10, nbytes=500, label="b")  # 50 B/s
    got = StageProgress(tmp_path).poll(attempt=1, world=2)
    assert (got["done"], got["total"], got["bytes_done"], got["bytes_total"]) == (22, 58, 1700, 5000)
    assert got["rate"] == pytest.approx(170.0) and got["eta_s"] == pytest.approx(3300 / 170.0)
    assert got["unit"] == "tensors" and got["world"] == 2 and got["label"] in ("a", "b")
    assert [(r["rank"], r["host"], r["done"], r["total"]) for r in got["ranks"]] == [(0, "node0", 12, 30),
                                                                                     (1, "node1", 10, 28)]


def test_follows_each_rank_file_by_offset_and_a_finished_rank_adds_no_rate(tmp_path):
    clock = Clock()
    s0, s1 = rank_sink(tmp_path, 0), rank_sink(tmp_path, 1)
    p0 = Progress(s0, "tensors", total=4, interval_s=0.0, clock=clock)
    p1 = Progress(s1, "tensors", total=4, interval_s=0.0, clock=clock)
    sp = StageProgress(tmp_path)
    assert sp.poll() is None  # nothing reported yet
    clock.t = 2.0
    p0.advance(1)
    first = sp.poll(attempt=1, world=2)
    assert (first["done"], first["total"], len(first["ranks"])) == (1, 4, 1)  # rank 1 has not reported yet
    offsets = {r: f.offset for r, f in sp._files.items()}
    assert offsets == {0: (tmp_path / "events.jsonl").stat().st_size,
                       1: (tmp_path / "events.rank1.jsonl").stat().st_size}
    p1.advance(4)  # rank 1 is done: 2 units/s, then no longer working
    p0.advance(1)
    got = sp.poll(attempt=1, world=2)
    assert (got["done"], got["total"]) == (6, 8)
    assert got["rate"] == pytest.approx(1.0) and got["eta_s"] == pytest.approx(2.0)  # rank 0's 2 left at 1/s
    # a poll reads only what was appended: the lines already read are never parsed again
    (tmp_path / "events.jsonl").open("a").write("not json\n")
    assert sp.poll(attempt=1, world=2) == got


def test_an_earlier_attempt_and_ranks_beyond_the_world_do_not_count(tmp_path):
    clock = Clock()
    old = [rank_sink(tmp_path, r, attempt=1) for r in range(3)]
    for s in old:
        Progress(s, "tensors", total=10, interval_s=0.0, clock=clock).advance(5)
    s0, _ = rank_sink(tmp_path, 0, attempt=2), rank_sink(tmp_path, 1, attempt=2)  # a rerun on 2 ranks
    Progress(s0, "tensors", total=5, interval_s=0.0, clock=clock).advance(2)
    got = StageProgress(tmp_path).poll(attempt=2, world=2)
    assert (got["done"], got["total"], [r["rank"] for r in got["ranks"]]) == (2, 5, [0])
    # without the status's attempt and world (an old run): every rank file's latest attempt counts
    got = StageProgress(tmp_path).poll()
    assert (got["done"], got["total"], got["world"]) == (7, 15, 3)  # rank 0 (attempt 2), rank 2 (1)


def test_a_tail_read_skips_the_cut_line_and_one_rank_is_its_event_unchanged(tmp_path):
    clock = Clock()
    s0 = rank_sink(tmp_path, 0)
    p = Progress(s0, "tensors", total=5000, interval_s=0.0, clock=clock)
    for _ in range(2000):
        clock.t += 0.01
        p.advance(1, label="model.layers.0.mlp.experts.0.w1")
    sp = StageProgress(tmp_path, tail=4096)
    got = sp.poll(attempt=1, world=1)
    evs, _ = read_events(tmp_path / "events.jsonl")
    assert got == evs[-1].data  # world 1: the rank's own latest progress, no "ranks"
    assert sp._files[0].offset == (tmp_path / "events.jsonl").stat().st_size


def test_scope_all_is_as_far_as_the_slowest_rank(tmp_path):
    """calibrate: every rank walks every layer (Progress(scope="all")): the stage is at its slowest rank."""
    clock = Clock()
    ps = [Progress(rank_sink(tmp_path, r), "layers", total=8, interval_s=0.0, clock=clock, scope=SCOPE_ALL)
          for r in range(2)]
    clock.t = 4.0
    ps[0].advance(4)
    ps[1].advance(2)
    got = StageProgress(tmp_path).poll(attempt=1, world=2)
    assert (got["done"], got["total"], got["scope"]) == (2, 8, SCOPE_ALL)
    assert got["rate"] == pytest.approx(0.5) and got["eta_s"] == pytest.approx(12.0)
    assert [(r["done"], r["total"]) for r in got["ranks"]] == [(4, 8), (2, 8)]


def test_merge_of_nothing_is_none():
    assert merge_progress({}) is None


def test_stage_ranks_merges_a_followed_stream_and_a_new_attempt_drops_a_rank(tmp_path):
    """What `quantdeck run` and the headless console print: the followed events of both rank files, merged."""
    from engine.runs.progress_merge import StageRanks

    clock = Clock()
    s0, s1 = rank_sink(tmp_path, 0), rank_sink(tmp_path, 1)
    Progress(s0, "tensors", total=6, interval_s=0.0, clock=clock).advance(2)
    Progress(s1, "tensors", total=4, interval_s=0.0, clock=clock).advance(3)
    rank_sink(tmp_path, 1, attempt=2)  # rank 1 starts again: its attempt-1 progress no longer counts
    merged, sr = [], StageRanks()
    for name in ("events.jsonl", "events.rank1.jsonl"):
        for ev in read_events(tmp_path / name)[0]:
            m = sr.feed(ev)
            if m is not None:
                merged.append((m["done"], m["total"], m.get("world")))
    assert merged == [(2, 6, None), (5, 10, 2)]
    last0 = read_events(tmp_path / "events.jsonl")[0][-1]
    assert sr.feed(last0) == last0.data  # rank 1 dropped (attempt 2): rank 0 alone, its event unchanged
