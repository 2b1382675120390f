"""The jitted update of two versions of dqn_pruned.py, timed head to head in one process on the same batch:
python benchmarks/update_ab.py OLD.py [NEW.py (default: this checkout's)] [--network nature] [--rounds 15] ...

Loop timings on a shared CPU drift by 10-30% between runs, more than a change to the update usually moves it. Here
both versions are loaded side by side and timed in alternating rounds (the order rotated each round), each round
`--steps` gradient steps from the version's own initial state on one fixed random batch (84x84x4 uint8 frames and 4
actions, as Breakout's; 8 floats for the MLP), no mask update. Both files need the API dqn_pruned.py has had since
71274af: Args, QNetwork, Batch, init_train_state, make_loss, make_update (its update takes one batch, or a tuple of
batches in the versions with --gradient-steps). Example, against the commit before the
single-file rewrite:
    git worktree add /tmp/old 71274af && python benchmarks/update_ab.py /tmp/old/dqn_pruned.py --network nature
Prints, per pruning method, each version's median and fastest milliseconds per gradient step and new / old medians.
"""

import argparse
import importlib.util
import os
import sys
import time
from functools import partial

import jax
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `common`, which either version imports


def load(name: str, path: str):
    """The script at `path` as a module called `name` (two versions of one file can then live side by side)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_step(module, method: str, network: str, batch_size: int):
    """(update, state, batch) of one version: its jitted update, compiled, its initial train state (seed 1) and the
    fixed random batch (seed 0: the same for both versions)."""
    rng = np.random.default_rng(0)
    shape = (batch_size, 84, 84, 4) if network != "mlp" else (batch_size, 8)
    obs, next_obs = (rng.integers(0, 256, shape).astype(np.uint8 if network != "mlp" else np.float32) for _ in "ab")
    actions, rewards = rng.integers(0, 4, batch_size).astype(np.int32), rng.random(batch_size).astype(np.float32)
    batch = module.Batch(obs, actions, rewards, np.full(batch_size, 0.99, np.float32), next_obs)
    args = module.Args(network=network, pruning_method=method, batch_size=batch_size)
    net = module.QNetwork(4, network, args.width_scale, args.scale_dense, args.use_bias, args.use_output_bias)
    params = jax.jit(net.init)(jax.random.PRNGKey(args.seed), obs[:1])["params"]
    tx = optax.adam(args.learning_rate, eps=args.adam_eps)
    state, _ = module.init_train_state(args, params, tx, np.random.default_rng(1), jax.random.PRNGKey(1))
    update = module.make_update(module.make_loss(net), tx, method)
    if hasattr(module.Args, "gradient_steps"):  # this version's update takes a tuple of batches: give it one
        update = partial(lambda steps, state, batch, counts: steps(state, (batch,), (counts,)), update)
    jax.block_until_ready(update(state, batch, None))  # compiled before it is timed
    return update, state, batch


def time_rounds(setups: dict, rounds: int, steps: int) -> dict:
    """{key: [ms per gradient step of each round]}, the keys taking turns, the order rotated each round."""
    keys, times = list(setups), {key: [] for key in setups}
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            update, state, batch = setups[key]
            start = time.perf_counter()
            for _ in range(steps):
                state, _ = update(state, batch, None)
            jax.block_until_ready(state)
            times[key].append((time.perf_counter() - start) / steps * 1000)
    return times


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the other version of dqn_pruned.py")
    parser.add_argument("new", nargs="?", default=os.path.join(ROOT, "dqn_pruned.py"), help="default: this one")
    parser.add_argument("--network", default="nature", choices=["resnet", "cnn", "nature", "mlp"])
    parser.add_argument("--methods", nargs="+", default=["none", "gmp"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="gradient steps per round")
    options = parser.parse_args(argv)
    versions = {"old": load("dqn_old", options.old), "new": load("dqn_new", options.new)}
    setups = {
        (version, method): make_step(module, method, options.network, options.batch_size)
        for method in options.methods
        for version, module in versions.items()
    }
    times = time_rounds(setups, options.rounds, options.steps)
    print(
        f"{options.network}, batch {options.batch_size}, {options.rounds} rounds of {options.steps} steps; ms per step"
    )
    print("| method | old median | old fastest | new median | new fastest | new / old |\n|---|---|---|---|---|---|")
    rows = []
    for method in options.methods:
        old, new = times[("old", method)], times[("new", method)]
        row = {"method": method, "old": float(np.median(old)), "new": float(np.median(new))}
        row.update(old_min=min(old), new_min=min(new), ratio=row["new"] / row["old"])
        rows.append(row)
        print(
            f"| {method} | {row['old']:.2f} | {min(old):.2f} | {row['new']:.2f} | {min(new):.2f} | {row['ratio']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()
