"""The sparse-training core of dqn_pruned.py: schedule, ERK, top-k, GMP, RigL/SET, static masks.

Expected values come from the papers (Zhu & Gupta 2017's schedule, Evci et al. 2020's ERK, Graesser et al. 2022's
densities, Dopamine's network sizes), or are
computed by hand / in NumPy inside the test. Functions that run inside the jitted update are checked both
eagerly and under jax.jit (the `maybe_jit` fixture). The schedule and ERK are host-side Python (float64, exact
integer counts) and never run under jit; what they feed into the jitted mask computation is checked end to end.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dqn_pruned as dqn
from common import metrics

# ----------------------------------------------------------------------------- schedule (Zhu & Gupta 2017; JaxPruner)


def test_gmp_schedule_matches_spec_table():
    # The paper's run: G = 2.5M gradient steps, t_start = 500k, t_end = 2M; the cubic schedule gives s at each 10%
    # of training.
    total, t_start, t_end = 2_500_000, 500_000, 2_000_000
    table = {0.2: 0.0, 0.3: 0.400, 0.4: 0.669, 0.5: 0.831, 0.6: 0.915, 0.7: 0.946, 0.8: 0.950, 0.9: 0.950}
    for fraction, expected in table.items():
        assert 0.95 * dqn.gmp_schedule(round(fraction * total), t_start, t_end) == pytest.approx(expected, abs=6e-4)


def test_gmp_schedule_formula_and_plus_one_offset():
    t_start, t_end = 10, 30
    for step in range(40):
        p = min(max(step + 1 - t_start, 0), t_end - t_start) / (t_end - t_start)
        assert dqn.gmp_schedule(step, t_start, t_end) == pytest.approx(1 - (1 - p) ** 3, abs=1e-12)
    assert dqn.gmp_schedule(t_start - 1, t_start, t_end) == 0.0  # before the window: dense
    assert dqn.gmp_schedule(t_start, t_start, t_end) == pytest.approx(1 - (19 / 20) ** 3)  # +1: already > 0 at t_start
    assert dqn.gmp_schedule(t_end - 1, t_start, t_end) == 1.0  # +1: reached one step early, as in JaxPruner
    assert dqn.gmp_schedule(10**9, t_start, t_end) == 1.0


def test_cosine_drop_fraction():
    assert dqn.cosine_drop_fraction(0, 0, 100, 0.3) == pytest.approx(0.3)
    assert dqn.cosine_drop_fraction(50, 0, 100, 0.3) == pytest.approx(0.15)
    assert dqn.cosine_drop_fraction(25, 0, 100, 0.3) == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert dqn.cosine_drop_fraction(100, 0, 100, 0.3) == pytest.approx(0.0, abs=1e-12)
    assert dqn.cosine_drop_fraction(60, 20, 100, 0.3) == pytest.approx(0.15)  # offset to the window's start


def test_mask_update_steps():
    steps = [c for c in range(60) if dqn.is_mask_update_step("gmp", c, 10, 45, 10)]
    assert steps == [10, 20, 30, 40, 45]  # every 10 from t_start, plus t_end so the target is reached
    for method in ("static", "none"):
        assert not any(dqn.is_mask_update_step(method, c, 0, 100, 1) for c in range(200))
    assert [c for c in range(20) if dqn.is_mask_update_step("rigl", c, 0, 12, 5)] == [0, 5, 10, 12]


def test_num_grad_steps_matches_a_loop():
    for total, starts, freq in [(100, 10, 4), (101, 12, 4), (50, 0, 1), (10_000, 333, 7), (30, 29, 4)]:
        expected = sum(1 for t in range(total) if t >= starts and t % freq == 0)
        assert dqn.num_grad_steps(total, starts, freq) == expected
    # the paper's run: (10M - 20k) / 4 = 2.495M gradient steps, so 20%/80% are ~500k/2M (JaxPruner's dqn.gin: 500k/2M)
    args = dqn.Args()
    assert dqn.num_grad_steps(args.total_timesteps, args.learning_starts, args.train_frequency) == 2_495_000
    assert dqn.prune_window(args) == (499_000, 1_996_000, 1000)
    assert dqn.prune_window(dqn.Args(pruning_method="rigl")) == (0, 1_996_000, 5000)


# ---------------------------------------------------------------------------------- ERK (Evci et al. 2020)


def impala_params(width: int, actions: int = 18, scale_dense: bool = False):
    network = dqn.QNetwork(actions, "resnet", width, scale_dense, True, True)
    shapes = jax.eval_shape(network.init, jax.random.key(0), jnp.zeros((1, 84, 84, 4), jnp.uint8))["params"]
    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)


@pytest.mark.parametrize("width, kernels, biases", [(1, 2_089_024, 930), (3, 6_829_248, 1_730), (5, 12_343_616, 2_530)])
def test_impala_parameter_counts(width, kernels, biases):
    leaves = jax.tree.leaves(impala_params(width))
    assert sum(p.size for p in leaves if p.ndim > 1) == kernels  # Dopamine's ImpalaDQNNetwork
    assert sum(p.size for p in leaves if p.ndim == 1) == biases
    assert sum(p.ndim > 1 for p in leaves) == 17  # 15 convs + dense + output


def test_erk_impala_width3_matches_spec():
    params = impala_params(3)
    targets = dqn.target_sparsities(params, 0.95, "erk")
    t = targets["torso"]
    assert t["stack0_conv"]["kernel"] == pytest.approx(0.232, abs=1e-3)
    assert 0.887 < t["stack0_block0_conv0"]["kernel"] < 0.889
    for i in (1, 2):
        for name in ("conv", "block0_conv0", "block1_conv1"):
            assert 0.917 - 1e-3 < t[f"stack{i}_{name}"]["kernel"] < 0.945 + 1e-3
    assert targets["dense"]["kernel"] == pytest.approx(0.953, abs=1e-3)
    assert targets["q"]["kernel"] == 0.0  # the output layer stays dense under ERK at 95%
    assert targets["q"]["bias"] == 0.0 and t["stack0_conv"]["bias"] == 0.0  # biases are never pruned
    # the kept weights equal the uniform budget sum_l (N_l - floor(0.95 N_l)): 0.95 to within one weight per layer
    kernels = sum(p.size for p in jax.tree.leaves(params) if p.ndim > 1)
    assert metrics.overall_sparsity(params, targets) == pytest.approx(0.95, abs=17 / kernels)


def test_erk_at_99_prunes_the_output_layer():
    targets = dqn.target_sparsities(impala_params(3), 0.99, "erk")
    assert targets["q"]["kernel"] == pytest.approx(
        0.74, abs=0.01
    )  # the output layer becomes about 74% sparse under ERK


def test_erk_nature_cnn_matches_methods_table():
    network = dqn.QNetwork(18, "cnn", 1, False, True, True)
    params = jax.eval_shape(network.init, jax.random.key(0), jnp.zeros((1, 84, 84, 4), jnp.uint8))["params"]
    assert params["dense"]["kernel"].shape == (7744, 512)  # SAME padding (Dopamine's NatureDQNNetwork)
    targets = dqn.target_sparsities(params, 0.95, "erk")
    expected = [0.856, 0.928, 0.918]  # Graesser et al. 2022's ERK densities, SAME padding (7744)
    for i, value in enumerate(expected):
        assert targets["torso"][f"conv{i}"]["kernel"] == pytest.approx(value, abs=1e-3)
    assert targets["dense"]["kernel"] == pytest.approx(0.953, abs=1e-3)
    assert targets["q"]["kernel"] == 0.0


def test_erk_budget_and_uniform():
    shapes = [(3, 3, 4, 8), (200, 64), (64, 3)]
    for s in (0.5, 0.8, 0.9):
        sparsities = dqn.erk_sparsities(shapes, s)
        kept = sum(math.prod(sh) * (1 - sl) for sh, sl in zip(shapes, sparsities))
        assert kept == pytest.approx(sum(math.prod(sh) - math.floor(s * math.prod(sh)) for sh in shapes))
        assert all(0 <= sl < 1 for sl in sparsities)
        # ERK density is proportional to (sum of dims) / (prod of dims) among the layers not forced dense
        free = [(sh, sl) for sh, sl in zip(shapes, sparsities) if sl > 0]
        ratios = [(1 - sl) / (sum(sh) / math.prod(sh)) for sh, sl in free]
        assert max(ratios) == pytest.approx(min(ratios))
    params = {"a": np.zeros((10, 10)), "b": np.zeros(10)}
    assert dqn.target_sparsities(params, 0.7, "uniform") == {"a": 0.7, "b": 0.0}
    assert dqn.erk_sparsities(shapes, 0.0) == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------- top-k


def test_keep_top_k_by_hand(maybe_jit):
    keep = maybe_jit(dqn.keep_top_k)
    scores = jnp.array([0.3, -1.0, 2.0, 0.5, 0.1])
    np.testing.assert_array_equal(keep(scores, 2), [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(keep(scores, 0), [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(keep(scores, 5), [1, 1, 1, 1, 1])


def test_keep_top_k_exact_with_ties(maybe_jit):
    keep = maybe_jit(dqn.keep_top_k)
    ties = jnp.zeros((4, 5))  # all scores equal: exactly k kept, lowest flat indices first
    for k in (0, 1, 7, 20):
        mask = np.asarray(keep(ties, k))
        assert mask.sum() == k and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask.reshape(-1), np.arange(20) < k)
    scores = jnp.array([1.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    np.testing.assert_array_equal(keep(scores, 4), [1, 1, 1, 1, 0, 0])


def test_keep_top_k_matches_numpy_stable_argsort(maybe_jit):
    """Random arrays with ties, signed zeros and infinities against a NumPy stable-argsort reference."""
    keep = maybe_jit(dqn.keep_top_k)
    rng = np.random.default_rng(0)
    values = np.array([-np.inf, -2.0, -0.0, 0.0, 0.5, 0.5, 1.0, 3.0, np.inf], np.float32)
    for trial in range(60):
        n = int(rng.choice([1, 7, 40]))
        scores = rng.choice(values, n) if trial % 2 else rng.normal(size=n).astype(np.float32)
        k = int(rng.integers(0, n + 1))
        expected = np.zeros(n, np.uint8)
        expected[np.argsort(-np.where(scores == 0, 0.0, scores), kind="stable")[:k]] = 1  # -0.0 ties with +0.0
        np.testing.assert_array_equal(keep(jnp.asarray(scores), np.int32(k)), expected)


# ------------------------------------------------------------------------- GMP through sparse_step


def small_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "conv": {"kernel": jax.random.normal(k1, (3, 3, 4, 8)), "bias": jnp.ones(8)},
        "dense": {"kernel": jax.random.normal(k2, (72, 10)), "bias": jnp.ones(10)},
    }


def init_state(params, masks, tx, seed=0):
    params = dqn.apply_masks(params, masks)
    return dqn.TrainState(
        params=params,
        target_params=params,
        masks=masks,
        opt_state=tx.init(params),
        grad_step=jnp.zeros((), jnp.int32),
        key=jax.random.PRNGKey(seed),
        finite=jnp.ones((), bool),
    )


def random_masked_state(mask_seed: int, sparsity: float):
    """Adam, ERK targets, random exact masks and a masked train state on small_params."""
    tx = optax.adam(1e-2)
    params = small_params(jax.random.key(0))
    targets = dqn.target_sparsities(params, sparsity, "erk")
    masks = dqn.random_masks(np.random.default_rng(mask_seed), params, targets, bernoulli=False)
    return tx, targets, masks, init_state(params, masks, tx)


def random_grads(key, params):
    return jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)


def ones_like(params):
    return jax.tree.map(lambda p: jnp.ones(p.shape, jnp.uint8), params)


def run_gmp(maybe_jit, steps=60, t_start=10, t_end=40, frequency=5, sparsity=0.9):
    """Simulates the training loop's use of sparse_step under GMP with random gradients."""
    tx = optax.adam(1e-2)
    params = small_params(jax.random.key(0))
    targets = dqn.target_sparsities(params, sparsity, "erk")
    state = init_state(params, ones_like(params), tx)
    step = maybe_jit(lambda state, grads, counts: dqn.sparse_step(state, 0.0, grads, counts, tx, "gmp"))
    history, key = [], jax.random.key(1)
    for c in range(steps):
        key, grad_key = jax.random.split(key)
        grads = random_grads(grad_key, state.params)
        counts = dqn.mask_update_counts(dqn.Args(), state.masks, targets, c, (t_start, t_end, frequency))
        assert (counts is not None) == dqn.is_mask_update_step("gmp", c, t_start, t_end, frequency)
        pre_params = state.params
        state = step(state, grads, counts)
        history.append((c, counts, pre_params, state))
    return targets, history


def test_gmp_masks_are_topk_of_pre_update_weights_and_nested(maybe_jit):
    targets, history = run_gmp(maybe_jit)
    previous = None
    for c, counts, pre_params, state in history:
        if counts is not None:
            for p, m, k in zip(jax.tree.leaves(pre_params), jax.tree.leaves(state.masks), jax.tree.leaves(counts)):
                assert int(m.sum()) == int(k)  # exact count
                # the kept weights are the k largest |theta| before the update (NumPy reference, stable descending)
                order = np.argsort(-np.abs(np.asarray(p)).reshape(-1), kind="stable")
                expected = np.zeros(p.size, np.uint8)
                expected[order[: int(k)]] = 1
                np.testing.assert_array_equal(np.asarray(m).reshape(-1), expected)
        if previous is not None:  # nested: a pruned weight never comes back
            for new, old in zip(jax.tree.leaves(state.masks), jax.tree.leaves(previous)):
                assert np.all(np.asarray(new) <= np.asarray(old))
        previous = state.masks


def test_gmp_reaches_target_and_nonzeros_constant_after_end(maybe_jit):
    t_end = 40
    targets, history = run_gmp(maybe_jit, t_end=t_end)
    nonzeros = [sum(int(jnp.sum(p != 0)) for p in jax.tree.leaves(s.params)) for _, _, _, s in history]
    assert len(set(nonzeros[t_end:])) == 1
    final = history[-1][3]
    for p, s in zip(jax.tree.leaves(final.params), jax.tree.leaves(targets)):
        assert int(jnp.sum(p != 0)) == dqn.keep_count(p.size, s)  # per-layer target, exactly
    assert nonzeros[0] > nonzeros[-1]
    # the biases are untouched by pruning
    assert np.all(np.asarray(final.masks["conv"]["bias"]) == 1)


def test_pruned_weights_stay_zero_after_1000_adam_steps(maybe_jit):
    tx, _, masks, state = random_masked_state(3, 0.9)
    step = maybe_jit(lambda state, grads: dqn.sparse_step(state, 0.0, grads, None, tx, "gmp"))
    key = jax.random.key(4)
    for _ in range(1000):
        key, grad_key = jax.random.split(key)
        state = step(state, random_grads(grad_key, state.params))
    for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(masks)):
        assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0.0)  # exactly zero
        assert np.all(np.asarray(p)[np.asarray(m) == 1] != 0.0)  # and the active weights did move
    # Adam's moments were never masked (GMP leaves them alone): pruned positions carry non-zero mu
    mu = state.opt_state[0].mu
    assert np.any(np.asarray(mu["dense"]["kernel"])[np.asarray(masks["dense"]["kernel"]) == 0] != 0)
    assert int(state.grad_step) == 1000


# ------------------------------------------------------------------------------------- RigL and SET


def test_rigl_drop_and_grow_by_hand(maybe_jit):
    params = {"w": jnp.array([[0.5, -0.1, 0.0], [0.0, 0.3, 0.0]])}
    masks = {"w": jnp.array([[1, 1, 0], [0, 1, 0]], jnp.uint8)}
    grads = {"w": jnp.array([[0.0, 0.05, 0.9], [0.2, 0.0, 0.5]])}
    counts = {"w": np.int32(1)}
    new = maybe_jit(lambda *a: dqn.next_masks("rigl", *a))(jax.random.key(0), params, grads, masks, counts)
    # drop the smallest active |w| (-0.1 at [0,1]); grow the largest |grad| among the rest (0.9 at [0,2])
    np.testing.assert_array_equal(new["w"], [[1, 0, 1], [0, 1, 0]])


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_rigl_set_keep_density_and_reset_grown_moments(maybe_jit, method):
    b1, b2 = 0.9, 0.999  # optax.adam defaults
    tx, targets, _, state = random_masked_state(5, 0.8)
    step = maybe_jit(lambda state, grads, counts: dqn.sparse_step(state, 0.0, grads, counts, tx, method))
    key = jax.random.key(6)
    for c in range(30):  # warm Adam's moments up everywhere (they are not masked)
        key, grad_key = jax.random.split(key)
        state = step(state, random_grads(grad_key, state.params), None)
    grads = random_grads(key, state.params)
    counts = dqn.mask_update_counts(
        dqn.Args(pruning_method=method, drop_fraction=0.3), state.masks, targets, 0, (0, 100, 1)
    )
    new = step(state, grads, counts)
    grew_any = False
    for name in ("conv", "dense"):
        old_m, new_m = np.asarray(state.masks[name]["kernel"]), np.asarray(new.masks[name]["kernel"])
        assert new_m.sum() == old_m.sum() == dqn.keep_count(old_m.size, targets[name]["kernel"])  # constant density
        dropped = int(counts[name]["kernel"])
        assert dropped == math.floor(old_m.sum() * 0.3) and dropped > 0
        assert ((old_m == 1) & (new_m == 0)).sum() <= dropped
        grown = (new_m == 1) & (old_m == 0)
        grew_any |= grown.any()
        g = np.asarray(grads[name]["kernel"])
        # a grown weight starts at 0 with fresh moments, then takes this step: mu = (1-b1) g, nu = (1-b2) g^2
        np.testing.assert_allclose(
            np.asarray(new.opt_state[0].mu[name]["kernel"])[grown], (1 - b1) * g[grown], rtol=1e-5
        )
        np.testing.assert_allclose(
            np.asarray(new.opt_state[0].nu[name]["kernel"])[grown], (1 - b2) * g[grown] ** 2, rtol=1e-5
        )
        # a weight that stayed active keeps its accumulated moments
        stayed = (new_m == 1) & (old_m == 1)
        expected_mu = b1 * np.asarray(state.opt_state[0].mu[name]["kernel"]) + (1 - b1) * g
        np.testing.assert_allclose(
            np.asarray(new.opt_state[0].mu[name]["kernel"])[stayed], expected_mu[stayed], rtol=1e-4, atol=1e-7
        )
        assert np.all(np.asarray(new.params[name]["kernel"])[new_m == 0] == 0)
        if method == "rigl":  # grown = the largest |grad| among the weights not kept
            kept = (old_m == 1) & (new_m == 1)
            assert np.abs(g[grown]).min() >= np.abs(g[~kept & ~grown & (old_m == 0)]).max()
    assert grew_any


def test_rigl_drop_count_uses_the_active_weights():
    """RigL (Evci et al. 2020): n_drop = floor(n_active * f), also for Bernoulli masks whose n_active is not the
    target count."""
    masks = {"w": np.zeros((20, 10), np.uint8), "b": np.ones(10, np.uint8)}
    masks["w"].reshape(-1)[:95] = 1
    args = dqn.Args(pruning_method="rigl", drop_fraction=0.6)
    counts = dqn.mask_update_counts(args, masks, {"w": 0.5, "b": 0.0}, 50, (0, 100, 50))
    assert counts == {"w": math.floor(95 * 0.3), "b": 0}  # cosine at the window's middle: f = 0.6 / 2


def test_static_masks_never_change(maybe_jit):
    tx, _, masks, state = random_masked_state(7, 0.9)
    step = maybe_jit(lambda state, grads: dqn.sparse_step(state, 0.0, grads, None, tx, "static"))
    for i in range(50):
        state = step(state, random_grads(jax.random.key(i), state.params))
    for new, old, p in zip(jax.tree.leaves(state.masks), jax.tree.leaves(masks), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(new, old)
        assert np.all((np.asarray(p) != 0) <= (np.asarray(old) == 1))


def test_random_masks_exact_and_bernoulli():
    """Host-side (NumPy generator), drawn once at init: exact counts, or Bernoulli entries near the target."""
    params = {"big": np.zeros((512, 512)), "bias": np.zeros(512)}
    targets = {"big": 0.9, "bias": 0.0}
    exact = dqn.random_masks(np.random.default_rng(0), params, targets, bernoulli=False)
    assert exact["big"].dtype == np.uint8 and int(exact["big"].sum()) == dqn.keep_count(512 * 512, 0.9)
    assert np.all(exact["bias"] == 1)
    bern = dqn.random_masks(np.random.default_rng(0), params, targets, bernoulli=True)
    sigma = math.sqrt(0.1 * 0.9 / (512 * 512))
    assert abs(float(bern["big"].mean()) - 0.1) < 5 * sigma
    assert int(bern["big"].sum()) != int(exact["big"].sum())  # not an exact count
    assert np.all(bern["bias"] == 1)
    again = dqn.random_masks(np.random.default_rng(0), params, targets, bernoulli=False)
    other = dqn.random_masks(np.random.default_rng(1), params, targets, bernoulli=False)
    np.testing.assert_array_equal(exact["big"], again["big"])  # the seed determines the mask
    assert not np.array_equal(exact["big"], other["big"])
    # uniformly random: every position is kept with probability ~0.1 (rows of 512 weights)
    assert np.abs(exact["big"].mean(axis=1) - 0.1).max() < 6 * math.sqrt(0.1 * 0.9 / 512)


def test_sparsity_summary(maybe_jit):
    params = {
        "a": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "bias": jnp.array([0.0, 2.0])},
        "b": {"kernel": jnp.ones((2, 3))},
    }
    summary = maybe_jit(metrics.sparsity_summary)(params)
    assert float(summary["pruning/layer/a/kernel"]) == pytest.approx(0.75)
    assert float(summary["pruning/layer/b/kernel"]) == pytest.approx(0.0)
    assert float(summary["pruning/kernel_sparsity"]) == pytest.approx(3 / 10)
    assert float(summary["pruning/total_sparsity"]) == pytest.approx(4 / 12)
    assert "pruning/layer/a/bias" not in summary


def test_a_non_finite_loss_is_refused_on_the_device(maybe_jit):
    """sparse_step keeps the state of a step whose loss is not finite (params, Adam, masks, step count, key), sets the
    flag, and stays frozen after it even for finite losses; a finite step before it changes the params."""
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    tx = optax.adam(0.1)
    state, _ = dqn.init_train_state(
        dqn.Args(pruning_method="none"), params, tx, np.random.default_rng(0), jax.random.PRNGKey(0)
    )
    grads = jax.tree.map(jnp.ones_like, params)
    step = maybe_jit(lambda state, loss: dqn.sparse_step(state, loss, grads, None, tx, "none"))
    good = step(state, jnp.float32(1.0))
    assert bool(good.finite) and int(good.grad_step) == 1 and not np.allclose(good.params["w"], 1.0)
    refused = step(good, jnp.float32(jnp.nan))
    for loss in (jnp.nan, jnp.inf, 1.0):  # refused, then frozen whatever the loss
        refused = step(refused, jnp.float32(loss))
        assert not bool(refused.finite)
        for a, b in zip(jax.tree.leaves(good.replace(finite=False)), jax.tree.leaves(refused)):
            np.testing.assert_array_equal(a, b)
