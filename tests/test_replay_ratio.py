"""Replay ratios above 1 (--gradient-steps N): the gradient steps and mask updates of tiny runs against hand counts,
and N steps in one jitted call against N calls of one step each on the same batches."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from conftest import read_scalars
from flax import serialization

import dqn_pruned as dqn
import iqn_pruned as iqn
import miqn_pruned as miqn
import rainbow_pruned as rainbow

MODULES = {"dqn": dqn, "rainbow": rainbow, "iqn": iqn, "miqn": miqn}


def tiny_args(module, **overrides):
    """CartPole, an MLP, 400 env steps, learning from step 80, GMP to 80% with a mask update every 20 gradient steps."""
    args = module.Args(
        env_id="CartPole-v1",
        network="mlp",
        total_timesteps=400,
        learning_starts=80,
        batch_size=16,
        buffer_size=1000,
        exploration_steps=100,
        target_network_frequency=50,
        sparsity=0.8,
        prune_frequency_grad_steps=20,
        log_frequency=100,
        metrics_frequency=0,
        save_model=True,
        exp_name="rr",
    )
    if module in (iqn, miqn):  # fewer quantile fractions: a faster update
        args = dataclasses.replace(args, num_tau_samples=8, num_tau_prime_samples=8, num_quantile_samples=4)
    return dataclasses.replace(args, **overrides)


def record_updates(module, monkeypatch, stop_at_mask_update: bool = False) -> list:
    """Patches module.make_update so that main()'s update records each call: (the update, the state it got, its inputs
    (batches, [probs,] counts)). With stop_at_mask_update, main() stops (StopIteration) at the first call whose counts
    hold a mask update, before running it."""
    calls, real_make_update = [], module.make_update

    def make_update(*make_args):
        update = real_make_update(*make_args)

        def recording(state, *inputs):
            calls.append((update, state, inputs))
            if stop_at_mask_update and any(counts is not None for counts in inputs[-1]):
                raise StopIteration
            return update(state, *inputs)

        return recording

    monkeypatch.setattr(module, "make_update", make_update)
    return calls


# Hand counts for tiny_args: training events at env steps t in [80, 400) with t % F == 0, that is 320 / F of them,
# times N gradient steps each; the window is [round(0.2 G), round(0.8 G)] with a mask update every 20 gradient steps
# counted from its start, and one forced at its end.
#   F=4, N=1: G = 80,  window [16, 64]:   16, 36, 56; 64                 -> 4 mask updates
#   F=2, N=1: G = 160, window [32, 128]:  32, 52, 72, 92, 112; 128       -> 6
#   F=1, N=1: G = 320, window [64, 256]:  64, 84, ..., 244 (10); 256     -> 11
#   F=1, N=2: G = 640, window [128, 512]: 128, 148, ..., 508 (20); 512   -> 21
HAND_COUNTS = {
    (4, 1): (80, [16, 36, 56, 64]),
    (2, 1): (160, [32, 52, 72, 92, 112, 128]),
    (1, 1): (320, [64 + 20 * i for i in range(10)] + [256]),
    (1, 2): (640, [128 + 20 * i for i in range(20)] + [512]),
}


@pytest.mark.parametrize(
    "name, train_frequency, gradient_steps",
    [("dqn", *case) for case in HAND_COUNTS] + [(name, 1, 2) for name in ("rainbow", "iqn", "miqn")],
)
def test_gradient_steps_and_mask_updates_match_a_hand_count(
    tmp_path, monkeypatch, name, train_frequency, gradient_steps
):
    module = MODULES[name]
    monkeypatch.chdir(tmp_path)
    calls = record_updates(module, monkeypatch)
    args = tiny_args(module, train_frequency=train_frequency, gradient_steps=gradient_steps)
    run_dir = module.main(args)["run_dir"]

    total, mask_steps = HAND_COUNTS[(train_frequency, gradient_steps)]
    assert len(calls) == 320 // train_frequency  # one call per training event
    counts = [step_counts for _, _, inputs in calls for step_counts in inputs[-1]]  # one entry per gradient step
    assert len(counts) == total and all(len(inputs[0]) == gradient_steps for _, _, inputs in calls)
    assert [step for step, entry in enumerate(counts) if entry is not None] == mask_steps
    assert read_scalars(run_dir)["charts/grad_steps"][-1] == (399, float(total))
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["replay_ratio"] == gradient_steps / train_frequency
    assert config["prune_window_grad_steps"] == [mask_steps[0], mask_steps[-1], 20]

    # the final masks hold exactly each layer's target: keep_count(size, its ERK sparsity) weights
    with open(os.path.join(run_dir, "rr.msgpack"), "rb") as f:
        saved = serialization.msgpack_restore(f.read())
    targets = module.target_sparsities(saved["params"], 0.8, "erk")
    for mask, target in zip(jax.tree.leaves(saved["masks"]), jax.tree.leaves(targets)):
        assert int(mask.sum()) == module.keep_count(mask.size, target)  # biases: target 0, all kept


@pytest.mark.parametrize("name, method", [("dqn", "gmp"), ("rainbow", "gmp"), ("iqn", "set"), ("miqn", "gmp")])
def test_n_steps_in_one_call_equal_n_single_steps(tmp_path, monkeypatch, name, method):
    """Bit for bit on CPU: the state (params, masks, Adam's moments, key, step count), the last step's metrics and
    Rainbow's priorities of every step, for an event without a mask update and for one with a mask update inside."""
    module = MODULES[name]
    monkeypatch.chdir(tmp_path)
    calls = record_updates(module, monkeypatch, stop_at_mask_update=True)
    # G = 3 * 236 = 708 gradient steps; gmp's window starts at round(0.2 G) = 142, the second step of an event
    args = tiny_args(module, total_timesteps=296, learning_starts=60, train_frequency=1, gradient_steps=3)
    args = dataclasses.replace(args, pruning_method=method, prune_start_fraction=0.2)
    with pytest.raises(StopIteration):
        module.main(args)
    update, *_ = calls[0]
    with_mask_update = calls[-1][2][-1]
    assert len(calls) == 142 // 3 + 1 and [c is not None for c in with_mask_update] == [False, True, False]
    for _, state, inputs in (calls[0], calls[-1]):
        state_all, *outputs_all = update(state, *inputs)
        state_one, outputs_one = state, []
        for i in range(3):
            state_one, *outputs = update(state_one, *(entries[i : i + 1] for entries in inputs))
            outputs_one.append(outputs)
        for a, b in zip(jax.tree.leaves(state_all), jax.tree.leaves(state_one)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(outputs_all[0]), jax.tree.leaves(outputs_one[-1][0])
        ):  # the last step's metrics
            np.testing.assert_array_equal(a, b)
        if module is rainbow:  # every step's new priorities, (3, B)
            np.testing.assert_array_equal(outputs_all[1], np.concatenate([out[1] for out in outputs_one]))
    assert int(state_all.grad_step) == int(calls[-1][1].grad_step) + 3
