"""Atari 100k: the protocol's environment flags (--no-sticky-actions, --terminal-on-life-loss: a lost life ends the
stored episode while the logged return covers the whole game); DQN's dueling head, double-Q target, Huber loss and
DrQ augmentation; Rainbow's noisy nets, dueling and double-Q; the drq-eps and der presets against Dopamine's gin
files, on the command line, in tiny Pong runs and across a kill and resume."""

import dataclasses
import glob
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, check_saved_masks, read_scalars, run_script
from flax import serialization
from test_resume import kill_after_first_checkpoint

import dqn_pruned as dqn
import rainbow_pruned as rainbow


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


# ------------------------------------------------------------------------------------------------------------ presets
# Dopamine's labs/atari_100k/configs/DrQ_eps.gin and DER.gin, as the flags they become (Runner.training_steps x
# num_iterations = 100,000 agent steps; MaxEpisodeEvalRunner.num_eval_episodes = 100; epsilon_eval 0.001;
# create_optimizer.learning_rate / eps; sticky_actions False; AtariPreprocessing.terminal_on_life_loss True).
DRQ_EPS_GIN = {
    "noop_max": 30,  # DataEfficientAtariRunner(max_noops=30), Dopamine's Atari 100k runner (not in the gin file)
    "gamma": 0.99,  # JaxDQNAgent.gamma
    "n_step": 10,  # update_horizon
    "learning_starts": 1600,  # min_replay_history
    "train_frequency": 1,  # update_period
    "target_network_frequency": 1,  # target_update_period
    "end_e": 0.01,  # epsilon_train
    "eval_epsilon": 0.001,  # epsilon_eval
    "exploration_steps": 5000,  # epsilon_decay_period
    "dueling": True,
    "double_q": True,
    "augmentation": True,  # Atari100kRainbowAgent.data_augmentation
    "loss": "huber",  # mse_loss False: losses.huber_loss
    "learning_rate": 0.0001,
    "adam_eps": 0.00015,
    "sticky_actions": False,
    "terminal_on_life_loss": True,
    "total_timesteps": 100_000,
    "eval_episodes": 100,
    "batch_size": 32,
    "network": "cnn",  # FullRainbowNetwork's convs: 32 8x8/4, 64 4x4/2, 64 3x3/1, flax's SAME padding
}
DER_GIN = {
    "noop_max": 30,  # DataEfficientAtariRunner(max_noops=30), Dopamine's Atari 100k runner (not in the gin file)
    "gamma": 0.99,
    "n_step": 10,
    "learning_starts": 1600,
    "train_frequency": 1,
    "target_network_frequency": 2000,
    "start_e": 0.0,  # noisy: the agent's epsilon_fn is zero_epsilon
    "end_e": 0.0,
    "eval_epsilon": 0.001,
    "noisy": True,
    "dueling": True,
    "double_q": True,
    "num_atoms": 51,
    "v_min": -10.0,  # -vmax
    "v_max": 10.0,
    "learning_rate": 0.0001,
    "adam_eps": 0.00015,
    "sticky_actions": False,
    "terminal_on_life_loss": True,
    "total_timesteps": 100_000,
    "eval_episodes": 100,
    "batch_size": 32,
    "network": "cnn",
}


@pytest.mark.parametrize("module, name, gin", [(dqn, "drq-eps", DRQ_EPS_GIN), (rainbow, "der", DER_GIN)])
def test_presets_hold_the_gin_files_values(module, name, gin):
    args = module.preset_args(name)
    assert {key: getattr(args, key) for key in gin} == gin
    assert args.preset == name and args.eval_frequency == args.total_timesteps  # one evaluation, at the end
    changed = {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != getattr(module.Args(), f.name)}
    assert changed - {"preset"} <= set(module.PRESETS[name])  # a preset sets nothing it does not list
    assert module.preset_args("paper") == module.Args()  # the paper's settings are the defaults


@pytest.mark.parametrize("module, name", [(dqn, "drq-eps"), (rainbow, "der")])
def test_a_flag_given_with_a_preset_wins(module, name):
    argv = ["--preset", name, "--n-step", "3", "--no-dueling", "--sticky-actions"]
    args = module.tyro.cli(module.Args, default=module.preset_defaults(argv), args=argv)
    assert (args.n_step, args.dueling, args.sticky_actions) == (3, False, True)  # given: the flags' values
    assert args.preset == name and args.learning_starts == 1600 and args.total_timesteps == 100_000  # the preset's
    assert module.preset_defaults(["--preset=paper"]) == module.Args()
    with pytest.raises(module.ArgsError, match="the presets are paper"):
        module.preset_defaults(["--preset", "drq"])


@pytest.mark.parametrize("script, module", [("dqn_pruned.py", dqn), ("rainbow_pruned.py", rainbow)])
def test_help_lists_each_preset_and_what_it_sets(script, module):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "2000"},
    )
    text = " ".join(result.stdout.split())
    for name, values in module.PRESETS.items():
        assert f"{name}:" in text
        for key, value in values.items():
            flag = key.replace("_", "-")
            assert (
                (f"--{flag}" if value else f"--no-{flag}") in text
                if isinstance(value, bool)
                else f"--{flag} {value}" in text
            )


# ---------------------------------------------------------------------------------------------------- DrQ(eps) pieces
def test_huber_loss_against_numpy(maybe_jit):
    errors = np.array([-3.0, -1.0, -0.4, 0.0, 0.2, 1.0, 2.5])
    q = np.linspace(-1.0, 1.0, 7).astype(np.float32)
    targets = (q + errors).astype(np.float32)
    expected = np.mean([0.5 * e**2 if abs(e) <= 1 else abs(e) - 0.5 for e in errors])  # delta 1
    assert float(maybe_jit(dqn.huber_loss)(q, targets)) == pytest.approx(expected, rel=1e-6)
    grad = jax.grad(lambda q: dqn.huber_loss(q, targets))(jnp.asarray(q))  # d/dq: -clip(y - q, -1, 1) / B
    np.testing.assert_allclose(grad, -np.clip(errors, -1, 1) / 7, rtol=1e-5, atol=1e-7)


def find_shift(padded: np.ndarray, out: np.ndarray) -> tuple:
    """The (row, column) offset and scale for which out = padded[row:row+84, column:column+84] * scale."""
    for row in range(9):
        for column in range(9):
            crop = padded[row : row + 84, column : column + 84]
            scale = out.sum() / crop.sum()
            if np.allclose(out, crop * scale, rtol=1e-5):
                return row, column, scale
    raise AssertionError("not a scaled crop of the padded image")


def test_augmentation_crops_pads_by_edge_and_jitters_intensity(maybe_jit):
    obs = np.random.default_rng(0).integers(1, 256, (512, 84, 84, 4)).astype(np.uint8)
    augment = maybe_jit(dqn.augment)
    out = np.asarray(augment(jax.random.key(0), obs))
    assert out.shape == obs.shape and out.dtype == np.float32
    padded = np.pad(obs.astype(np.float64), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")  # edge replication
    shifts = np.array([find_shift(padded[i], out[i]) for i in range(len(obs))])  # one crop and scale for all 4 frames
    assert set(shifts[:, 0]) == set(shifts[:, 1]) == set(range(8))  # every offset 0..7 on each axis, never 8
    scales = shifts[:, 2]
    assert scales.min() >= 0.9 - 1e-6 and scales.max() <= 1.1 + 1e-6  # 1 + 0.05 clip(N(0, 1), -2, 2)
    assert scales.mean() == pytest.approx(1.0, abs=0.01) and scales.std() == pytest.approx(0.05 * 0.959, rel=0.06)
    np.testing.assert_array_equal(out, augment(jax.random.key(0), obs))  # deterministic for a key
    assert not np.array_equal(out, augment(jax.random.key(1), obs))
    corner = dqn.augment(jax.random.key(0), np.arange(84 * 84, dtype=np.float32).reshape(1, 84, 84, 1))[0, :, :, 0]
    row, column, scale = find_shift(np.pad(np.arange(84 * 84.0).reshape(84, 84), 4, mode="edge"), np.asarray(corner))
    assert scale > 0  # a crop of an image of distinct pixels: the padding repeats the border rows and columns
    if row < 4:
        np.testing.assert_allclose(corner[: 4 - row], np.broadcast_to(corner[4 - row], (4 - row, 84)))


def test_the_update_augments_state_and_next_state_with_independent_keys():
    """The loss an augmented step reports is the loss of the batch with its states and next states augmented by
    the two keys split from fold_in(state key, 1): two different crops of the same frames."""
    network = dqn.QNetwork(4, "nature", 1, False, True, True)
    obs = np.random.default_rng(1).integers(0, 256, (8, 84, 84, 4)).astype(np.uint8)
    batch = dqn.Batch(obs, np.arange(8) % 4, np.ones(8, np.float32), np.full(8, 0.9, np.float32), obs.copy())
    params = network.init(jax.random.key(0), obs[:1])["params"]
    args = dqn.Args(pruning_method="none")
    tx = dqn.optax.adam(1e-4)
    state, _ = dqn.init_train_state(args, params, tx, np.random.default_rng(0), jax.random.PRNGKey(3))
    loss_fn = dqn.make_loss(network, huber=True)
    _, metrics = dqn.make_update(loss_fn, tx, "none", augmentation=True)(state, (batch,), (None,))
    obs_key, next_key = jax.random.split(jax.random.fold_in(state.key, 2))
    used = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in jax.random.split(state.key)}  # next key, masks'
    assert not used & {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in (obs_key, next_key)}
    seen = batch._replace(obs=dqn.augment(obs_key, obs), next_obs=dqn.augment(next_key, obs))
    assert float(metrics["losses/td_loss"]) == pytest.approx(float(loss_fn(params, params, seen, None)[0]), rel=1e-5)
    same = batch._replace(obs=dqn.augment(obs_key, obs), next_obs=dqn.augment(obs_key, obs))
    assert float(loss_fn(params, params, same, None)[0]) != pytest.approx(float(metrics["losses/td_loss"]), rel=1e-3)
    assert not np.array_equal(seen.obs, seen.next_obs)


# ------------------------------------------------------------------------------------------------- Rainbow's pieces
def noisy_kernel(params, key, fan_in: int, noise: bool = True):
    """The effective kernel of a bias-free NoisyDense: its output on the identity matrix."""
    layer = rainbow.NoisyDense(params["kernel"].shape[1], False)
    return layer.apply({"params": params}, jnp.eye(fan_in), noise, rngs={"noise": key} if noise else {})


def test_noisy_layer_init_noise_moments_and_gradients():
    fan_in, features = 16, 6
    layer = rainbow.NoisyDense(features, True)
    params = layer.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, jnp.ones((1, fan_in)), True)[
        "params"
    ]
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(params["kernel"]).max() <= bound and np.abs(params["bias"]).max() <= bound  # mu ~ U(+-1/sqrt(p))
    assert np.abs(params["kernel"]).max() > 0.8 * bound
    np.testing.assert_allclose(params["kernel_sigma"], 0.1 / np.sqrt(fan_in))  # Dopamine's sigma_0 = 0.1
    np.testing.assert_allclose(params["bias_sigma"], 0.1 / np.sqrt(fan_in))
    kernel_params = {"kernel": params["kernel"], "kernel_sigma": params["kernel_sigma"] * 10}
    draws = jax.jit(jax.vmap(lambda k: noisy_kernel(kernel_params, k, fan_in)))(
        jax.random.split(jax.random.key(2), 20000)
    )
    noise = (np.asarray(draws) - np.asarray(params["kernel"])) / np.asarray(kernel_params["kernel_sigma"])  # f f^T
    assert np.abs(noise.mean(0)).max() < 0.05  # zero mean
    np.testing.assert_allclose(noise.var(0), 2 / np.pi, rtol=0.1)  # E f(e)^2 = E|e| = sqrt(2/pi), times itself
    factor = noise[:, 0, :] / noise[:, 0, :1]  # factorized: each row of a draw is a multiple of the first
    np.testing.assert_allclose(noise[:, 1, :], noise[:, 1, :1] * factor, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(
        noisy_kernel(kernel_params, jax.random.key(5), fan_in), noisy_kernel(kernel_params, jax.random.key(5), fan_in)
    )
    np.testing.assert_array_equal(noisy_kernel(kernel_params, jax.random.key(5), fan_in, noise=False), params["kernel"])
    x = np.random.default_rng(0).normal(size=(2, fan_in)).astype(np.float32)
    same = layer.apply({"params": params}, np.stack([x[0], x[0]]), True, rngs={"noise": jax.random.key(7)})
    np.testing.assert_array_equal(same[0], same[1])  # one draw for the whole batch
    grads = jax.grad(lambda p: layer.apply({"params": p}, x, True, rngs={"noise": jax.random.key(7)}).sum())(params)
    assert np.abs(grads["kernel_sigma"]).min() > 0 and np.abs(grads["bias_sigma"]).min() > 0  # gradients reach sigma
    grads = jax.grad(lambda p: layer.apply({"params": p}, x, False).sum())(params)
    assert not np.any(grads["kernel_sigma"]) and not np.any(grads["bias_sigma"])
    biases = jax.vmap(lambda k: layer.apply({"params": params}, jnp.zeros((1, fan_in)), True, rngs={"noise": k})[0])(
        jax.random.split(jax.random.key(8), 20000)
    )  # the bias alone: mu_b + sigma_b f(e_out)
    bias_noise = (np.asarray(biases) - np.asarray(params["bias"])) / np.asarray(params["bias_sigma"])
    assert np.abs(bias_noise.mean(0)).max() < 0.03
    np.testing.assert_allclose(bias_noise.var(0), np.sqrt(2 / np.pi), rtol=0.05)  # E f(e)^2 = E|e|


def test_rainbow_acts_with_noise_and_evaluates_without():
    """make_q_fn: a key draws the noisy layers' noise (acting in training), None gives the mean network (evaluation)."""
    network = rainbow.RainbowNetwork(3, 5, "mlp", 1, False, True, True, noisy=True)
    obs = np.random.default_rng(0).normal(size=(2, 6, 1)).astype(np.float32)
    params = network.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, obs)["params"]
    support = jnp.linspace(-1.0, 1.0, 5)
    q_fn = rainbow.make_q_fn(network, support)
    mean = rainbow.q_values(network.apply({"params": params}, obs, False), support)
    np.testing.assert_array_equal(q_fn(params, obs, None), mean)
    noisy = [np.asarray(q_fn(params, obs, jax.random.key(k))) for k in (2, 2, 3)]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.allclose(noisy[0], mean) and not np.allclose(noisy[0], noisy[2])


def test_rainbow_dueling_logits_against_numpy(maybe_jit):
    network = rainbow.RainbowNetwork(3, 5, "mlp", 1, False, True, True, dueling=True)
    obs = np.random.default_rng(0).normal(size=(4, 6, 1)).astype(np.float32)
    params = network.init(jax.random.key(0), obs)["params"]
    assert set(params) == {"torso", "dense", "value", "advantage"}
    logits = maybe_jit(lambda p, x: network.apply({"params": p}, x))(params, obs)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    h = np.maximum(obs[..., 0] @ p["torso"]["fc"]["kernel"] + p["torso"]["fc"]["bias"], 0)
    h = np.maximum(h @ p["dense"]["kernel"] + p["dense"]["bias"], 0)
    value = (h @ p["value"]["kernel"] + p["value"]["bias"])[:, None, :]  # (4, 1, 5)
    advantage = (h @ p["advantage"]["kernel"] + p["advantage"]["bias"]).reshape(4, 3, 5)
    np.testing.assert_allclose(logits, value + advantage - advantage.mean(1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_rainbow_double_q_target_by_hand(maybe_jit):
    """The target distribution is the target network's distribution of the online network's a*, projected."""
    network = rainbow.RainbowNetwork(4, 11, "mlp", 1, False, True, True)
    support = jnp.linspace(-5.0, 5.0, 11)
    rng = np.random.default_rng(3)
    obs = rng.normal(size=(16, 5, 1)).astype(np.float32)
    batch = rainbow.Batch(
        obs,
        rng.integers(0, 4, 16),
        rng.normal(size=16).astype(np.float32),
        np.full(16, 0.9, np.float32),
        obs[::-1].copy(),
    )
    params = network.init(jax.random.key(0), obs)["params"]
    target_params = network.init(jax.random.key(1), obs)["params"]
    _, aux = maybe_jit(rainbow.make_loss(network, support, double_q=True))(params, target_params, batch, None)
    next_online = np.asarray(rainbow.q_values(network.apply({"params": params}, batch.next_obs), support))
    next_logits = np.asarray(network.apply({"params": target_params}, batch.next_obs), np.float64)
    best = next_online.argmax(-1)
    assert (best != rainbow.q_values(next_logits, support).argmax(-1)).any()  # the networks disagree: it can fail
    probs = np.exp(next_logits[np.arange(16), best])
    probs /= probs.sum(-1, keepdims=True)
    moved = np.clip(batch.rewards[:, None] + 0.9 * np.asarray(support)[None], -5, 5)  # where each atom's mass goes
    expected = (probs * moved).sum(-1)  # the projection keeps the clipped mean
    np.testing.assert_allclose(aux["targets"], expected, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------- the presets through the loop
TINY_PONG = ["--env-id", "ALE/Pong-v5", "--network", "nature", "--total-timesteps", "400", "--learning-starts", "100"]
TINY_PONG += ["--buffer-size", "500", "--batch-size", "8", "--eval-episodes", "1", "--sparsity", "0.8"]
TINY_PONG += ["--prune-frequency-grad-steps", "20", "--target-network-frequency", "50", "--log-frequency", "50"]
TINY_PONG += ["--checkpoint-frequency", "100", "--save-model", "--exp-name", "run"]


@pytest.mark.parametrize(
    "script, module, name", [("dqn_pruned.py", dqn, "drq-eps"), ("rainbow_pruned.py", rainbow, "der")]
)
def test_tiny_preset_runs_on_pong_reach_their_targets_and_resume_bit_identical(tmp_path, script, module, name):
    """--preset drq-eps (augmentation, Huber, dueling, double-Q) and --preset der (noisy nets, dueling, double-Q,
    prioritized replay), GMP to 80% with ERK: every kernel (the noisy sigmas too) ends at its exact target, and a run
    killed with SIGKILL after its first checkpoint and resumed ends bit-identical (params, every logged scalar)."""
    flags = ["--preset", name, *TINY_PONG]
    (tmp_path / "reference").mkdir()
    (tmp_path / "killed").mkdir()
    result = run_script(script, *flags, cwd=str(tmp_path / "reference"))
    assert result.returncode == 0, result.stderr[-3000:]
    (reference,) = glob.glob(str(tmp_path / "reference" / "runs" / "*"))
    params, _, _ = check_saved_masks(module, os.path.join(reference, "run.msgpack"), 0.8)
    assert {"value", "advantage"} <= set(params)
    if name == "der":
        assert "kernel_sigma" in params["advantage"]
    run_dir = kill_after_first_checkpoint(
        [sys.executable, os.path.join(ROOT, script), *flags], str(tmp_path / "killed"), 0.5
    )
    result = run_script(script, "--resume", run_dir, cwd=str(tmp_path / "killed"))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(reference, "run.msgpack"), "rb") as f, open(os.path.join(run_dir, "run.msgpack"), "rb") as g:
        for a, b in zip(*(jax.tree.leaves(serialization.msgpack_restore(h.read())) for h in (f, g))):
            np.testing.assert_array_equal(a, b)
    expected, got = read_scalars(reference), read_scalars(run_dir)
    assert set(expected) == set(got) and "eval/episodic_return" in got
    assert all(got[tag] == expected[tag] for tag in expected if tag != "charts/SPS")


class CountingEnv:
    """A stand-in env: frames count its steps since the last reset; an episode ends after `length` steps."""

    def __init__(self, length: int = 1000):
        self.length, self.steps, self.resets, self.actions = length, 0, 0, []

    def reset(self, seed=None):
        self.steps, self.resets = 0, self.resets + 1
        return np.zeros(1), {}

    def step(self, action):
        self.steps, self.actions = self.steps + 1, [*self.actions, action]
        return np.full(1, self.steps), 1.0, self.steps >= self.length, False, {}

    def restart_count(self):
        self.actions = [*self.actions, "restart count"]


def test_no_op_starts_take_0_to_noop_max_minus_1_no_ops():
    """start_game: 0..29 no-op steps at --noop-max 30 (Dopamine's randint(0, 30)), every count reached, never 30; a game
    that ends during them starts again; --noop-max 0 is a plain reset that leaves the generator untouched."""
    rng, counts = np.random.default_rng(0), []
    for _ in range(3000):
        env = CountingEnv()
        frame = dqn.start_game(env, rng, 30)
        counts.append(int(frame[0]))
        assert env.actions == [0] * counts[-1] + ["restart count"] and env.resets == 1
    assert set(counts) == set(range(30))
    env = CountingEnv(length=3)
    frame = dqn.start_game(env, np.random.default_rng(1), 30)
    drawn = int(np.random.default_rng(1).integers(30))
    assert drawn >= 3 and env.resets == 1 + drawn // 3 and frame[0] == drawn % 3 and env.actions[-1] == "restart count"
    rng = np.random.default_rng(2)
    before = rng.bit_generator.state
    env = CountingEnv()
    assert dqn.start_game(env, rng, 0, seed=5)[0] == 0 and env.actions == [] and rng.bit_generator.state == before


def test_the_step_limit_counts_the_agents_steps_after_the_no_ops():
    """Dopamine's runner counts max_steps_per_episode in agent steps, after its no-ops: a game that started with n
    no-ops is truncated after max_steps more steps, not max_steps - n. A pickle taken late in such a game (past
    max_steps - n steps of the agent) replays the restart and is truncated at the same step."""
    rng = np.random.default_rng(4)
    noops = int(np.random.default_rng(4).integers(30))
    assert noops >= 10  # the seed's draw, so that counting the no-ops would truncate 10 or more steps early
    env = dqn.AtariEnv("pong", max_steps=60)
    dqn.start_game(env, rng, 30, seed=7)
    assert env.steps == 0 and list(env.history[-noops - 1 :]) == [0] * noops + [env.RESTART_COUNT]
    for _ in range(55):
        assert not env.step(2)[3]
    restored = pickle.loads(pickle.dumps(env))
    for t in range(5):
        ends = [e.step(3)[2:4] for e in (env, restored)]
        assert ends[0] == ends[1] == (False, t == 4)
    with pytest.raises(RuntimeError, match="reset"):
        restored.step(0)
