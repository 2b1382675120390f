"""Resident memory of a full replay buffer: python benchmarks/memory.py [--capacity 1000000] [--script dqn_pruned.py]

Fills the script's own ReplayBuffer (the shared section; Rainbow's prioritized one with --script rainbow_pruned.py) to
`capacity` transitions of synthetic 84x84 uint8 frames, episodes of --episode-length steps (each episode end also stores
its final observation, as the training loop does), and prints the growth of the process's resident memory (VmRSS) and
the bytes per transition. Frames are random, so no page stays untouched. Linux only (reads /proc/self/status).
"""

import argparse
import importlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, from anywhere


def resident_bytes() -> int:
    """VmRSS of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--capacity", type=int, default=1_000_000, help="buffer capacity and transitions stored (1M: Atari's)")
    add(
        "--script",
        default="dqn_pruned.py",
        help="whose ReplayBuffer: dqn_pruned.py (uniform) or rainbow_pruned.py (prioritized)",
    )
    add("--episode-length", type=int, default=1000, help="env steps per synthetic episode")
    args = parser.parse_args(argv)
    if args.capacity < 1 or args.episode_length < 1:
        parser.error("--capacity and --episode-length must be >= 1")
    module = importlib.import_module(os.path.basename(args.script)[: -len(".py")])
    buffer_class = module.PrioritizedReplayBuffer if hasattr(module, "PrioritizedReplayBuffer") else module.ReplayBuffer

    before = resident_bytes()
    start = time.time()
    buffer = buffer_class(args.capacity, (84, 84), np.uint8, 4, module.Args().n_step, 0.99)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (64, 84, 84), dtype=np.uint8)  # a pool of random frames, cycled
    step = 0
    while buffer.count < args.capacity:
        step += 1
        episode_end = step % args.episode_length == 0
        buffer.add(frames[step % 64], int(rng.integers(6)), 0.0, False, episode_end, frames[(step + 1) % 64])
    grown = resident_bytes() - before
    row = {"script": args.script, "capacity": args.capacity, "transitions": step, "seconds": time.time() - start}
    row.update(resident_gb=grown / 1e9, bytes_per_transition=grown / step)
    print("| script | capacity (slots) | transitions stored | resident memory | bytes per transition |")
    print("|---|---|---|---|---|")
    print(f"| {args.script} | {args.capacity:,} | {step:,} | {grown / 1e9:.2f} GB | {grown / step:,.0f} |")
    return row


if __name__ == "__main__":
    main()
