"""The Atari environment on ale-py's AtariVectorEnv against the hand-written one it replaced (reference_atari.py):
frames, rewards and episode ends; seeding, exact resume from a pickle, truncation and make_env's errors."""

import pickle

import numpy as np
import pytest
import reference_atari as reference

import dqn_pruned as dqn


def assert_close_frames(ours: np.ndarray, expected: np.ndarray) -> None:
    """ALE's own tests' tolerance for resized frames (OpenCV's fixed-point INTER_AREA against an exact one): at most
    25 pixels differ, each by at most 2."""
    assert ours.shape == expected.shape == (84, 84) and ours.dtype == expected.dtype == np.uint8
    difference = np.abs(ours.astype(np.int16) - expected)
    assert np.count_nonzero(difference) <= 25 and difference.max() <= 2


@pytest.mark.parametrize(
    "game, sticky, max_steps",
    [("breakout", 0.0, 27_000), ("pong", 0.0, 100), ("breakout", 0.25, 27_000), ("pong", 0.25, 100)],
)
def test_frames_rewards_and_ends_match_the_reference(game, sticky, max_steps):
    """Random actions; Breakout's episodes end (game over), Pong's are truncated after 100 steps. With sticky actions
    too: both envs seed ALE's generator the same way, so the same seed repeats the same actions."""
    ours, theirs = dqn.AtariEnv(game, sticky, max_steps), reference.AtariEnv(game, sticky=sticky, max_steps=max_steps)
    assert ours.action_space == theirs.action_space and ours.observation_space == theirs.observation_space
    rng, ends, seed, lost = np.random.default_rng(0), [], 1, 0
    assert_close_frames(ours.reset(seed=seed)[0], theirs.reset(seed=seed)[0])
    for t in range(400):
        action = int(rng.integers(ours.action_space.n))
        (frame, *rest), (expected, *expected_rest) = ours.step(action), theirs.step(action)
        assert_close_frames(frame, expected)
        assert rest == expected_rest  # reward, terminated, truncated, info (a life lost in the step)
        lost += rest[3]["life_lost"]
        if rest[1] or rest[2]:
            ends.append((t, rest[1]))
            seed += 1
            assert_close_frames(ours.reset(seed=seed)[0], theirs.reset(seed=seed)[0])
    assert ends and all(terminated == (game == "breakout") for _, terminated in ends)  # an episode boundary was crossed
    assert lost >= (4 if game == "breakout" else 0)  # Breakout's lives, each loss reported as the reference does


def rollout(env: "dqn.AtariEnv", seed: int | None, steps: int = 300):
    frames, rewards = [env.reset(seed=seed)[0]], []
    for t in range(steps):
        frame, reward, *_ = env.step((t // 3) % env.action_space.n)
        frames.append(frame)
        rewards.append(reward)
    return np.stack(frames), rewards


def test_the_reset_seed_decides_the_sticky_actions():
    env = dqn.AtariEnv("pong")
    frames, rewards = rollout(env, 7)
    same_frames, same_rewards = rollout(env, 7)
    np.testing.assert_array_equal(frames, same_frames)
    assert rewards == same_rewards
    assert not np.array_equal(frames, rollout(env, 8)[0])  # other sticky-action draws
    # reset() without a seed goes on from the last seeded one: reproducible as well; once RESEED_STEPS steps have
    # passed since it, the next reset() seeds again, with a seed drawn from the last (a ROM reload each time)
    env.RESEED_STEPS = 500
    runs = []
    for _ in range(2):
        env.reset(seed=7)
        runs.append([rollout(env, None)[0] for _ in range(3)])  # resets after 300, 600 and 900 steps
        assert env.seed != 7 and len(env.history) == 300  # reseeded at the reset after 600 steps
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("steps", [30, 121])
def test_a_pickled_env_goes_on_identically(steps):
    """Pickled mid-episode (after an unseeded reset at step 100 when steps = 121), then both go on through
    truncations and unseeded resets."""
    rng = np.random.default_rng(steps)
    env = dqn.AtariEnv("pong", max_steps=100)
    env.reset(seed=3)
    for _ in range(steps):
        if env.step(int(rng.integers(6)))[3]:
            env.reset()
    env.step(2)  # a move, which sticky actions may repeat
    state = env.__getstate__()  # what a checkpoint holds: plain data
    assert set(state) == {"game", "sticky", "max_steps", "seed", "history"} and len(state["history"]) == steps + 2 - (
        steps < 100
    )
    copy, restored = pickle.loads(pickle.dumps(env)), dqn.AtariEnv("pong")
    restored.reset(seed=5)
    restored.__setstate__(state)  # as the loop restores a checkpoint: into the env it has made
    ends = 0
    for _ in range(250):
        action = int(rng.integers(6))
        (frame, *rest), *others = env.step(action), copy.step(action), restored.step(action)
        for other_frame, *other_rest in others:
            np.testing.assert_array_equal(frame, other_frame)
            assert rest == other_rest
        if rest[1] or rest[2]:
            ends += 1
            frame, *others = (e.reset()[0] for e in (env, copy, restored))
            assert all(np.array_equal(frame, other) for other in others)
    assert ends >= 2


def test_truncation_and_explicit_resets():
    env = dqn.AtariEnv("breakout", max_steps=50)
    frame, info = env.reset(seed=0)
    assert env.observation_space.contains(frame) and info == {}
    for t in range(50):
        frame, reward, terminated, truncated, info = env.step(t % 4)
        assert isinstance(reward, float) and not terminated and truncated == (t == 49)
    with pytest.raises(RuntimeError, match="reset"):  # never the vector env's autoreset frame
        env.step(0)
    assert np.array_equal(env.reset(seed=0)[0], dqn.AtariEnv("breakout").reset(seed=0)[0])
    assert not env.step(0)[3]


def test_make_env():
    with pytest.raises(dqn.ArgsError, match="unknown --env-id 'CartPol-v1'.*Did you mean"):
        dqn.make_env("CartPol-v1")
    with pytest.raises(dqn.ArgsError, match="DQN needs a discrete one"):
        dqn.make_env("Pendulum-v1")
    env, is_atari = dqn.make_env("ALE/Pong-v5")
    assert is_atari and isinstance(env, dqn.AtariEnv) and env.action_space.n == 6  # Pong's minimal action set
    assert (env.game, env.sticky, env.max_steps) == ("pong", 0.25, 27_000)
    env, is_atari = dqn.make_env("CartPole-v1")
    assert not is_atari and env.action_space.n == 2
