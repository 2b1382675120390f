"""cql_pruned.py through its command line: tiny offline runs for every pruning method (CQL and CQL+C51) on synthetic
Pong and CartPole datasets (the public layout, written here) and a run directory; every bad-data case failing cleanly;
and the README's commands: CQL learns from the replay buffer of the online main job's checkpoint."""

import dataclasses
import glob
import gzip
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import tyro
from conftest import check_metric_logs, check_saved_masks, read_scalars, readme_command, run_script
from test_cql import dopamine_checkpoint, write_run

import cql_pruned as cql
import dqn_pruned as dqn


def write_dataset(directory: str, slots: int = 700, capacity: int = 256, seed: int = 0, cartpole: bool = False) -> None:
    """A Pong-shaped dataset (random 84x84 frames, 6 actions, stacks of 4) or a CartPole-shaped one (4 floats, 2
    actions, no stacking) in the DQN Replay Dataset's layout: stack - 1 zero-frame padding slots before every episode,
    episodes ended by a terminal at random, checkpoints of `capacity` slots (zero-filled), the last one partial, each
    with Dopamine's add_count and invalid_range (n = 1)."""
    rng = np.random.default_rng(seed)
    shape, dtype, stack, num_actions = ((4,), np.float32, 1, 2) if cartpole else ((84, 84), np.uint8, 4, 6)
    frames = (rng.normal(size=(slots, *shape)) if cartpole else rng.integers(1, 256, (slots, *shape))).astype(dtype)
    actions, rewards = rng.integers(num_actions, size=slots), rng.choice([-1.0, 0.0, 1.0], size=slots)
    padding, terminals, left = np.zeros(slots, bool), np.zeros(slots, bool), stack - 1
    for j in range(slots):
        if left:
            padding[j], left = True, left - 1
        elif rng.random() < 0.02:
            terminals[j], left = True, stack - 1
    frames[padding], actions[padding], rewards[padding] = 0, 0, 0.0
    for i in range(-(-slots // capacity)):
        add_count = min((i + 1) * capacity, slots)  # slots written when checkpoint i was logged
        invalid_range = (add_count % capacity - 1 + np.arange(stack + 1)) % capacity
        arrays = []
        for array in (frames, actions, rewards, terminals):
            arrays.append(np.zeros((capacity, *array.shape[1:]), array.dtype))
            arrays[-1][: add_count - i * capacity] = array[i * capacity : add_count]
        dopamine_checkpoint(directory, i, *arrays, add_count, invalid_range)


@pytest.fixture(scope="module")
def pong_dataset(tmp_path_factory) -> str:  # a run's directory {Game}/{run}/ above its replay_logs/, as published
    directory = tmp_path_factory.mktemp("pong")
    write_dataset(str(directory / "replay_logs"))
    return str(directory)


@pytest.fixture(scope="module")
def cartpole_dataset(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("cartpole")
    write_dataset(str(directory / "replay_logs"), cartpole=True)
    return str(directory)


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory) -> str:
    """An online script's run directory whose checkpoint holds a replay buffer of random CartPole-shaped steps."""
    rng = np.random.default_rng(1)
    rb = dqn.ReplayBuffer(1000, (4,), np.float32, 1, 1, 0.99)
    for _ in range(700):
        ended = rng.random()
        frame, next_frame = rng.normal(size=(2, 4)).astype(np.float32)
        rb.add(frame, int(rng.integers(2)), 1.0, bool(ended < 0.03), bool(0.03 <= ended < 0.05), next_frame)
    directory = tmp_path_factory.mktemp("cartpole_run")
    write_run(directory, rb.__getstate__(), env_id="CartPole-v1")
    return str(directory)


TINY = [
    *("--env-id", "ALE/Pong-v5", "--network", "cnn", "--num-checkpoints", "3", "--transitions-per-checkpoint", "200"),
    *("--num-iterations", "2", "--grad-steps-per-iteration", "20", "--eval-steps", "1", "--batch-size", "8"),
    *("--prune-frequency-grad-steps", "5", "--sparsity", "0.8", "--log-frequency", "10", "--save-model"),
]


def test_help_lists_every_flag(tmp_path):
    result = run_script("cql_pruned.py", "--help", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    for field in dataclasses.fields(cql.Args):
        assert "--" + field.name.replace("_", "-") in result.stdout, field.name
    assert not os.path.exists(tmp_path / "runs")


# Atari's CNN for gmp and rigl; CartPole's MLP (compiled in seconds) for the rest: the sparse core is shared
TINY_RUNS = [
    ("gmp", False, "pong_dataset"),
    ("rigl", True, "pong_dataset"),
    ("set", False, "cartpole_run"),
    ("static", True, "cartpole_dataset"),
    ("none", False, "cartpole_dataset"),
]


@pytest.mark.parametrize("method, c51, data", TINY_RUNS)
def test_tiny_offline_run(tmp_path, request, method, c51, data):
    flags = [*TINY, "--dataset-dir", request.getfixturevalue(data), "--pruning-method", method]
    flags += ["--exp-name", f"tiny_{method}"]
    cartpole = data.startswith("cartpole")
    if cartpole:
        flags += ["--env-id", "CartPole-v1", "--network", "mlp"]
    if method in ("gmp", "static"):  # also the analysis metrics, every 20 gradient steps
        flags += ["--metrics-frequency", "20", "--metrics-batch-size", "16", "--metrics-grad-samples", "4"]
    result = run_script("cql_pruned.py", *flags, *(["--c51"] if c51 else []), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    env_name = "CartPole-v1" if cartpole else "ALE_Pong-v5"
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{env_name}__tiny_{method}__1__*"))
    sparsity = 0.0 if method == "none" else 0.8
    params, kept, total = check_saved_masks(cql, os.path.join(run_dir, f"tiny_{method}.msgpack"), sparsity)
    assert ("advantage" in params and "value" in params) if c51 else ("q" in params)

    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    columns = (config["n_step"], config["target_update_period"], config["scale_dense"])
    assert columns == ((3, 100, True) if c51 else (1, 2000, False))
    # 20%/80% of 40 offline steps
    assert config["prune_window_grad_steps"] == ([8, 32, 5] if method == "gmp" else [0, 32, 5])
    loaded = f"loaded {config['dataset_transitions']} valid transitions"
    assert loaded in result.stdout and config["dataset_transitions"] > 500
    scalars = read_scalars(run_dir)
    for tag in ("losses/total_loss", "losses/td_loss", "losses/cql_loss", "losses/q_values", "charts/SPS"):
        assert [step for step, _ in scalars[tag]] == [10, 20, 30, 40], tag  # x-axis: gradient steps
    for tag in ("pruning/target_sparsity", "pruning/kernel_sparsity", "pruning/total_sparsity"):
        assert [step for step, _ in scalars[tag]] == [10, 20, 30, 40], tag
    assert [step for step, _ in scalars["eval/episodic_return"]] == [20, 40]  # after each iteration
    assert [value for _, value in scalars["eval/episodes"]] == [1, 1]  # --eval-steps 1: one whole episode
    assert min(value for _, value in scalars["losses/cql_loss"]) >= 0  # logsumexp >= any one action's value
    assert scalars["pruning/kernel_sparsity"][-1][1] >= 1 - kept / total - 1e-6
    assert scalars["pruning/target_sparsity"][-1][1] == pytest.approx(sparsity, abs=1e-3)
    if method == "gmp":  # the schedule ran over the offline gradient steps: 2 of its 24 steps done at step 10
        assert 0 < scalars["pruning/kernel_sparsity"][0][1] < 0.2
    if method in ("gmp", "static"):
        hidden = ["torso/fc"] if cartpole else ["torso/conv0", "torso/conv1", "torso/conv2"]
        check_metric_logs(run_dir, scalars, [20, 40], hidden + ["dense"])
    else:
        assert not any(tag.startswith("metrics/") for tag in scalars)


def corrupt(path: str) -> None:
    """Flips bytes in the middle of a gzip stream."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 64)


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def replace_array(path: str, array: np.ndarray) -> None:
    with gzip.GzipFile(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


OBS, ACT, REW = "$store$_observation_ckpt.0.gz", "$store$_action_ckpt.0.gz", "$store$_reward_ckpt.0.gz"
BAD_DATA = [  # (what to do to a good dataset, flags, message)
    ("missing flag", None, [], "--dataset-dir is required"),
    ("no directory", lambda d: shutil.rmtree(d), [], "is not a directory"),
    (
        "empty directory",
        lambda d: [os.remove(os.path.join(d, f)) for f in os.listdir(d)],
        [],
        "holds no replay checkpo",
    ),
    ("missing file", lambda d: os.remove(os.path.join(d, REW)), [], "checkpoint 0 in"),
    (
        "too few checkpoints",
        None,
        ["--num-checkpoints", "5"],
        "has checkpoints [0, 1, 2]; --first-checkpoint 0 --num-checkpoints 5 asks for 0..4",
    ),
    ("truncated frames", lambda d: truncate(os.path.join(d, OBS)), [], "truncated"),
    ("corrupt frames", lambda d: corrupt(os.path.join(d, OBS)), ["--transitions-per-checkpoint", "256"], "corrupt"),
    ("not gzip", lambda d: pathlib.Path(d, ACT).write_bytes(b"not a gzip file"), [], "not a gzipped .npy array"),
    (
        "frame shape",
        lambda d: replace_array(os.path.join(d, OBS), np.zeros((256, 80, 80), np.uint8)),
        [],
        "expected frames of shape (N, 84, 84)",
    ),
    (
        "frame dtype",
        lambda d: replace_array(os.path.join(d, OBS), np.zeros((256, 84, 84), np.float32)),
        [],
        "and dtype uint8",
    ),
    (
        "reward dtype",
        lambda d: replace_array(os.path.join(d, REW), np.zeros(256, np.int32)),
        [],
        "expected float rewards",
    ),
    (
        "action length",
        lambda d: replace_array(os.path.join(d, ACT), np.zeros(100, np.int32)),
        [],
        "expected integer actions of shape (256,)",
    ),
    (
        "other game",
        lambda d: replace_array(os.path.join(d, ACT), np.full(256, 17, np.int32)),
        [],
        "has 6 actions: a dataset of another game?",
    ),
    (
        "int64 actions",
        lambda d: replace_array(os.path.join(d, ACT), np.full(256, 2**32 + 1, np.int64)),
        [],
        "a dataset of another game?",
    ),
    (
        "negative add_count",
        lambda d: replace_array(os.path.join(d, "add_count_ckpt.0.gz"), np.array(-5)),
        [],
        "add_count -5 < 0",
    ),
]


@pytest.mark.parametrize("case, damage, flags, message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_fails_cleanly(tmp_path, monkeypatch, case, damage, flags, message):
    """main() raises ArgsError (the CLI prints it as one line, exit code 2) before writing anything."""
    directory = str(tmp_path / "replay_logs")
    write_dataset(directory)
    if damage is not None:
        damage(directory)
    monkeypatch.chdir(tmp_path)
    args = tyro.cli(cql.Args, args=[*TINY, *([] if case == "missing flag" else ["--dataset-dir", directory]), *flags])
    with pytest.raises(cql.ArgsError) as error:
        cql.main(args)
    assert message in str(error.value)
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("case", ["truncated frames", "other game"])
def test_bad_data_on_the_command_line(tmp_path, case):
    _, damage, _, message = next(c for c in BAD_DATA if c[0] == case)
    directory = str(tmp_path / "replay_logs")
    write_dataset(directory)
    damage(directory)
    result = run_script("cql_pruned.py", *TINY, "--dataset-dir", directory, cwd=str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_readme_online_run_trains_cql(tmp_path, monkeypatch):
    """The README's CartPole main job with --checkpoint-frequency (its one checkpoint, at the end, holds the whole
    replay buffer) learns, and the README's offline command, dense and GMP to 90%, trained only on that buffer, reaches
    a mean evaluation return >= 150 over its last 5 iterations (a random policy gets about 22; seeds 1-4 measured
    303 to 461, seeds 5-8 221 to 365)."""
    online = tyro.cli(dqn.Args, args=readme_command("dqn_pruned.py", "CartPole-v1", "--checkpoint-frequency"))
    main_job = tyro.cli(dqn.Args, args=readme_command("dqn_pruned.py", "CartPole-v1"))
    assert dataclasses.replace(online, checkpoint_frequency=0) == dataclasses.replace(main_job, checkpoint_frequency=0)
    assert online.checkpoint_frequency == online.total_timesteps
    monkeypatch.chdir(tmp_path)
    result = dqn.main(online)
    returns = result["episodic_returns"]
    assert np.mean(returns[-20:]) >= 195 and np.mean(returns[:20]) < 50, returns[-40:]  # the main job learned
    assert read_scalars(result["run_dir"])["pruning/kernel_sparsity"][-1][1] == pytest.approx(0.9, abs=1e-3)

    offline = tyro.cli(cql.Args, args=readme_command("cql_pruned.py", "CartPole-v1"))
    assert glob.glob(offline.dataset_dir) == [result["run_dir"]]  # the README's --dataset-dir names that run
    assert (offline.pruning_method, offline.sparsity, offline.cql_alpha, offline.c51) == ("gmp", 0.9, 0.1, False)
    for method in ("gmp", "none"):
        offline_run = dataclasses.replace(offline, dataset_dir=result["run_dir"], pruning_method=method)
        evaluations = cql.main(dataclasses.replace(offline_run, exp_name=f"offline_{method}"))
        assert len(evaluations["eval_returns"]) == offline.num_iterations
        assert np.mean(evaluations["eval_returns"][-5:]) >= 150, (method, evaluations["eval_returns"])
        scalars = read_scalars(evaluations["run_dir"])
        assert scalars["pruning/kernel_sparsity"][-1][1] == pytest.approx(0.9 if method == "gmp" else 0.0, abs=1e-3)
        steps = [offline.grad_steps_per_iteration * (i + 1) for i in range(offline.num_iterations)]
        assert [step for step, _ in scalars["eval/episodic_return"]] == steps
