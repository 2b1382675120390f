"""The Atari env against an independent max-pool and area resize of ALE's own screens, and DQN's target, loss and
epsilon schedule against hand computations."""

import ale_py
import jax.numpy as jnp
import numpy as np
import pytest
import reference_atari

import dqn_pruned as dqn


def area_resize_reference(image: np.ndarray, out: int) -> np.ndarray:
    """Independent, exact area interpolation (float64): repeat every pixel out/g times along an axis (g = gcd of
    the sizes), so each output pixel covers a whole block of in/g repeated pixels, and average the blocks."""
    for axis in (0, 1):
        n = image.shape[axis]
        g = np.gcd(n, out)
        image = np.repeat(image.astype(np.float64), out // g, axis=axis)
        image = image.reshape(image.shape[:axis] + (out, n // g) + image.shape[axis + 1 :]).mean(axis=axis + 1)
    return image


def test_area_resize_matrix():  # of the reference env that tests/test_atari_env.py compares ale-py's frames with
    rows = reference_atari.area_resize_matrix(210, 84)
    assert rows.shape == (84, 210)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=1e-6)  # each output pixel is an average
    np.testing.assert_allclose(
        reference_atari.area_resize_matrix(168, 84)[3, 6:8], [0.5, 0.5]
    )  # integer factor: 2x2 box
    image = np.random.default_rng(0).integers(0, 256, (210, 160)).astype(np.float32)
    ours = reference_atari.area_resize_matrix(210, 84) @ image @ reference_atari.area_resize_matrix(160, 84).T
    np.testing.assert_allclose(ours, area_resize_reference(image, 84), atol=1e-3)
    columns, weights = reference_atari.banded_taps(rows)  # the env applies the same weights as a few taps per pixel
    assert columns.shape == (84, 3)
    np.testing.assert_allclose(np.einsum("ot,otw->ow", weights, image[columns]), rows @ image, rtol=1e-5)


def test_atari_env_follows_the_protocol():
    env = dqn.AtariEnv("pong")
    assert env.action_space.n == 6  # Pong's minimal action set, not the full 18
    assert env.sticky == 0.25 and env.max_steps == 27_000  # Machado et al. 2018; 108k frames
    obs, _ = env.reset(seed=3)
    assert obs.shape == (84, 84) and obs.dtype == np.uint8


def test_atari_frames_are_maxpooled_and_resized():
    """Without sticky actions, replay the same actions on a second ALE and rebuild the frame independently: equal but
    for OpenCV's rounding (ALE's own tests accept +-2 on at most 25 pixels)."""
    env = dqn.AtariEnv("breakout", sticky=0.0)
    env.reset(seed=1)
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setFloat("repeat_action_probability", 0.0)
    ale.setInt("random_seed", 1)
    ale.loadROM(ale_py.roms.get_rom_path("breakout"))
    ale.reset_game()
    actions = ale.getMinimalActionSet()
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = int(rng.integers(len(actions)))
        obs, reward, terminated, truncated, _ = env.step(a)
        frames, total = [], 0
        for _ in range(4):
            total += ale.act(actions[a])
            frames.append(ale.getScreenGrayscale().copy())
        assert reward == total
        expected = area_resize_reference(np.maximum(frames[2], frames[3]), 84)
        difference = np.abs(obs.astype(float) - expected)
        assert difference.max() <= 2.5 and (difference > 0.501).sum() <= 25
        assert not terminated and not truncated


def test_atari_seeds_and_truncation():
    def rollout(seed):
        env = dqn.AtariEnv("pong", max_steps=150)
        obs, _ = env.reset(seed=seed)
        frames = [obs]
        for t in range(150):
            obs, _, terminated, truncated, _ = env.step(t % 6)
            frames.append(obs)
        return np.stack(frames), terminated, truncated

    a, terminated, truncated = rollout(7)
    assert truncated and not terminated  # 150-step cap: truncated, not terminal
    b, _, _ = rollout(7)
    c, _, _ = rollout(8)
    np.testing.assert_array_equal(a, b)  # same seed, same frames (sticky actions included)
    assert not np.array_equal(a, c)  # another seed, other sticky-action draws


def test_make_env_errors():
    with pytest.raises(dqn.ArgsError, match="Did you mean"):
        dqn.make_env("CartPol-v1")
    with pytest.raises(dqn.ArgsError, match="discrete"):
        dqn.make_env("Pendulum-v1")
    env, is_atari = dqn.make_env("ALE/Pong-v5")
    assert is_atari and isinstance(env, dqn.AtariEnv)


def test_dqn_target_and_loss(maybe_jit):
    rewards = jnp.array([1.0, 0.0, -1.0])
    discounts = jnp.array([0.99, 0.0, 0.5])  # gamma^n (1 - terminal)
    next_q = jnp.array([[1.0, 3.0], [5.0, 2.0], [-2.0, -4.0]])
    targets = maybe_jit(dqn.dqn_targets)(rewards, discounts, next_q)
    np.testing.assert_allclose(targets, [1 + 0.99 * 3, 0.0, -1 + 0.5 * -2], rtol=1e-6)
    q = jnp.array([2.0, 1.0, -3.0])
    loss = maybe_jit(dqn.mse_loss)(q, targets)
    assert float(loss) == pytest.approx(((3.97 - 2) ** 2 + 1 + 1) / 3, rel=1e-6)  # mean (y - q)^2, no 1/2


def test_epsilon_schedule_matches_dopamine():
    # the paper's Table 2: eps(t) = 0.01 + clip(0.99 (250k + 20k - t) / 250k, 0, 0.99)
    for t in (0, 19_999, 20_000, 100_000, 269_999, 270_000, 5_000_000):
        expected = 0.01 + min(max(0.99 * (250_000 + 20_000 - t) / 250_000, 0.0), 0.99)
        assert dqn.linear_epsilon(dqn.Args(), t) == pytest.approx(expected)  # the defaults: the paper's
