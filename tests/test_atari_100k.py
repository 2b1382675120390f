"""The Atari 100k protocol's environment flags: --no-sticky-actions and --terminal-on-life-loss (a lost life ends the
stored episode while the logged return covers the whole game)."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import check_saved_masks, read_scalars

import dqn_pruned as dqn


def breakout_args(**overrides) -> dqn.Args:
    """600 random steps of Breakout (several games of 5 lives), a few gradient steps at the end on the Nature CNN."""
    args = dqn.Args(
        env_id="ALE/Breakout-v5",
        network="nature",
        total_timesteps=600,
        learning_starts=590,
        batch_size=8,
        buffer_size=1000,
        pruning_method="none",
        log_frequency=100,
        metrics_frequency=0,
    )
    return dataclasses.replace(args, **overrides)


def record(monkeypatch) -> tuple:
    """Records every env step main() takes (reward, terminated, truncated, life lost) and every stored transition's
    terminal flag."""
    steps, stored = [], []
    real_step, real_add = dqn.AtariEnv.step, dqn.ReplayBuffer.add

    def step(env, action):
        result = real_step(env, action)
        steps.append((result[1], result[2], result[3], result[4]["life_lost"]))
        return result

    def add(buffer, frame, action, reward, terminated, truncated, next_frame):
        stored.append(bool(terminated))
        return real_add(buffer, frame, action, reward, terminated, truncated, next_frame)

    monkeypatch.setattr(dqn.AtariEnv, "step", step)
    monkeypatch.setattr(dqn.ReplayBuffer, "add", add)
    return steps, stored


@pytest.mark.parametrize("life_loss", [False, True])
def test_a_life_loss_ends_the_stored_episode_not_the_game(tmp_path, monkeypatch, life_loss):
    monkeypatch.chdir(tmp_path)
    steps, stored = record(monkeypatch)
    run_dir = dqn.main(breakout_args(terminal_on_life_loss=life_loss))["run_dir"]
    assert len(steps) == len(stored) == 600
    lost = [life for *_, life in steps]
    games_over = [terminated or truncated for _, terminated, truncated, _ in steps]
    assert sum(lost) >= 8 and sum(games_over) >= 2  # lives lost inside games, and games ended
    assert stored == [terminated or (life_loss and life) for (_, terminated, _, life) in steps]
    # the logged return is the whole game's: the rewards from one game's end to the next
    ends = [t for t, over in enumerate(games_over) if over]
    expected = [sum(r for r, *_ in steps[a + 1 : b + 1]) for a, b in zip([-1] + ends, ends)]
    logged = read_scalars(run_dir)["charts/episodic_return"]
    assert [step for step, _ in logged] == ends and [value for _, value in logged] == expected


def test_sticky_actions_flag():
    """--no-sticky-actions: no repeated actions (Atari 100k); the default: 0.25."""
    assert dqn.make_env("ALE/Pong-v5", sticky_actions=False)[0].sticky == 0.0
    assert dqn.make_env("ALE/Pong-v5")[0].sticky == 0.25
    assert dqn.make_env("ALE/Pong-v5", dqn.Args().sticky_actions)[0].sticky == 0.25
    # the same seed and actions, the same game without them; with them the emulator's repeats change it
    frames = {}
    for sticky in (False, True):
        env, _ = dqn.make_env("ALE/Breakout-v5", sticky)
        env.reset(seed=3)
        frames[sticky] = [env.step(t % 4)[0] for t in range(80)]
    again, _ = dqn.make_env("ALE/Breakout-v5", False)
    again.reset(seed=4)  # another seed: without sticky actions the emulator is deterministic
    assert all(np.array_equal(a, again.step(t % 4)[0]) for t, a in enumerate(frames[False]))
    assert not all(np.array_equal(a, b) for a, b in zip(frames[False], frames[True]))


def test_dueling_head_against_numpy(maybe_jit):
    """Q = V + A - mean_a A on the 512 features (Wang et al. 2016), its two heads prunable output layers."""
    network = dqn.QNetwork(3, "mlp", 1, False, True, True, dueling=True)
    obs = np.random.default_rng(0).normal(size=(5, 4, 1)).astype(np.float32)
    params = network.init(jax.random.key(0), obs)["params"]
    assert set(params) == {"torso", "dense", "value", "advantage"} and params["value"]["kernel"].shape == (512, 1)
    q = maybe_jit(lambda p, x: network.apply({"params": p}, x))(params, obs)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    h = np.maximum(obs[..., 0] @ p["torso"]["fc"]["kernel"] + p["torso"]["fc"]["bias"], 0)
    h = np.maximum(h @ p["dense"]["kernel"] + p["dense"]["bias"], 0)
    value = h @ p["value"]["kernel"] + p["value"]["bias"]  # (5, 1)
    advantage = h @ p["advantage"]["kernel"] + p["advantage"]["bias"]  # (5, 3)
    np.testing.assert_allclose(q, value + advantage - advantage.mean(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    targets = dqn.target_sparsities(params, 0.9, "uniform")  # (ERK keeps the 512 x 1 value kernel dense)
    assert targets["value"]["kernel"] == targets["advantage"]["kernel"] == 0.9 and targets["value"]["bias"] == 0


def test_double_q_target_by_hand(maybe_jit):
    """The online network picks a*, the target network values it: rewards (1, 0.5), discounts (0.9, 0 at a terminal),
    Q_target(s') = [[1, 5], [2, 3]], Q_online(s') = [[3, 1], [0, 1]]: a* = (0, 1), y = (1 + 0.9 * 1, 0.5); without
    double-Q, y = (1 + 0.9 * 5, 0.5)."""
    rewards, discounts = np.array([1.0, 0.5], np.float32), np.array([0.9, 0.0], np.float32)
    target, online = np.array([[1.0, 5.0], [2.0, 3.0]], np.float32), np.array([[3.0, 1.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(maybe_jit(dqn.dqn_targets)(rewards, discounts, target, online), [1.9, 0.5], rtol=1e-6)
    np.testing.assert_allclose(maybe_jit(dqn.dqn_targets)(rewards, discounts, target), [5.5, 0.5], rtol=1e-6)
    # in the loss: the targets come from the online network's argmax at s'
    network = dqn.QNetwork(2, "mlp", 1, False, True, True)
    rng = np.random.default_rng(1)
    obs, next_obs = rng.normal(size=(2, 6, 4, 1)).astype(np.float32)
    rewards = rng.normal(size=6).astype(np.float32)
    batch = dqn.Batch(obs, np.zeros(6, np.int32), rewards, np.full(6, 0.9, np.float32), next_obs)
    online_params = network.init(jax.random.key(2), batch.obs)["params"]
    target_params = network.init(jax.random.key(3), batch.obs)["params"]
    _, aux = dqn.make_loss(network, double_q=True)(online_params, target_params, batch, None)
    next_online = np.asarray(network.apply({"params": online_params}, batch.next_obs))
    next_target = np.asarray(network.apply({"params": target_params}, batch.next_obs))
    best = next_online.argmax(-1)
    assert (best != next_target.argmax(-1)).any()  # the two networks disagree somewhere: the check can fail
    expected = batch.rewards + 0.9 * next_target[np.arange(6), best]
    np.testing.assert_allclose(aux["targets"], expected, rtol=1e-5)


def test_a_tiny_pong_run_with_the_new_flags_reaches_its_targets(tmp_path, monkeypatch):
    """--dueling --double-q --no-sticky-actions --terminal-on-life-loss through DQN's loop: GMP's masks end exactly at
    their ERK targets (the dueling heads pruned like every kernel)."""
    monkeypatch.chdir(tmp_path)
    args = breakout_args(env_id="ALE/Pong-v5", total_timesteps=240, learning_starts=80, train_frequency=4)
    args = dataclasses.replace(args, pruning_method="gmp", sparsity=0.8, prune_frequency_grad_steps=5, save_model=True)
    args = dataclasses.replace(args, dueling=True, double_q=True, sticky_actions=False, terminal_on_life_loss=True)
    run_dir = dqn.main(args)["run_dir"]
    params, _, _ = check_saved_masks(dqn, os.path.join(run_dir, f"{args.exp_name}.msgpack"), 0.8)
    assert {"value", "advantage"} <= set(params) and "q" not in params
