"""dqn_pruned.py through its real command line: --help, tiny Atari runs for every pruning method, bad inputs."""
import dataclasses
import glob
import os

import jax
import numpy as np
import pytest
from flax import serialization

import dqn_pruned as dqn
from conftest import read_scalars, run_script

TINY_PONG = ["--env-id", "ALE/Pong-v5", "--total-timesteps", "240", "--learning-starts", "80", "--batch-size", "8",
             "--buffer-size", "1000", "--train-frequency", "4", "--target-network-frequency", "50",
             "--exploration-steps", "100", "--prune-frequency-grad-steps", "10", "--sparsity", "0.8", "--log-frequency", "40"]


def test_help_lists_every_flag(tmp_path):
    result = run_script("dqn_pruned.py", "--help", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    for field in dataclasses.fields(dqn.Args):
        assert "--" + field.name.replace("_", "-") in result.stdout, field.name
    assert "gradient steps" in result.stdout and "env steps" in result.stdout  # units are documented
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("method, network", [("gmp", "cnn"), ("rigl", "cnn"), ("set", "cnn"), ("static", "cnn"),
                                             ("none", "cnn"), ("gmp", "resnet")])
def test_tiny_pong_run(tmp_path, method, network):
    result = run_script("dqn_pruned.py", *TINY_PONG, "--pruning-method", method, "--network", network, "--save-model",
                        "--exp-name", f"tiny_{method}", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"ALE_Pong-v5__tiny_{method}__1__*"))

    # the saved model is a plain {"params", "masks"} dict anyone can load without the script
    with open(os.path.join(run_dir, f"tiny_{method}.msgpack"), "rb") as f:
        saved = serialization.msgpack_restore(f.read())
    params, masks = saved["params"], saved["masks"]
    assert jax.tree.structure(params) == jax.tree.structure(masks)
    target = 0.0 if method == "none" else 0.8
    targets = dqn.target_sparsities(params, target, "erk")
    kept = total = 0
    for p, m, s in zip(jax.tree.leaves(params), jax.tree.leaves(masks), jax.tree.leaves(targets)):
        assert np.all(p[m == 0] == 0)  # pruned weights are exactly zero
        if p.ndim > 1:
            assert int(m.sum()) == dqn.keep_count(p.size, s)  # each layer at its ERK target, exactly
            kept, total = kept + int(m.sum()), total + p.size
        else:
            assert np.all(m == 1)  # biases are never pruned
    assert 1 - kept / total == pytest.approx(target, abs=1e-3)

    scalars = read_scalars(run_dir)
    for tag in ("losses/td_loss", "losses/q_values", "charts/SPS", "charts/epsilon", "pruning/target_sparsity",
                "pruning/kernel_sparsity", "pruning/total_sparsity", "pruning/layer/q/kernel"):
        assert tag in scalars, tag
    # achieved sparsity counts exact zeros in the params (JaxPruner's definition): it equals the mask's sparsity,
    # except that rigl/set grown weights start at 0 and stay there while their gradient is exactly 0
    achieved = scalars["pruning/kernel_sparsity"][-1][1]
    zeros = sum(int((p == 0).sum()) for p in jax.tree.leaves(params) if p.ndim > 1)
    assert achieved == pytest.approx(zeros / total, abs=1e-6)  # logged = what the saved params show
    assert 1 - kept / total - 1e-6 <= achieved <= 1 - kept / total + (0.03 if method in ("rigl", "set") else 1e-3)
    assert scalars["pruning/target_sparsity"][-1][1] == pytest.approx(target, abs=1e-3)
    assert scalars["pruning/total_sparsity"][-1][1] < achieved or method == "none"  # biases are dense
    assert [step for step, _ in scalars["charts/SPS"]] == [39, 79, 119, 159, 199, 239]  # x-axis: env steps
    # the loop does exactly the gradient steps the pruning window was derived from
    assert scalars["charts/grad_steps"][-1][1] == dqn.num_grad_steps(240, 80, 4) == 40
    if method == "gmp":  # sparsity rose during the run instead of being there from the start
        assert scalars["pruning/kernel_sparsity"][0][1] == 0.0


BAD_INPUTS = [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--width-scale", "0"], "--width-scale must be a positive integer"),
    (["--prune-start-fraction", "0.8", "--prune-end-fraction", "0.5"], "--prune-start-fraction (0.8) < --prune-end-fraction (0.5)"),
    (["--env-id", "ALE/Pongg-v5"], "unknown --env-id 'ALE/Pongg-v5'"),
    (["--buffer-size", "16", "--batch-size", "32"], "--buffer-size (16) must be >= --batch-size (32)"),
    (["--env-id", "CartPole-v1"], "--network resnet needs Atari frames"),
    (["--learning-starts", "100", "--total-timesteps", "50"], "--learning-starts must be < --total-timesteps"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--buffer-size", "4", "--batch-size", "2", "--learning-starts", "8"], "--buffer-size (4) must be >= frame stack + n-step (5)"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[b[1][:30] for b in BAD_INPUTS])
def test_bad_input_fails_cleanly(tmp_path, flags, message):
    result = run_script("dqn_pruned.py", *flags, cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[len('error: '):]}"]  # one line
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "runs")  # nothing written


def test_readme_flag_table_matches_args():
    """Every flag is in the README's table with its current default (the table cannot drift from Args)."""
    from conftest import ROOT

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for field in dataclasses.fields(dqn.Args):
        default = "unset" if field.default is None else field.default
        row = f"| `--{field.name.replace('_', '-')}` | `{default}` |"
        assert row in readme or field.name == "exp_name", row
