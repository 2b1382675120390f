"""Analysis metrics of a value network under sparse training , as pure jax.numpy functions.

Every *_pruned.py imports this module (and nothing else from common/) and logs these under the tags listed in the
README's "Analysis metrics" section, every --metrics-frequency steps, on one fixed batch of replay states. The
functions take plain arrays and dicts, so they run eagerly on NumPy inputs and under jax.jit alike.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


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
    return layer_fractions(
        {name: mask.reshape(-1, mask.shape[-1]).sum(axis=0) == 0 for name, mask in kernel_masks.items()}
    )


def srank(features: jax.Array, delta: float = 0.01) -> jax.Array:
    """Effective rank srank_delta (Kumar et al. 2021): the smallest k with sum_{i<=k} sigma_i / sum_i sigma_i >=
    1 - delta, sigma the singular values of the feature matrix in descending order (0 for an all-zero matrix).
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
    mean), a proxy for Obando-Ceron et al.'s "Q-target variance" (Fig. 11). (B,) -> ()."""
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


# ------------------------------------------------------------------------------------------------------------------
# The analysis every script runs every --metrics-frequency steps on one fixed batch: the metrics above, recorded
# from the script's own network and loss, and written to TensorBoard.
# ------------------------------------------------------------------------------------------------------------------
OUTPUT_LAYERS = ("q", "logits", "value", "advantage")  # the heads' output layers; every other conv/dense is hidden
# layers whose dormant fraction is logged on its own but left out of the overall one: IQN's quantile embedding
# (3,872 k units on the ResNet, most of all counted units, so the overall fraction would mostly measure it)
SEPARATE_LAYERS = ("quantile_embedding",)


def layer_name(path) -> str:
    """Tree path -> 'torso/stack0_conv/kernel'."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def overall_sparsity(params, targets) -> float:
    """Sparsity over all prunable kernels (ndim > 1) implied by per-layer sparsities: sum_l N_l s_l / sum_l N_l."""
    pairs = [(p.size, s) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(targets)) if p.ndim > 1]
    return sum(n * s for n, s in pairs) / max(sum(n for n, _ in pairs), 1)


def sparsity_summary(params) -> dict:
    """Achieved sparsity (exact zeros, JaxPruner's summary): per prunable layer (ndim > 1), over all prunable kernels,
    and over all parameters."""
    summary, zeros, size, kernel_zeros, kernel_size = {}, 0, 0, 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf_zeros = jnp.sum(leaf == 0)
        zeros, size = zeros + leaf_zeros, size + leaf.size
        if leaf.ndim > 1:
            summary[f"pruning/layer/{layer_name(path)}"] = leaf_zeros / leaf.size
            kernel_zeros, kernel_size = kernel_zeros + leaf_zeros, kernel_size + leaf.size
    summary["pruning/kernel_sparsity"] = kernel_zeros / max(kernel_size, 1)
    summary["pruning/total_sparsity"] = zeros / size
    return summary


def hidden_activations(q_fn, params, obs, key) -> tuple:
    """(Q(s, .) (B, A), {layer: activations (B, ..., units)}), recorded while q_fn runs: the units whose dormancy is
    measured. The CNN, the MLP and the heads: the ReLU of every hidden conv and dense layer's output, what the next
    layer reads. The Impala ResNet: the 12 activations Dopamine's ReDo code records on it (labs/redo,
    ScalableDQNResNet), per residual block the ReLU of the residual stream at its input, which its first conv reads
    ({block}_input: the stack's conv after the max-pool, or the first block's output after the skip add), and the ReLU
    of its first conv's output, which its second conv reads ({block}_conv0); the stacks' convs and the blocks' second
    convs are not recorded themselves. Then the dense layer, as in the other torsos."""
    activations = {}

    def record(call, call_args, call_kwargs, context):
        out = call(*call_args, **call_kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
            name = "/".join(module.path)
            if "_block" in module.name:  # a residual block's conv: what it reads, already ReLU'd
                block, conv = name.rsplit("_", 1)
                activations[block + ("_input" if conv == "conv0" else "_conv0")] = call_args[0]
            elif not module.name.startswith("stack") and module.name not in OUTPUT_LAYERS:
                activations[name] = nn.relu(out)
        return out

    with nn.intercept_methods(record):
        q = q_fn(params, obs, key)
    return q, activations


def make_analysis(q_fn, loss_fn, grad_samples: int):
    """The jitted analysis (params, target_params, masks, batch, key) -> (scalars, gradient covariance (n, n)) of a
    script's q_fn(params, obs, key) -> Q(s, .) and loss_fn(params, target_params, batch, key) -> (loss, aux with
    "targets"). Per-sample gradients are those of the loss on each of the batch's first `grad_samples` transitions
    alone, masked like the updates they would make."""

    def analysis(params, target_params, masks, batch, key):
        q, activations = hidden_activations(q_fn, params, batch.obs, key)
        counted = {name: a for name, a in activations.items() if name not in SEPARATE_LAYERS}
        scalars = {f"metrics/dormant_{tau}": dormant_fractions(counted, tau)[1] for tau in (0.1, 0.025)}
        per_layer = dormant_fractions(activations, 0.1)[0]
        scalars.update({f"metrics/dormant_0.1/{name}": value for name, value in per_layer.items()})
        kernel_masks = {  # every hidden layer's kernel (all 15 convs of the ResNet)
            layer_name(path[:-1]): m
            for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]
            if m.ndim > 1 and path[-2].key not in OUTPUT_LAYERS
        }
        per_layer, scalars["metrics/dead_fraction"] = dead_neuron_fractions(kernel_masks)
        scalars.update({f"metrics/dead/{name}": value for name, value in per_layer.items()})
        features = activations["dense"]  # the penultimate layer, (B, 512) ((B, K, 512) in IQN)
        scalars["metrics/srank"] = srank(features.reshape(-1, features.shape[-1]))
        scalars["metrics/param_norm"] = param_norm(params)
        scalars["metrics/q_norm"] = q_norm(q)
        scalars["metrics/target_variance"] = target_variance(loss_fn(params, target_params, batch, key)[1]["targets"])

        def sample_gradient(sample, sample_key):  # the flat, masked gradient of one transition's loss
            one = jax.tree.map(lambda x: x[None], sample)
            grads = jax.grad(lambda p: loss_fn(p, target_params, one, sample_key)[0])(params)
            return ravel_pytree(jax.tree.map(lambda g, m: g * m, grads, masks))[0]  # (P,)

        few = jax.tree.map(lambda x: x[:grad_samples], batch)
        grads = jax.vmap(sample_gradient)(few, jax.random.split(key, grad_samples))  # (n, P)
        covariance = gradient_covariance(grads)  # (n, n)
        scalars["metrics/grad_cosine_abs"], scalars["metrics/grad_interference"] = interference(covariance)
        return scalars, covariance

    return jax.jit(analysis)


def by_action(batch, first: int):
    """The batch (a NamedTuple of arrays) with its first `first` transitions (those of the gradient covariance, a
    random subset) reordered by action (stable), so that its heat map shows transitions of one action side by side."""
    order = np.concatenate([np.argsort(batch.actions[:first], kind="stable"), np.arange(first, len(batch.actions))])
    return type(batch)(*(field[order] for field in batch))


def write_analysis(writer, results: tuple, step: int) -> None:
    """TensorBoard: the analysis scalars, and the covariance matrix as a gray image (C = -1 black, +1 white)."""
    scalars, covariance = jax.device_get(results)
    for tag, value in scalars.items():
        writer.add_scalar(tag, float(value), step)
    writer.add_image("metrics/grad_covariance", (np.asarray(covariance) + 1.0) / 2.0, step, dataformats="HW")
