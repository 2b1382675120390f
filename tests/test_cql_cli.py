"""cql_pruned.py through its command line: tiny offline runs for every pruning method (CQL and CQL+C51) on synthetic
Pong and CartPole datasets, and every bad-data case failing cleanly."""
import dataclasses
import glob
import gzip
import json
import os
import shutil

import numpy as np
import pytest

import cql_pruned as cql
import dqn_pruned as dqn
from conftest import check_metric_logs, check_saved_masks, read_scalars, run_script


def write_dataset(directory: str, steps: int = 600, capacity: int = 256, seed: int = 0, cartpole: bool = False) -> None:
    """A Pong-shaped dataset from the writer (random 84x84 frames, 6 actions), or a CartPole-shaped one (4 floats, 2
    actions); episodes end at random."""
    rng = np.random.default_rng(seed)
    shape, dtype, stack, actions = ((4,), np.float32, 1, 2) if cartpole else ((84, 84), np.uint8, 4, 6)
    draw = (lambda: rng.normal(size=shape).astype(dtype)) if cartpole else (lambda: rng.integers(0, 256, shape, dtype=dtype))
    writer = dqn.DatasetWriter(directory, capacity, shape, dtype, stack, 1)
    frame = draw()
    for _ in range(steps):
        next_frame = draw()
        terminated = bool(rng.random() < 0.02)
        writer.add(frame, int(rng.integers(actions)), float(rng.choice([-1.0, 0.0, 1.0])), terminated, False, next_frame)
        frame = next_frame
    writer.close()


@pytest.fixture(scope="module")
def pong_dataset(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("pong") / "replay_logs")
    write_dataset(directory)
    return directory


@pytest.fixture(scope="module")
def cartpole_dataset(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("cartpole") / "replay_logs")
    write_dataset(directory, cartpole=True)
    return directory


TINY = ["--env-id", "ALE/Pong-v5", "--network", "cnn", "--num-checkpoints", "3", "--transitions-per-checkpoint", "200",
        "--num-iterations", "2", "--grad-steps-per-iteration", "20", "--eval-steps", "1", "--batch-size", "8",
        "--prune-frequency-grad-steps", "5", "--sparsity", "0.8", "--log-frequency", "10", "--save-model"]


def test_help_lists_every_flag(tmp_path):
    result = run_script("cql_pruned.py", "--help", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    for field in dataclasses.fields(cql.Args):
        assert "--" + field.name.replace("_", "-") in result.stdout, field.name
    assert not os.path.exists(tmp_path / "runs")


# Atari's CNN for gmp and rigl; CartPole's MLP (compiled in seconds) for the rest: the sparse core is shared
@pytest.mark.parametrize("method, c51, env", [("gmp", False, "pong"), ("rigl", True, "pong"), ("set", False, "cartpole"),
                                              ("static", True, "cartpole"), ("none", False, "cartpole")])
def test_tiny_offline_run(tmp_path, request, method, c51, env):
    dataset = request.getfixturevalue(f"{env}_dataset")
    # the run directory above replay_logs/ works too, as in the public layout {Game}/{run}/replay_logs
    flags = [*TINY, "--dataset-dir", os.path.dirname(dataset), "--pruning-method", method, "--exp-name", f"tiny_{method}"]
    if env == "cartpole":
        flags += ["--env-id", "CartPole-v1", "--network", "mlp"]
    if method in ("gmp", "static"):  # also the analysis metrics, every 20 gradient steps
        flags += ["--metrics-frequency", "20", "--metrics-batch-size", "16", "--metrics-grad-samples", "4"]
    result = run_script("cql_pruned.py", *flags, *(["--c51"] if c51 else []), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{'CartPole-v1' if env == 'cartpole' else 'ALE_Pong-v5'}__tiny_{method}__1__*"))
    sparsity = 0.0 if method == "none" else 0.8
    params, kept, total = check_saved_masks(cql, os.path.join(run_dir, f"tiny_{method}.msgpack"), sparsity)
    assert ("advantage" in params and "value" in params) if c51 else ("q" in params)

    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert (config["n_step"], config["target_update_period"], config["scale_dense"]) == ((3, 100, True) if c51 else (1, 2000, False))
    assert config["prune_window_grad_steps"] == ([8, 32, 5] if method == "gmp" else [0, 32, 5])  # 20%/80% of 40 offline steps
    scalars = read_scalars(run_dir)
    for tag in ("losses/total_loss", "losses/td_loss", "losses/cql_loss", "losses/q_values", "charts/SPS",
                "pruning/target_sparsity", "pruning/kernel_sparsity", "pruning/total_sparsity"):
        assert [step for step, _ in scalars[tag]] == [10, 20, 30, 40], tag  # x-axis: gradient steps
    assert [step for step, _ in scalars["charts/eval_return"]] == [20, 40]  # after each iteration
    assert [value for _, value in scalars["charts/eval_episodes"]] == [1, 1]  # --eval-steps 1: one whole episode
    assert min(value for _, value in scalars["losses/cql_loss"]) >= 0  # logsumexp >= any one action's value
    assert scalars["pruning/kernel_sparsity"][-1][1] >= 1 - kept / total - 1e-6
    assert scalars["pruning/target_sparsity"][-1][1] == pytest.approx(sparsity, abs=1e-3)
    if method == "gmp":  # the schedule ran over the offline gradient steps: 2 of its 24 steps done at step 10
        assert 0 < scalars["pruning/kernel_sparsity"][0][1] < 0.2
    if method in ("gmp", "static"):
        check_metric_logs(run_dir, scalars, [20, 40], (["torso/conv0", "torso/conv1", "torso/conv2"] if env == "pong" else ["torso/fc"]) + ["dense"])
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
    ("empty directory", lambda d: [os.remove(os.path.join(d, f)) for f in os.listdir(d)], [], "holds no replay checkpoints"),
    ("missing file", lambda d: os.remove(os.path.join(d, REW)), [], "checkpoint 0 in"),
    ("too few checkpoints", None, ["--num-checkpoints", "5"], "has checkpoints [0, 1, 2]; --first-checkpoint 0 --num-checkpoints 5 asks for 0..4"),
    ("truncated frames", lambda d: truncate(os.path.join(d, OBS)), [], "truncated"),
    ("corrupt frames", lambda d: corrupt(os.path.join(d, OBS)), ["--transitions-per-checkpoint", "256"], "corrupt"),
    ("not gzip", lambda d: open(os.path.join(d, ACT), "wb").write(b"not a gzip file"), [], "not a gzipped .npy array"),
    ("frame shape", lambda d: replace_array(os.path.join(d, OBS), np.zeros((256, 80, 80), np.uint8)), [], "expected frames of shape (N, 84, 84)"),
    ("frame dtype", lambda d: replace_array(os.path.join(d, OBS), np.zeros((256, 84, 84), np.float32)), [], "and dtype uint8"),
    ("reward dtype", lambda d: replace_array(os.path.join(d, REW), np.zeros(256, np.int32)), [], "expected float rewards"),
    ("action length", lambda d: replace_array(os.path.join(d, ACT), np.zeros(100, np.int32)), [], "expected integer actions of shape (256,)"),
    ("other game", lambda d: replace_array(os.path.join(d, ACT), np.full(256, 17, np.int32)), [], "has 6 actions: a dataset of another game?"),
    ("int64 actions", lambda d: replace_array(os.path.join(d, ACT), np.full(256, 2**32 + 1, np.int64)), [], "a dataset of another game?"),
    ("negative add_count", lambda d: replace_array(os.path.join(d, "add_count_ckpt.0.gz"), np.array(-5)), [], "add_count -5 < 0"),
]


@pytest.mark.parametrize("case, damage, flags, message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_fails_cleanly(tmp_path, monkeypatch, case, damage, flags, message):
    """main() raises ArgsError (the CLI prints it as one line, exit code 2) before writing anything."""
    directory = str(tmp_path / "replay_logs")
    write_dataset(directory, steps=600)
    if damage is not None:
        damage(directory)
    monkeypatch.chdir(tmp_path)
    import tyro

    args = tyro.cli(cql.Args, args=[*TINY, *([] if case == "missing flag" else ["--dataset-dir", directory]), *flags])
    with pytest.raises(cql.ArgsError) as error:
        cql.main(args)
    assert message in str(error.value)
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("case", ["truncated frames", "other game"])
def test_bad_data_on_the_command_line(tmp_path, case):
    _, damage, _, message = next(c for c in BAD_DATA if c[0] == case)
    directory = str(tmp_path / "replay_logs")
    write_dataset(directory, steps=600)
    damage(directory)
    result = run_script("cql_pruned.py", *TINY, "--dataset-dir", directory, cwd=str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "runs")
