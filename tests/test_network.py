"""Networks of dqn_pruned.py (bias flags, dense scaling, shapes) and the file's own hygiene (flags, shared markers)."""

import ast
import os
import re

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, args_docstrings

import dqn_pruned as dqn
from common import metrics


def init(torso, width=1, scale_dense=False, use_bias=True, use_output_bias=True, obs_shape=(84, 84, 4)):
    network = dqn.QNetwork(5, torso, width, scale_dense, use_bias, use_output_bias)
    dtype = jnp.uint8 if len(obs_shape) == 3 else jnp.float32
    return network, jax.eval_shape(network.init, jax.random.key(0), jnp.zeros((2, *obs_shape), dtype))["params"]


def leaf_names(params):
    return [metrics.layer_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


@pytest.mark.parametrize(
    "torso, obs_shape", [("resnet", (84, 84, 4)), ("cnn", (84, 84, 4)), ("nature", (84, 84, 4)), ("mlp", (6, 1))]
)
def test_bias_flags(torso, obs_shape):
    _, params = init(torso, obs_shape=obs_shape)
    assert "q/bias" in leaf_names(params) and "dense/bias" in leaf_names(params)
    _, params = init(torso, use_bias=False, obs_shape=obs_shape)
    assert [n for n in leaf_names(params) if n.endswith("bias")] == ["q/bias"]  # only the output bias is left
    _, params = init(torso, use_bias=False, use_output_bias=False, obs_shape=obs_shape)
    assert not any(n.endswith("bias") for n in leaf_names(params))
    _, params = init(torso, use_output_bias=False, obs_shape=obs_shape)
    assert "q/bias" not in leaf_names(params) and "dense/bias" in leaf_names(params)


def test_widths_and_dense_scaling():
    _, params = init("resnet", width=2)
    assert params["torso"]["stack0_conv"]["kernel"].shape == (3, 3, 4, 32)
    assert params["dense"]["kernel"].shape == (
        11 * 11 * 64,
        512,
    )  # the dense layer stays at 512 (Dopamine's ImpalaDQNNetwork)
    _, params = init("resnet", width=2, scale_dense=True)
    assert params["dense"]["kernel"].shape == (11 * 11 * 64, 1024) and params["q"]["kernel"].shape == (1024, 5)
    _, params = init("mlp", width=3, obs_shape=(6, 1))
    assert params["torso"]["fc"]["kernel"].shape == (6, 768)


def test_cnn_padding_same_and_valid():
    """cnn: Dopamine's SAME padding (21 -> 11 -> 11, dense 7744 x 512); nature: Mnih et al.'s VALID padding
    (20 -> 9 -> 7,
    dense 3136 x 512). The VALID torso equals three VALID convolutions computed by lax directly."""
    _, params = init("cnn")
    assert params["dense"]["kernel"].shape == (7744, 512)
    network, _ = init("nature", width=2)
    x = jax.random.randint(jax.random.key(1), (2, 84, 84, 4), 0, 256).astype(jnp.uint8)
    params = network.init(jax.random.key(0), x)["params"]
    assert params["dense"]["kernel"].shape == (7 * 7 * 128, 512) and params["torso"]["conv0"]["kernel"].shape == (
        8,
        8,
        4,
        64,
    )
    h = x.astype(jnp.float32) / 255.0
    for i, stride in enumerate((4, 2, 1)):
        conv = params["torso"][f"conv{i}"]
        h = jax.lax.conv_general_dilated(
            h, conv["kernel"], (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + conv["bias"][None, None, None, :])
    features = dqn.TORSOS["nature"](2, True).apply({"params": params["torso"]}, x)
    assert features.shape == (2, 7 * 7 * 128)
    assert jnp.allclose(features, h.reshape(2, -1), atol=1e-5)


def test_q_values_shape_and_dtype():
    network = dqn.QNetwork(5, "cnn", 1, False, True, True)
    x = jnp.zeros((3, 84, 84, 4), jnp.uint8)
    params = network.init(jax.random.key(0), x)["params"]
    q = network.apply({"params": params}, x)
    assert q.shape == (3, 5) and q.dtype == jnp.float32


@pytest.mark.parametrize(
    "script", ["dqn_pruned.py", "rainbow_pruned.py", "iqn_pruned.py", "miqn_pruned.py", "cql_pruned.py"]
)
def test_every_flag_is_read_and_documented(script):
    """No flag that lies: every Args field is read as args.<field> and has a docstring."""
    with open(os.path.join(ROOT, script)) as f:
        text = f.read()
    args_class = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "Args")
    documented = args_docstrings(script)
    fields = [a.target.id for a in args_class.body if isinstance(a, ast.AnnAssign)]
    assert len(fields) > 25
    for field in fields:
        assert documented.get(field, "").strip(), f"{field} has no docstring"
        assert re.search(rf"args\.{field}\b", text), f"{field} is never read"
