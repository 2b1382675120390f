"""cql_pruned.py and the DQN Replay Dataset: the reader on a hand-built dataset in the public layout, the writer's
round trip against the online replay buffer, bad data, the CQL regularizer and losses against NumPy and by hand."""
import gzip
import os

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


def dopamine_checkpoint(directory, suffix: int, frames, actions, rewards, terminals, add_count: int, invalid_range) -> None:
    """Writes one checkpoint with the public file names and dtypes (METHODS 7.2), independently of DatasetWriter."""
    os.makedirs(directory, exist_ok=True)
    arrays = {"$store$_observation": frames.astype(np.uint8), "$store$_action": np.asarray(actions, np.int32),
              "$store$_reward": np.asarray(rewards, np.float32), "$store$_terminal": np.asarray(terminals, np.uint8),
              "add_count": np.array(add_count), "invalid_range": np.asarray(invalid_range)}
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
    actions, rewards, terminals = np.zeros(capacity, np.int32), np.zeros(capacity, np.float32), np.zeros(capacity, np.uint8)
    actions[real] = [1, 2, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
    rewards[[3, 5, 9, 11, 12, 18, 20]] = [1, 1, 1, 1, 1, 0.5, -1]
    terminals[[5, 13]] = 1
    invalid_range = [(24 - 1 + i) % capacity for i in range(5)]  # Dopamine's invalid_range(cursor 24, n=1, stack 4)
    return frames, actions, rewards, terminals, 24, invalid_range


def load(directory, frame_shape=(84, 84), num_actions=3, stack=4, **flags):
    args = cql.resolve(cql.Args(dataset_dir=str(directory), env_id="ALE/Pong-v5", **{"num_checkpoints": 1, "gamma": GAMMA, **flags}))
    return cql.load_dataset(args, frame_shape, np.uint8, num_actions, stack)


def transitions(dataset) -> dict:
    """{start slot: (reward, discount, next slot)} of every valid transition."""
    return {int(s): (float(r), float(d), int(n)) for s, r, d, n in zip(dataset.starts, dataset.rewards, dataset.discounts, dataset.next_slots)}


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
    expected = {3: (1, g, 4), 4: (0, g, 5), 5: (1, 0, 6), 9: (1, g, 10), 10: (0, g, 11), 11: (1, g, 12), 12: (1, g, 13),
                13: (0, 0, 14), 17: (0, g, 18), 18: (0.5, g, 19), 19: (0, g, 20), 20: (-1, g, 21), 21: (0, g, 22), 22: (0, g, 23)}
    assert_transitions(dataset, expected)
    assert len(dataset.frames) == 24  # only written slots are loaded
    # stacks: oldest frame first, the zero padding before an episode's first frame
    stacks = dataset.stacked(np.array([3, 4, 10, 17, 22]))
    assert stacks.shape == (5, 84, 84, 4)
    assert [list(s[0, 0]) for s in stacks] == [[0, 0, 0, 4], [0, 0, 4, 5], [0, 0, 10, 11], [0, 0, 0, 18], [20, 21, 22, 23]]
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
    expected = {3: (1 + g * g, 0, 6), 4: (g, 0, 6), 5: (1, 0, 6), 9: (1 + g * g, g**3, 12), 10: (g + g * g, g**3, 13),
                11: (1 + g, 0, 14), 12: (1, 0, 14), 13: (0, 0, 14), 17: (0.5 * g, g**3, 20), 18: (0.5 - g * g, g**3, 21),
                19: (-g, g**3, 22), 20: (-1, g**3, 23)}
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
    with pytest.raises(cql.ArgsError, match=r"has checkpoints \[0, 1, 2\]; --first-checkpoint 2 --num-checkpoints 2 asks for 2..3"):
        load(tmp_path, first_checkpoint=2, num_checkpoints=2)


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


@pytest.mark.parametrize("stack, n_step", [(4, 3), (4, 1), (1, 3)])
def test_writer_round_trip_matches_the_online_buffer(tmp_path, stack, n_step):
    """Steps go to the online ReplayBuffer and to DatasetWriter (several checkpoints, the last partial); the reader
    gives back the buffer's transitions: same stacks, actions, n-step rewards and discounts, next states."""
    rng, steps, capacity = np.random.default_rng(stack * 10 + n_step), 700, 160
    rb = dqn.ReplayBuffer(10_000, (3, 2), np.uint8, stack, n_step, GAMMA)
    writer = dqn.DatasetWriter(str(tmp_path), capacity, (3, 2), np.uint8, stack, n_step)
    slot_to_buffer = {}  # writer slot -> buffer slot of the same env step
    for step in stream_of_episodes(rng, steps):
        slot_to_buffer[writer.add_count + (stack - 1 if writer.episode_start else 0)] = rb.count
        rb.add(*step)
        writer.add(*step)
    writer.close()
    files = dqn.checkpoint_files(str(tmp_path))
    assert sorted(files) == list(range(writer.add_count // capacity + 1)) and len(files) >= 5
    assert all(names == set(dqn.CHECKPOINT_ARRAYS) | {dqn.TRUNCATION} for names in files.values())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    dataset = load(tmp_path, frame_shape=(3, 2), num_actions=4, stack=stack, n_step=n_step, num_checkpoints=len(files),
                   transitions_per_checkpoint=10**6)
    assert len(dataset.frames) == writer.add_count  # every slot came back
    # every valid transition of the reader is one of the buffer's, identical; global slot -> writer slot is identity
    starts = dataset.starts
    assert set(starts.tolist()) <= set(slot_to_buffer)
    buffer_slots = np.array([slot_to_buffer[s] for s in starts.tolist()])
    returns, discounts, next_idx, valid = rb.n_step_window(buffer_slots)
    assert valid.all()
    np.testing.assert_array_equal(dataset.stacked(starts), rb.stacked(buffer_slots))
    np.testing.assert_array_equal(dataset.actions[starts], rb.actions[buffer_slots])
    np.testing.assert_allclose(dataset.rewards, returns, rtol=1e-6)
    np.testing.assert_allclose(dataset.discounts, discounts, rtol=1e-6)
    bootstrap = discounts > 0  # a terminal transition's next state is never used
    np.testing.assert_array_equal(dataset.stacked(dataset.next_slots[bootstrap]), rb.stacked(next_idx[bootstrap]))
    # and it misses only windows that cross a checkpoint boundary
    _, _, _, all_valid = rb.n_step_window(np.array(sorted(slot_to_buffer.values())))
    near_boundary = sum(1 for s in slot_to_buffer if s % capacity <= stack - 1 or s % capacity >= capacity - n_step or s >= writer.add_count - n_step)
    assert all_valid.sum() - near_boundary <= len(dataset) <= all_valid.sum()
    # sampling draws these transitions
    batch = dataset.sample(np.random.default_rng(1), 256)
    lookup = {tuple(dataset.stacked(np.array([s]))[0].ravel()): i for i, s in enumerate(starts)}
    for obs, action, reward in zip(batch.obs, batch.actions, batch.rewards):
        i = lookup[tuple(obs.ravel())]
        assert action == rb.actions[buffer_slots[i]] and reward == pytest.approx(returns[i])


def test_writer_layout_and_interrupted_checkpoint(tmp_path):
    """Dopamine's layout: 3 padding slots per episode start, no slot for a terminated episode's final observation,
    one listed in truncation_ckpt for a truncated one; full checkpoints carry the running add_count and Dopamine's
    invalid_range; a checkpoint still being written is only temporary files."""
    writer = dqn.DatasetWriter(str(tmp_path), 12, (2,), np.uint8, 4, 1)
    frame = lambda v: np.full(2, v, np.uint8)  # noqa: E731
    writer.add(frame(1), 1, 1.0, False, False, frame(2))
    writer.add(frame(2), 2, 0.0, True, False, frame(3))  # terminated: frame 3 is not stored
    writer.add(frame(4), 3, 1.0, False, True, frame(5))  # truncated: frame 5 is
    writer.add(frame(6), 1, -1.0, False, False, frame(7))  # padding in slots 10, 11 and 0 of checkpoint 1, then frame 6
    assert os.listdir(tmp_path) and all(f.endswith("ckpt.0.gz") for f in os.listdir(tmp_path) if not f.endswith(".tmp"))
    read = lambda name, i: np.load(gzip.open(tmp_path / f"{name}_ckpt.{i}.gz"))  # noqa: E731
    np.testing.assert_array_equal(read("$store$_observation", 0)[:, 0], [0, 0, 0, 1, 2, 0, 0, 0, 4, 5, 0, 0])
    np.testing.assert_array_equal(read("$store$_action", 0), [0, 0, 0, 1, 2, 0, 0, 0, 3, 0, 0, 0])
    np.testing.assert_array_equal(read("$store$_terminal", 0), [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(read("$store$_reward", 0), [0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0])
    assert read("add_count", 0) == 12 and read("truncation", 0).tolist() == [9]
    assert read("invalid_range", 0).tolist() == [11, 0, 1, 2, 3]  # cursor 0 after the wrap, n = 1, stack 4
    assert read("$store$_observation", 0).dtype == np.uint8 and read("$store$_action", 0).dtype == np.int32
    assert read("$store$_reward", 0).dtype == np.float32 and read("$store$_terminal", 0).dtype == np.uint8
    assert [f for f in os.listdir(tmp_path) if "ckpt.1" in f] == ["$store$_observation_ckpt.1.gz.tmp"]  # in progress
    writer.close()
    assert read("add_count", 1) == 2 and read("$store$_observation", 1).shape == (12, 2)  # zero-filled to capacity
    np.testing.assert_array_equal(read("$store$_observation", 1)[:, 0], [0, 6] + [0] * 10)
    assert read("invalid_range", 1).tolist() == [1, 2, 3, 4, 5]  # cursor 2


def test_cql_regularizer_against_numpy(maybe_jit):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 5)).astype(np.float32) * 3
    actions = rng.integers(5, size=6).astype(np.int32)
    expected = np.log(np.exp(q.astype(np.float64)).sum(-1)) - q[np.arange(6), actions]
    got = maybe_jit(cql.cql_regularizer)(jnp.asarray(q), jnp.asarray(actions))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # by hand: Q = (0, 0) -> log 2; one action far above the others -> about 0 when it is the data's, its gap otherwise
    np.testing.assert_allclose(cql.cql_regularizer(jnp.array([[0.0, 0.0], [10.0, 0.0], [10.0, 0.0]]), jnp.array([1, 0, 1])),
                               [np.log(2), np.log1p(np.exp(-10)), 10 + np.log1p(np.exp(-10))], rtol=1e-6, atol=2e-6)


def test_huber_loss_against_numpy(maybe_jit):
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5], np.float32)
    expected = np.where(np.abs(x) <= 1, 0.5 * x**2, np.abs(x) - 0.5)
    np.testing.assert_allclose(maybe_jit(cql.huber_loss)(jnp.asarray(x)), expected, rtol=1e-6)


def small_batch(rng, num_actions, obs_dim=3, batch=5):
    return cql.Batch(rng.normal(size=(batch, obs_dim, 1)).astype(np.float32), rng.integers(num_actions, size=batch).astype(np.int32),
                     rng.normal(size=batch).astype(np.float32), np.array([0.9, 0.0, 0.81, 0.9, 0.0], np.float32)[:batch],
                     rng.normal(size=(batch, obs_dim, 1)).astype(np.float32))


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
    np.testing.assert_allclose([td, regularizer, loss], [expected_td, expected_reg, expected_td + 0.1 * expected_reg], rtol=1e-5)


class TableNetwork:
    """A stand-in network whose logits are a table: params["table"][obs id], obs id = obs[:, 0, 0]."""

    def apply(self, variables, obs):
        return variables["params"]["table"][obs[:, 0, 0].astype(jnp.int32)]


def test_cql_c51_loss_by_hand(maybe_jit):
    """3 atoms z = (-1, 0, 1), 2 actions, one transition from state 0 to state 1 with r = 0.5, discount 0.5.
    Online net at s' = 1: action 0 has p = (0, 0, 1) (Q = 1), action 1 has p = (1, 0, 0) (Q = -1), so double-DQN picks
    a* = 0 although the target net prefers action 1 there. Target net at (s', a* = 0): p = (0.5, 0.5, 0), whose atoms
    move to 0.5 + 0.5 z = (0, 0.5, 1): the first to atom 0, the second half-half onto atoms 0 and 1 -> m = (0, 0.75, 0.25).
    Online at (s = 0, a = 1): p = (0.25, 0.25, 0.5) -> cross-entropy = -(0.75 ln 0.25 + 0.25 ln 0.5). Q(0, .) = (0, 0.25)
    with p(0, 0) uniform -> regularizer = ln(e^0 + e^0.25) - 0.25."""
    eps = 1e-30
    log = lambda p: np.log(np.maximum(np.array(p, np.float32), eps))  # noqa: E731
    online = np.stack([np.stack([log([1 / 3, 1 / 3, 1 / 3]), log([0.25, 0.25, 0.5])]), np.stack([log([0, 0, 1]), log([1, 0, 0])])])
    target = np.stack([np.zeros((2, 3), np.float32), np.stack([log([0.5, 0.5, 0]), log([0, 0, 1])])])
    batch = cql.Batch(np.zeros((1, 1, 1), np.float32), np.array([1], np.int32), np.array([0.5], np.float32),
                      np.array([0.5], np.float32), np.ones((1, 1, 1), np.float32))
    support = jnp.array([-1.0, 0.0, 1.0])
    loss_fn = maybe_jit(cql.cql_c51_loss, static_argnums=(0,))
    loss, aux = loss_fn(TableNetwork(), {"table": jnp.asarray(online)}, {"table": jnp.asarray(target)}, batch, 0.1, support)
    ce, regularizer, q_taken, y = aux["td_loss"], aux["cql_loss"], aux["q_taken"][0], aux["targets"][0]
    expected_ce = -(0.75 * np.log(0.25) + 0.25 * np.log(0.5))
    expected_reg = np.log(1 + np.exp(0.25)) - 0.25
    np.testing.assert_allclose([ce, regularizer, q_taken, loss], [expected_ce, expected_reg, 0.25, expected_ce + 0.1 * expected_reg], rtol=1e-5)
    assert y == pytest.approx(0.25)  # the mean of m = (0, 0.75, 0.25) on z = (-1, 0, 1)


def test_dueling_c51_head_against_numpy():
    network = cql.DuelingC51Network(3, 5, "mlp", 2, True, True, True)
    obs = np.random.default_rng(2).normal(size=(4, 6, 1)).astype(np.float32)
    params = jax.tree.map(np.asarray, network.init(jax.random.key(3), obs)["params"])
    assert params["torso"]["fc"]["kernel"].shape == (6, 512) and params["dense"]["kernel"].shape == (512, 1024)  # 512 * k
    assert params["value"]["kernel"].shape == (1024, 5) and params["advantage"]["kernel"].shape == (1024, 15)
    hidden = np.maximum(np.maximum(obs.reshape(4, 6) @ params["torso"]["fc"]["kernel"] + params["torso"]["fc"]["bias"], 0)
                        @ params["dense"]["kernel"] + params["dense"]["bias"], 0)
    value = hidden @ params["value"]["kernel"] + params["value"]["bias"]
    advantage = (hidden @ params["advantage"]["kernel"] + params["advantage"]["bias"]).reshape(4, 3, 5)
    expected = value[:, None, :] + advantage - advantage.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(network.apply({"params": params}, obs), expected, rtol=1e-4, atol=1e-5)


def test_resolve_fills_each_column():
    plain, c51 = cql.resolve(cql.Args()), cql.resolve(cql.Args(c51=True))
    assert (plain.learning_rate, plain.adam_eps, plain.n_step, plain.target_update_period, plain.scale_dense) == (5e-5, 3.125e-4, 1, 2000, False)
    assert (c51.learning_rate, c51.adam_eps, c51.n_step, c51.target_update_period, c51.scale_dense) == (6.25e-5, 1.5e-4, 3, 100, True)
    assert cql.resolve(cql.Args(c51=True, n_step=1, learning_rate=1e-3)).n_step == 1  # set flags win
    assert (plain.cql_alpha, plain.batch_size, plain.gamma, c51.num_atoms, c51.v_max) == (0.1, 32, 0.99, 51, 10.0)
    assert (plain.num_iterations, plain.grad_steps_per_iteration, plain.eval_steps, plain.eval_epsilon) == (200, 62_500, 125_000, 0.001)
    assert (plain.num_checkpoints, plain.transitions_per_checkpoint) == (50, 50_000)  # the paper's 5%
    assert cql.pruning_window(plain, 200 * 62_500) == (2_500_000, 10_000_000, 1000)  # 20% / 80% of 12.5M


def test_dopamine_full_checkpoint_with_a_longer_window(tmp_path):
    """Dopamine logs a full buffer when add_count % capacity == capacity - 1: slot capacity - 1 still holds the previous
    round's data and its invalid_range was computed for the logger's n = 1. Read with n = 3, the reader also excludes
    the slots whose 3-step window would end on that stale slot."""
    frames, actions, rewards, terminals, _, _ = hand_checkpoint()
    for j in range(24, 29):  # episode C goes on to slot 28
        frames[j] = j + 1
    frames[29], terminals[29] = 99, 1  # stale: from the previous million steps
    cursor = 29
    dopamine_checkpoint(tmp_path, 0, frames, actions, rewards, terminals, 2 * 30 - 1, [(cursor - 1 + i) % 30 for i in range(5)])
    one = transitions(load(tmp_path, n_step=1))
    three = transitions(load(tmp_path, n_step=3))
    assert max(one) == 27 and one[27][2] == 28  # 28 and 29 are in the logged invalid_range
    assert max(three) == 25 and three[25][2] == 28  # 26, 27 would reach slot 29
    assert all(next_slot != 29 for _, _, next_slot in three.values())


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
