"""Replay buffer of dqn_pruned.py: single frames, stacks rebuilt at sample time, n-step returns.

Hand-computed cases first, then a randomized comparison against an independent reference that keeps, for every
write, which episode and step it holds, and derives stacks, n-step returns and validity from that record.
"""

import numpy as np
import pytest

import dqn_pruned as dqn


def fill(rb, episodes):
    """episodes: list of (rewards, terminated). Frames are [episode + 1, t + 1] so padding zeros are visible."""
    for e, (rewards, terminated) in enumerate(episodes):
        for t, r in enumerate(rewards):
            last = t == len(rewards) - 1
            rb.add(
                np.array([e + 1, t + 1], np.float32),
                t % 3,
                r,
                terminated and last,
                (not terminated) and last,
                np.array([e + 1, t + 2], np.float32),
            )


def test_stack_is_zero_filled_at_episode_start():
    rb = dqn.ReplayBuffer(100, (2,), np.float32, stack=4, n_step=1, gamma=0.9)
    fill(rb, [([1.0, 1.0], True), ([1.0, 1.0, 1.0], True)])
    # slots: A0 A1 A_final B0 B1 B2 B_final
    stacks = rb.stacked(np.array([3, 4, 5]))  # (3, 2, 4): B0, B1, B2
    np.testing.assert_array_equal(stacks[0, 0], [0, 0, 0, 2])  # B0: nothing from episode A
    np.testing.assert_array_equal(stacks[1, 0], [0, 0, 2, 2])
    np.testing.assert_array_equal(stacks[1, 1], [0, 0, 1, 2])
    np.testing.assert_array_equal(stacks[2, 1], [0, 1, 2, 3])


def test_n_step_return_by_hand():
    rb = dqn.ReplayBuffer(100, (2,), np.float32, stack=1, n_step=3, gamma=0.5)
    fill(rb, [([1.0, 2.0, 3.0, 4.0, 5.0], False), ([1.0, 2.0], True)])
    # episode 0 (truncated after 5 steps): slots 0..4, final observation at slot 5; episode 1: slots 6, 7, final 8
    rewards, discounts, next_idx, valid = rb.n_step_window(np.array([0, 2, 3, 4, 5, 6, 7]))
    np.testing.assert_allclose(rewards[:4], [1 + 0.5 * 2 + 0.25 * 3, 3 + 0.5 * 4 + 0.25 * 5, 4 + 0.5 * 5, 5])
    np.testing.assert_allclose(discounts[:4], [0.125, 0.125, 0.25, 0.5])  # truncation bootstraps with gamma^k, k < n
    np.testing.assert_array_equal(next_idx[:4], [3, 5, 5, 5])  # the final observation of the truncated episode
    assert valid[:4].all() and not valid[4]  # a final observation is never a sampled state
    np.testing.assert_allclose(rewards[5:], [1 + 0.5 * 2, 2])  # termination: no bootstrap
    np.testing.assert_allclose(discounts[5:], [0.0, 0.0])
    assert valid[5:].all()


def test_incomplete_window_is_not_sampled():
    rb = dqn.ReplayBuffer(100, (2,), np.float32, stack=1, n_step=3, gamma=0.5)
    for t in range(4):  # an episode still running: 4 transitions, no end yet
        rb.add(np.array([1, t + 1], np.float32), 0, 1.0, False, False, np.array([1, t + 2], np.float32))
    # slot 0 needs next observation at slot 3 (written); slot 1 needs slot 4 (not yet written)
    valid = rb.n_step_window(np.arange(4))[3]
    np.testing.assert_array_equal(valid, [True, False, False, False])
    batch = rb.sample(np.random.default_rng(0), 16)
    np.testing.assert_array_equal(batch.obs[:, :, 0], np.tile([1, 1], (16, 1)))


class Reference:
    """Independent model: what every write holds, and what a transition from it should look like."""

    def __init__(self, capacity, stack, n_step, gamma):
        self.capacity, self.stack, self.n, self.gamma = capacity, stack, n_step, gamma
        self.writes = []  # per write: (episode, t, is_final_obs)
        self.episodes = []  # per episode: dict(rewards=[...], terminated=bool or None while running)

    def record(self, episode, t, reward, terminated, truncated):
        if t == 0:
            self.episodes.append({"rewards": [], "terminated": None})
        self.episodes[episode]["rewards"].append(reward)
        self.writes.append((episode, t, False))
        if terminated or truncated:
            self.episodes[episode]["terminated"] = terminated
            self.writes.append((episode, t + 1, True))

    def slot_of(self, write):
        return write % self.capacity

    def stack_of(self, episode, t):
        return np.stack(
            [
                np.array([episode + 1, s + 1], np.float32) if s >= 0 else np.zeros(2, np.float32)
                for s in range(t - self.stack + 1, t + 1)
            ],
            axis=-1,
        )

    def expected(self):
        """{slot: (obs, action, return, discount, next_obs)} for every slot that may be sampled now."""
        count = len(self.writes)
        oldest = max(0, count - self.capacity)
        out = {}
        for w in range(oldest, count):
            episode, t, final = self.writes[w]
            if final:
                continue
            ep = self.episodes[episode]
            length = len(ep["rewards"])
            steps = min(self.n, length - t)  # the window stops at the episode's end
            if ep["terminated"] is None and t + steps >= length:
                continue  # episode still running: observation t + steps is not written yet
            if count > self.capacity and w - (self.stack - 1) < oldest:
                continue  # the ring overwrote a slot this stack reads
            ends = t + steps == length
            ret = sum(self.gamma**i * ep["rewards"][t + i] for i in range(steps))
            discount = 0.0 if (ends and ep["terminated"]) else self.gamma**steps
            out[self.slot_of(w)] = (self.stack_of(episode, t), t % 3, ret, discount, self.stack_of(episode, t + steps))
        return out


@pytest.mark.parametrize("capacity, stack, n_step", [(23, 4, 3), (50, 1, 1), (17, 3, 5), (1000, 4, 3)])
def test_buffer_matches_reference_through_wraparound(capacity, stack, n_step):
    gamma = 0.7
    rng = np.random.default_rng(capacity + stack + n_step)
    rb = dqn.ReplayBuffer(capacity, (2,), np.float32, stack, n_step, gamma)
    ref = Reference(capacity, stack, n_step, gamma)
    for episode in range(40):
        length = int(rng.integers(1, 9))
        terminated_end = bool(rng.random() < 0.5)
        for t in range(length):
            reward = float(rng.integers(-2, 3))
            terminated = terminated_end and t == length - 1
            truncated = (not terminated_end) and t == length - 1
            rb.add(
                np.array([episode + 1, t + 1], np.float32),
                t % 3,
                reward,
                terminated,
                truncated,
                np.array([episode + 1, t + 2], np.float32),
            )
            ref.record(episode, t, reward, terminated, truncated)
            expected = ref.expected()
            idx = np.arange(rb.size)
            returns, discounts, next_idx, valid = rb.n_step_window(idx)
            assert set(idx[valid].tolist()) == set(expected), (episode, t)
            if expected:
                slots = np.array(sorted(expected))
                obs, nxt = rb.stacked(slots), rb.stacked(next_idx[slots])
                for j, slot in enumerate(slots):
                    e_obs, e_action, e_ret, e_disc, e_next = expected[slot]
                    np.testing.assert_array_equal(obs[j], e_obs)
                    assert rb.actions[slot] == e_action
                    assert returns[slot] == pytest.approx(e_ret, rel=1e-5)
                    assert discounts[slot] == pytest.approx(e_disc, rel=1e-6)
                    np.testing.assert_array_equal(nxt[j], e_next)
    batch = rb.sample(rng, 64)
    assert batch.obs.shape == (64, 2, stack) and batch.next_obs.shape == (64, 2, stack)
    assert batch.actions.dtype == np.int32 and batch.rewards.dtype == np.float32 and batch.discounts.dtype == np.float32


def test_sampling_is_uniform_over_valid_slots():
    rb = dqn.ReplayBuffer(64, (2,), np.float32, stack=2, n_step=1, gamma=0.9)
    fill(rb, [([1.0] * 9, True)] * 6)  # 60 slots: 54 transitions, 6 final observations
    rng = np.random.default_rng(0)
    counts = np.zeros(64)
    for _ in range(200):
        batch = rb.sample(rng, 100)
        episode, t = batch.obs[:, 0, -1].astype(int) - 1, batch.obs[:, 1, -1].astype(int) - 1
        np.add.at(counts, episode * 10 + t, 1)
    hits = counts[counts > 0]
    assert len(hits) == 54  # every transition, no final observation
    assert hits.min() > 0.75 * hits.mean() and hits.max() < 1.25 * hits.mean()  # 20000 draws / 54 ~ 370 each


def test_atari_bytes_per_transition():
    rb = dqn.ReplayBuffer(10_000, (84, 84), np.uint8, stack=4, n_step=1, gamma=0.99)
    stored = sum(a.nbytes for a in (rb.frames, rb.actions, rb.rewards, rb.terminated, rb.first, rb.last))
    per_transition = stored / rb.capacity
    assert 84 * 84 <= per_transition <= 84 * 84 * 1.01  # one frame, not four stacked ones (1M -> ~7.07 GB)
    assert rb.stacked(np.array([0])).shape == (1, 84, 84, 4)
