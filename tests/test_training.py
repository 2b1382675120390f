"""Whole runs of each agent's main(): learning on CartPole (the README's commands), seeding, the paper commands."""

import dataclasses

import numpy as np
import pytest
import tyro
from conftest import read_scalars, readme_command

import dqn_pruned as dqn
import iqn_pruned as iqn
import miqn_pruned as miqn
import rainbow_pruned as rainbow

MODULES = {"dqn_pruned.py": dqn, "rainbow_pruned.py": rainbow, "iqn_pruned.py": iqn, "miqn_pruned.py": miqn}


@pytest.mark.parametrize(
    "script, method", [(s, m) for s in MODULES for m in ("gmp", "none") if (s, m) != ("dqn_pruned.py", "gmp")]
)
def test_cartpole_learns_dense_and_pruned(tmp_path, monkeypatch, script, method):
    """The README's CartPole command (GMP to 90%), and the same run dense, reach a mean return >= 195 over the last 20
    episodes (dqn_pruned.py's own command is checked in test_cql_cli.py with the offline agent, which trains on its
    data)."""
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


def first_losses(module, tmp_path, monkeypatch, seed: int, name: str) -> list:
    monkeypatch.chdir(tmp_path)
    args = module.Args(
        env_id="CartPole-v1",
        network="mlp",
        total_timesteps=300,
        learning_starts=100,
        train_frequency=1,
        batch_size=16,
        buffer_size=1000,
        exploration_steps=200,
        target_network_frequency=25,
        log_frequency=1,
        pruning_method="gmp",
        sparsity=0.8,
        prune_frequency_grad_steps=10,
        seed=seed,
        exp_name=name,
        **(
            {"num_tau_samples": 8, "num_tau_prime_samples": 8, "num_quantile_samples": 8}
            if module in (iqn, miqn)
            else {}
        ),
    )
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


def assert_paper_run(module, args, learning_rate: float, adam_eps: float) -> None:
    """What every online agent's paper command sets alike (the paper's Table 2 and Dopamine's gin files): the Impala
    ResNet at width 3, GMP to 95% with ERK, 10M env steps from 20k learning starts, a gradient step every 4 env steps,
    a target copy every 8000, batch 32, 1M transitions of replay, gamma 0.99; the pruning window at 20% / 80% of the
    run's 2.495M gradient steps. Then the agent's own Adam settings, and every check passes."""
    assert (args.network, args.width_scale, args.pruning_method, args.sparsity, args.sparsity_distribution) == (
        "resnet",
        3,
        "gmp",
        0.95,
        "erk",
    )
    assert (args.total_timesteps, args.learning_starts, args.train_frequency, args.target_network_frequency) == (
        10_000_000,
        20_000,
        4,
        8000,
    )
    assert (args.learning_rate, args.adam_eps, args.batch_size, args.buffer_size, args.gamma) == (
        learning_rate,
        adam_eps,
        32,
        1_000_000,
        0.99,
    )
    assert module.prune_window(args) == (499_000, 1_996_000, 1000)
    module.check_args(args)


def test_readme_paper_command_uses_the_paper_settings():
    args = tyro.cli(dqn.Args, args=readme_command("dqn_pruned.py", "--width-scale 3"))
    assert_paper_run(dqn, args, 6.25e-5, 1.5e-4)


def test_readme_rainbow_paper_command_uses_the_paper_settings():
    """The paper's Table 2 and Dopamine's rainbow.gin: C51 with 51 atoms on [-10, 10], 3-step returns, Adam
    6.25e-5 / 1.5e-4, and DQN's common settings."""
    args = tyro.cli(rainbow.Args, args=readme_command("rainbow_pruned.py", "--width-scale 3"))
    assert (args.num_atoms, args.v_min, args.v_max, args.n_step) == (51, -10.0, 10.0, 3)
    assert (args.start_e, args.end_e, args.exploration_steps) == (1.0, 0.01, 250_000)
    assert_paper_run(rainbow, args, 6.25e-5, 1.5e-4)


@pytest.mark.parametrize("script", ["iqn_pruned.py", "miqn_pruned.py"])
def test_readme_iqn_paper_commands_use_the_paper_settings(script):
    """The paper's Table 2, Dopamine's iqn.gin and Vieillard et al. 2020: N = N' = 64, K = 32, kappa 1, 64 cosines,
    3-step, Adam 5e-5 / 3.125e-4; M-IQN tau 0.03, alpha 0.9, l_0 -1."""
    module = MODULES[script]
    args = tyro.cli(module.Args, args=readme_command(script, "--width-scale 3"))
    assert (
        args.num_tau_samples,
        args.num_tau_prime_samples,
        args.num_quantile_samples,
        args.kappa,
        args.quantile_embedding_dim,
    ) == (64, 64, 32, 1.0, 64)
    assert args.n_step == 3
    if module is miqn:
        assert (args.munchausen_tau, args.munchausen_alpha, args.munchausen_clip) == (0.03, 0.9, -1.0)
    assert_paper_run(module, args, 5e-5, 3.125e-4)


# The first 50 losses of the README's main job at seed 1, recorded on main before the single-file refactor (commit
# 71274af) as float.hex: a change that leaves the jitted update alone must reproduce them bit for bit.
MAIN_JOB_FIRST_LOSSES = [
    "0x1.0703d00000000p+0",
    "0x1.1335060000000p+0",
    "0x1.f28ae40000000p-1",
    "0x1.8a84d40000000p-1",
    "0x1.5df6da0000000p-1",
    "0x1.2247ca0000000p-1",
    "0x1.cccf280000000p-2",
    "0x1.75affc0000000p-2",
    "0x1.1ffd140000000p-2",
    "0x1.3230520000000p-2",
    "0x1.7f22c20000000p-3",
    "0x1.8cd5980000000p-3",
    "0x1.1c136c0000000p-2",
    "0x1.d36b7a0000000p-3",
    "0x1.dc2b840000000p-2",
    "0x1.b294700000000p-2",
    "0x1.ad29180000000p-3",
    "0x1.59f5d40000000p-2",
    "0x1.2dc9f00000000p-2",
    "0x1.a8392a0000000p-3",
    "0x1.69c9e40000000p-3",
    "0x1.171c680000000p-3",
    "0x1.68dfbe0000000p-3",
    "0x1.458d680000000p-3",
    "0x1.517d2e0000000p-3",
    "0x1.efd6c60000000p-4",
    "0x1.ce0d7c0000000p-4",
    "0x1.eea43c0000000p-4",
    "0x1.8ac1240000000p-4",
    "0x1.04a51e0000000p-3",
    "0x1.be87e80000000p-4",
    "0x1.84dbfc0000000p-4",
    "0x1.11f78c0000000p-4",
    "0x1.0bf5f00000000p-4",
    "0x1.47aeba0000000p-4",
    "0x1.1873d80000000p-4",
    "0x1.14ae5a0000000p-5",
    "0x1.53274c0000000p-5",
    "0x1.14e4760000000p-5",
    "0x1.dace680000000p-5",
    "0x1.76f8920000000p-5",
    "0x1.2dc80c0000000p-5",
    "0x1.de34c20000000p-5",
    "0x1.cb47540000000p-6",
    "0x1.585ec80000000p-6",
    "0x1.4fe5440000000p-5",
    "0x1.003a0a0000000p-6",
    "0x1.9e44520000000p-6",
    "0x1.ee23560000000p-6",
    "0x1.093f380000000p-6",
]


def test_main_job_first_50_losses_are_unchanged(tmp_path, monkeypatch):
    args = tyro.cli(dqn.Args, args=readme_command("dqn_pruned.py", "CartPole-v1"))
    losses, real_make_update = [], dqn.make_update

    class Enough(Exception):
        pass

    def recording_make_update(*make_args):
        update = real_make_update(*make_args)

        def recording_update(state, batch, counts):
            state, update_metrics = update(state, batch, counts)
            losses.append(float(update_metrics["losses/td_loss"]))
            if len(losses) == len(MAIN_JOB_FIRST_LOSSES):
                raise Enough
            return state, update_metrics

        return recording_update

    monkeypatch.setattr(dqn, "make_update", recording_make_update)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Enough):
        dqn.main(args)
    assert [loss.hex() for loss in losses] == MAIN_JOB_FIRST_LOSSES


def test_only_greedy_actions_leave_the_device_between_logs(tmp_path, monkeypatch):
    """No host-device sync per gradient step: every read of a device array's value (jax.device_get, float(), int(),
    np.asarray all go through ArrayImpl._value; jax.transfer_guard does not see transfers on CPU) is counted. A run
    whose every action is greedy reads one value per env step (the action) and a few dozen at its only log."""
    from jax._src.array import ArrayImpl

    reads, real_value = [], ArrayImpl._value
    monkeypatch.setattr(ArrayImpl, "_value", property(lambda array: reads.append(1) or real_value.fget(array)))
    monkeypatch.chdir(tmp_path)
    args = dqn.Args(
        env_id="CartPole-v1",
        network="mlp",
        total_timesteps=400,
        learning_starts=100,
        train_frequency=1,
        batch_size=16,
        buffer_size=1000,
        start_e=0.0,
        end_e=0.0,
        sparsity=0.8,
        prune_frequency_grad_steps=10,
        target_network_frequency=50,
        log_frequency=1000,
        metrics_frequency=0,
    )
    result = dqn.main(args)
    assert 400 <= len(reads) < 400 + 50  # a read per gradient step would add 300
    assert read_scalars(result["run_dir"])["charts/grad_steps"] == [
        (399, 300.0)
    ]  # 300 updates, mask updates among them
