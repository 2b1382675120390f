"""rainbow_pruned.py's pieces against independent computations: the C51 projection, the sum tree, prioritized
replay (and its checkpoint state), importance weights and priorities, the loss and the update (also a refused one),
main()'s loop writing every accepted step's priorities back and no refused step's, the loop's device-to-host
transfers, and the C51 head's ERK sparsity."""

import dataclasses
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import rainbow_pruned as rainbow
from common import metrics


# ------------------------------------------------------------------------------- categorical projection
def projection_reference(next_probs, rewards, discounts, support):
    """Bellemare et al. 2017, Algorithm 1, atom by atom in float64: each moved atom b = (Tz - v_min)/dz splits its
    probability between floor(b) and ceil(b) in proportion to closeness (all of it when b is an integer)."""
    v_min, v_max = support[0], support[-1]
    dz = (v_max - v_min) / (len(support) - 1)
    out = np.zeros(next_probs.shape, np.float64)
    for b in range(len(rewards)):
        for j, z in enumerate(support):
            tz = min(max(rewards[b] + discounts[b] * z, v_min), v_max)
            position = (tz - v_min) / dz
            lower, upper = int(np.floor(position)), int(np.ceil(position))
            if lower == upper:
                out[b, lower] += next_probs[b, j]
            else:
                out[b, lower] += next_probs[b, j] * (upper - position)
                out[b, upper] += next_probs[b, j] * (position - lower)
    return out


def test_projection_by_hand():
    support = jnp.array([0.0, 1.0, 2.0])
    next_probs = jnp.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    rewards = jnp.array([0.5, 0.0, 7.0])
    discounts = jnp.array([1.0, 0.5, 0.0])
    out = rainbow.categorical_projection(next_probs, rewards, discounts, support)
    # row 0: the atom at 1 moves to 1.5, half to each neighbour; row 1: atoms move to 0, 0.5, 1;
    # row 2: terminal with a reward above v_max: everything on the top atom
    np.testing.assert_allclose(out, [[0.0, 0.5, 0.5], [0.2 + 0.15, 0.15 + 0.5, 0.0], [0.0, 0.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize("v_min, v_max, atoms", [(-10.0, 10.0, 51), (-3.0, 5.0, 7)])
def test_projection_against_reference(maybe_jit, v_min, v_max, atoms):
    rng = np.random.default_rng(atoms)
    batch = 13
    support = np.linspace(v_min, v_max, atoms)
    next_probs = rng.dirichlet(np.ones(atoms) * 0.5, size=batch)
    rewards = rng.uniform(-3 * v_max, 3 * v_max, batch)  # many moved supports clip at one end or both
    rewards[:3] = [v_max * 0.3, v_min * 0.4, 0.0]
    discounts = np.where(rng.random(batch) < 0.3, 0.0, 0.99**3)  # terminal and non-terminal
    discounts[:3] = [0.99**3, 0.0, 0.5]
    expected = projection_reference(next_probs, rewards, discounts, support)
    project = maybe_jit(rainbow.categorical_projection)
    out = project(*(jnp.asarray(a, jnp.float32) for a in (next_probs, rewards, discounts, support)))
    assert out.shape == (batch, atoms) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(np.asarray(out) >= 0)
    assert np.any(expected[:, 0] > 0.5) and np.any(expected[:, -1] > 0.5)  # clipping at both ends was exercised


# ------------------------------------------------------------------------------------------- sum tree
def chi_square_pvalue(counts, priorities):
    expected = priorities / priorities.sum() * counts.sum()
    used = priorities > 0
    assert counts[~used].sum() == 0  # zero priority is never drawn
    return stats.chisquare(counts[used], expected[used]).pvalue


def test_sum_tree_sampling_frequencies_follow_priorities():
    rng = np.random.default_rng(0)
    capacity = 37  # not a power of two: spare leaves must never be drawn
    tree = rainbow.SumTree(capacity)
    priorities = rng.uniform(0.05, 2.0, capacity)
    priorities[[3, 17, 36]] = 0.0
    tree.set(np.arange(capacity), priorities)
    assert tree.total() == pytest.approx(priorities.sum(), rel=1e-12)
    np.testing.assert_array_equal(tree.get(np.arange(capacity)), priorities)
    draws = tree.sample(rng, 200_000)
    counts = np.bincount(draws, minlength=tree.leaves)
    assert counts[capacity:].sum() == 0
    assert chi_square_pvalue(counts[:capacity], priorities) > 1e-3

    # an update changes the frequencies: the new ones match the new priorities and reject the old ones
    new = priorities.copy()
    new[:10] *= 8.0
    new[20] = 0.0
    tree.set(np.arange(10), new[:10])
    tree.set(20, 0.0)
    assert tree.total() == pytest.approx(new.sum(), rel=1e-12)
    counts = np.bincount(tree.sample(rng, 200_000), minlength=tree.leaves)[:capacity]
    assert chi_square_pvalue(counts, new) > 1e-3
    assert (
        stats.chisquare(counts[priorities > 0], (priorities / priorities.sum() * counts.sum())[priorities > 0]).pvalue
        < 1e-12
    )


def test_sum_tree_repeated_slots_take_the_last_value_and_total_stays_exact():
    tree = rainbow.SumTree(5)
    tree.set(np.array([1, 3, 1, 1]), np.array([2.0, 4.0, 8.0, 0.5]))
    np.testing.assert_array_equal(tree.get(np.arange(5)), [0.0, 0.5, 0.0, 4.0, 0.0])
    assert tree.total() == 4.5
    rng = np.random.default_rng(1)
    for _ in range(2000):  # many small updates: the total is recomputed, never accumulated, so it stays exact
        idx = rng.integers(0, 5, 3)
        tree.set(idx, rng.uniform(0, 1, 3))
    assert tree.total() == pytest.approx(tree.get(np.arange(5)).sum(), rel=1e-15)
    with pytest.raises(ValueError):
        tree.set(0, -1.0)


def test_sum_tree_at_one_million_slots():
    """1M leaves: a 2^20-leaf tree (20 levels per operation); batched set and sample agree with the leaves."""
    capacity = 1_000_000
    tree = rainbow.SumTree(capacity)
    assert tree.leaves == 2**20 and tree.nodes.nbytes == 2**21 * 8  # 16 MiB next to the 7 GB of frames
    rng = np.random.default_rng(2)
    priorities = rng.uniform(0, 1, capacity)
    tree.set(np.arange(capacity), priorities)
    assert tree.total() == pytest.approx(priorities.sum(), rel=1e-12)
    tree.set(999_999, 1e6)  # one heavy slot takes about half of all the mass
    draws = tree.sample(rng, 10_000)
    share = np.mean(draws == 999_999)
    assert share == pytest.approx(1e6 / (1e6 + priorities[:-1].sum()), abs=0.03)


# -------------------------------------------------------------------------------- prioritized replay
def add_steps(rb, rng, n, episode_every=7):
    for t in range(n):
        end = (t + 1) % episode_every == 0
        rb.add(
            np.full((2,), t, np.float32),
            t % 3,
            1.0,
            end and t % 2 == 0,
            end and t % 2 == 1,
            np.full((2,), t + 1, np.float32),
        )


def test_prioritized_buffer_priorities_through_wraparound():
    """Reference model: each written slot gets the largest priority set so far (1.0 at first) or 0 for an episode's
    final observation; updated slots take their new priorities; the tree total is their sum."""
    rng = np.random.default_rng(3)
    rb = rainbow.PrioritizedReplayBuffer(20, (2,), np.float32, 1, 2, 0.9)
    reference, max_priority = {}, 1.0
    for round_ in range(8):
        before = rb.count
        add_steps(rb, rng, 9)
        for slot in range(before, rb.count):
            reference[slot % 20] = 0.0 if rb.last[slot % 20] else max_priority
        _, slots, probs = rb.sample(rng, 6)
        assert not rb.last[slots].any()
        np.testing.assert_allclose(probs, [reference[s] / sum(reference.values()) for s in slots], rtol=1e-6)
        new = rng.uniform(0.1, 1.0 + round_, len(slots))
        rb.update_priorities(slots, new)
        for s, p in zip(slots, new):
            reference[s] = p  # duplicates: the same slot gets its last value
        max_priority = max(max_priority, new.max())
        assert rb.max_priority == max_priority
        assert rb.tree.total() == pytest.approx(sum(reference.values()), rel=1e-12)
        np.testing.assert_array_equal(
            rb.tree.get(np.arange(20)), [reference.get(s, 0.0) for s in range(20)]
        )  # unwritten slots: 0
    assert rb.count > 3 * 20  # wrapped around several times


def test_prioritized_sampling_prefers_high_priority_and_skips_invalid():
    rng = np.random.default_rng(4)
    rb = rainbow.PrioritizedReplayBuffer(50, (2,), np.float32, 1, 3, 0.9)
    add_steps(rb, rng, 30, episode_every=100)  # one episode, still running: the newest slots' windows are open
    rb.update_priorities(np.arange(30), np.full(30, 1e-3))
    rb.update_priorities(np.array([5, 27, 28, 29]), np.array([10.0, 10.0, 10.0, 10.0]))
    assert np.mean(np.isin(rb.tree.sample(rng, 4000), [27, 28, 29])) > 0.7  # the tree draws them often...
    batch, slots, probs = rb.sample(rng, 4000)
    assert slots.max() <= 26  # ...but slots 27..29 lack 3 following steps: they are redrawn, never returned
    assert np.mean(slots == 5) > 0.9
    np.testing.assert_array_equal(batch.obs[:, 0, 0], slots.astype(np.float32))  # frame t holds t
    assert np.all(probs[slots == 5] == np.float32(10.0 / rb.tree.total()))


class TopOfRange:
    """A stand-in generator whose uniform draws are all the largest float below 1: the descent then meets the
    rounding case where the remaining mass is >= a left sum although the right subtree is empty."""

    def random(self, n):
        return np.full(n, np.nextafter(1.0, 0.0))


def test_sum_tree_never_draws_an_empty_slot_at_the_top_of_the_range():
    rng = np.random.default_rng(6)
    for _ in range(3000):
        capacity = int(rng.integers(2, 40))
        priorities = rng.uniform(0, 1, capacity) * (rng.random(capacity) < 0.6)
        priorities[rng.integers(capacity)] = rng.uniform(0.1, 1)  # at least one non-zero
        tree = rainbow.SumTree(capacity)
        tree.set(np.arange(capacity), priorities)
        drawn = tree.sample(TopOfRange(), 3)
        assert np.all(priorities[drawn] > 0), (priorities, drawn)


def test_sum_tree_one_slot_and_many_slot_updates_agree():
    rng = np.random.default_rng(7)
    one, many = rainbow.SumTree(23), rainbow.SumTree(23)
    for _ in range(300):
        idx, value = int(rng.integers(23)), float(rng.uniform(0, 3))
        one.set(idx, value)  # the scalar path taken at every env step
        many.set(np.array([idx]), np.array([value]))
    np.testing.assert_array_equal(one.nodes, many.nodes)
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError):
            one.set(3, bad)
    one_slot = rainbow.SumTree(1)  # capacity 1: the leaf is the root
    one_slot.set(0, 2.5)
    assert one_slot.total() == 2.5 and list(one_slot.sample(rng, 4)) == [0, 0, 0, 0]


def small_args(**overrides) -> rainbow.Args:
    args = rainbow.Args(
        env_id="CartPole-v1",
        network="mlp",
        total_timesteps=200,
        learning_starts=100,
        train_frequency=2,
        batch_size=16,
        buffer_size=500,
        exploration_steps=100,
        target_network_frequency=50,
        log_frequency=50,
        pruning_method="none",
        exp_name="priorities",
    )
    return dataclasses.replace(args, **overrides)


def record_the_loop(monkeypatch):
    """Records, in main(), each update's new priorities and sampled slots, and every update_priorities call (checking
    that the sum tree then holds the written values)."""
    updates, written = [], []
    original_make_update, original_sample = rainbow.make_update, rainbow.PrioritizedReplayBuffer.sample
    original_update_priorities = rainbow.PrioritizedReplayBuffer.update_priorities

    def make_update(*args, **kwargs):
        update = original_make_update(*args, **kwargs)

        def recorded(state, batches, probs, counts):  # one entry per batch, in step order
            state, update_metrics, priorities = update(state, batches, probs, counts)
            for record, step_priorities, step_counts in zip(updates[-len(batches) :], np.array(priorities), counts):
                record.update(
                    priorities=step_priorities, finite=bool(state.finite), mask_update=step_counts is not None
                )
            return state, update_metrics, priorities

        return recorded

    def sample(self, rng, batch_size):
        batch, slots, probs = original_sample(self, rng, batch_size)
        updates.append({"slots": slots.copy()})
        return batch, slots, probs

    def update_priorities(self, idx, priorities):
        written.append((np.array(idx), np.array(priorities)))
        original_update_priorities(self, idx, priorities)
        last = {int(i): p for i, p in zip(idx, priorities)}  # a repeated slot keeps its last value
        np.testing.assert_array_equal(self.tree.get(list(last)), list(last.values()))

    monkeypatch.setattr(rainbow, "make_update", make_update)
    monkeypatch.setattr(rainbow.PrioritizedReplayBuffer, "sample", sample)
    monkeypatch.setattr(rainbow.PrioritizedReplayBuffer, "update_priorities", update_priorities)
    return updates, written


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory):
    """One short main() run with GMP mask updates and epsilon 0 (every action greedy), recorded by record_the_loop,
    and the order of its replay stores ("add") and jax.device_get calls ("get")."""
    events, device_get, add = [], jax.device_get, rainbow.PrioritizedReplayBuffer.add
    args = small_args(start_e=0.0, end_e=0.0, pruning_method="gmp", sparsity=0.5, prune_frequency_grad_steps=5)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(tmp_path_factory.mktemp("greedy_run"))
        updates, written = record_the_loop(monkeypatch)
        monkeypatch.setattr(jax, "device_get", lambda tree: events.append("get") or device_get(tree))
        monkeypatch.setattr(rainbow.PrioritizedReplayBuffer, "add", lambda rb, *a: events.append("add") or add(rb, *a))
        rainbow.main(args)
    return args, updates, written, events


def test_training_loop_feeds_priorities_back(greedy_run):
    """In main(), every gradient step writes the update's new priorities sqrt(CE + 1e-10) for the slots it sampled."""
    _, updates, written, _ = greedy_run
    assert len(updates) == len(written) == rainbow.num_grad_steps(200, 100, 2) == 50
    assert sum(update["mask_update"] for update in updates) == 7  # gradient steps 10, 15, ..., 40
    for update, (idx, priorities) in zip(updates, written):
        np.testing.assert_array_equal(idx, update["slots"])
        np.testing.assert_array_equal(priorities, update["priorities"])
        assert idx.shape == priorities.shape == (16,) and update["finite"]
        assert np.all(priorities > 0.1)  # cross-entropies of 51 atoms, not the initial 1.0
        assert not np.allclose(priorities, 1.0)


def test_loop_transfers_only_the_greedy_action_and_the_priorities(greedy_run):
    """Between logging steps, an env step's only device-to-host transfers are its greedy action and, on a gradient
    step (mask updates included), the new priorities (jax.device_get calls counted)."""
    args, _, _, events = greedy_run
    segments = "|".join(events).split("add")[1:]  # the transfers after each env step's store, up to the next one
    assert len(segments) == args.total_timesteps
    checked = 0
    for t, segment in enumerate(segments[:-1]):
        if (t + 1) % args.log_frequency == 0:
            continue  # a log reads the logged values too
        gradient_step = t >= args.learning_starts and t % args.train_frequency == 0
        assert segment.count("get") == 1 + gradient_step, t  # this step's priorities, the next step's action
        checked += 1
    assert checked == 196  # steps 0..198 but the three logging ones


def test_refused_steps_write_no_priorities(tmp_path, monkeypatch):
    """With a huge learning rate the loss turns non-finite: those steps are refused on the device, their priorities
    come back NaN and never reach the sum tree (it would raise), every accepted step's do; the run stops at the next
    log with the last good state checkpointed."""
    monkeypatch.chdir(tmp_path)
    updates, written = record_the_loop(monkeypatch)
    args = small_args(total_timesteps=600, train_frequency=1, learning_rate=1e30, checkpoint_frequency=1000)
    with pytest.raises(rainbow.NonFiniteError, match="non-finite loss"):
        rainbow.main(args)
    accepted = [update for update in updates if update["finite"]]
    refused = [update for update in updates if not update["finite"]]
    assert refused and all(np.isnan(update["priorities"]).all() for update in refused)
    assert all(np.isfinite(update["priorities"]).all() for update in accepted)
    flags = [update["finite"] for update in updates]
    assert flags == sorted(flags, reverse=True)  # once refused, every later step is refused too
    assert len(written) == len(accepted)
    for update, (idx, priorities) in zip(accepted, written):
        np.testing.assert_array_equal(idx, update["slots"])
        np.testing.assert_array_equal(priorities, update["priorities"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = rainbow.load_checkpoint(str(run_dir))
    assert saved["grad_step"] == len(accepted)
    assert np.isfinite(saved["replay"]["tree"]).all()


def test_prioritized_buffer_checkpoint_state_is_plain_data():
    """__getstate__ gives plain data (the sum tree as its nodes array), and a fresh buffer given it (through pickle)
    is the same buffer: same tree, same largest priority, the same draws and the same priorities for what follows."""
    rng = np.random.default_rng(8)
    rb = rainbow.PrioritizedReplayBuffer(20, (2,), np.float32, 1, 2, 0.9)
    add_steps(rb, rng, 27)
    _, slots, _ = rb.sample(rng, 6)
    rb.update_priorities(slots, rng.uniform(0.5, 3.0, 6))
    state = rb.__getstate__()
    assert isinstance(rb.tree, rainbow.SumTree)  # the buffer itself is unchanged
    assert all(isinstance(v, (np.ndarray, int, float, bool)) for v in state.values()), {
        k: type(v) for k, v in state.items()
    }
    np.testing.assert_array_equal(state["tree"], rb.tree.nodes)
    restored = rainbow.PrioritizedReplayBuffer(20, (2,), np.float32, 1, 2, 0.9)  # as main() makes it, then restores
    restored.__setstate__(pickle.loads(pickle.dumps(state)))
    unpickled = pickle.loads(pickle.dumps(rb))  # pickling the object goes through the same two methods
    for other in (restored, unpickled):
        np.testing.assert_array_equal(other.tree.nodes, rb.tree.nodes)
        assert other.tree.leaves == rb.tree.leaves and other.max_priority == rb.max_priority and other.count == rb.count
    futures = []
    for buffer in (rb, restored, unpickled):  # the same future for all three
        future_rng = np.random.default_rng(9)
        add_steps(buffer, future_rng, 5)
        buffer.update_priorities(np.arange(4), np.array([4.0, 0.2, 0.3, 0.4]))
        batch, slots, probs = buffer.sample(future_rng, 8)
        futures.append((buffer.tree.nodes.copy(), slots, probs, *batch))
    for other in futures[1:]:
        for mine, theirs in zip(futures[0], other):
            np.testing.assert_array_equal(mine, theirs)


# ---------------------------------------------------------------------- importance weights, priorities, loss
def test_importance_weights_and_priorities_by_hand(maybe_jit):
    weights = maybe_jit(rainbow.importance_weights)(jnp.array([0.1, 0.4, 0.2, 0.1]))
    # 1/sqrt(P): 3.1623, 1.5811, 2.2361, 3.1623; divided by the largest
    np.testing.assert_allclose(weights, [1.0, 0.5, np.sqrt(0.5), 1.0], rtol=1e-5)
    priorities = maybe_jit(rainbow.priorities_from_loss)(jnp.array([0.0, 0.25, 4.0]))
    np.testing.assert_allclose(priorities, [1e-5, 0.5, 2.0], rtol=1e-4)


def test_cross_entropy_by_hand(maybe_jit):
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    target = jnp.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    loss = maybe_jit(rainbow.cross_entropy)(logits, target)
    np.testing.assert_allclose(
        loss, [np.log(2.0), -(0.2 * np.log(0.1) + 0.3 * np.log(0.1) + 0.5 * np.log(0.8))], rtol=1e-5
    )
    grad = jax.grad(lambda t: rainbow.cross_entropy(logits, t).sum())(target)
    assert np.all(grad == 0)  # the target is held fixed


def test_update_loss_against_numpy():
    """The jitted update's loss and priorities equal a NumPy recomputation from the two networks' outputs:
    a* by the target network's Q, projection (reference above), cross-entropy, importance weights."""
    rng = np.random.default_rng(5)
    network = rainbow.RainbowNetwork(3, 11, "mlp", 1, False, True, True)
    support = jnp.linspace(-2.0, 2.0, 11)
    obs, next_obs = rng.normal(size=(6, 4, 1)).astype(np.float32), rng.normal(size=(6, 4, 1)).astype(np.float32)
    params = network.init(jax.random.PRNGKey(0), obs)["params"]
    target_params = network.init(jax.random.PRNGKey(1), obs)["params"]
    batch = rainbow.Batch(
        obs,
        np.array([0, 2, 1, 1, 0, 2], np.int32),
        rng.normal(size=6).astype(np.float32),
        np.array([0.9, 0.0, 0.81, 0.9, 0.9, 0.0], np.float32),
        next_obs,
    )
    probs = np.array([0.1, 0.05, 0.2, 0.3, 0.15, 0.2], np.float32)
    tx = optax.adam(1e-3)
    state, _ = rainbow.init_train_state(
        rainbow.Args(pruning_method="none"), params, tx, np.random.default_rng(0), jax.random.PRNGKey(2)
    )
    state = state.replace(target_params=target_params)
    update = rainbow.make_update(rainbow.make_loss(network, support), tx, "none")
    new_state, update_metrics, (priorities,) = update(state, (batch,), (probs,), (None,))
    assert bool(new_state.finite) and int(new_state.grad_step) == 1

    softmax = lambda x: (
        np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    )
    next_p = softmax(np.asarray(network.apply({"params": target_params}, next_obs), np.float64))  # (B, A, atoms)
    best = (next_p * np.asarray(support)).sum(-1).argmax(-1)
    target = projection_reference(
        next_p[np.arange(6), best], batch.rewards, batch.discounts, np.asarray(support, np.float64)
    )
    p = softmax(np.asarray(network.apply({"params": params}, obs), np.float64))[np.arange(6), batch.actions]
    losses = -(target * np.log(p)).sum(-1)
    weights = probs.astype(np.float64) ** -0.5 / (probs.astype(np.float64) ** -0.5).max()
    assert float(update_metrics["losses/td_loss"]) == pytest.approx(np.mean(weights * losses), rel=1e-4)
    assert float(update_metrics["losses/q_values"]) == pytest.approx((p * np.asarray(support)).sum(-1).mean(), abs=1e-5)
    np.testing.assert_allclose(priorities, np.sqrt(losses + 1e-10), rtol=1e-4)

    # one non-finite reward: the step is refused (the state kept, flagged) and every new priority is NaN
    bad = batch._replace(rewards=batch.rewards.copy())
    bad.rewards[3] = np.nan
    refused, update_metrics, priorities = update(state, (bad,), (probs,), (None,))
    assert not bool(refused.finite) and not np.isfinite(float(update_metrics["losses/td_loss"]))
    assert np.isnan(np.asarray(priorities)).all()
    for kept, before in zip(jax.tree.leaves(refused.replace(finite=True)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(kept, before)


def test_q_values_and_head_shape():
    network = rainbow.RainbowNetwork(5, 51, "cnn", 1, False, True, True)
    x = jnp.zeros((3, 84, 84, 4), jnp.uint8)
    params = network.init(jax.random.PRNGKey(0), x)["params"]
    assert params["logits"]["kernel"].shape == (512, 5 * 51)
    logits = network.apply({"params": params}, x)
    assert logits.shape == (3, 5, 51)
    q = rainbow.q_values(logits, jnp.linspace(-10, 10, 51))
    p = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_allclose(q, (p * np.linspace(-10, 10, 51)).sum(-1), rtol=1e-5, atol=1e-6)


def test_c51_output_kernel_erk_sparsity():
    """ERK (Evci et al. 2020, the paper's distribution): at 95% the C51 output kernel (512 x A*51) is about
    0.88-0.94 sparse (0.942 at k=1, A=18; DQN's output kernel stays dense)."""
    for width, actions in ((1, 18), (3, 18), (3, 6)):
        network = rainbow.RainbowNetwork(actions, 51, "resnet", width, False, True, True)
        shapes = jax.eval_shape(network.init, jax.random.PRNGKey(0), jnp.zeros((1, 84, 84, 4), jnp.uint8))["params"]
        targets = rainbow.target_sparsities(shapes, 0.95, "erk")
        assert 0.88 <= targets["logits"]["kernel"] <= 0.945, (width, actions, targets["logits"]["kernel"])
        assert metrics.overall_sparsity(shapes, targets) == pytest.approx(0.95, abs=1e-5)
