from console import format as fmt


def test_bar_eighths_and_bounds():
    assert fmt.bar(0.0, 4) == "    "
    assert fmt.bar(1.0, 4) == "████"
    assert fmt.bar(0.5, 4) == "██  "
    assert fmt.bar(2.0, 3) == "███"
    assert fmt.bar(None, 3) == "···"
    assert len(fmt.bar(0.37, 9)) == 9


def test_spark_scales_to_top_and_pads_left():
    assert fmt.spark([0, 1], 4, top=1.0) == "  ▁█"
    assert fmt.spark([], 3) == "   "
    assert fmt.spark([5, 5, 5, 5, 5], 3) == "███"


def test_durations_rates_sizes():
    assert fmt.duration(None) == "-"
    assert fmt.duration(42) == "42s"
    assert fmt.duration(185) == "3m05s"
    assert fmt.duration(3987) == "1h06m"
    assert fmt.rate(0.011, "layers") == "39.6/h"
    assert fmt.rate(2.5, "shards") == "2.5/s"
    assert fmt.rate(18432.0, "tok") == "18.4k/s"
    assert fmt.rate(3 * 2**20, "B") == "3.0M/s"
    assert fmt.size(2 * 2**40) == "2.0T"
    assert fmt.count(17, 61) == "17/61"


def test_hosts_label():
    assert fmt.join_hosts(["node0"], 0) == "node0"
    assert fmt.join_hosts(["node0", "node1", "node2", "node3"], 32) == "4 nodes ×32"
    assert fmt.join_hosts([], 0) == "-"


def test_rank_line_lists_each_rank_share():
    from console.format import rank_line

    assert rank_line([(0, "node0", 12, 30), (1, "node1", 10, 28)], 2) == "ranks 2: r0 12/30 node0 · r1 10/28 node1"
    assert rank_line([(0, "", 3, 4)], 4) == "ranks 4: r0 3/4"  # ranks not reported yet are not listed
    assert rank_line([(0, "node0", 3, 4)], 1) == "" and rank_line([], 8) == ""
    lockstep = [(r, f"node{r // 8}", 17 if r != 9 else 16, 61) for r in range(32)]  # 32 ranks on 4 nodes
    assert rank_line(lockstep, 32) == ("ranks 32: r0-7 17/61 node0 · r8 17/61 node1 · r9 16/61 node1 · "
                                       "r10-15 17/61 node1 · r16-23 17/61 node2 · r24-31 17/61 node3")
    assert rank_line(lockstep, 32, width=40) == "ranks 32: r0-7 17/61 node0 · r8 17/61 n…"
