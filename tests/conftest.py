"""Shared test setup: the repository root on sys.path, strict shapes, and small helpers."""

import ast
import os
import shlex
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A swapped or missing axis must fail loudly instead of broadcasting (DQN Zoo's test setting).
jax.config.update("jax_numpy_rank_promotion", "raise")


def run_script(script: str, *flags: str, cwd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `python script flags...` through the real CLI in `cwd`."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def readme_command(script: str, *markers: str) -> list:
    """Flags of the README's first `python {script} ...` command that contains every marker (continuations joined)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"python {script}") and all(marker in line for marker in markers):
            return shlex.split(line.split("#")[0])[2:]
    raise AssertionError(f"no README command `python {script} ...` with {markers}")


def args_docstrings(script: str) -> dict:
    """{field: attribute docstring, its lines joined by single spaces} of a script's Args class, read from its source
    as tyro reads it."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args").body
    return {
        a.target.id: " ".join(b.value.value.split())
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
    }


def read_scalars(run_dir: str) -> dict:
    """TensorBoard scalars of a run: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def read_image_steps(run_dir: str) -> dict:
    """TensorBoard images of a run: {tag: [step, ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"images": 0})
    accumulator.Reload()
    return {tag: [e.step for e in accumulator.Images(tag)] for tag in accumulator.Tags()["images"]}


# the tags of the analysis metrics every script logs (README, "Analysis metrics"), besides per-layer ones
METRIC_TAGS = [
    "metrics/dormant_0.1",
    "metrics/dormant_0.025",
    "metrics/dead_fraction",
    "metrics/srank",
    "metrics/param_norm",
    "metrics/q_norm",
    "metrics/target_variance",
    "metrics/grad_cosine_abs",
    "metrics/grad_interference",
]


def check_metric_logs(run_dir: str, scalars: dict, steps: list, hidden_layers: list, dormant_layers=None) -> None:
    """The analysis metrics were logged at exactly `steps`, dead fractions per layer for exactly the hidden layers,
    dormant ones for exactly `dormant_layers` (default: the hidden layers), with the covariance heat map; fractions are
    fractions."""
    for tag in METRIC_TAGS:
        assert [step for step, _ in scalars[tag]] == steps, tag
    assert sorted(t[len("metrics/dormant_0.1/") :] for t in scalars if t.startswith("metrics/dormant_0.1/")) == sorted(
        hidden_layers if dormant_layers is None else dormant_layers
    )
    assert sorted(t[len("metrics/dead/") :] for t in scalars if t.startswith("metrics/dead/")) == sorted(hidden_layers)
    for tag in ("metrics/dormant_0.1", "metrics/dormant_0.025", "metrics/dead_fraction", "metrics/grad_interference"):
        assert all(0 <= value <= 1 for _, value in scalars[tag]), tag
    assert all(value >= 1 for _, value in scalars["metrics/srank"])
    assert read_image_steps(run_dir) == {"metrics/grad_covariance": steps}


@pytest.fixture(params=["eager", "jit"])
def maybe_jit(request):
    """Runs a check twice: on the plain function, and on jax.jit of it."""
    return (lambda f, **kw: f) if request.param == "eager" else (lambda f, **kw: jax.jit(f, **kw))


def check_saved_masks(module, model_path: str, sparsity: float):
    """Loads a --save-model file (a plain {"params", "masks"} dict anyone can read without the script) and checks the
    masks: pruned weights exactly zero, every kernel exactly at its ERK target, biases dense. Returns (params, kept
    weights, prunable weights)."""
    import numpy as np
    from flax import serialization

    with open(model_path, "rb") as f:
        saved = serialization.msgpack_restore(f.read())
    params, masks = saved["params"], saved["masks"]
    assert jax.tree.structure(params) == jax.tree.structure(masks)
    targets = module.target_sparsities(params, sparsity, "erk")
    kept = total = 0
    for p, m, s in zip(jax.tree.leaves(params), jax.tree.leaves(masks), jax.tree.leaves(targets)):
        assert np.all(p[m == 0] == 0)  # pruned weights are exactly zero
        if p.ndim > 1:
            assert int(m.sum()) == module.keep_count(p.size, s)  # each layer at its ERK target, exactly
            kept, total = kept + int(m.sum()), total + p.size
        else:
            assert np.all(m == 1)  # biases are never pruned
    assert 1 - kept / total == pytest.approx(sparsity, abs=1e-3)
    return params, kept, total
