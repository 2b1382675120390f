"""The benchmarks run on tiny configs and print their tables (their figures are not asserted: they are timings)."""
import math
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory  # noqa: E402
import throughput  # noqa: E402


def test_throughput_prints_one_row_per_method(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = throughput.main(["--env-id", "CartPole-v1", "--network", "mlp", "--methods", "none", "gmp", "--learning-starts", "200",
                            "--warmup-steps", "100", "--loop-steps", "200", "--calls", "10", "--buffer-size", "1000"])
    out = capsys.readouterr().out.splitlines()
    table = out[next(i for i, line in enumerate(out) if line.startswith("dqn_pruned.py on ")):]  # after the runs' progress lines
    assert table[0].startswith("dqn_pruned.py on CartPole-v1, mlp k=1, batch 32, a gradient step every 4 env steps; cpu")
    assert table[1].startswith("| method | env steps/s |") and [line.split(" | ")[0] for line in table[3:]] == ["| none", "| gmp"]
    assert [row["method"] for row in rows] == ["none", "gmp"]
    for row in rows:
        for key in ("env", "store", "act", "sample", "learn", "update", "bound", "loop", "paper", "vs_dense"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
    assert rows[0]["vs_dense"] == 1.0 and rows[0]["mask"] == 0.0
    assert os.listdir(tmp_path) == []  # its runs went to a scratch directory


def test_paper_rate_counts_the_paper_schedule():
    """GMP in the paper's run: a mask update every 1000 gradient steps from 499,000 to 1,996,000, both ends included,
    out of 2,495,000 gradient steps."""
    import dqn_pruned as dqn

    assert throughput.paper_rate(dqn, dqn.Args(pruning_method="gmp")) == 1498 / 2_495_000
    assert throughput.paper_rate(dqn, dqn.Args(pruning_method="static")) == 0.0
    args = dqn.Args(pruning_method="gmp", total_timesteps=3000, learning_starts=1000, train_frequency=4)  # 500 gradient steps
    assert throughput.mask_updates(dqn, args, range(0, 500)) == len(range(100, 401, 1000)) + 1  # t_start, and the forced t_end


def test_memory_prints_bytes_per_transition(capsys):
    row = memory.main(["--capacity", "50000"])
    out = capsys.readouterr().out
    assert "| dqn_pruned.py | 50,000 |" in out
    # a slot holds one 84x84 uint8 frame, an int32 action, a float32 reward and three flags: 7,067 bytes; one episode
    # of 1000 steps takes 1001 slots
    assert 0.9 * 7067 * 1.001 < row["bytes_per_transition"] < 1.1 * 7067 * 1.001
