"""common/metrics.py against hand-computed values on tiny inputs (eager and jitted), and each script's analysis against
an independent recomputation (NumPy forward pass, one jax.grad per transition)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cql_pruned as cql
import dqn_pruned as dqn
import iqn_pruned as iqn
import rainbow_pruned as rainbow
from common import metrics


def test_dormant_neurons_by_hand(maybe_jit):
    """Dense layer, 4 units over a batch of 2: mean |h| = (0, 0.03, 1, 1), layer mean 0.5075, scores (0, 0.059, 1.97,
    1.97): units 0 and 1 are 0.1-dormant, only unit 0 is 0.025-dormant. Conv layer, 3 channels on 2x2 positions:
    channel 0 is zero everywhere, channel 1 is 0.4 at one position of one image (mean |h| 0.05), channel 2 is 1
    everywhere: mean 0.35, scores (0, 0.143, 2.86): only channel 0 is dormant at both taus."""
    dense = np.array([[0.0, 0.02, 1.0, 2.0], [0.0, -0.04, 1.0, 0.0]], np.float32)
    conv = np.zeros((2, 2, 2, 3), np.float32)
    conv[0, 1, 0, 1] = 0.4
    conv[..., 2] = 1.0
    activations = {"dense": dense, "conv": conv}
    per_layer, overall = maybe_jit(metrics.dormant_fractions, static_argnums=(1,))(activations, 0.1)
    np.testing.assert_allclose([per_layer["dense"], per_layer["conv"], overall], [2 / 4, 1 / 3, 3 / 7], rtol=1e-6)
    per_layer, overall = maybe_jit(metrics.dormant_fractions, static_argnums=(1,))(activations, 0.025)
    np.testing.assert_allclose([per_layer["dense"], per_layer["conv"], overall], [1 / 4, 1 / 3, 2 / 7], rtol=1e-6)
    np.testing.assert_allclose(metrics.neuron_scores(dense), np.array([0, 0.03, 1, 1]) / 0.5075, rtol=1e-5)
    np.testing.assert_allclose(metrics.neuron_scores(conv), np.array([0, 0.05, 1]) / (1.05 / 3), rtol=1e-5)


def test_dead_neurons_by_hand(maybe_jit):
    """A unit is dead when every incoming weight is masked: dense (3 in, 4 out) with output 2 fully masked (output 0
    partly masked is alive); conv (2x2, 3 in, 5 out) with output channel 4 fully masked: 1/4, 1/5, 2/9 overall."""
    dense = np.ones((3, 4), np.uint8)
    dense[:, 2] = 0
    dense[:2, 0] = 0
    conv = np.ones((2, 2, 3, 5), np.uint8)
    conv[..., 4] = 0
    conv[0, 0, :, 1] = 0
    per_layer, overall = maybe_jit(metrics.dead_neuron_fractions)({"dense": dense, "conv": conv})
    np.testing.assert_allclose([per_layer["dense"], per_layer["conv"], overall], [1 / 4, 1 / 5, 2 / 9], rtol=1e-6)


def test_srank_of_matrices_with_known_spectra(maybe_jit):
    """sigma = (10, 5, 0.1, 0): cumulative shares 0.662, 0.9934, 1.0, so srank_0.01 = 2 and srank_0.001 = 3; a rank-1
    matrix has srank 1, the 5x5 identity 5 (k/5 >= 0.99 first at k = 5), the zero matrix 0."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(6, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    features = (u * np.array([10.0, 5.0, 0.1, 0.0])) @ v.T  # (6, 4), singular values 10, 5, 0.1, 0
    srank = maybe_jit(metrics.srank, static_argnums=(1,))
    assert int(srank(features.astype(np.float32), 0.01)) == 2
    assert int(srank(features.astype(np.float32), 0.001)) == 3
    assert int(srank(np.outer(np.arange(1.0, 7.0), np.arange(1.0, 5.0)).astype(np.float32), 0.01)) == 1
    assert int(srank(np.eye(5, dtype=np.float32), 0.01)) == 5
    assert int(srank(np.zeros((4, 3), np.float32), 0.01)) == 0


def test_norms_and_target_variance_by_hand(maybe_jit):
    params = {"a": {"kernel": np.array([[3.0, 0.0], [0.0, 4.0]], np.float32)}, "b": np.array([12.0], np.float32)}
    assert float(maybe_jit(metrics.param_norm)(params)) == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    assert float(
        maybe_jit(metrics.q_norm)(np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], np.float32))
    ) == pytest.approx(2.0)  # (5 + 0 + 1) / 3
    assert float(maybe_jit(metrics.target_variance)(np.array([1.0, 2.0, 3.0, 6.0], np.float32))) == pytest.approx(
        3.5
    )  # mean 3: (4+1+0+9)/4


def test_gradient_covariance_orthogonal_identical_opposite(maybe_jit):
    covariance = maybe_jit(metrics.gradient_covariance)
    summary = maybe_jit(metrics.interference)
    orthogonal = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.5]], np.float32)
    c = covariance(orthogonal)
    np.testing.assert_allclose(c, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(summary(c), [0.0, 0.0], atol=1e-6)
    identical = np.tile(np.array([[1.0, -2.0, 2.0]], np.float32), (4, 1))
    c = covariance(identical)
    np.testing.assert_allclose(c, np.ones((4, 4)), atol=1e-5)
    np.testing.assert_allclose(summary(c), [1.0, 0.0], atol=1e-5)
    opposite = np.array([[1.0, 2.0], [-1.0, -2.0]], np.float32)
    c = covariance(opposite)
    np.testing.assert_allclose(c, [[1.0, -1.0], [-1.0, 1.0]], atol=1e-5)
    np.testing.assert_allclose(summary(c), [1.0, 1.0], atol=1e-5)
    mixed = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], np.float32)  # cosines 1/sqrt2, -1, -1/sqrt2
    c = covariance(mixed)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(c, [[1, s, -1], [s, 1, -s], [-1, -s, 1]], atol=1e-5)
    np.testing.assert_allclose(summary(c), [(s + 1 + s) / 3, 2 / 3], atol=1e-5)


def small_batch(rng, size: int, actions: int) -> dqn.Batch:
    return dqn.Batch(
        rng.normal(size=(size, 4, 1)).astype(np.float32),
        rng.integers(0, actions, size).astype(np.int32),
        rng.normal(size=size).astype(np.float32),
        np.where(rng.random(size) < 0.3, 0.0, 0.99).astype(np.float32),
        rng.normal(size=(size, 4, 1)).astype(np.float32),
    )


def relu(x):
    return np.maximum(x, 0.0)


def test_dqn_analysis_against_independent_computation():
    """dqn_pruned.py's analysis on the MLP network, with a sparse mask: dormant fractions, srank, norms and target
    variance from a NumPy forward pass; the covariance from one jax.grad per transition, masked, in NumPy."""
    rng = np.random.default_rng(3)
    network = dqn.QNetwork(3, "mlp", 1, False, True, True)
    batch = small_batch(rng, 12, 3)
    params = network.init(jax.random.key(0), batch.obs)["params"]
    target_params = jax.tree.map(lambda p: p + 0.1, network.init(jax.random.key(1), batch.obs)["params"])
    masks = dqn.random_masks(np.random.default_rng(4), params, dqn.target_sparsities(params, 0.7, "erk"), False)
    masks["torso"]["fc"]["kernel"][:, :5] = 0  # 5 structurally dead units in the first layer
    params = dqn.apply_masks(params, masks)
    params["torso"]["fc"]["bias"] = params["torso"]["fc"]["bias"].at[5:40].set(-10.0)  # 35 more dormant ones
    q_fn, loss_fn = dqn.make_q_fn(network), dqn.make_loss(network)
    scalars, covariance = jax.device_get(
        metrics.make_analysis(q_fn, loss_fn, 5)(params, target_params, masks, batch, jax.random.key(5))
    )

    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    tp = jax.tree.map(lambda x: np.asarray(x, np.float64), target_params)
    forward = lambda p, obs: (
        h1 := relu(obs[..., 0] @ p["torso"]["fc"]["kernel"] + p["torso"]["fc"]["bias"]),
        h2 := relu(h1 @ p["dense"]["kernel"] + p["dense"]["bias"]),
        h2 @ p["q"]["kernel"] + p["q"]["bias"],
    )
    h1, h2, q = forward(p, batch.obs)
    y = batch.rewards + batch.discounts * forward(tp, batch.next_obs)[2].max(-1)

    def dormant(h, tau):
        s = np.abs(h).mean(0)
        return s / s.mean() <= tau

    for tau in (0.1, 0.025):
        expected = np.concatenate([dormant(h1, tau), dormant(h2, tau)]).mean()
        assert scalars[f"metrics/dormant_{tau}"] == pytest.approx(expected, abs=1e-6)
    assert dormant(h1, 0.1).sum() >= 40
    assert scalars["metrics/dormant_0.1/torso/fc"] == pytest.approx(dormant(h1, 0.1).mean(), abs=1e-6)
    assert scalars["metrics/dead/torso/fc"] == pytest.approx(5 / 256) and "metrics/dead/q" not in scalars
    sigma = np.linalg.svd(h2, compute_uv=False)
    assert scalars["metrics/srank"] == np.argmax(np.cumsum(sigma) / sigma.sum() >= 0.99) + 1
    assert scalars["metrics/param_norm"] == pytest.approx(
        np.sqrt(sum((x**2).sum() for x in jax.tree.leaves(p))), rel=1e-5
    )
    assert scalars["metrics/q_norm"] == pytest.approx(np.linalg.norm(q, axis=-1).mean(), rel=1e-5)
    assert scalars["metrics/target_variance"] == pytest.approx(y.var(), rel=1e-4)

    grads = []
    for i in range(5):
        one = dqn.Batch(*(field[i : i + 1] for field in batch))
        g = jax.grad(lambda params: loss_fn(params, target_params, one, None)[0])(params)
        grads.append(
            np.concatenate(
                [np.ravel(np.asarray(gl) * np.asarray(m)) for gl, m in zip(jax.tree.leaves(g), jax.tree.leaves(masks))]
            )
        )
    grads = np.array(grads, np.float64)
    expected = grads @ grads.T / np.outer(np.linalg.norm(grads, axis=1), np.linalg.norm(grads, axis=1))
    np.testing.assert_allclose(covariance, expected, atol=1e-4)
    off = ~np.eye(5, dtype=bool)
    assert scalars["metrics/grad_interference"] == pytest.approx((expected[off] < 0).mean())


@pytest.mark.parametrize(
    "module, network, extra",
    [
        (rainbow, rainbow.RainbowNetwork(3, 11, "mlp", 1, False, True, True), (jnp.linspace(-5.0, 5.0, 11),)),
        (iqn, iqn.IQNNetwork(3, "mlp", 1, False, True, True, 8), None),
        (cql, cql.DuelingC51Network(3, 11, "mlp", 1, True, True, True), (jnp.linspace(-5.0, 5.0, 11),)),
    ],
    ids=["rainbow", "iqn", "cql-c51"],
)
def test_other_heads_analysis(module, network, extra):
    """Every head's hidden layers are found (never its output layers), and its q_fn and targets feed the metrics."""
    rng = np.random.default_rng(6)
    batch = small_batch(rng, 8, 3)
    if module is iqn:
        args = iqn.Args(
            env_id="CartPole-v1",
            network="mlp",
            num_tau_samples=4,
            num_tau_prime_samples=5,
            num_quantile_samples=3,
            quantile_embedding_dim=8,
        )
        params = network.init(jax.random.key(0), batch.obs, np.zeros((1, 1), np.float32))["params"]
        q_fn, loss_fn = iqn.make_q_fn(network, 3), iqn.make_loss(network, args)
    elif module is rainbow:
        params = network.init(jax.random.key(0), batch.obs)["params"]
        q_fn, loss_fn = rainbow.make_q_fn(network, *extra), rainbow.make_loss(network, *extra)
    else:
        args = cql.resolve(cql.Args(env_id="CartPole-v1", network="mlp", c51=True, num_atoms=11, v_min=-5.0, v_max=5.0))
        params = network.init(jax.random.key(0), batch.obs)["params"]
        q_fn, loss_fn = cql.make_q_fn(network, args, *extra), cql.make_loss(network, args, *extra)
    masks = jax.tree.map(lambda p: np.ones(p.shape, np.uint8), params)
    q, activations = metrics.hidden_activations(q_fn, params, batch.obs, jax.random.key(1))
    expected_layers = {"torso/fc", "dense"} | ({"quantile_embedding"} if module is iqn else set())
    assert set(activations) == expected_layers
    assert q.shape == (8, 3)
    scalars, covariance = metrics.make_analysis(q_fn, loss_fn, 4)(params, params, masks, batch, jax.random.key(1))
    assert covariance.shape == (4, 4)
    assert np.all(np.diag(covariance) <= 1 + 1e-6) and np.all(np.diag(covariance) > 0.99)  # |g|^2 / (|g|^2 + 1e-6)
    assert float(scalars["metrics/q_norm"]) == pytest.approx(float(np.linalg.norm(q, axis=-1).mean()), rel=1e-5)
    targets = loss_fn(params, params, batch, jax.random.key(1))[1]["targets"]
    assert targets.shape == (8,)
    assert float(scalars["metrics/target_variance"]) == pytest.approx(float(np.var(targets)), rel=1e-4)


def test_by_action_orders_the_covariance_samples():
    """Only the first transitions (the gradient covariance's, a random subset of the batch) are ordered by action; the
    rest keep their places."""
    batch = small_batch(np.random.default_rng(7), 9, 3)
    ordered = metrics.by_action(batch, 5)
    assert list(ordered.actions[:5]) == sorted(batch.actions[:5])
    order = np.concatenate([np.argsort(batch.actions[:5], kind="stable"), np.arange(5, 9)])
    for field, original in zip(ordered, batch):
        np.testing.assert_array_equal(field, original[order])


def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A stride-1 SAME convolution in NumPy. (B, H, W, C), (k, k, C, O), (O,) -> (B, H, W, O)."""
    k = kernel.shape[0]
    padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))  # (B, H, W, C, k, k)
    return np.einsum("bhwcij,ijco->bhwo", windows, kernel) + bias


def max_pool_same(x: np.ndarray) -> np.ndarray:
    """3x3 max-pool, stride 2, SAME (XLA's padding: the odd pad at the end). (B, H, W, C) -> (B, ceil(H/2), ...)."""
    size = x.shape[1]
    out = -(-size // 2)
    total = max((out - 1) * 2 + 3 - size, 0)
    padded = np.pad(
        x, ((0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)), constant_values=-np.inf
    )
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))[:, ::2, ::2]
    return windows.max(axis=(-2, -1))


def test_resnet_dormant_neurons_are_redo_layers():
    """The Impala ResNet's dormant neurons are the 13 layers of Dopamine's ReDo code: per residual block, the ReLU'd
    stream at its input and the ReLU of its first conv, plus the dense layer; values and fractions against a NumPy
    forward pass. Its dead neurons still cover every hidden kernel (15 convs and dense)."""
    rng = np.random.default_rng(8)
    network = dqn.QNetwork(4, "resnet", 1, False, True, True)
    obs = rng.integers(0, 256, (3, 84, 84, 4)).astype(np.uint8)
    params = network.init(jax.random.key(0), obs)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)  # biases != 0
    q_fn = dqn.make_q_fn(network)
    q, activations = metrics.hidden_activations(q_fn, params, obs, None)

    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    conv = lambda name, x: conv_same(x, p["torso"][name]["kernel"], p["torso"][name]["bias"])
    x, expected = obs.astype(np.float64) / 255.0, {}
    for i in range(3):
        x = max_pool_same(conv(f"stack{i}_conv", x))
        for j in range(2):
            block = f"torso/stack{i}_block{j}"
            expected[f"{block}_input"] = relu(x)
            expected[f"{block}_conv0"] = relu(conv(f"stack{i}_block{j}_conv0", relu(x)))
            x = x + conv(f"stack{i}_block{j}_conv1", expected[f"{block}_conv0"])
    features = relu(x).reshape(3, -1)
    expected["dense"] = relu(features @ p["dense"]["kernel"] + p["dense"]["bias"])
    assert list(activations) == list(expected) and len(expected) == 13
    for name, value in expected.items():
        np.testing.assert_allclose(activations[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(q, expected["dense"] @ p["q"]["kernel"] + p["q"]["bias"], rtol=1e-4, atol=1e-5)

    loss_fn = dqn.make_loss(network)
    batch = dqn.Batch(obs, np.array([0, 1, 3], np.int32), np.ones(3, np.float32), np.full(3, 0.9, np.float32), obs)
    masks = jax.tree.map(lambda p: np.ones(p.shape, np.uint8), params)
    scalars = jax.device_get(
        metrics.make_analysis(q_fn, loss_fn, 2)(params, params, masks, batch, jax.random.key(2))[0]
    )
    scores = {name: np.abs(h).reshape(-1, h.shape[-1]).mean(0) for name, h in expected.items()}
    dormant = {name: s / s.mean() <= 0.1 for name, s in scores.items()}
    assert scalars["metrics/dormant_0.1"] == pytest.approx(np.concatenate(list(dormant.values())).mean(), abs=1e-6)
    for name, flags in dormant.items():
        assert scalars[f"metrics/dormant_0.1/{name}"] == pytest.approx(flags.mean(), abs=1e-6)
    assert 0 < scalars["metrics/dormant_0.1"] < 1  # some units dormant, not all: the check can fail
    dead = sorted(tag[len("metrics/dead/") :] for tag in scalars if tag.startswith("metrics/dead/"))
    assert len(dead) == 16 and "torso/stack0_conv" in dead and "torso/stack2_block1_conv1" in dead and "dense" in dead


def test_quantile_embedding_is_left_out_of_the_overall_fraction():
    """IQN's quantile embedding gets its own per-layer tag; the overall fractions count the torso and dense only."""
    rng = np.random.default_rng(9)
    batch = small_batch(rng, 8, 3)
    network = iqn.IQNNetwork(3, "mlp", 1, False, True, True, 8)
    params = network.init(jax.random.key(0), batch.obs, np.zeros((1, 1), np.float32))["params"]
    bias = params["quantile_embedding"]["bias"]
    params["quantile_embedding"]["bias"] = bias.at[: bias.size // 2].set(-100.0)  # half its units dormant
    args = iqn.Args(env_id="CartPole-v1", network="mlp", num_tau_samples=4, num_tau_prime_samples=5)
    q_fn, loss_fn = iqn.make_q_fn(network, 3), iqn.make_loss(network, dataclasses.replace(args, num_quantile_samples=3))
    masks = jax.tree.map(lambda p: np.ones(p.shape, np.uint8), params)
    analysis = metrics.make_analysis(q_fn, loss_fn, 4)
    scalars = jax.device_get(analysis(params, params, masks, batch, jax.random.key(1))[0])
    _, activations = metrics.hidden_activations(q_fn, params, batch.obs, jax.random.key(1))
    for tau in (0.1, 0.025):
        counted = {name: activations[name] for name in ("torso/fc", "dense")}
        assert scalars[f"metrics/dormant_{tau}"] == pytest.approx(float(metrics.dormant_fractions(counted, tau)[1]))
        everything = metrics.dormant_fractions(activations, tau)[1]  # what the overall fraction was before
        assert abs(float(everything) - scalars[f"metrics/dormant_{tau}"]) > 0.05
    embedding = metrics.dormant_fractions({"e": activations["quantile_embedding"]}, 0.1)[1]
    assert scalars["metrics/dormant_0.1/quantile_embedding"] == pytest.approx(float(embedding)) and embedding >= 0.5
