"""Where the training loop's time goes, dense and pruned: python benchmarks/throughput.py [--script dqn_pruned.py] ...

For each pruning method, in this one process, one run of the script's own main() on the same config (its
train_online is wrapped, so every piece measured is the script's own: env, buffer, acting, learning):
    env        env.step with random actions, steps/s (filling the replay buffer for what follows)
    store      ReplayBuffer.add, transitions/s
    act        the jitted greedy action at batch 1 (one forward pass), calls/s
    sample     a replay batch drawn and its frame stacks rebuilt (host work inside learn), batches/s
    learn      one gradient step: a replay batch sampled and the jitted update (Rainbow: and its priorities written
               back), steps/s
    update     the rest of a gradient step: 1 / (1/learn - 1/sample), steps/s (the jitted update; in Rainbow also the
               priorities written back)
    mask       the extra time of a gradient step that also updates the masks (gmp: top-k of every layer; rigl/set:
               drop and regrow), ms
    bound      the loop's bound from the above: 1 / (1/env + 1/store + 1/act + 1/(learn * train_frequency)) env steps/s
    loop       the real loop's SPS after learning starts (the first --warmup-steps left out), with acting greedy
               (epsilon 0.01) as late in a run
    paper      the loop's SPS with its mask updates at the paper's rate instead of this short run's: a short run's
               pruning window (20%-80% of its gradient steps, plus the update forced at its end) packs them several
               times denser than a 10M-step run (GMP: 1,501 in 2,495,000 gradient steps), so the measured mask time of
               the timed window's updates is swapped for the paper's rate times its gradient steps
and the wall-clock ratio of each method's paper-rate loop to dense (none), the median over --repeats runs of each
method, interleaved, the order rotated each time (none, gmp, ..., static; gmp, ..., static, none; ...). Every jitted function is compiled before it is timed (also the
mask-update step). The 10M-env-step projection is the paper's run (40M frames) at the paper-rate SPS.
"""
import argparse
import ast
import dataclasses
import importlib
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, from anywhere


def rate(function, count: int) -> float:
    """Calls per second of function() over `count` calls (its result waited for)."""
    start = time.perf_counter()
    for _ in range(count):
        jax.block_until_ready(function())
    return count / (time.perf_counter() - start)


def measure_pieces(module, args, env, is_atari, state, targets, rb, rng, learn, greedy_action, calls: int) -> dict:
    """Env, store, act, sample+update and update alone, each timed on its own; the buffer is filled on the way."""
    stack = 4 if is_atari else 1
    frame, _ = env.reset(seed=0)
    obs = np.stack([frame] * stack, axis=-1)
    env_time = store_time = 0.0
    for _ in range(args.learning_starts):
        start = time.perf_counter()
        next_frame, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        middle = time.perf_counter()
        rb.add(frame, 0, 0.0, terminated, truncated, next_frame)
        store_time += time.perf_counter() - middle
        env_time += middle - start
        frame = env.reset()[0] if terminated or truncated else next_frame
    pieces = {"env": args.learning_starts / env_time, "store": args.learning_starts / store_time}

    jax.block_until_ready(greedy_action(state.params, obs, 0))  # compile
    pieces["act"] = rate(lambda: greedy_action(state.params, obs, 0), calls)

    # compile the update, with and without a mask update, on a throwaway copy of the train state
    t_start, t_end, _ = module.prune_window(args)
    counts = module.mask_update_counts(args.pruning_method, state.masks, targets, t_start, t_start, t_end, args.drop_fraction)
    for step_counts in ((counts, None) if args.pruning_method in ("gmp", "rigl", "set") else (None,)):
        jax.block_until_ready(learn(state, step_counts))
    pieces["sample"] = rate(lambda: rb.sample(rng, args.batch_size), calls)
    current = [state]

    def gradient_step():
        current[0] = learn(current[0], None)[0]
        return current[0]

    pieces["learn"] = rate(gradient_step, calls)
    pieces["mask"] = 0.0
    if args.pruning_method in ("gmp", "rigl", "set"):  # the same steps again with mask updates (at the window's start)
        with_mask = rate(lambda: learn(current[0], counts)[0], max(calls // 20, 3))
        pieces["mask"] = max(1000 / with_mask - 1000 / rate(lambda: learn(current[0], None)[0], max(calls // 20, 3)), 0.0)
    return pieces


def mask_updates(module, args, grad_steps) -> int:
    """Mask updates among gradient steps `grad_steps` (a range) of a run with these args."""
    t_start, t_end, frequency = module.prune_window(args)
    return sum(module.is_mask_update_step(args.pruning_method, c, t_start, t_end, frequency) for c in grad_steps)


def paper_rate(module, args) -> float:
    """Mask updates per gradient step in the paper's run (10M env steps, 20k learning starts, a step every 4)."""
    paper = dataclasses.replace(args, total_timesteps=10_000_000, learning_starts=20_000, train_frequency=4)
    total = module.num_grad_steps(paper.total_timesteps, paper.learning_starts, paper.train_frequency)
    t_start, t_end, frequency = module.prune_window(paper)
    count = len(range(t_start, t_end + 1, frequency)) + ((t_end - t_start) % frequency != 0)
    return count / total if args.pruning_method in ("gmp", "rigl", "set") else 0.0


def benchmark(module, flags: dict, methods: list, loop_steps: int, warmup_steps: int, calls: int, repeats: int) -> list:
    """One row per method of the script `module`: the median over `repeats` interleaved runs of the pieces' rates,
    the bound and the loop's SPS."""
    real_train_online = module.train_online
    runs = {method: [] for method in methods}
    workdir = tempfile.mkdtemp(prefix="throughput_")
    cwd = os.getcwd()
    os.chdir(workdir)  # run directories go to a scratch directory
    try:
        for repeat in range(repeats):
            for method in methods[repeat % len(methods):] + methods[: repeat % len(methods)]:  # a new order each time
                args = module.Args(**{**flags, "pruning_method": method, "exp_name": f"bench_{method}",
                                      "total_timesteps": flags["learning_starts"] + warmup_steps + loop_steps,
                                      "log_frequency": warmup_steps, "start_e": 0.01, "end_e": 0.01})
                row = {"method": method}

                def measured_train_online(args, env, is_atari, state, targets, rb, rng, learn, greedy_action, analysis):
                    row.update(measure_pieces(module, args, env, is_atari, state, targets, rb, rng, learn, greedy_action, calls))
                    return real_train_online(args, env, is_atari, state, targets, rb, rng, learn, greedy_action, analysis)

                module.train_online = measured_train_online
                try:
                    result = module.main(args)
                finally:
                    module.train_online = real_train_online
                timed_from = args.learning_starts + warmup_steps
                row["loop"] = loop_sps(result["run_dir"], timed_from)
                row["update"] = 1.0 / max(1 / row["learn"] - 1 / row["sample"], 1e-9)
                row["bound"] = 1.0 / (1 / row["env"] + 1 / row["store"] + 1 / row["act"] + 1 / (row["learn"] * args.train_frequency))
                # the timed window's mask updates, swapped for the paper's rate of them
                first = module.num_grad_steps(timed_from, args.learning_starts, args.train_frequency)
                last = module.num_grad_steps(args.total_timesteps, args.learning_starts, args.train_frequency)
                seconds = loop_steps / row["loop"] + (paper_rate(module, args) * (last - first) - mask_updates(module, args, range(first, last))) * row["mask"] / 1000
                row["paper"] = loop_steps / seconds
                runs[method].append(row)
    finally:
        os.chdir(cwd)
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [{"method": method, **{key: float(np.median([r[key] for r in rs])) for key in rs[0] if key != "method"}} for method, rs in runs.items()]
    dense = next((r["paper"] for r in rows if r["method"] == "none"), None)
    for row in rows:
        row["vs_dense"] = dense / row["paper"] if dense else float("nan")
        row["projected_hours"] = 10_000_000 / row["paper"] / 3600
    return rows


def loop_sps(run_dir: str, after: int) -> float:
    """Env steps per second of the loop's logged windows that start at env step `after` or later."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    events = accumulator.Scalars("charts/SPS")
    steps = [e.step + 1 for e in events]  # a window ends after env step e.step
    windows = [(end - begin, sps) for begin, end, sps in zip([0] + steps, steps, [e.value for e in events]) if begin >= after]
    if not windows:
        raise ValueError("no logged window after the warm-up: raise --loop-steps")
    return sum(n for n, _ in windows) / sum(n / sps for n, sps in windows)


def print_table(rows: list, title: str) -> None:
    print(title)
    print("| method | env steps/s | store/s | act/s | sample/s | learn steps/s | update steps/s | mask update | bound SPS | loop SPS | "
          "loop / bound | paper-rate SPS | wall-clock vs dense | 10M env steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['env']:,.0f} | {r['store']:,.0f} | {r['act']:,.0f} | {r['sample']:,.0f} | {r['learn']:,.1f} | {r['update']:,.1f} | "
              f"{r['mask']:,.0f} ms | {r['bound']:,.1f} | {r['loop']:,.1f} | {r['loop'] / r['bound']:.2f} | {r['paper']:,.1f} | "
              f"{r['vs_dense']:.3f} | {r['projected_hours']:.1f} h |")


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", default="dqn_pruned.py", help="an online agent: dqn_pruned.py, rainbow_pruned.py, iqn_pruned.py, miqn_pruned.py")
    parser.add_argument("--env-id", default="ALE/Breakout-v5")
    parser.add_argument("--network", default="cnn", choices=["resnet", "cnn", "nature", "mlp"], help="the script's --network")
    parser.add_argument("--width-scale", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-frequency", type=int, default=4, help="env steps per gradient step (4: replay ratio 0.25)")
    parser.add_argument("--methods", nargs="+", default=["none", "gmp", "rigl", "set", "static"], help="pruning methods, dense (none) first")
    parser.add_argument("--learning-starts", type=int, default=2000, help="random steps that fill the buffer (and time env and store)")
    parser.add_argument("--warmup-steps", type=int, default=500, help="loop steps after learning starts left out of its SPS (also the log window)")
    parser.add_argument("--loop-steps", type=int, default=3000, help="loop steps timed")
    parser.add_argument("--calls", type=int, default=200, help="calls timed for act and learn")
    parser.add_argument("--buffer-size", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method, interleaved; the table shows medians")
    parser.add_argument("--extra", nargs="*", default=[], help="more Args fields as name=value (e.g. num_tau_samples=8 use_bias=False)")
    args = parser.parse_args(argv)
    if args.loop_steps < args.warmup_steps or args.loop_steps % args.warmup_steps:
        parser.error("--loop-steps must be a multiple of --warmup-steps (the log window)")
    if min(args.learning_starts, args.warmup_steps, args.calls, args.repeats) < 1:
        parser.error("--learning-starts, --warmup-steps, --calls and --repeats must be >= 1")
    flags = {"env_id": args.env_id, "network": args.network, "width_scale": args.width_scale, "batch_size": args.batch_size,
             "train_frequency": args.train_frequency, "learning_starts": args.learning_starts, "buffer_size": args.buffer_size}
    module = importlib.import_module(os.path.basename(args.script)[: -len(".py")])
    names = {f.name for f in dataclasses.fields(module.Args)}
    for item in args.extra:
        name, _, value = item.partition("=")
        if name not in names:
            parser.error(f"--extra {item}: {args.script} has no field {name!r}")
        try:
            flags[name] = ast.literal_eval(value)  # numbers, True/False, None
        except (ValueError, SyntaxError):
            flags[name] = value  # a string

    rows = benchmark(module, flags, args.methods, args.loop_steps, args.warmup_steps, args.calls, args.repeats)
    print_table(rows, f"{args.script} on {args.env_id}, {args.network} k={args.width_scale}, batch {args.batch_size}, "
                      f"a gradient step every {args.train_frequency} env steps; {jax.devices()[0].device_kind} ({jax.default_backend()})")
    return rows


if __name__ == "__main__":
    main()
