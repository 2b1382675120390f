"""Where the training loop's time goes, dense and pruned: python benchmarks/throughput.py [--script dqn_pruned.py] ...

For each pruning method, in this one process: the loop's pieces, built from the script's own functions as its main()
builds them, each timed on its own (dqn_pruned.py only; every jitted function compiled first, the mask update too;
from the command line, main() loads them from a JAX compilation cache: the timed loop compiles nothing):
    env, store  env.step with random actions and ReplayBuffer.add (filling the buffer for what follows), steps/s
    act         a frame stack built and the jitted greedy action at batch 1 (one forward pass), calls/s
    sample      a replay batch drawn and its frame stacks rebuilt, batches/s
    learn       one gradient step: a replay batch sampled and the jitted update, steps/s
    update      the jitted update alone: 1 / (1/learn - 1/sample), steps/s
    mask        extra time of a gradient step that updates the masks (gmp: top-k per layer; rigl/set: drop, regrow), ms
    bound       1 / (1/env + 1/store + 1/act + 1/(learn * train_frequency)), env steps/s
then one run of the script's main() on the same config, its SPS read back from its TensorBoard log:
    loop        the loop's SPS after learning starts and --warmup-steps, acting greedy (epsilon 0.01) as late in a run
    paper       the loop's SPS with the timed window's mask updates at the paper's rate: a short run's window (20%-80%
                of its gradient steps, plus the update forced at its end) packs them denser than a 10M-step run does
                (GMP: 1,498 in 2,495,000 gradient steps)
and each method's wall-clock ratio to dense (none) and the paper's run (10M env steps) projected, at the paper-rate
SPS; medians over --repeats runs, interleaved, the order rotated each time. Rainbow, IQN and M-IQN (their networks and
updates take other inputs) get the loop only; their ratio and projection use the loop SPS.
With --gradient-steps N [N ...] (dqn_pruned.py; replay ratios above 1): instead, per method and N, gradient steps/s of
a training event of N steps, N batches sampled and one jitted update call (learn), and of the call alone (update),
N rotated round by round over --repeats rounds of --calls calls (medians); a table, no runs.
"""

import argparse
import ast
import contextlib
import dataclasses
import importlib
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import jax
import numpy as np
import optax
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, from anywhere


def rate(function, count: int) -> float:
    """Calls per second of function() over `count` calls (its result waited for), after one that compiles it."""
    jax.block_until_ready(function())
    start = time.perf_counter()
    for _ in range(count):
        jax.block_until_ready(function())
    return count / (time.perf_counter() - start)


def build(dqn, args) -> SimpleNamespace:
    """The pieces of dqn_pruned.py (the module `dqn`) as its main() builds them: env, host rng, train state, mask
    targets, the jitted update, the greedy action, the replay buffer, filled with --learning-starts random steps, and
    the rates of env.step and ReplayBuffer.add while it filled (env, store: steps/s)."""
    env, is_atari = dqn.make_env(args.env_id)
    stack, shape, dtype = 4 if is_atari else 1, env.observation_space.shape, env.observation_space.dtype
    rng, mask_rng = np.random.default_rng(args.seed), np.random.default_rng([args.seed, 1])
    init_key, train_key = jax.random.split(jax.random.PRNGKey(args.seed))
    n = env.action_space.n
    network = dqn.QNetwork(n, args.network, args.width_scale, args.scale_dense, args.use_bias, args.use_output_bias)
    params = jax.jit(network.init)(init_key, np.zeros((1, *shape, stack), dtype))["params"]
    tx = optax.adam(args.learning_rate, eps=args.adam_eps)
    state, targets = dqn.init_train_state(args, params, tx, mask_rng, train_key)
    update = dqn.make_update(dqn.make_loss(network), tx, args.pruning_method)
    q_fn = dqn.make_q_fn(network)
    greedy_action = jax.jit(lambda params, obs, step: q_fn(params, obs[None], None).argmax(-1)[0])
    rb = dqn.ReplayBuffer(args.buffer_size, shape, dtype, stack, args.n_step, args.gamma)

    frame, _ = env.reset(seed=0)
    env_time = store_time = 0.0
    for _ in range(args.learning_starts):
        start = time.perf_counter()
        next_frame, _, terminated, truncated, _ = env.step(int(rng.integers(n)))
        middle = time.perf_counter()
        rb.add(frame, 0, 0.0, terminated, truncated, next_frame)
        env_time, store_time = env_time + middle - start, store_time + time.perf_counter() - middle
        frame = env.reset()[0] if terminated or truncated else next_frame
    rates = {"env": args.learning_starts / env_time, "store": args.learning_starts / store_time}
    pieces = dict(state=state, targets=targets, update=update, greedy_action=greedy_action, rb=rb, rng=rng)
    return SimpleNamespace(**pieces, frame=frame, stack=stack, rates=rates)


def measure_pieces(dqn, args, calls: int) -> dict:
    """Env, store, act, sample, learn and the mask update of dqn_pruned.py (the module `dqn`), each timed on its own
    on pieces built as its main() builds them (build)."""
    built = build(dqn, args)
    state, targets, update, rb, rng, frame = built.state, built.targets, built.update, built.rb, built.rng, built.frame
    greedy_action, stack, pieces = built.greedy_action, built.stack, dict(built.rates)

    pieces["act"] = rate(lambda: greedy_action(state.params, np.stack([frame] * stack, axis=-1), 0), calls)
    pieces["sample"] = rate(lambda: rb.sample(rng, args.batch_size), calls)
    window = dqn.prune_window(args)
    counts = dqn.mask_update_counts(args, state.masks, targets, window[0], window)  # a mask update at the start
    pruned = args.pruning_method in ("gmp", "rigl", "set")

    def learn(step_counts=None):  # one gradient step (a batch sampled, the update), from the same state each time
        return update(state, (rb.sample(rng, args.batch_size),), (step_counts,))

    pieces["learn"] = rate(learn, calls)
    pieces["update"] = 1.0 / max(1 / pieces["learn"] - 1 / pieces["sample"], 1e-9)
    few = max(calls // 20, 3)  # steps with a mask update against as many without
    pieces["mask"] = max(1000 / rate(lambda: learn(counts), few) - 1000 / rate(learn, few), 0.0) if pruned else 0.0
    seconds = sum(1 / pieces[k] for k in ("env", "store", "act")) + 1 / (pieces["learn"] * args.train_frequency)
    pieces["bound"] = 1 / seconds  # env steps/s if nothing overlapped
    return pieces


def measure_gradient_steps(dqn, args, ns: list, calls: int, repeats: int) -> list:
    """One row per N in `ns`: gradient steps per second of a training event of N steps (--gradient-steps N: N replay
    batches sampled, then one jitted update call; no mask update), with the sampling (learn) and without it (update:
    the call alone on N fixed batches). Medians over `repeats` rounds, the order of N rotated each round."""
    built = build(dqn, args)
    state, update, rb, rng = built.state, built.update, built.rb, built.rng
    runs = {n: [] for n in ns}
    for repeat in range(repeats):
        for n in ns[repeat % len(ns) :] + ns[: repeat % len(ns)]:
            fixed, none = tuple(rb.sample(rng, args.batch_size) for _ in range(n)), (None,) * n
            learn = rate(lambda: update(state, tuple(rb.sample(rng, args.batch_size) for _ in range(n)), none), calls)
            runs[n].append({"learn": n * learn, "update": n * rate(lambda: update(state, fixed, none), calls)})
    rows = [
        {"n": n, **{k: float(np.median([r[k] for r in rs])) for k in ("learn", "update")}} for n, rs in runs.items()
    ]
    for row in rows:
        row["vs_one"] = row["update"] / rows[0]["update"]
    return rows


def mask_updates(module, args, grad_steps) -> int:
    """Mask updates among gradient steps `grad_steps` (a range) of a run with these args."""
    t_start, t_end, frequency = module.prune_window(args)
    return sum(module.is_mask_update_step(args.pruning_method, c, t_start, t_end, frequency) for c in grad_steps)


def paper_rate(module, args) -> float:
    """Mask updates per gradient step in the paper's run (10M env steps, 20k learning starts, a step every 4)."""
    if args.pruning_method not in ("gmp", "rigl", "set"):
        return 0.0
    paper = dataclasses.replace(args, total_timesteps=10_000_000, learning_starts=20_000, train_frequency=4)
    t_start, t_end, frequency = module.prune_window(paper)
    count = len(range(t_start, t_end + 1, frequency)) + ((t_end - t_start) % frequency != 0)  # t_end forced
    return count / module.num_grad_steps(paper.total_timesteps, paper.learning_starts, paper.train_frequency)


def loop_sps(run_dir: str, after: int) -> float:
    """Env steps per second of the loop's logged windows that start at env step `after` or later."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload().Scalars("charts/SPS")
    ends = [e.step + 1 for e in events]  # a window ends after env step e.step
    windows = [(end - begin, e.value) for begin, end, e in zip([0] + ends, ends, events) if begin >= after]
    if not windows:
        raise ValueError("no logged window after the warm-up: raise --loop-steps")
    return sum(n for n, _ in windows) / sum(n / sps for n, sps in windows)


def run_once(module, flags: dict, method: str, warmup_steps: int, loop_steps: int, calls: int) -> dict:
    """One row: the pieces (dqn_pruned.py), then the script's main() on the same config, its loop's SPS."""
    total = flags["learning_starts"] + warmup_steps + loop_steps
    fixed = {"total_timesteps": total, "log_frequency": warmup_steps, "start_e": 0.01, "end_e": 0.01}
    args = module.Args(**flags, **fixed, pruning_method=method, exp_name=f"bench_{method}")
    row = measure_pieces(module, args, calls) if module.__name__ == "dqn_pruned" else {}
    timed_from = -(-(args.learning_starts + warmup_steps) // warmup_steps) * warmup_steps  # a log window's start
    row["loop"] = loop_sps(module.main(args)["run_dir"], timed_from)
    if "mask" in row:  # the timed window's mask updates, swapped for the paper's rate of them
        steps = [module.num_grad_steps(t, args.learning_starts, args.train_frequency) for t in (timed_from, total)]
        swapped = paper_rate(module, args) * (steps[1] - steps[0]) - mask_updates(module, args, range(*steps))
        row["paper"] = (total - timed_from) / ((total - timed_from) / row["loop"] + swapped * row["mask"] / 1000)
    return row


def benchmark(module, flags: dict, methods: list, loop_steps: int, warmup_steps: int, calls: int, repeats: int) -> list:
    """One row per method: medians over `repeats` interleaved runs, the ratio to dense, the 10M-step projection."""
    runs = {method: [] for method in methods}
    with tempfile.TemporaryDirectory(prefix="throughput_") as workdir, contextlib.chdir(workdir):  # the runs go there
        for repeat in range(repeats):
            for method in methods[repeat % len(methods) :] + methods[: repeat % len(methods)]:  # a new order each time
                runs[method].append(run_once(module, flags, method, warmup_steps, loop_steps, calls))
    rows = [{"method": m, **{key: float(np.median([r[key] for r in rs])) for key in rs[0]}} for m, rs in runs.items()]
    dense = next((r.get("paper", r["loop"]) for r in rows if r["method"] == "none"), None)
    for row in rows:
        row["vs_dense"] = dense / row.get("paper", row["loop"]) if dense else float("nan")
        row["projected_hours"] = 10_000_000 / row.get("paper", row["loop"]) / 3600
    return rows


def print_table(rows: list, title: str) -> None:
    def cell(row: dict, key: str, spec: str, unit: str = "") -> str:
        return format(row[key], spec) + unit if key in row else "n/a"

    print(title)
    print(
        "| method | env steps/s | store/s | act/s | sample/s | learn steps/s | update steps/s | mask update "
        "| bound SPS | loop SPS | loop / bound | paper-rate SPS | wall-clock vs dense | 10M env steps |"
    )
    print("|---" * 14 + "|")
    for r in rows:
        cells = [cell(r, key, ",.0f") for key in ("env", "store", "act", "sample")]
        cells += [cell(r, key, ",.1f") for key in ("learn", "update")] + [cell(r, "mask", ",.0f", " ms")]
        cells += [cell(r, "bound", ",.1f"), f"{r['loop']:,.1f}"]
        cells += [f"{r['loop'] / r['bound']:.2f}" if "bound" in r else "n/a", cell(r, "paper", ",.1f")]
        print(f"| {r['method']} | " + " | ".join(cells) + f" | {r['vs_dense']:.3f} | {r['projected_hours']:.1f} h |")


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--script", default="dqn_pruned.py", help="dqn_pruned.py (every figure), rainbow/iqn/miqn_pruned.py (the loop)")
    add("--env-id", default="ALE/Breakout-v5")
    add("--network", default="cnn", choices=["resnet", "cnn", "nature", "mlp"], help="the script's --network")
    add("--width-scale", type=int, default=1)
    add("--batch-size", type=int, default=32)
    add("--train-frequency", type=int, default=4, help="env steps per gradient step (4: replay ratio 0.25)")
    add("--methods", nargs="+", default=["none", "gmp", "rigl", "set", "static"], help="pruning methods, none first")
    add("--learning-starts", type=int, default=2000, help="random steps that fill the buffer (and time env, store)")
    add("--warmup-steps", type=int, default=500, help="loop steps after learning starts left out (also the log window)")
    add("--loop-steps", type=int, default=3000, help="loop steps timed")
    add("--calls", type=int, default=200, help="calls timed for act and learn")
    add("--buffer-size", type=int, default=100_000)
    add("--repeats", type=int, default=1, help="runs of each method, interleaved; the table shows medians")
    add("--extra", nargs="*", default=[], help="more Args fields as name=value (e.g. num_tau_samples=8 use_bias=False)")
    add("--gradient-steps", type=int, nargs="+", dest="per_call", help="instead: gradient steps/s at N per call (dqn)")
    args = parser.parse_args(argv)
    if args.loop_steps < args.warmup_steps or args.loop_steps % args.warmup_steps:
        parser.error("--loop-steps must be a multiple of --warmup-steps (the log window)")
    if min(args.learning_starts, args.warmup_steps, args.calls, args.repeats, *(args.per_call or [1])) < 1:
        parser.error("--learning-starts, --warmup-steps, --calls, --repeats and --gradient-steps must be >= 1")
    module = importlib.import_module(os.path.basename(args.script)[: -len(".py")])
    fields = {f.name for f in dataclasses.fields(module.Args)}
    flags = {name: value for name, value in vars(args).items() if name in fields}  # --env-id ... --buffer-size
    for item in args.extra:
        name, _, value = item.partition("=")
        if name not in fields:
            parser.error(f"--extra {item}: {args.script} has no field {name!r}")
        try:
            flags[name] = ast.literal_eval(value)  # numbers, True/False, None
        except (ValueError, SyntaxError):
            flags[name] = value  # a string

    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    title = f"{args.script} on {args.env_id}, {args.network} k={args.width_scale}, batch {args.batch_size}, "
    if args.per_call:  # the replay-ratio table: one jitted call per training event of N gradient steps
        if module.__name__ != "dqn_pruned":
            parser.error("--gradient-steps times dqn_pruned.py's pieces only")
        rows = []
        for method in args.methods:
            method_args = module.Args(**flags, pruning_method=method)
            for row in measure_gradient_steps(module, method_args, args.per_call, args.calls, args.repeats):
                rows.append({"method": method, **row})
        print(title + f"N gradient steps per jitted call; {device}")
        print("| method | N | learn steps/s | update steps/s | update / N = 1 |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['n']} | {r['learn']:,.1f} | {r['update']:,.1f} | {r['vs_one']:.2f} |")
        return rows
    rows = benchmark(module, flags, args.methods, args.loop_steps, args.warmup_steps, args.calls, args.repeats)
    print_table(rows, title + f"a gradient step every {args.train_frequency} env steps; {device}")
    return rows


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache:  # from the command line: set before any compile
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        main()
