"""iqn_pruned.py and miqn_pruned.py against independent computations: the quantile Huber loss, the IQN and
Munchausen targets, the quantile network, the whole update, ERK on the IQN head, and the two files' diff."""

import difflib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT

import iqn_pruned as iqn
import miqn_pruned as miqn
from common import metrics


# ------------------------------------------------------------------------------------ quantile Huber loss
def quantile_huber_reference(pred, target, taus, kappa):
    """Dabney et al. 2018, Eq. 10, one (i, j) pair at a time in float64: sum over the N online quantiles i,
    mean over the N' targets j."""
    batch, n = pred.shape
    out = np.zeros(batch)
    for b in range(batch):
        for i in range(n):
            for j in range(target.shape[1]):
                delta = target[b, j] - pred[b, i]
                huber = 0.5 * delta**2 if abs(delta) <= kappa else kappa * (abs(delta) - 0.5 * kappa)
                out[b] += abs(taus[b, i] - (delta < 0)) * huber / kappa / target.shape[1]
    return out


def test_quantile_huber_loss_by_hand():
    # one online quantile at tau = 0.25, two targets: delta = +0.5 (inside kappa = 1) and -3 (outside)
    pred, target, taus = jnp.array([[1.0]]), jnp.array([[1.5, -2.0]]), jnp.array([[0.25]])
    expected = (0.25 * 0.5 * 0.5**2 + 0.75 * 1.0 * (3.0 - 0.5)) / 2
    np.testing.assert_allclose(iqn.quantile_huber_loss(pred, target, taus, 1.0), [expected], rtol=1e-6)


@pytest.mark.parametrize("kappa", [1.0, 0.5, 2.0])
def test_quantile_huber_loss_against_double_loop(maybe_jit, kappa):
    rng = np.random.default_rng(int(kappa * 10))
    batch, n, n_prime = 3, 5, 7  # distinct sizes: a swapped axis cannot pass
    pred = rng.normal(0, 2, (batch, n))
    target = rng.normal(0, 2, (batch, n_prime))
    taus = rng.uniform(0, 1, (batch, n))
    deltas = np.abs(target[:, None, :] - pred[:, :, None])
    assert (deltas <= kappa).any() and (deltas > kappa).any()  # both sides of kappa are exercised
    loss = maybe_jit(iqn.quantile_huber_loss, static_argnames="kappa")(
        *(jnp.asarray(a, jnp.float32) for a in (pred, target, taus)), kappa=kappa
    )
    assert loss.shape == (batch,)
    np.testing.assert_allclose(loss, quantile_huber_reference(pred, target, taus, kappa), rtol=1e-5)
    # the gradient flows into the online quantiles only
    grad_target = jax.grad(lambda t: iqn.quantile_huber_loss(jnp.asarray(pred), t, jnp.asarray(taus), kappa).sum())(
        jnp.asarray(target)
    )
    assert np.all(grad_target == 0)


# ------------------------------------------------------------------------------------------------ targets
def test_iqn_targets_by_hand(maybe_jit):
    next_quantiles = jnp.array(
        [[[1.0, 5.0], [2.0, 6.0], [3.0, 7.0]], [[9.0, 0.0], [8.0, 1.0], [7.0, 2.0]]]
    )  # (B=2, N'=3, A=2)
    q_next = jnp.array([[0.0, 1.0], [3.0, -1.0]])  # a* = 1 for the first transition, 0 for the second
    y = maybe_jit(iqn.iqn_targets)(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.0]), next_quantiles, q_next)
    np.testing.assert_allclose(y, [[1 + 0.5 * 5, 1 + 0.5 * 6, 1 + 0.5 * 7], [-1.0, -1.0, -1.0]])


def munchausen_reference(rewards, discounts, actions, next_quantiles, q_current, q_next, tau, alpha, clip_min):
    """Vieillard et al. 2020 written out in float64 with the plain log-softmax."""

    def log_pi(q):
        z = q / tau
        return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)

    out = np.zeros(next_quantiles.shape[:2])
    for b in range(len(rewards)):
        bonus = alpha * np.clip(tau * log_pi(q_current[b])[actions[b]], clip_min, 0.0)
        pi = np.exp(log_pi(q_next[b]))
        for j in range(next_quantiles.shape[1]):
            soft = sum(pi[a] * (next_quantiles[b, j, a] - tau * log_pi(q_next[b])[a]) for a in range(len(pi)))
            out[b, j] = rewards[b] + bonus + discounts[b] * soft
    return out


def munchausen_inputs(seed, batch=4, n_prime=6, actions=3):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=batch),
        np.array([0.97, 0.0, 0.9, 0.97])[:batch],
        rng.integers(0, actions, batch),
        rng.normal(size=(batch, n_prime, actions)),
        rng.normal(0, 0.1, (batch, actions)),
        rng.normal(0, 0.1, (batch, actions)),
    )


@pytest.mark.parametrize("tau, alpha, clip_min", [(0.03, 0.9, -1.0), (1.0, 0.5, -0.2), (0.1, 0.9, -10.0)])
def test_munchausen_targets_against_reference(maybe_jit, tau, alpha, clip_min):
    inputs = munchausen_inputs(int(tau * 100))
    targets = maybe_jit(miqn.munchausen_targets, static_argnames=("tau", "alpha", "clip_min"))(
        *(jnp.asarray(a) for a in inputs), tau=tau, alpha=alpha, clip_min=clip_min
    )
    assert targets.shape == (4, 6)
    np.testing.assert_allclose(targets, munchausen_reference(*inputs, tau, alpha, clip_min), rtol=1e-4, atol=1e-5)


def test_munchausen_bonus_is_clipped():
    rewards, discounts, _, next_quantiles, q_current, q_next = munchausen_inputs(7)
    q_current = np.array([[0.0, 5.0, 5.0]] * 4)  # action 0 is far from greedy: tau log pi(0|s) = -5 - tau log 2 < l_0
    y = miqn.munchausen_targets(
        *(jnp.asarray(a) for a in (rewards, discounts, np.zeros(4, int), next_quantiles, q_current, q_next)),
        1.0,
        0.9,
        -1.0,
    )
    y0 = miqn.munchausen_targets(
        *(jnp.asarray(a) for a in (rewards, discounts, np.zeros(4, int), next_quantiles, q_current, q_next)),
        1.0,
        0.0,
        -1.0,
    )
    np.testing.assert_allclose(y - y0, -0.9, atol=1e-5)  # the bonus is alpha * l_0


def test_munchausen_reduces_to_iqn_with_alpha_0_and_small_tau():
    rewards, discounts, actions, next_quantiles, q_current, q_next = (jnp.asarray(a) for a in munchausen_inputs(3))
    munchausen = miqn.munchausen_targets(
        rewards, discounts, actions, next_quantiles, q_current, q_next, 1e-5, 0.0, -1.0
    )
    assert np.all(np.isfinite(munchausen))  # the scaled log-softmax is stable at tiny temperatures
    np.testing.assert_allclose(munchausen, iqn.iqn_targets(rewards, discounts, next_quantiles, q_next), atol=1e-5)


def test_scaled_log_softmax_is_stable():
    q = jnp.array([[1000.0, 999.0, -1000.0]])
    out = miqn.scaled_log_softmax(q, 0.03)
    assert np.all(np.isfinite(out))
    z = np.array([[1000.0, 999.0, -1000.0]]) / 0.03  # float64 reference: tau * log softmax(q / tau)
    expected = 0.03 * (z - z.max() - np.log(np.exp(z - z.max()).sum()))
    np.testing.assert_allclose(
        out, expected, rtol=1e-6, atol=1e-6
    )  # q - tau logsumexp(q / tau) in float32 is off by 6e-5 here


# ---------------------------------------------------------------------------------------- network, update
def mlp_forward_reference(params, obs, taus, dim):
    """The implicit quantile network (Dabney et al. 2018, Sec. 3; Dopamine's ImplicitQuantileNetwork) on the MLP
    torso, in NumPy from the params."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    relu = lambda x: np.maximum(x, 0)
    phi = relu(obs.reshape(len(obs), -1) @ p["torso"]["fc"]["kernel"] + p["torso"]["fc"]["bias"])  # (B, d)
    cosines = np.cos(np.pi * taus[:, :, None] * np.arange(1, dim + 1))  # (B, N, dim)
    embedding = relu(cosines @ p["quantile_embedding"]["kernel"] + p["quantile_embedding"]["bias"])  # (B, N, d)
    hidden = relu((phi[:, None, :] * embedding) @ p["dense"]["kernel"] + p["dense"]["bias"])
    return hidden @ p["q"]["kernel"] + p["q"]["bias"]  # (B, N, A)


def test_network_against_numpy():
    rng = np.random.default_rng(0)
    network = iqn.IQNNetwork(3, "mlp", 1, False, True, True, 16)
    obs, taus = rng.normal(size=(5, 4, 1)).astype(np.float32), rng.uniform(size=(5, 7)).astype(np.float32)
    params = network.init(jax.random.key(0), obs, taus)["params"]
    params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)  # non-zero biases
    assert params["quantile_embedding"]["kernel"].shape == (16, 256)  # cosines -> torso features d
    out = network.apply({"params": params}, obs, taus)
    assert out.shape == (5, 7, 3)
    np.testing.assert_allclose(out, mlp_forward_reference(params, obs, taus, 16), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("module", [iqn, miqn], ids=["iqn", "miqn"])
def test_update_loss_against_numpy(module):
    """The jitted update's loss equals a NumPy recomputation from the same quantile fractions (re-derived from the
    state's key as the update derives them): target, quantile Huber loss, batch mean."""
    rng = np.random.default_rng(1)
    args = module.Args(
        env_id="CartPole-v1",
        network="mlp",
        num_tau_samples=5,
        num_tau_prime_samples=7,
        num_quantile_samples=3,
        quantile_embedding_dim=8,
        kappa=1.0,
    )
    network = module.IQNNetwork(2, "mlp", 1, False, True, True, 8)
    batch_size = 6
    obs, next_obs = (rng.normal(size=(batch_size, 4, 1)).astype(np.float32) for _ in range(2))
    params = network.init(jax.random.key(0), obs, np.zeros((1, 1), np.float32))["params"]
    target_params = network.init(jax.random.key(1), obs, np.zeros((1, 1), np.float32))["params"]
    batch = module.Batch(
        obs,
        rng.integers(0, 2, batch_size).astype(np.int32),
        rng.normal(size=batch_size).astype(np.float32),
        np.array([0.9, 0.0, 0.81, 0.9, 0.9, 0.0], np.float32),
        next_obs,
    )
    tx = optax.adam(1e-3)
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.uint8), params)
    state = module.TrainState(
        params=params,
        target_params=target_params,
        masks=masks,
        opt_state=tx.init(params),
        grad_step=jnp.zeros((), jnp.int32),
        key=jax.random.PRNGKey(2),
        finite=jnp.ones((), bool),
    )
    _, metrics = module.make_update(module.make_loss(network, args), tx, "none")(state, (batch,), (None,))

    loss_key, _ = jax.random.split(state.key)
    keys = jax.random.split(loss_key, 3 if module is miqn else 2)
    taus = np.asarray(jax.random.uniform(keys[0], (batch_size, 5)), np.float64)
    target_taus = np.asarray(jax.random.uniform(keys[1], (batch_size, 3 + 7)), np.float64)
    next_all = mlp_forward_reference(target_params, next_obs, target_taus, 8)
    q_next, next_quantiles = next_all[:, :3].mean(1), next_all[:, 3:]
    if module is miqn:
        current_taus = np.asarray(jax.random.uniform(keys[2], (batch_size, 3)), np.float64)
        q_current = mlp_forward_reference(target_params, obs, current_taus, 8).mean(1)
        targets = munchausen_reference(
            batch.rewards, batch.discounts, batch.actions, next_quantiles, q_current, q_next, 0.03, 0.9, -1.0
        )
    else:
        best = q_next.argmax(-1)
        targets = batch.rewards[:, None] + batch.discounts[:, None] * next_quantiles[np.arange(batch_size), :, best]
    taken = mlp_forward_reference(params, obs, taus, 8)[np.arange(batch_size), :, batch.actions]  # (B, N)
    expected = quantile_huber_reference(taken, targets, taus, 1.0).mean()
    assert float(metrics["losses/td_loss"]) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["losses/q_values"]) == pytest.approx(taken.mean(), abs=1e-5)


def test_iqn_head_erk_sparsity():
    """ERK (Evci et al. 2020; JaxPruner's sparsity_distributions.py) at 95% on the IQN head of the Impala torso, k=3:
    the quantile-embedding kernel about 0.78 sparse, the dense layer 0.971, the output 0-0.19 (the ERK formula worked
    out for these shapes)."""
    network = iqn.IQNNetwork(18, "resnet", 3, False, True, True, 64)
    shapes = jax.eval_shape(network.init, jax.random.key(0), jnp.zeros((1, 84, 84, 4), jnp.uint8), jnp.zeros((1, 2)))[
        "params"
    ]
    targets = iqn.target_sparsities(shapes, 0.95, "erk")
    assert shapes["quantile_embedding"]["kernel"].shape == (64, 11 * 11 * 96)
    assert targets["quantile_embedding"]["kernel"] == pytest.approx(0.78, abs=0.01)
    assert targets["dense"]["kernel"] == pytest.approx(0.971, abs=0.001)
    assert 0.0 <= targets["q"]["kernel"] <= 0.19
    assert metrics.overall_sparsity(shapes, targets) == pytest.approx(0.95, abs=1e-5)


# ------------------------------------------------------------------------------------- miqn vs iqn diff
def test_miqn_differs_from_iqn_only_in_munchausen_parts():
    """`diff iqn_pruned.py miqn_pruned.py` touches only the module docstring, the Args fields and checks, and the
    algorithm section (the target and its call)."""

    def read(name):
        with open(os.path.join(ROOT, name)) as f:
            return f.read().splitlines()

    def section_of(lines):  # line index -> the `# ===== name` banner above it ("docstring" before the first)
        name, out = "docstring", []
        for line in lines:
            banner = re.match(r"^# =+ (.+)$", line)
            name = banner.group(1) if banner else name
            out.append(name)
        return out

    a, b = read("iqn_pruned.py"), read("miqn_pruned.py")
    sections_a, sections_b = section_of(a), section_of(b)
    changed = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            changed += [sections_a[i] for i in range(i1, i2)] + [sections_b[j] for j in range(j1, j2)]
            changed += [sections_b[j1] if j1 < len(b) else "end"]  # where an insertion lands
    assert set(changed) <= {"docstring", "Args", "algorithm: IQN", "algorithm: M-IQN"}, set(changed)
    diff_lines = sum(
        1
        for line in difflib.unified_diff(a, b, lineterm="", n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    )
    print(f"diff iqn_pruned.py miqn_pruned.py: {diff_lines} changed lines")
    assert diff_lines < 70  # a budget: the two files should stay a small diff apart
