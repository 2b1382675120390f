"""The online agents' evaluation phase (--eval-frequency): logged as eval/episodic_return at the env steps it ran and
after the last one, recomputed from the saved params, never changing training, and redone after a resume when a kill
interrupted it."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import read_scalars
from flax import serialization

import dqn_pruned as dqn
import iqn_pruned as iqn

MODULES = {"dqn": dqn, "iqn": iqn}


def tiny_args(module, **overrides):
    """CartPole, 450 env steps (evaluations at 100, 200, 300, 400 and after the last step), GMP to 80%."""
    args = module.Args(
        env_id="CartPole-v1",
        network="mlp",
        total_timesteps=450,
        learning_starts=80,
        train_frequency=1,
        batch_size=16,
        buffer_size=1000,
        exploration_steps=100,
        target_network_frequency=50,
        sparsity=0.8,
        prune_frequency_grad_steps=20,
        log_frequency=50,
        metrics_frequency=0,
        save_model=True,
        exp_name="eval",
    )
    if module is iqn:
        args = dataclasses.replace(args, num_tau_samples=8, num_tau_prime_samples=8, num_quantile_samples=4)
    return dataclasses.replace(args, **overrides)


def greedy_action_of(module, args, params):
    """The script's jitted greedy action, built as its main() builds it, for `params`."""
    if module is iqn:
        network = iqn.IQNNetwork(2, "mlp", 1, False, True, True, args.quantile_embedding_dim)
        q_fn, act_key = iqn.make_q_fn(network, args.num_quantile_samples), jax.random.split(jax.random.PRNGKey(1), 3)[2]
        return jax.jit(lambda p, obs, step: q_fn(p, obs[None], jax.random.fold_in(act_key, step)).argmax(-1)[0])
    q_fn = dqn.make_q_fn(dqn.QNetwork(2, "mlp", 1, False, True, True))
    return jax.jit(lambda p, obs, step: q_fn(p, obs[None], None).argmax(-1)[0])


@pytest.mark.parametrize("name", ["dqn", "iqn"])
def test_evaluation_is_logged_and_never_changes_training(tmp_path, monkeypatch, name):
    module = MODULES[name]
    monkeypatch.chdir(tmp_path)
    plain = module.main(tiny_args(module))["run_dir"]
    evaluated = module.main(tiny_args(module, eval_frequency=100, eval_episodes=3))["run_dir"]
    without, with_eval = read_scalars(plain), read_scalars(evaluated)
    assert set(with_eval) - set(without) == {"eval/episodic_return"}
    for tag in without:  # every loss, return and sparsity the same, step for step
        if tag != "charts/SPS":
            assert with_eval[tag] == without[tag], tag
    models = []
    for run_dir in (plain, evaluated):
        with open(os.path.join(run_dir, "eval.msgpack"), "rb") as f:
            models.append(serialization.msgpack_restore(f.read()))
    for a, b in zip(jax.tree.leaves(models[0]), jax.tree.leaves(models[1])):
        np.testing.assert_array_equal(a, b)

    logged = with_eval["eval/episodic_return"]
    assert [step for step, _ in logged] == [99, 199, 299, 399, 449]  # the env step each ran at; one after the last
    # the last evaluation again, by hand: the saved (final, masked) params, epsilon 0.001, its own env and seeds
    env, _ = dqn.make_env("CartPole-v1")
    greedy = greedy_action_of(module, tiny_args(module), models[1]["params"])
    args = tiny_args(module, eval_frequency=100, eval_episodes=3)
    returns = module.evaluate(args, env, greedy, models[1]["params"], 1, 449)
    assert len(returns) == 3 and all(r == int(r) and 8 <= r <= 500 for r in returns)  # whole CartPole episodes
    assert logged[-1][1] == pytest.approx(np.mean(returns), rel=1e-6)
    assert len({value for _, value in logged}) > 1  # the policy changed between evaluations


def test_an_evaluation_interrupted_by_a_kill_is_redone(tmp_path, monkeypatch):
    """A run stopped during its third evaluation (env step 300, after the checkpoint at 200) and resumed ends with the
    same logs, evaluations included, and the same params as one never interrupted."""
    monkeypatch.chdir(tmp_path)
    args = tiny_args(dqn, eval_frequency=100, eval_episodes=2, checkpoint_frequency=200)
    reference = dqn.main(args)["run_dir"]
    calls, real_evaluate = [], dqn.evaluate

    def killed_in_the_third(*evaluate_args):
        calls.append(evaluate_args[-1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill: the loop stops where it is
        return real_evaluate(*evaluate_args)

    monkeypatch.setattr(dqn, "evaluate", killed_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        dqn.main(args)
    (run_dir,) = [os.path.join("runs", d) for d in os.listdir("runs") if os.path.join("runs", d) != reference]
    assert calls == [99, 199, 299] and not os.path.exists(os.path.join(run_dir, "eval.msgpack"))
    monkeypatch.setattr(dqn, "evaluate", real_evaluate)
    dqn.main(dataclasses.replace(args, resume=run_dir))
    expected, got = read_scalars(reference), read_scalars(run_dir)
    assert set(expected) == set(got)
    for tag in expected:
        if tag != "charts/SPS":
            assert got[tag] == expected[tag], tag
    assert [step for step, _ in got["eval/episodic_return"]] == [99, 199, 299, 399, 449]
    for name in ("eval.msgpack",):
        with open(os.path.join(reference, name), "rb") as f, open(os.path.join(run_dir, name), "rb") as g:
            assert f.read() == g.read()
