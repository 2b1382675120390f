"""The Atari 100k protocol's environment flags: --no-sticky-actions and --terminal-on-life-loss (a lost life ends the
stored episode while the logged return covers the whole game)."""

import dataclasses

import numpy as np
import pytest
from conftest import read_scalars

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
