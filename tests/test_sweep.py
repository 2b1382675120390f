"""common/sweep.py through its command line, with real submitit (its local executor) and real runs of dqn_pruned.py:
the grid (a product, less the points that differ only in flags their pruning method does not use), the script's own
validation before anything is written, a local sweep of tiny CartPole runs that common.plot reads, a job preempted
the way SLURM does it (SIGUSR2 to the job's processes) that requeues, resumes and ends bit-identical to an
uninterrupted run, and a failed run reported with its last error line."""

import csv
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import psutil
import pytest
from conftest import ROOT, read_scalars
from flax import serialization

from common import sweep

TINY = "--env-id CartPole-v1 --network mlp --learning-starts 100 --buffer-size 1000 --batch-size 16 --log-frequency 100"
TINY = [*TINY.split(), "--metrics-frequency", "0"]


def run_sweep(*flags: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """python -m common.sweep FLAGS..., from the repository root as the README says."""
    command = [sys.executable, "-m", "common.sweep", *flags]
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def flag_values(line: str) -> dict:
    """{flag: value} of a printed command line (flags without a value map to None)."""
    tokens, values = shlex.split(line)[2:], {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            following = tokens[i + 1] if i + 1 < len(tokens) else "--"
            values[token] = None if following.startswith("--") else following
    return values


def test_dry_run_prints_the_product(tmp_path):
    grid = ["--env-id", "CartPole-v1", "Acrobot-v1", "--seed", "1", "2", "--width-scale", "1", "2", "--network", "mlp"]
    result = run_sweep("dqn_pruned.py", *grid, "--sweep-dir", str(tmp_path / "s"), "--executor", "local", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 8
    points = [flag_values(line) for line in lines]
    expected = {(env, seed, width) for env in ("CartPole-v1", "Acrobot-v1") for seed in "12" for width in "12"}
    assert {(p["--env-id"], p["--seed"], p["--width-scale"]) for p in points} == expected
    assert all(shlex.split(line)[:2] == [sys.executable, os.path.join(ROOT, "dqn_pruned.py")] for line in lines)
    assert len({p["--exp-name"] for p in points}) == 8  # each point's run is found by its name
    assert all(p["--checkpoint-frequency"] == "250000" and "--resume" not in p for p in points)
    assert not os.path.exists(tmp_path / "s")  # nothing written


def test_dry_run_leaves_out_flags_a_method_does_not_use(tmp_path):
    grid = "--env-id CartPole-v1 Acrobot-v1 --seed 1 2 --pruning-method none gmp --sparsity 0.9 0.95 --network mlp"
    result = run_sweep("dqn_pruned.py", *grid.split(), "--sweep-dir", str(tmp_path), "--executor", "local", "--dry-run")
    assert result.returncode == 0, result.stderr
    points = [flag_values(line) for line in result.stdout.splitlines()]
    assert len(points) == 12  # 3 per game and seed, not 4
    for env in ("CartPole-v1", "Acrobot-v1"):
        for seed in "12":
            game_seed = [p for p in points if (p["--env-id"], p["--seed"]) == (env, seed)]
            runs = [(p["--pruning-method"], p.get("--sparsity")) for p in game_seed]
            assert sorted(runs, key=str) == [("gmp", "0.9"), ("gmp", "0.95"), ("none", None)]
    assert "--pruning-method none does not use --sparsity" in result.stderr

    # --drop-fraction is RigL's and SET's alone; --mask-sampling draws random masks, which GMP never does
    grid = "--pruning-method gmp rigl static --drop-fraction 0.1 0.2 --mask-sampling exact bernoulli"
    result = run_sweep("dqn_pruned.py", *grid.split(), "--sweep-dir", str(tmp_path), "--executor", "local", "--dry-run")
    assert result.returncode == 0, result.stderr
    points = [flag_values(line) for line in result.stdout.splitlines()]
    methods = [p["--pruning-method"] for p in points]
    assert (methods.count("gmp"), methods.count("rigl"), methods.count("static")) == (1, 4, 2)
    assert all("--drop-fraction" not in p for p in points if p["--pruning-method"] != "rigl")

    # with --dense-warmup, static keeps --prune-start-fraction: its dense phase ends there
    grid = "--pruning-method static rigl --prune-start-fraction 0.2 --dense-warmup"
    result = run_sweep("dqn_pruned.py", *grid.split(), "--sweep-dir", str(tmp_path), "--executor", "local", "--dry-run")
    assert result.returncode == 0, result.stderr
    points = [flag_values(line) for line in result.stdout.splitlines()]
    assert [(p["--pruning-method"], p["--prune-start-fraction"]) for p in points] == [
        ("static", "0.2"),
        ("rigl", "0.2"),
    ]


@pytest.mark.parametrize(
    "grid, message",
    [
        ("--seed 1 2 --sparsity 0.9 1.5", "--sparsity must be in [0, 1), got 1.5"),  # the script's check_args
        ("--seed 1 x", "Error parsing --seed"),  # tyro's parser
        ("--env-id CartPole-v1 CartPol-v1 --network mlp", "unknown --env-id 'CartPol-v1'"),
        ("--pruning-method gmp magic", "invalid choice 'magic'"),
        ("--seed 1 --resume runs/x", "--resume is the sweep's to give"),
        ("--seed 1 2 --seed 3", "--seed is given twice"),
        ("--seed 1 --slurm-time-min 60", "--slurm-time-min: for --executor slurm only"),
    ],
)
def test_a_bad_value_fails_before_anything_is_submitted(tmp_path, grid, message):
    result = run_sweep("dqn_pruned.py", *grid.split(), "--sweep-dir", str(tmp_path / "s"), "--executor", "local")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not os.path.exists(tmp_path / "s")


def test_slurm_flags_and_a_machine_without_slurm(tmp_path):
    flags = ["dqn_pruned.py", "--seed", "1", "2", "--sweep-dir", str(tmp_path / "s"), "--executor", "slurm"]
    flags += ["--slurm-gpus-per-job", "1", "--slurm-cpus-per-job", "8", "--slurm-mem-gb", "64"]
    flags += ["--slurm-partition", "gpu", "--slurm-setup", "module load cuda", "--max-parallel", "50"]
    result = run_sweep(*flags, "--dry-run")  # without a time limit: submitit's would be 5 minutes
    assert result.returncode == 2 and "needs --slurm-time-min" in result.stderr
    flags += ["--slurm-time-min", "2880"]
    result = run_sweep(*flags, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    parameters = {"name": "sweep_s", "nodes": 1, "tasks_per_node": 1, "timeout_min": 2880, "gpus_per_node": 1,
                  "cpus_per_task": 8, "mem_gb": 64, "slurm_partition": "gpu", "slurm_setup": ["module load cuda"],
                  "slurm_array_parallelism": 50}  # fmt: skip
    assert f"slurm parameters: {parameters}" in result.stderr
    if shutil.which("sbatch") is None:  # here: the slurm executor is refused, nothing written
        result = run_sweep(*flags)
        assert result.returncode == 2 and "needs SLURM's sbatch and srun" in result.stderr
        assert not os.path.exists(tmp_path / "s")


def test_local_sweep_runs_the_grid_and_plot_reads_it(tmp_path):
    sweep_dir = str(tmp_path / "sweep")
    flags = [*TINY, "--total-timesteps", "600", "--seed", "1", "2", "--pruning-method", "none", "gmp"]
    flags += ["--sweep-dir", sweep_dir, "--executor", "local", "--max-parallel", "2", "--wait"]
    result = run_sweep("dqn_pruned.py", *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        record = json.load(f)
    assert record["grid"]["--seed"] == ["1", "2"] and record["grid"]["--pruning-method"] == ["none", "gmp"]
    points = record["points"]
    assert len(points) == 4 and len({p["job_id"] for p in points}) == 4
    for point in points:
        with open(os.path.join(point["run_dir"], "config.json")) as f:
            config = json.load(f)
        given = dict(point["flags"])
        assert str(config["seed"]) == given["--seed"] and config["pruning_method"] == given["--pruning-method"]
        assert config["exp_name"] == point["exp_name"]
        assert os.path.dirname(point["run_dir"]) == os.path.join(sweep_dir, "runs")
        assert glob.glob(os.path.join(point["run_dir"], "events.out.tfevents.*"))
    assert sorted(os.listdir(os.path.join(sweep_dir, "runs"))) == sorted(os.path.basename(p["run_dir"]) for p in points)

    # --max-parallel 2: two runs at once, never three (counted at each run's start)
    states = [sweep.read_json(sweep.state_path(sweep_dir, p["exp_name"])) for p in points]
    assert max(sum(s["started"] <= t["started"] < s["ended"] for s in states) for t in states) == 2

    status = run_sweep("--status", sweep_dir)
    assert status.returncode == 0 and status.stdout.splitlines()[-1] == "4 points: 4 done"
    assert all(line.split()[1] == "done" for line in status.stdout.splitlines()[:-1])

    # a finished point's job, run again (a requeue after the run ended), returns its run and starts nothing
    assert sweep.PointJob(sweep_dir, points[0]["exp_name"], points[0]["command"])() == points[0]["run_dir"]
    assert len(os.listdir(os.path.join(sweep_dir, "runs"))) == 4

    figures = str(tmp_path / "figures")
    command = [sys.executable, "-m", "common.plot", os.path.join(sweep_dir, "runs"), "--out", figures]
    command += ["--points", "4", "--reps", "100", "--curve-reps", "50"]
    plot = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0, plot.stderr
    assert "skipped" not in plot.stdout
    for name in ("curves_CartPole-v1.png", "iqm_vs_sparsity_CartPole-v1.png", "iqm_vs_width_CartPole-v1.png"):
        assert os.path.getsize(os.path.join(figures, name)) > 0
    with open(os.path.join(figures, "aggregates.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["pruning_method"] for row in rows) == ["gmp", "none"] and all(row["seeds"] == "2" for row in rows)


def test_a_preempted_job_requeues_and_resumes_exactly(tmp_path):
    sweep_dir, reference_dir = str(tmp_path / "sweep"), str(tmp_path / "reference")
    flags = [*TINY, "--total-timesteps", "12000", "--pruning-method", "gmp", "--sparsity", "0.9", "--save-model"]
    flags += ["--checkpoint-frequency", "3000", "--sweep-dir", sweep_dir, "--executor", "local", "--wait"]
    command = [sys.executable, "-m", "common.sweep", "dqn_pruned.py", *flags]
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(sweep_dir, "sweep.json")):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()
        time.sleep(0.05)
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        (point,) = json.load(f)["points"]
    os.makedirs(reference_dir)  # the same command, never interrupted, meanwhile
    reference = subprocess.Popen(point["command"], cwd=reference_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    # SLURM signals every process of the job (scancel --signal=USR2, or sbatch --signal=USR2@90 before the time limit)
    while not glob.glob(os.path.join(sweep_dir, "runs", "*", "checkpoint.pkl")):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()
        time.sleep(0.02)
    job = psutil.Process(sweep.read_json(sweep.state_path(sweep_dir, point["exp_name"]))["pid"])
    for process in [job, *job.children(recursive=True)]:
        process.send_signal(signal.SIGUSR2)

    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    state = sweep.read_json(sweep.state_path(sweep_dir, point["exp_name"]))
    assert (state["state"], state["attempts"]) == ("done", 2) and state["job_id"] == point["job_id"]  # within its job
    status = run_sweep("--status", sweep_dir).stdout.splitlines()
    assert status[0].split()[1] == "done" and status[0].endswith("(requeued 1 time)")
    assert status[1] == "1 points: 1 done"
    (run_dir,) = glob.glob(os.path.join(sweep_dir, "runs", "*"))
    with open(os.path.join(run_dir, "config.json")) as f:
        resumed_after = json.load(f).get("resumed_at_step", [])
    assert len(resumed_after) == 1 and resumed_after[0] < 12000 - 1, "the run ended before the signal: make it longer"

    (reference_run,) = glob.glob(os.path.join(reference_dir, "runs", "*"))
    model = point["exp_name"] + ".msgpack"
    with open(os.path.join(reference_run, model), "rb") as f:
        expected = serialization.msgpack_restore(f.read())
    with open(os.path.join(run_dir, model), "rb") as f:
        got = serialization.msgpack_restore(f.read())
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    scalars_expected, scalars_got = read_scalars(reference_run), read_scalars(run_dir)
    assert set(scalars_expected) == set(scalars_got)
    for tag in scalars_expected:
        if tag != "charts/SPS":
            assert scalars_got[tag] == scalars_expected[tag], tag


def test_a_failed_run_is_reported_with_its_last_error_line(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "runs").write_text("a file where the runs should go\n")  # the run cannot make its directory
    flags = [*TINY, "--total-timesteps", "600", "--sweep-dir", str(sweep_dir), "--executor", "local", "--wait"]
    result = run_sweep("dqn_pruned.py", *flags)
    assert result.returncode == 1, result.stdout + result.stderr
    (log,) = glob.glob(str(sweep_dir / "logs" / "*.err"))
    with open(log) as f:
        last = [line.strip() for line in f.read().splitlines() if line.strip()][-1]
    assert "runs" in last  # the run's own error, e.g. NotADirectoryError: ... 'runs/CartPole-v1__...'
    status = run_sweep("--status", str(sweep_dir)).stdout.splitlines()
    assert status[0].split()[1] == "failed" and status[0].endswith(f"last error: {last}")
    assert status[1] == "1 points: 1 failed"
