"""Analysis metrics of a value network under sparse training (METHODS 5), as pure jax.numpy functions.

Every *_pruned.py imports this module (and nothing else from common/) and logs these under the tags listed in the
README's "Analysis metrics" section, every --metrics-frequency steps, on one fixed batch of replay states. The
functions take plain arrays and dicts, so they run eagerly on NumPy inputs and under jax.jit alike.
"""
import jax
import jax.numpy as jnp


def neuron_scores(activation: jax.Array) -> jax.Array:
    """ReDo's neuron score (Sokar et al. 2023, Eq. 1; Dopamine's estimate_neuron_score): s_i = E|h_i| / mean_k E|h_k|,
    the expectation over the batch (and, for a conv layer, over its spatial positions: a conv neuron is a channel).
    Divided by the layer mean, not the sum, as the reference code does (dopamine#209), so scores average to 1.
    (B, ..., H) post-activations -> (H,) scores."""
    mean_abs = jnp.abs(activation).reshape(-1, activation.shape[-1]).mean(axis=0)  # (H,)
    return mean_abs / (mean_abs.mean() + 1e-9)


def layer_fractions(flags: dict) -> tuple:
    """{layer: (H,) bool per neuron} -> ({layer: fraction of its neurons flagged}, fraction over all neurons of all
    the given layers)."""
    per_layer = {name: flag.mean() for name, flag in flags.items()}
    total = sum(flag.size for flag in flags.values())
    return per_layer, sum(flag.sum() for flag in flags.values()) / max(total, 1)


def dormant_fractions(activations: dict, tau: float) -> tuple:
    """tau-dormant neurons (Sokar et al. 2023): neuron i is dormant iff its score s_i <= tau (tau 0.1, or 0.025 for
    the default setting, dopamine#226). {layer: (B, ..., H) post-activations} -> ({layer: dormant fraction},
    fraction over all neurons of all the given layers)."""
    return layer_fractions({name: neuron_scores(activation) <= tau for name, activation in activations.items()})


def dead_neuron_fractions(kernel_masks: dict) -> tuple:
    """Structurally dead neurons: every incoming weight is masked, so the unit computes a constant (its bias).
    A kernel's last axis indexes its output neurons (dense (in, out); conv (h, w, in, out)).
    {layer: 0/1 kernel mask} -> ({layer: dead fraction}, fraction over all neurons of all the given layers)."""
    return layer_fractions({name: mask.reshape(-1, mask.shape[-1]).sum(axis=0) == 0 for name, mask in kernel_masks.items()})


def srank(features: jax.Array, delta: float = 0.01) -> jax.Array:
    """Effective rank srank_delta (Kumar et al. 2021): the smallest k with sum_{i<=k} sigma_i / sum_i sigma_i >= 1 - delta,
    sigma the singular values of the feature matrix in descending order (0 for an all-zero matrix).
    (n, d) penultimate-layer features -> () int."""
    sigma = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)  # (min(n, d),), descending
    cumulative = jnp.cumsum(sigma) / jnp.maximum(sigma.sum(), 1e-12)
    return jnp.where(sigma.sum() > 0, jnp.sum(cumulative < 1.0 - delta) + 1, 0)


def param_norm(params) -> jax.Array:
    """Global L2 norm of all parameters, sqrt(sum theta^2) (optax.global_norm). pytree -> ()."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(params)))


def q_norm(q_values: jax.Array) -> jax.Array:
    """Mean over the batch of ||Q(s, .)||_2 (Ma et al.'s compute_q_estimation_norm). (B, A) -> ()."""
    return jnp.linalg.norm(q_values, axis=-1).mean()


def target_variance(targets: jax.Array) -> jax.Array:
    """Variance over the batch of the TD targets y = r + gamma^n max_a' Q_target(s', a') (or the target distribution's
    mean), a proxy for Obando-Ceron et al.'s "Q-target variance" (Fig. 11; METHODS 5.5). (B,) -> ()."""
    return jnp.var(targets)


def gradient_covariance(grads: jax.Array) -> jax.Array:
    """Normalized gradient covariance (Lyle et al. 2022; Obando-Ceron et al. Fig. 14): the cosine similarities
    C_ij = <g_i, g_j> / (||g_i|| ||g_j|| + 1e-6) of per-sample gradients. (n, P) -> (n, n)."""
    grads = grads.astype(jnp.float32)
    norms = jnp.linalg.norm(grads, axis=-1)  # (n,)
    return (grads @ grads.T) / (norms[:, None] * norms[None, :] + 1e-6)


def interference(covariance: jax.Array) -> tuple:
    """Summaries of a gradient covariance matrix over its off-diagonal pairs: (mean |C_ij|, the fraction of C_ij < 0,
    i.e. of sample pairs whose updates interfere). (n, n) -> ((), ())."""
    n = covariance.shape[0]
    off_diagonal = ~jnp.eye(n, dtype=bool)
    pairs = max(n * (n - 1), 1)
    return jnp.sum(jnp.abs(covariance) * off_diagonal) / pairs, jnp.sum((covariance < 0) & off_diagonal) / pairs
