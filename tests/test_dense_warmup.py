"""--dense-warmup (rigl, set, static): dense training until the pruning window starts, then the random initial masks;
the switch by hand on sparse_step, and the masks of a tiny RigL run (Ganaie et al.'s RigL from 20%) step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import read_scalars

import dqn_pruned as dqn


def test_the_switch_masks_params_and_zeroes_moments_of_removed_weights(maybe_jit):
    """Before t_start the masks stay all ones and the drawn masks wait; the step at t_start starts from the drawn
    masks: the params masked, Adam's moments of the removed weights zeroed (zero gradients here, so a zeroed moment
    stays 0 and a kept one only decays by b1 and b2), the kept ones untouched; later steps never zero a moment."""
    params = {"w": jnp.arange(1.0, 25.0).reshape(4, 6), "b": jnp.ones(6)}
    tx = optax.adam(0.1)
    args = dqn.Args(pruning_method="static", sparsity=0.5, sparsity_distribution="uniform", dense_warmup=True)
    state, _ = dqn.init_train_state(args, params, tx, np.random.default_rng(0), jax.random.PRNGKey(0), 2)
    drawn = dqn.random_masks(np.random.default_rng(0), params, {"w": 0.5, "b": 0.0}, False)  # the same draw
    t_start, waiting = state.dense_until
    assert int(t_start) == 2 and np.array_equal(waiting["w"], drawn["w"]) and drawn["w"].sum() == 12
    assert np.all(state.masks["w"] == 1) and np.array_equal(state.params["w"], params["w"])
    adam = state.opt_state[0]
    state = state.replace(
        opt_state=(
            adam._replace(mu=jax.tree.map(jnp.ones_like, params), nu=jax.tree.map(jnp.ones_like, params)),
            *state.opt_state[1:],
        )
    )
    zero = jax.tree.map(jnp.zeros_like, params)
    step = maybe_jit(lambda state: dqn.sparse_step(state, jnp.float32(1.0), zero, None, tx, "static"))

    for _ in range(2):  # gradient steps 0 and 1: dense
        state = step(state)
        assert np.all(state.masks["w"] == 1) and np.all(state.params["w"] != 0)
    before = state.opt_state[0]
    state = step(state)  # gradient step 2 = t_start
    np.testing.assert_array_equal(state.masks["w"], drawn["w"])
    assert np.all(state.params["w"][drawn["w"] == 0] == 0) and np.all(state.params["w"][drawn["w"] == 1] != 0)
    mu, nu = state.opt_state[0].mu["w"], state.opt_state[0].nu["w"]
    assert np.all(mu[drawn["w"] == 0] == 0) and np.all(nu[drawn["w"] == 0] == 0)
    np.testing.assert_allclose(mu[drawn["w"] == 1], 0.9 * before.mu["w"][drawn["w"] == 1], rtol=1e-6)
    np.testing.assert_allclose(nu[drawn["w"] == 1], 0.999 * before.nu["w"][drawn["w"] == 1], rtol=1e-6)
    np.testing.assert_array_equal(state.masks["b"], np.ones(6))  # biases are never masked
    state = state.replace(
        opt_state=(state.opt_state[0]._replace(mu=jax.tree.map(jnp.ones_like, params)), *state.opt_state[1:])
    )
    state = step(state)  # after t_start: a plain static step, every moment kept
    assert np.all(state.opt_state[0].mu["w"] == 0.9)
    np.testing.assert_array_equal(state.masks["w"], drawn["w"])


@pytest.mark.parametrize("method", ["rigl", "static"])
def test_a_run_is_dense_until_the_window_then_at_its_targets(tmp_path, monkeypatch, method):
    """CartPole, 320 gradient steps, --prune-start-fraction 0.2: t_start = 64. Every kernel is dense (masks all ones,
    no zero weight) after gradient steps 1..64; after step 65 each layer holds exactly keep_count(size, its ERK
    target) weights, and that count never changes again (RigL drops and regrows as many; static never changes)."""
    monkeypatch.chdir(tmp_path)
    after, real_make_update = [], dqn.make_update

    def make_update(*make_args):
        update = real_make_update(*make_args)

        def recording(state, batches, counts):
            state, update_metrics = update(state, batches, counts)
            kernels = [
                (m, p) for m, p in zip(jax.tree.leaves(state.masks), jax.tree.leaves(state.params)) if m.ndim > 1
            ]
            kept = [int(m.sum()) for m, _ in kernels]
            zeros = sum(int((np.asarray(p) == 0).sum()) for _, p in kernels)
            drawn = [d for d in jax.tree.leaves(state.dense_until[1]) if d.ndim > 1]
            moved = [int((np.asarray(m) != d).sum()) for (m, _), d in zip(kernels, drawn)]  # entries off the drawn mask
            after.append((int(state.grad_step), kept, zeros, moved))
            return state, update_metrics

        return recording

    monkeypatch.setattr(dqn, "make_update", make_update)
    args = dqn.Args(
        env_id="CartPole-v1",
        network="mlp",
        total_timesteps=400,
        learning_starts=80,
        train_frequency=1,
        batch_size=16,
        buffer_size=1000,
        exploration_steps=100,
        target_network_frequency=50,
        pruning_method=method,
        sparsity=0.8,
        prune_start_fraction=0.2,
        prune_frequency_grad_steps=20,
        dense_warmup=True,
        log_frequency=20,
        metrics_frequency=0,
    )
    run_dir = dqn.main(args)["run_dir"]
    assert dqn.prune_window(args)[0] == 64 and [step for step, *_ in after] == list(range(1, 321))
    params = dqn.QNetwork(2, "mlp", 1, False, True, True).init(jax.random.PRNGKey(0), np.zeros((1, 4, 1)))["params"]
    shapes = [p.shape for p in jax.tree.leaves(params) if p.ndim > 1]
    targets = [
        s
        for s, p in zip(jax.tree.leaves(dqn.target_sparsities(params, 0.8, "erk")), jax.tree.leaves(params))
        if p.ndim > 1
    ]
    sizes = [int(np.prod(shape)) for shape in shapes]
    expected = [dqn.keep_count(size, target) for size, target in zip(sizes, targets)]
    assert sum(expected) < 0.3 * sum(sizes)
    for step, kept, zeros, moved in after:
        if step <= 64:
            assert kept == sizes and zeros == 0, step
        else:
            assert kept == expected, step
        if step == 65:  # the switch, then RigL's first update: floor(0.3 kept) dropped and as many grown per layer
            limits = [2 * int(0.3 * k) for k in expected] if method == "rigl" else [0] * len(expected)
            assert all(m <= limit for m, limit in zip(moved, limits)) and (method == "static" or sum(moved) > 0)
    # the logged target: 0 until the window starts, then the final sparsity
    logged = read_scalars(run_dir)["pruning/target_sparsity"]
    final = 1 - sum(expected) / sum(sizes)
    for env_step, value in logged:
        grad_steps = max(env_step + 1 - 80, 0)
        assert value == pytest.approx(final if grad_steps > 64 else 0.0, abs=1e-3), env_step
