"""The benchmarks on tiny configs: timings are not asserted, but every figure derived from them is recomputed here, and
the mask-update counts and the loop's SPS against hand computations."""

import math
import os
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT
from tensorboardX import SummaryWriter

import dqn_pruned as dqn

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory
import throughput
import update_ab


def test_throughput_rows_follow_their_formulas(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--env-id", "CartPole-v1", "--network", "mlp", "--methods", "none", "gmp", "--learning-starts", "200"]
    rows = throughput.main(
        flags + ["--warmup-steps", "100", "--loop-steps", "200", "--calls", "10", "--buffer-size", "1000"]
    )
    out = capsys.readouterr().out.splitlines()
    table = out[
        next(i for i, line in enumerate(out) if line.startswith("dqn_pruned.py on ")) :
    ]  # after the runs' lines
    assert table[0].startswith(
        "dqn_pruned.py on CartPole-v1, mlp k=1, batch 32, a gradient step every 4 env steps; cpu"
    )
    assert table[1].startswith("| method | env steps/s |") and [line.split(" | ")[0] for line in table[3:]] == [
        "| none",
        "| gmp",
    ]
    assert [row["method"] for row in rows] == ["none", "gmp"]
    assert os.listdir(tmp_path) == []  # its runs went to a scratch directory
    none, gmp = rows
    for row in rows:
        for key in ("env", "store", "act", "sample", "learn", "update", "bound", "loop", "paper"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
        assert row["update"] == pytest.approx(1 / (1 / row["learn"] - 1 / row["sample"]))
        host = 1 / row["env"] + 1 / row["store"] + 1 / row["act"]
        assert row["bound"] == pytest.approx(1 / (host + 1 / (4 * row["learn"])))
        assert row["vs_dense"] == pytest.approx(none["paper"] / row["paper"])
        assert row["projected_hours"] == pytest.approx(10_000_000 / row["paper"] / 3600)
    assert none["mask"] == 0.0 and none["paper"] == pytest.approx(none["loop"]) and none["vs_dense"] == 1.0
    # gmp, 500 env steps: 75 gradient steps (env steps 200, 204, ..., 496), mask updates at round(0.2 * 75) = 15 and
    # the forced round(0.8 * 75) = 60. The timed window, env steps 300-499, holds gradient steps 25-74: 50 steps and
    # the update at 60, swapped for 50 steps at the paper's rate (1498 in 2,495,000).
    swapped = 50 * 1498 / 2_495_000 - 1
    assert gmp["paper"] == pytest.approx(200 / (200 / gmp["loop"] + swapped * gmp["mask"] / 1000))


def test_throughput_gradient_steps_table(capsys, tmp_path, monkeypatch):
    """--gradient-steps N ...: a row per method and N, gradient steps/s N times the calls/s of one jitted call of N
    steps, and update / N = 1 the ratio of the update rates (their timings replaced by known ones)."""
    monkeypatch.chdir(tmp_path)
    seconds = iter([0.1, 0.05, 0.3, 0.1, 0.5, 0.1])  # per call: learn and update at N = 1, 2, 4
    monkeypatch.setattr(throughput, "rate", lambda function, count: function() and 1 / next(seconds))
    flags = ["--env-id", "CartPole-v1", "--network", "mlp", "--methods", "gmp", "--learning-starts", "100"]
    rows = throughput.main(flags + ["--gradient-steps", "1", "2", "4", "--buffer-size", "1000"])
    assert [(row["method"], row["n"]) for row in rows] == [("gmp", 1), ("gmp", 2), ("gmp", 4)]
    assert [row["learn"] for row in rows] == pytest.approx([10.0, 2 / 0.3, 4 / 0.5])
    assert [row["update"] for row in rows] == pytest.approx([20.0, 20.0, 40.0])
    assert [row["vs_one"] for row in rows] == pytest.approx([1.0, 1.0, 2.0])
    out = capsys.readouterr().out.splitlines()
    assert out[-6].startswith("dqn_pruned.py on CartPole-v1, mlp k=1, batch 32, N gradient steps per jitted call")
    assert out[-1] == "| gmp | 4 | 8.0 | 40.0 | 2.00 |"
    with pytest.raises(SystemExit):
        throughput.main(flags + ["--gradient-steps", "0"])


def test_paper_rate_counts_the_paper_schedule():
    """The paper's run: 2,495,000 gradient steps (env steps 20,000 to 10M, one every 4). GMP: a mask update every
    1000 gradient steps from round(0.2 * 2,495,000) = 499,000 to 1,996,000, both ends included: 1498. RigL: every
    5000 from 0, 0 to 1,995,000 (400), plus the update forced at 1,996,000: 401."""
    assert throughput.paper_rate(dqn, dqn.Args(pruning_method="gmp")) == 1498 / 2_495_000
    assert throughput.paper_rate(dqn, dqn.Args(pruning_method="rigl")) == 401 / 2_495_000
    assert throughput.paper_rate(dqn, dqn.Args(pruning_method="static")) == 0.0
    args = dqn.Args(pruning_method="gmp", total_timesteps=3000, learning_starts=1000, train_frequency=4)  # 500 steps
    assert throughput.mask_updates(dqn, args, range(500)) == 2  # 100 (t_start) and 400 (t_end, forced)
    assert throughput.mask_updates(dqn, args, range(101, 400)) == 0
    assert throughput.mask_updates(dqn, dqn.Args(pruning_method="none"), range(10**4)) == 0


def test_loop_sps_weights_the_logged_windows_by_their_steps(tmp_path):
    """Windows of 100, 100, 100 and 50 env steps at 50, 100, 200 and 400 SPS; the first one left out: 250 steps in
    100/100 + 100/200 + 50/400 = 1.625 s."""
    writer = SummaryWriter(str(tmp_path))
    for step, sps in ((99, 50.0), (199, 100.0), (299, 200.0), (349, 400.0)):
        writer.add_scalar("charts/SPS", sps, step)
    writer.close()
    assert throughput.loop_sps(str(tmp_path), 100) == pytest.approx(250 / 1.625)
    assert throughput.loop_sps(str(tmp_path), 300) == pytest.approx(400.0)
    with pytest.raises(ValueError, match="raise --loop-steps"):
        throughput.loop_sps(str(tmp_path), 301)


def test_a_loop_only_row_prints_na(capsys):
    """Rainbow, IQN and M-IQN rows hold the loop's figures only."""
    throughput.print_table([{"method": "none", "loop": 1234.5678, "vs_dense": 1.0, "projected_hours": 22.5}], "title")
    row = capsys.readouterr().out.splitlines()[3]
    assert row == "| none | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 1,234.6 | n/a | n/a | 1.000 | 22.5 h |"


def test_memory_prints_bytes_per_transition(capsys):
    row = memory.main(["--capacity", "50000"])
    out = capsys.readouterr().out
    assert "| dqn_pruned.py | 50,000 |" in out
    # a slot holds one 84x84 uint8 frame, an int32 action, a float32 reward and three flags: 7,067 bytes; one episode
    # of 1000 steps takes 1001 slots
    assert 0.9 * 7067 * 1.001 < row["bytes_per_transition"] < 1.1 * 7067 * 1.001


def test_update_ab_times_two_versions_of_one_update(capsys):
    """The same file as both versions, on the MLP: one row per method with each version's median and fastest round
    and the ratio of the medians; both versions start from the same state and batch, and a timed step changes it."""
    script = os.path.join(ROOT, "dqn_pruned.py")
    flags = ["--network", "mlp", "--methods", "none", "gmp", "--rounds", "3", "--steps", "2"]
    rows = update_ab.main([script, script, *flags])
    assert [row["method"] for row in rows] == ["none", "gmp"]
    for row in rows:
        assert 0 < row["old_min"] <= row["old"] and 0 < row["new_min"] <= row["new"]
        assert row["ratio"] == pytest.approx(row["new"] / row["old"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "mlp, batch 32, 3 rounds of 2 steps; ms per step" and out[3].startswith("| none | ")
    (u1, s1, b1), (u2, s2, b2) = (update_ab.make_step(update_ab.load(n, script), "gmp", "mlp", 8) for n in "ab")
    after1, after2 = u1(s1, b1, None)[0], u2(s2, b2, None)[0]
    leaves = jax.tree.leaves
    assert all(np.array_equal(x, y) for x, y in zip(leaves(after1.params), leaves(after2.params)))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(after1.params), leaves(s1.params)))
