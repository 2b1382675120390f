"""cql_pruned.py's data and losses: the reader on hand-built datasets in the public DQN Replay Dataset layout (written
here with numpy and gzip), a run directory's checkpointed replay buffer against the online buffer it came from, bad
run directories, the CQL regularizer and losses against NumPy and by hand, the evaluation."""

import gzip
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cql_pruned as cql
import dqn_pruned as dqn

GAMMA = 0.9


def save_gz(path: str, array: np.ndarray) -> None:
    """One array as the public dataset stores it: np.save into a gzip file."""
    with gzip.GzipFile(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def dopamine_checkpoint(directory, suffix: int, frames, actions, rewards, terminals, add_count, invalid_range) -> None:
    """Writes one checkpoint with the public file names and dtypes (Agarwal et al. 2020's replay_logs/)."""
    os.makedirs(directory, exist_ok=True)
    arrays = {
        "$store$_observation": frames,
        "$store$_action": np.asarray(actions, np.int32),
        "$store$_reward": np.asarray(rewards, np.float32),
        "$store$_terminal": np.asarray(terminals, np.uint8),
        "add_count": np.array(add_count),
        "invalid_range": np.asarray(invalid_range),
    }
    for name, array in arrays.items():
        save_gz(os.path.join(directory, f"{name}_ckpt.{suffix}.gz"), array)


def hand_checkpoint():
    """30 slots, 24 written (a final, partial buffer: add_count 24, cursor 24). Dopamine's layout: each episode starts
    with 3 zero-frame padding slots. Episode A: slots 3-5 (terminal at 5); B: 9-13 (terminal at 13); C: 17-23, cut by
    the end of the data. Frame of slot j: all (j + 1), padding all 0."""
    capacity = 30
    frames = np.zeros((capacity, 84, 84), np.uint8)
    real = [3, 4, 5, 9, 10, 11, 12, 13] + list(range(17, 24))
    for j in real:
        frames[j] = j + 1
    actions, rewards = np.zeros(capacity, np.int32), np.zeros(capacity, np.float32)
    terminals = np.zeros(capacity, np.uint8)
    actions[real] = [1, 2, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
    rewards[[3, 5, 9, 11, 12, 18, 20]] = [1, 1, 1, 1, 1, 0.5, -1]
    terminals[[5, 13]] = 1
    invalid_range = [(24 - 1 + i) % capacity for i in range(5)]  # Dopamine's invalid_range(cursor 24, n=1, stack 4)
    return frames, actions, rewards, terminals, 24, invalid_range


def load(directory, frame_shape=(84, 84), num_actions=3, stack=4, env_id="ALE/Pong-v5", **flags):
    args = cql.resolve(
        cql.Args(dataset_dir=str(directory), env_id=env_id, **{"num_checkpoints": 1, "gamma": GAMMA, **flags})
    )
    return cql.load_dataset(args, frame_shape, np.float32 if env_id == "CartPole-v1" else np.uint8, num_actions, stack)


def transitions(dataset) -> dict:
    """{start slot: (reward, discount, next slot)} of every valid transition."""
    fields = zip(dataset.starts, dataset.rewards, dataset.discounts, dataset.next_slots)
    return {int(s): (float(r), float(d), int(n)) for s, r, d, n in fields}


def assert_transitions(dataset, expected: dict) -> None:
    got = transitions(dataset)
    assert sorted(got) == sorted(expected)
    for start, (reward, discount, next_slot) in expected.items():
        assert got[start] == (pytest.approx(reward, rel=1e-6), pytest.approx(discount, rel=1e-6), next_slot), start


def test_public_layout_one_step(tmp_path):
    dopamine_checkpoint(tmp_path, 0, *hand_checkpoint())
    dataset = load(tmp_path, n_step=1)
    g = GAMMA
    # valid: stack inside the data and free of an earlier episode end, next slot written, not in invalid_range (23)
    expected = {3: (1, g, 4), 4: (0, g, 5), 5: (1, 0, 6), 9: (1, g, 10), 10: (0, g, 11), 11: (1, g, 12), 12: (1, g, 13)}
    expected |= {13: (0, 0, 14), 17: (0, g, 18), 18: (0.5, g, 19), 19: (0, g, 20), 20: (-1, g, 21), 21: (0, g, 22)}
    expected |= {22: (0, g, 23)}
    assert_transitions(dataset, expected)
    assert len(dataset.frames) == 24  # only written slots are loaded
    # stacks: oldest frame first, the zero padding before an episode's first frame
    stacks = dataset.stacked(np.array([3, 4, 10, 17, 22]))
    assert stacks.shape == (5, 84, 84, 4)
    assert [list(s[0, 0]) for s in stacks] == [
        [0, 0, 0, 4],
        [0, 0, 4, 5],
        [0, 0, 10, 11],
        [0, 0, 0, 18],
        [20, 21, 22, 23],
    ]
    assert np.all(stacks == stacks[:, :1, :1, :])  # every pixel of a frame holds its value
    batch = dataset.sample(np.random.default_rng(0), 64)
    assert set(batch.actions) <= {0, 1, 2} and batch.obs.dtype == np.uint8
    for obs, action, reward, next_obs in zip(batch.obs, batch.actions, batch.rewards, batch.next_obs):
        start = int(obs[0, 0, -1]) - 1  # the newest frame names the slot
        assert (reward, action) == (pytest.approx(expected[start][0]), hand_checkpoint()[1][start])
        assert next_obs[0, 0, -1] == (0 if start in (5, 13) else start + 2)  # after a terminal: padding


def test_public_layout_three_steps(tmp_path):
    dopamine_checkpoint(tmp_path, 0, *hand_checkpoint())
    g = GAMMA
    expected = {3: (1 + g * g, 0, 6), 4: (g, 0, 6), 5: (1, 0, 6), 9: (1 + g * g, g**3, 12), 10: (g + g * g, g**3, 13)}
    expected |= {11: (1 + g, 0, 14), 12: (1, 0, 14), 13: (0, 0, 14), 17: (0.5 * g, g**3, 20)}
    expected |= {18: (0.5 - g * g, g**3, 21), 19: (-g, g**3, 22), 20: (-1, g**3, 23)}
    assert_transitions(load(tmp_path, n_step=3), expected)


def test_checkpoint_selection_prefix_and_invalid_range(tmp_path):
    frames, actions, rewards, terminals, _, _ = hand_checkpoint()
    dopamine_checkpoint(tmp_path, 0, frames, actions, rewards, terminals, 30, [29, 0, 1, 2, 3])  # full: cursor 0
    dopamine_checkpoint(tmp_path, 1, *hand_checkpoint())
    os.remove(tmp_path / "$store$_reward_ckpt.1.gz")
    dopamine_checkpoint(tmp_path, 2, *hand_checkpoint())
    first = load(tmp_path, n_step=1, transitions_per_checkpoint=12)  # slots 0-11 of checkpoint 0
    assert sorted(transitions(first)) == [4, 5, 9, 10]  # 3 is in invalid_range; 11's next slot is not loaded
    with pytest.raises(cql.ArgsError, match=r"checkpoint 1 in .* lacks .*\$store\$_reward_ckpt.1.gz"):
        load(tmp_path, num_checkpoints=2)
    two = load(tmp_path, first_checkpoint=2, num_checkpoints=1, n_step=1)
    assert len(two) == 14
    message = r"has checkpoints \[0, 1, 2\]; --first-checkpoint 2 --num-checkpoints 2 asks for 2..3"
    with pytest.raises(cql.ArgsError, match=message):
        load(tmp_path, first_checkpoint=2, num_checkpoints=2)


def test_dopamine_full_checkpoint_with_a_longer_window(tmp_path):
    """Dopamine logs a full buffer when add_count % capacity == capacity - 1: slot capacity - 1 still holds the previous
    round's data and its invalid_range was computed for the logger's n = 1. Read with n = 3, the reader also excludes
    the slots whose 3-step window would end on that stale slot."""
    frames, actions, rewards, terminals, _, _ = hand_checkpoint()
    for j in range(24, 29):  # episode C goes on to slot 28
        frames[j] = j + 1
    frames[29], terminals[29] = 99, 1  # stale: from the previous million steps
    cursor = 29
    invalid_range = [(cursor - 1 + i) % 30 for i in range(5)]
    dopamine_checkpoint(tmp_path, 0, frames, actions, rewards, terminals, 2 * 30 - 1, invalid_range)
    one = transitions(load(tmp_path, n_step=1))
    three = transitions(load(tmp_path, n_step=3))
    assert max(one) == 27 and one[27][2] == 28  # 28 and 29 are in the logged invalid_range
    assert max(three) == 25 and three[25][2] == 28  # 26, 27 would reach slot 29
    assert all(next_slot != 29 for _, _, next_slot in three.values())


def stream_of_episodes(rng, steps: int, frame_shape=(3, 2)):
    """Random episodes: (frame, action, reward, terminated, truncated, next_frame) per step, every frame distinct."""
    counter = iter(range(1, 10**6))

    def frame():  # the step counter in the first two pixels; the third pixel is never 0, unlike the padding
        value, out = next(counter), np.full(frame_shape, 7, np.uint8)
        out.flat[0], out.flat[1] = value % 256, value // 256
        return out

    current = frame()
    for _ in range(steps):
        nxt = frame()
        end = rng.random()
        terminated, truncated = bool(end < 0.06), bool(0.06 <= end < 0.12)
        yield current, int(rng.integers(4)), float(rng.choice([-1.0, 0.0, 1.0])), terminated, truncated, nxt
        current = frame() if terminated or truncated else nxt


def write_run(directory, replay, env_id="ALE/Pong-v5") -> None:
    """A run directory as an online script leaves it (the parts the reader uses): config.json and a checkpoint.pkl
    whose "replay" entry is the replay buffer's __getstate__()."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"env_id": env_id, "script": "dqn_pruned.py"}, f)
    with open(os.path.join(directory, "checkpoint.pkl"), "wb") as f:
        pickle.dump({"global_step": 0, "replay": replay}, f)


@pytest.mark.parametrize(
    "stack, n_step, capacity", [(4, 3, 10_000), (4, 1, 10_000), (1, 3, 10_000), (4, 3, 300), (1, 1, 300)]
)
def test_run_buffer_matches_the_online_buffer(tmp_path, stack, n_step, capacity):
    """Steps go to the online ReplayBuffer (wrapped around when its capacity is 300); the dataset read from a run
    directory holding its __getstate__() gives back the buffer's transitions: the same valid ones (but a few of the
    oldest slots, which the buffer refuses after a wrap and the dataset keeps when an episode starts among them), the
    same stacks, actions, n-step rewards and discounts, next states."""
    rng, steps = np.random.default_rng(stack * 10 + n_step + capacity), 700
    rb = dqn.ReplayBuffer(capacity, (3, 2), np.uint8, stack, n_step, GAMMA)
    for step in stream_of_episodes(rng, steps):
        rb.add(*step)
    assert (rb.count > capacity) == (capacity == 300)
    write_run(tmp_path / "run", rb.__getstate__())
    dataset = load(tmp_path / "run", frame_shape=(3, 2), num_actions=4, stack=stack, n_step=n_step)
    assert len(dataset.frames) == rb.size + (stack - 1) * int(rb.first[: rb.size].sum())  # every slot, and padding

    # every transition of the dataset is one of the buffer's: its newest frame names the buffer slot
    slot_of_frame = {tuple(frame.ravel()): slot for slot, frame in enumerate(rb.frames[: rb.size])}
    buffer_slots = np.array([slot_of_frame[tuple(f.ravel())] for f in dataset.frames[dataset.starts]])
    returns, discounts, next_idx, valid = rb.n_step_window(buffer_slots)
    age = (buffer_slots - rb.count) % capacity if rb.count > capacity else buffer_slots
    assert np.all(valid | (age < stack - 1))  # the buffer's own rule after a wrap: age >= stack - 1
    np.testing.assert_array_equal(dataset.stacked(dataset.starts), rb.stacked(buffer_slots))
    np.testing.assert_array_equal(dataset.actions[dataset.starts], rb.actions[buffer_slots])
    np.testing.assert_allclose(dataset.rewards, returns, rtol=1e-6)
    np.testing.assert_allclose(dataset.discounts, discounts, rtol=1e-6)
    bootstrap = discounts > 0  # a terminal transition's next state is never used
    np.testing.assert_array_equal(dataset.stacked(dataset.next_slots[bootstrap]), rb.stacked(next_idx[bootstrap]))
    # and none of the buffer's valid transitions is missing
    _, _, _, all_valid = rb.n_step_window(np.arange(rb.size))
    assert set(np.flatnonzero(all_valid)) <= set(buffer_slots.tolist())
    assert len(dataset) - all_valid.sum() == np.sum(~valid) and np.sum(~valid) <= stack - 1
    # sampling draws these transitions
    batch = dataset.sample(np.random.default_rng(1), 256)
    position = {tuple(stacked.ravel()): i for i, stacked in enumerate(dataset.stacked(dataset.starts))}
    for obs, action, reward in zip(batch.obs, batch.actions, batch.rewards):
        i = position[tuple(obs.ravel())]
        assert action == rb.actions[buffer_slots[i]] and reward == pytest.approx(returns[i])


def test_run_buffer_by_hand(tmp_path):
    """A buffer of capacity 6, stack 2, n = 2: episode A (frames 1-3, truncated: 3 is its final observation), episode B
    (frames 4-6, terminated: 6 is its final observation), then frame 7 of episode C, which overwrote frame 1."""
    rb = dqn.ReplayBuffer(6, (1,), np.float32, 2, 2, GAMMA)
    f = lambda v: np.array([v], np.float32)
    rb.add(f(1), 1, 1.0, False, False, f(2))
    rb.add(f(2), 0, 2.0, False, True, f(3))  # truncated
    rb.add(f(4), 1, 3.0, False, False, f(5))
    rb.add(f(5), 0, 4.0, True, False, f(6))  # terminated
    rb.add(f(7), 1, 5.0, False, False, f(8))
    assert rb.count == 7 and rb.frames[0, 0] == 7
    cartpole = {"frame_shape": (1,), "num_actions": 2, "stack": 2, "n_step": 2, "env_id": "CartPole-v1"}
    write_run(tmp_path / "run", rb.__getstate__(), env_id="CartPole-v1")
    dataset = load(tmp_path / "run", **cartpole)
    # oldest first, one padding slot before each episode start: 2 3 | 0 4 5 6 | 0 7
    np.testing.assert_array_equal(dataset.frames[:, 0], [2, 3, 0, 4, 5, 6, 0, 7])
    g = GAMMA
    # frame 4: 3 + g 4, then the terminal; frame 5: the terminal step. Frame 2's stack reaches before the data, frame
    # 7's window has no next state yet, frames 3 and 6 are final observations (no action)
    assert_transitions(dataset, {3: (3 + g * 4, 0, 5), 4: (4, 0, 5)})
    np.testing.assert_array_equal(dataset.stacked(np.array([3, 4]))[:, 0], [[0, 4], [4, 5]])
    rb.add(f(8), 0, 6.0, False, True, f(9))  # truncated: frames 8 and 9 overwrite 2 and 3
    write_run(tmp_path / "run", rb.__getstate__(), env_id="CartPole-v1")
    dataset = load(tmp_path / "run", **cartpole)
    np.testing.assert_array_equal(dataset.frames[:, 0], [0, 4, 5, 6, 0, 7, 8, 9])
    # frame 7: 5 + g 6, bootstrapped from 9 with g^2; frame 8: 6, bootstrapped with g. Frame 4 is the oldest slot, which
    # the online buffer refuses after a wrap (its stack could reach overwritten frames): here its stack is whole
    assert_transitions(dataset, {1: (3 + g * 4, 0, 3), 2: (4, 0, 3), 5: (5 + g * 6, g * g, 7), 6: (6, g, 7)})
    assert not rb.n_step_window(np.array([3]))[3][0] and rb.frames[3, 0] == 4


def test_bad_run_directories(tmp_path):
    rb = dqn.ReplayBuffer(100, (4,), np.float32, 1, 1, GAMMA)
    for step in stream_of_episodes(np.random.default_rng(0), 50, frame_shape=(4,)):
        rb.add(*step)
    cartpole = {"frame_shape": (4,), "num_actions": 2, "stack": 1, "env_id": "CartPole-v1"}
    write_run(tmp_path / "pong", rb.__getstate__())
    with pytest.raises(cql.ArgsError, match=r"is a run of ALE/Pong-v5, not of --env-id CartPole-v1$"):
        load(tmp_path / "pong", **cartpole)
    write_run(tmp_path / "no_replay", None, env_id="CartPole-v1")  # checkpointed with --no-checkpoint-replay
    with pytest.raises(cql.ArgsError, match=r"its checkpoint.pkl holds no replay buffer \(--no-checkpoint-replay\)$"):
        load(tmp_path / "no_replay", **cartpole)
    write_run(tmp_path / "cut", rb.__getstate__(), env_id="CartPole-v1")
    with open(tmp_path / "cut" / "checkpoint.pkl", "r+b") as f:
        f.truncate(100)
    with pytest.raises(cql.ArgsError, match=r"cut: cannot read its run's replay buffer \(.*Error"):
        load(tmp_path / "cut", **cartpole)
    write_run(tmp_path / "short", dqn.ReplayBuffer(100, (4,), np.float32, 1, 1, GAMMA).__getstate__(), "CartPole-v1")
    with pytest.raises(cql.ArgsError, match=r"^no valid transition in --dataset-dir .*short$"):
        load(tmp_path / "short", **cartpole)


def test_cql_regularizer_against_numpy(maybe_jit):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 5)).astype(np.float32) * 3
    actions = rng.integers(5, size=6).astype(np.int32)
    expected = np.log(np.exp(q.astype(np.float64)).sum(-1)) - q[np.arange(6), actions]
    got = maybe_jit(cql.cql_regularizer)(jnp.asarray(q), jnp.asarray(actions))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # by hand: Q = (0, 0) -> log 2; one action far above the others -> about 0 when it is the data's, its gap otherwise
    got = cql.cql_regularizer(jnp.array([[0.0, 0.0], [10.0, 0.0], [10.0, 0.0]]), jnp.array([1, 0, 1]))
    np.testing.assert_allclose(
        got, [np.log(2), np.log1p(np.exp(-10)), 10 + np.log1p(np.exp(-10))], rtol=1e-6, atol=2e-6
    )


def test_huber_loss_against_numpy(maybe_jit):
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5], np.float32)
    expected = np.where(np.abs(x) <= 1, 0.5 * x**2, np.abs(x) - 0.5)
    np.testing.assert_allclose(maybe_jit(cql.huber_loss)(jnp.asarray(x)), expected, rtol=1e-6)


def small_batch(rng, num_actions, obs_dim=3, batch=5):
    return cql.Batch(
        rng.normal(size=(batch, obs_dim, 1)).astype(np.float32),
        rng.integers(num_actions, size=batch).astype(np.int32),
        rng.normal(size=batch).astype(np.float32),
        np.array([0.9, 0.0, 0.81, 0.9, 0.0], np.float32)[:batch],
        rng.normal(size=(batch, obs_dim, 1)).astype(np.float32),
    )


def test_cql_loss_against_numpy(maybe_jit):
    rng = np.random.default_rng(1)
    network = cql.QNetwork(4, "mlp", 1, False, True, True)
    params = network.init(jax.random.key(0), np.zeros((1, 3, 1), np.float32))["params"]
    target_params = network.init(jax.random.key(1), np.zeros((1, 3, 1), np.float32))["params"]
    batch = small_batch(rng, 4)
    loss, aux = maybe_jit(cql.cql_loss, static_argnums=(0,))(network, params, target_params, batch, 0.1)
    td, regularizer = aux["td_loss"], aux["cql_loss"]
    q = np.asarray(network.apply({"params": params}, batch.obs), np.float64)
    next_q = np.asarray(network.apply({"params": target_params}, batch.next_obs), np.float64)
    errors = batch.rewards + batch.discounts * next_q.max(-1) - q[np.arange(5), batch.actions]
    expected_td = np.mean(np.where(np.abs(errors) <= 1, 0.5 * errors**2, np.abs(errors) - 0.5))
    expected_reg = np.mean(np.log(np.exp(q).sum(-1)) - q[np.arange(5), batch.actions])
    expected = [expected_td, expected_reg, expected_td + 0.1 * expected_reg]
    np.testing.assert_allclose([td, regularizer, loss], expected, rtol=1e-5)


class TableNetwork:
    """A stand-in network whose logits are a table: params["table"][obs id], obs id = obs[:, 0, 0]."""

    def apply(self, variables, obs):
        return variables["params"]["table"][obs[:, 0, 0].astype(jnp.int32)]


def test_cql_c51_loss_by_hand(maybe_jit):
    """3 atoms z = (-1, 0, 1), 2 actions, one transition from state 0 to state 1 with r = 0.5, discount 0.5.
    Online net at s' = 1: action 0 has p = (0, 0, 1) (Q = 1), action 1 has p = (1, 0, 0) (Q = -1), so double-DQN picks
    a* = 0 although the target net prefers action 1 there. Target net at (s', a* = 0): p = (0.5, 0.5, 0), whose atoms
    move to 0.5 + 0.5 z = (0, 0.5, 1): the first to atom 0, the second half-half onto atoms 0 and 1 -> m = (0, 0.75,
    0.25). Online at (s = 0, a = 1): p = (0.25, 0.25, 0.5) -> cross-entropy = -(0.75 ln 0.25 + 0.25 ln 0.5).
    Q(0, .) = (0, 0.25) with p(0, 0) uniform -> regularizer = ln(e^0 + e^0.25) - 0.25."""
    eps = 1e-30
    log = lambda p: np.log(np.maximum(np.array(p, np.float32), eps))
    online = np.stack(
        [np.stack([log([1 / 3, 1 / 3, 1 / 3]), log([0.25, 0.25, 0.5])]), np.stack([log([0, 0, 1]), log([1, 0, 0])])]
    )
    target = np.stack([np.zeros((2, 3), np.float32), np.stack([log([0.5, 0.5, 0]), log([0, 0, 1])])])
    batch = cql.Batch(
        np.zeros((1, 1, 1), np.float32),
        np.array([1], np.int32),
        np.array([0.5], np.float32),
        np.array([0.5], np.float32),
        np.ones((1, 1, 1), np.float32),
    )
    support = jnp.array([-1.0, 0.0, 1.0])
    loss_fn = maybe_jit(cql.cql_c51_loss, static_argnums=(0,))
    loss, aux = loss_fn(
        TableNetwork(), {"table": jnp.asarray(online)}, {"table": jnp.asarray(target)}, batch, 0.1, support
    )
    ce, regularizer, q_taken, y = aux["td_loss"], aux["cql_loss"], aux["q_taken"][0], aux["targets"][0]
    expected_ce = -(0.75 * np.log(0.25) + 0.25 * np.log(0.5))
    expected_reg = np.log(1 + np.exp(0.25)) - 0.25
    expected = [expected_ce, expected_reg, 0.25, expected_ce + 0.1 * expected_reg]
    np.testing.assert_allclose([ce, regularizer, q_taken, loss], expected, rtol=1e-5)
    assert y == pytest.approx(0.25)  # the mean of m = (0, 0.75, 0.25) on z = (-1, 0, 1)


def test_dueling_c51_head_against_numpy():
    network = cql.DuelingC51Network(3, 5, "mlp", 2, True, True, True)
    obs = np.random.default_rng(2).normal(size=(4, 6, 1)).astype(np.float32)
    params = jax.tree.map(np.asarray, network.init(jax.random.key(3), obs)["params"])
    assert params["torso"]["fc"]["kernel"].shape == (6, 512) and params["dense"]["kernel"].shape == (512, 1024)  # 512k
    assert params["value"]["kernel"].shape == (1024, 5) and params["advantage"]["kernel"].shape == (1024, 15)
    fc, dense = params["torso"]["fc"], params["dense"]
    hidden = np.maximum(obs.reshape(4, 6) @ fc["kernel"] + fc["bias"], 0)
    hidden = np.maximum(hidden @ dense["kernel"] + dense["bias"], 0)
    value = hidden @ params["value"]["kernel"] + params["value"]["bias"]
    advantage = (hidden @ params["advantage"]["kernel"] + params["advantage"]["bias"]).reshape(4, 3, 5)
    expected = value[:, None, :] + advantage - advantage.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(network.apply({"params": params}, obs), expected, rtol=1e-4, atol=1e-5)


def test_resolve_fills_each_column():
    plain, c51 = cql.resolve(cql.Args()), cql.resolve(cql.Args(c51=True))
    column = lambda a: (a.learning_rate, a.adam_eps, a.n_step, a.target_update_period, a.scale_dense)
    assert column(plain) == (5e-5, 3.125e-4, 1, 2000, False)
    assert column(c51) == (6.25e-5, 1.5e-4, 3, 100, True)
    assert cql.resolve(cql.Args(c51=True, n_step=1, learning_rate=1e-3)).n_step == 1  # set flags win
    assert (plain.cql_alpha, plain.batch_size, plain.gamma, c51.num_atoms, c51.v_max) == (0.1, 32, 0.99, 51, 10.0)
    iterations = (plain.num_iterations, plain.grad_steps_per_iteration, plain.eval_steps, plain.eval_epsilon)
    assert iterations == (200, 62_500, 125_000, 0.001)
    assert (plain.num_checkpoints, plain.transitions_per_checkpoint) == (50, 50_000)  # the paper's 5%
    assert cql.pruning_window(plain, 200 * 62_500) == (2_500_000, 10_000_000, 1000)  # 20% / 80% of 12.5M


class CountingEnv:
    """Episodes of 5 steps with reward 1 per step; records the actions it gets."""

    class ActionSpace:
        n = 3

    action_space = ActionSpace()

    def __init__(self):
        self.actions, self.t = [], 0

    def reset(self, seed=None):
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.actions.append(action)
        self.t += 1
        return np.full(2, self.t, np.float32), 1.0, self.t == 5, False, {}


def test_evaluate_plays_whole_episodes():
    env = CountingEnv()
    returns = cql.evaluate(env, lambda params, obs: 2, None, np.random.default_rng(0), 12, 0.0, 1)
    assert returns == [5.0, 5.0, 5.0] and len(env.actions) == 15  # the episode running at step 12 finishes
    assert set(env.actions) == {2}  # greedy
    env = CountingEnv()
    cql.evaluate(env, lambda params, obs: 2, None, np.random.default_rng(0), 300, 1.0, 1)
    assert set(env.actions) == {0, 1, 2}  # epsilon 1: uniformly random actions
