"""Whole runs of each agent's main(): learning on CartPole (the README's commands), seeding, the paper commands."""
import dataclasses
import os
import shlex

import numpy as np
import pytest
import tyro

import cql_pruned as cql
import dqn_pruned as dqn
import iqn_pruned as iqn
import miqn_pruned as miqn
import rainbow_pruned as rainbow
from conftest import ROOT, read_scalars

MODULES = {"dqn_pruned.py": dqn, "rainbow_pruned.py": rainbow, "iqn_pruned.py": iqn, "miqn_pruned.py": miqn}


def readme_command(script: str, marker: str) -> list:
    """Flags of the README's `python {script} ...` command that contains `marker` (backslash continuations joined)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"python {script}") and marker in line:
            return shlex.split(line.split("#")[0])[2:]
    raise AssertionError(f"no README command `python {script} ...` with {marker!r}")


@pytest.mark.parametrize("script, method", [(s, m) for s in MODULES for m in ("gmp", "none") if (s, m) != ("dqn_pruned.py", "gmp")])
def test_cartpole_learns_dense_and_pruned(tmp_path, monkeypatch, script, method):
    """The README's CartPole command (GMP to 90%), and the same run dense, reach a mean return >= 195 over the last 20
    episodes (dqn_pruned.py's own command is checked with the offline agent below, which trains on its data)."""
    module = MODULES[script]
    main_job_args = tyro.cli(module.Args, args=readme_command(script, "CartPole-v1"))
    assert main_job_args.pruning_method == "gmp" and main_job_args.sparsity == 0.9 and main_job_args.network == "mlp"
    monkeypatch.chdir(tmp_path)
    result = module.main(dataclasses.replace(main_job_args, pruning_method=method, exp_name=f"learn_{method}"))
    check_learned(result, method)


def check_learned(result: dict, method: str) -> None:
    returns = result["episodic_returns"]
    assert np.mean(returns[-20:]) >= 195, returns[-40:]
    assert np.mean(returns[:20]) < 50  # it started out bad: the return rose
    scalars = read_scalars(result["run_dir"])
    sparsity = [v for _, v in scalars["pruning/kernel_sparsity"]]
    if method == "gmp":  # pruning reached its target while learning
        assert sparsity[0] == 0.0 and sparsity[-1] == pytest.approx(0.9, abs=1e-3)
        assert scalars["pruning/target_sparsity"][-1][1] == pytest.approx(0.9, abs=1e-3)
    else:
        assert max(sparsity) == 0.0


def test_main_job_learns_and_its_dataset_trains_cql(tmp_path, monkeypatch):
    """The README's main job with --save-replay-dir (its dataset command) learns like the main job, and the README's
    offline command, dense and GMP to 90%, trained only on the dataset it wrote, reaches a mean evaluation return >= 150
    over its last 3 iterations (a random policy gets about 22)."""
    flags = readme_command("dqn_pruned.py", "--save-replay-dir")
    assert flags[:-2] == readme_command("dqn_pruned.py", "CartPole-v1")  # the main job, plus the flag
    monkeypatch.chdir(tmp_path)
    check_learned(dqn.main(tyro.cli(dqn.Args, args=flags)), "gmp")
    directory = flags[-1]
    files = cql.checkpoint_files(directory)
    assert list(files) == [0] and files[0] == set(cql.CHECKPOINT_ARRAYS) | {cql.TRUNCATION}

    readme_args = tyro.cli(cql.Args, args=readme_command("cql_pruned.py", "CartPole-v1"))
    assert (readme_args.dataset_dir, readme_args.pruning_method, readme_args.sparsity, readme_args.cql_alpha, readme_args.c51) == (directory, "gmp", 0.9, 0.1, False)
    for method in ("gmp", "none"):
        result = cql.main(dataclasses.replace(readme_args, pruning_method=method, exp_name=f"offline_{method}"))
        returns = result["eval_returns"]
        assert len(returns) == readme_args.num_iterations
        assert np.mean(returns[-3:]) >= 150, (method, returns)
        scalars = read_scalars(result["run_dir"])
        assert scalars["pruning/kernel_sparsity"][-1][1] == pytest.approx(0.9 if method == "gmp" else 0.0, abs=1e-3)
        assert [step for step, _ in scalars["charts/eval_return"]] == [2000 * (i + 1) for i in range(len(returns))]


def first_losses(module, tmp_path, monkeypatch, seed: int, name: str) -> list:
    monkeypatch.chdir(tmp_path)
    args = module.Args(env_id="CartPole-v1", network="mlp", total_timesteps=300, learning_starts=100, train_frequency=1,
                    batch_size=16, buffer_size=1000, exploration_steps=200, target_network_frequency=25, log_frequency=1,
                    pruning_method="gmp", sparsity=0.8, prune_frequency_grad_steps=10, seed=seed, exp_name=name,
                    **({"num_tau_samples": 8, "num_tau_prime_samples": 8, "num_quantile_samples": 8} if module in (iqn, miqn) else {}))
    scalars = read_scalars(module.main(args)["run_dir"])
    losses = [v for _, v in scalars["losses/td_loss"]]
    assert len(losses) >= 50 and scalars["pruning/kernel_sparsity"][-1][1] > 0.7  # masks changed during these losses
    return losses[:50]


@pytest.mark.parametrize("script", MODULES)
def test_seeds_seed(tmp_path, monkeypatch, script):
    a = first_losses(MODULES[script], tmp_path, monkeypatch, 1, "det_a")
    b = first_losses(MODULES[script], tmp_path, monkeypatch, 1, "det_b")
    c = first_losses(MODULES[script], tmp_path, monkeypatch, 2, "det_c")
    assert a == b  # same seed, bit-identical losses on CPU
    assert a != c  # another seed, other losses
    assert len(set(a)) > 40


def test_readme_paper_command_uses_the_paper_settings():
    args = tyro.cli(dqn.Args, args=readme_command("dqn_pruned.py", "--width-scale 3"))
    assert (args.network, args.width_scale, args.pruning_method, args.sparsity, args.sparsity_distribution) == ("resnet", 3, "gmp", 0.95, "erk")
    assert (args.total_timesteps, args.learning_starts, args.train_frequency, args.target_network_frequency) == (10_000_000, 20_000, 4, 8000)
    assert (args.learning_rate, args.adam_eps, args.batch_size, args.buffer_size, args.gamma) == (6.25e-5, 1.5e-4, 32, 1_000_000, 0.99)
    assert dqn.prune_window(args) == (499_000, 1_996_000, 1000)  # 20% / 80% of 2.495M gradient steps
    dqn.check_args(args)


def test_readme_rainbow_paper_command_uses_the_paper_settings():
    """SPEC 3.2: C51 with 51 atoms on [-10, 10], 3-step returns, Adam 6.25e-5 / 1.5e-4, and DQN's common settings."""
    args = tyro.cli(rainbow.Args, args=readme_command("rainbow_pruned.py", "--width-scale 3"))
    assert (args.network, args.width_scale, args.pruning_method, args.sparsity, args.sparsity_distribution) == ("resnet", 3, "gmp", 0.95, "erk")
    assert (args.num_atoms, args.v_min, args.v_max, args.n_step) == (51, -10.0, 10.0, 3)
    assert (args.learning_rate, args.adam_eps, args.batch_size, args.buffer_size, args.gamma) == (6.25e-5, 1.5e-4, 32, 1_000_000, 0.99)
    assert (args.total_timesteps, args.learning_starts, args.train_frequency, args.target_network_frequency) == (10_000_000, 20_000, 4, 8000)
    assert (args.start_e, args.end_e, args.exploration_steps) == (1.0, 0.01, 250_000)
    assert rainbow.prune_window(args) == (499_000, 1_996_000, 1000)
    rainbow.check_args(args)


@pytest.mark.parametrize("script", ["iqn_pruned.py", "miqn_pruned.py"])
def test_readme_iqn_paper_commands_use_the_paper_settings(script):
    """SPEC 3.3-3.4: N = N' = 64, K = 32, kappa 1, 64 cosines, 3-step, Adam 5e-5 / 3.125e-4; M-IQN tau 0.03, alpha 0.9, l_0 -1."""
    module = MODULES[script]
    args = tyro.cli(module.Args, args=readme_command(script, "--width-scale 3"))
    assert (args.network, args.width_scale, args.pruning_method, args.sparsity, args.sparsity_distribution) == ("resnet", 3, "gmp", 0.95, "erk")
    assert (args.num_tau_samples, args.num_tau_prime_samples, args.num_quantile_samples, args.kappa, args.quantile_embedding_dim) == (64, 64, 32, 1.0, 64)
    assert (args.n_step, args.learning_rate, args.adam_eps, args.batch_size, args.buffer_size, args.gamma) == (3, 5e-5, 3.125e-4, 32, 1_000_000, 0.99)
    assert (args.total_timesteps, args.learning_starts, args.train_frequency, args.target_network_frequency) == (10_000_000, 20_000, 4, 8000)
    if module is miqn:
        assert (args.munchausen_tau, args.munchausen_alpha, args.munchausen_clip) == (0.03, 0.9, -1.0)
    assert module.prune_window(args) == (499_000, 1_996_000, 1000)
    module.check_args(args)
