"""From runs/ to the paper's figures: python -m common.plot RUNS_DIR --out FIGURES_DIR

Reads every run directory below RUNS_DIR (a directory with a config.json, as every *_pruned.py writes), groups the
runs by what their config says (script, with --c51 apart, network, env, pruning method, with --dense-warmup apart as
"rigl+warmup", sparsity, width, replay ratio, seed; never by parsing names), and writes to FIGURES_DIR:
    curves_{suite}.png             IQM learning curves with 95% CI bands, one panel per script
    iqm_vs_sparsity_{suite}.png    final IQM against sparsity, one line per (script, method, width, replay ratio); dense
                                   at 0
    iqm_vs_width_{suite}.png       final IQM against width, one line per (script, method, sparsity, replay ratio); dense
                                   included
    iqm_vs_replay_ratio_{suite}.png  final IQM against the replay ratio (gradient steps per env step), one line per
                                   (script, method, sparsity, width); only for a suite with more than one ratio
    aggregates.csv                 the final IQM and its CI for every configuration and suite
    curves.csv                     the learning curves' points

A suite is what is aggregated together: all ALE/{Game}-v5 runs, as human-normalized scores (HNS, common/atari_scores.py;
--score-table dopamine, the default: Dopamine's random and human scores, which the paper's IQMs use; dqn_zoo: DQN
Zoo's), or one classic-control env, as raw returns. A run's score at a point is the mean return over one of --points
equal slices of the run (the online scripts' training returns, charts/episodic_return, as in the paper; cql_pruned.py's
evaluation returns, eval/episodic_return); its final score is that of the last slice (with --points 40 and the
paper's 10M env steps, the last iteration: "IQM after 40M frames"). Empty slices take the previous slice's value.
Skipped, with a line saying why: runs with no return in their last slice (unfinished), a second run of one
configuration, game and seed, and Atari games without a human score in the table.

Aggregates follow Agarwal et al. (2021) with rliable: IQM over the (runs x games) matrix of scores, 95% CIs from the
stratified percentile bootstrap (runs resampled within each game; --reps 50,000 as in rliable, --curve-reps for the
curves), NumPy's global generator seeded with --seed before each. A configuration needs the same number of seeds in
every game: where the counts differ,
the lowest seeds are kept. The matrix's rows are the seeds in increasing order, its columns the games in name order.
"""

import argparse
import csv
import json
import math
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from common import atari_scores


def find_runs(runs_dir: str) -> list:
    """Every directory below runs_dir that holds a config.json, in sorted order."""
    found = []
    for directory, _, files in sorted(os.walk(runs_dir)):
        if "config.json" in files:
            found.append(directory)
    return sorted(found)


def read_returns(run_dir: str, offline: bool) -> tuple:
    """(tag, [(step, value), ...]) of the run's scored returns: an offline run's evaluations (eval/episodic_return;
    charts/eval_return in runs written before the online agents evaluated), an online run's training returns
    (charts/episodic_return, as the paper's figures; its evaluations are not read)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    for tag in ("eval/episodic_return", "charts/eval_return") if offline else ("charts/episodic_return",):
        if tag in tags:
            return tag, [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return None, []


def run_length(config: dict) -> int:
    """Steps of the run on its x-axis: env steps (online scripts) or gradient steps (cql_pruned.py)."""
    if "num_iterations" in config:
        return config["num_iterations"] * config["grad_steps_per_iteration"]
    return config["total_timesteps"]


def sliced_scores(returns: list, length: int, points: int) -> np.ndarray:
    """(points,) mean return in each of `points` equal slices of the run; `returns` are (steps done when it was
    logged - 1, return) pairs in [0, length). An empty slice takes the previous value (the first non-empty one's, for
    leading empty slices). NaN everywhere if there are no returns."""
    sums, counts = np.zeros(points), np.zeros(points)
    for step, value in returns:
        i = min(max(int(step * points // max(length, 1)), 0), points - 1)
        sums[i], counts[i] = sums[i] + value, counts[i] + 1
    scores = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    filled = np.flatnonzero(counts)
    if len(filled) == 0:
        return scores
    for i in range(points):
        if counts[i] == 0:
            scores[i] = scores[i - 1] if i > filled[0] else scores[filled[0]]
    return scores


def load_runs(runs_dir: str, points: int, table: str = "dopamine") -> list:
    """One record per usable run: its grouping keys, suite, task and (points,) scores, normalized by
    atari_scores.TABLES[table] for Atari games."""
    records = []
    for run_dir in find_runs(runs_dir):
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
        offline = "num_iterations" in config
        tag, returns = read_returns(run_dir, offline)
        if not returns:
            print(f"skipped {run_dir}: no returns logged")
            continue
        if offline:  # logged at the gradient steps done (k * iteration), the online returns at the step's index
            returns = [(step - 1, value) for step, value in returns]
        length = run_length(config)
        if max(step for step, _ in returns) < length * (points - 1) / points:
            print(f"skipped {run_dir}: unfinished (no return in its last slice)")
            continue
        game = atari_scores.game_of(config["env_id"])
        scores = sliced_scores(returns, length, points)
        if game is not None:
            if game not in atari_scores.TABLES[table]:
                print(f"skipped {run_dir}: {game} has no human score in the {table} table")
                continue
            scores = atari_scores.human_normalized(game, scores, table)
        method = config["pruning_method"] + ("+warmup" if config.get("dense_warmup") else "")  # dense until t_start
        replay_ratio = config.get("replay_ratio")  # None in offline runs
        if (
            replay_ratio is None and "train_frequency" in config
        ):  # online runs before --gradient-steps: a step per event
            replay_ratio = 1 / config["train_frequency"]
        records.append(
            {
                "run_dir": run_dir,
                "suite": "atari" if game is not None else config["env_id"],
                "task": config["env_id"],
                "script": config.get("script", config["exp_name"]) + (" --c51" if config.get("c51") else ""),
                "network": config["network"],
                "pruning_method": method,
                "sparsity": 0.0 if method == "none" else float(config["sparsity"]),
                "width": int(config["width_scale"]),
                "replay_ratio": replay_ratio,
                "seed": int(config["seed"]),
                "tag": tag,
                "length": length,
                "scores": scores,
            }
        )
    return records


CONFIG_KEYS = ("script", "network", "pruning_method", "sparsity", "width", "replay_ratio")


def score_matrices(records: list) -> dict:
    """{(suite, config): (runs, tasks, points) array, tasks, steps}: seeds in increasing order (the lowest ones, as many
    as every task has), tasks in name order."""
    groups = defaultdict(lambda: defaultdict(dict))
    for r in records:
        runs = groups[(r["suite"], tuple(r[k] for k in CONFIG_KEYS))][r["task"]]
        if r["seed"] in runs:
            print(
                f"skipped {r['run_dir']}: a second run of {r['task']}, seed {r['seed']}, with the configuration of "
                f"{runs[r['seed']]['run_dir']}"
            )
            continue
        runs[r["seed"]] = r
    matrices = {}
    for key, by_task in groups.items():
        tasks = sorted(by_task)
        runs = min(len(by_task[t]) for t in tasks)
        columns = [
            [by_task[t][seed]["scores"] for seed in sorted(by_task[t])[:runs]] for t in tasks
        ]  # (tasks, runs, points)
        length = max(r["length"] for t in tasks for r in by_task[t].values())
        matrices[key] = (np.transpose(np.array(columns), (1, 0, 2)), tasks, length)
    return matrices


def iqm_with_ci(scores: np.ndarray, reps: int, seed: int) -> tuple:
    """(IQM, lower, upper) per point of (runs, tasks, points) scores: rliable's aggregate_iqm and its stratified
    percentile bootstrap 95% CI. Each returned array has shape (points,)."""
    from rliable import library as rly
    from rliable import metrics

    def iqm(x):  # (runs, tasks, points) -> (points,)
        return np.array([metrics.aggregate_iqm(x[..., t]) for t in range(x.shape[-1])])

    # rliable's StratifiedBootstrap draws its resamples from NumPy's global generator (the random_state it takes never
    # reaches update_indices), so that generator is what must be seeded for the same CI twice
    np.random.seed(seed)
    point, interval = rly.get_interval_estimates({"x": scores}, iqm, reps=reps)
    return point["x"], interval["x"][0], interval["x"][1]


def label(config: tuple) -> str:
    script, network, method, sparsity, width, replay_ratio = config
    text = f"{script} {network} {method}" + ("" if method == "none" else f" {sparsity:g}") + f" k={width}"
    return text + ("" if replay_ratio is None else f" rr={replay_ratio:g}")


def suite_name(suite: str) -> str:
    return suite.replace("/", "_")


def plot_curves(suite: str, results: dict, points: int, out_dir: str, score: str) -> str:
    """Learning curves: IQM against the fraction of the run, with the CI band, one panel per script."""
    scripts = sorted({config[0] for config in results})
    fig, axes = plt.subplots(1, len(scripts), figsize=(5 * len(scripts), 3.6), squeeze=False)
    for ax, script in zip(axes[0], scripts):
        for config, r in sorted(results.items()):
            if config[0] != script:
                continue
            x = (np.arange(points) + 1) / points * r["length"]
            ax.plot(x, r["curve"][0], label=label(config)[len(script) + 1 :])  # the panel names the script
            ax.fill_between(x, r["curve"][1], r["curve"][2], alpha=0.2)
        ax.set_title(script)
        ax.set_xlabel("steps (end of slice)")
        ax.set_ylabel(f"IQM {score}")
        ax.legend(fontsize=7)
    return save(fig, os.path.join(out_dir, f"curves_{suite_name(suite)}.png"))


def plot_final_against(suite: str, results: dict, x_key: str, out_dir: str, score: str) -> str:
    """Final IQM with its CI against sparsity (x_key 'sparsity': one line per script, method and width; dense is a
    point at sparsity 0), against width (x_key 'width': one line per script, method and sparsity, dense included) or
    against the replay ratio (x_key 'replay_ratio'); every line also holds the other keys fixed."""
    x_index = CONFIG_KEYS.index(x_key)
    lines = defaultdict(list)
    for config, r in results.items():
        lines[tuple(v for i, v in enumerate(config) if i != x_index)].append((config[x_index], r["final"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    for line, values in sorted(lines.items()):
        values.sort()
        x = np.array([v[0] for v in values], float)
        y = np.array([v[1] for v in values])  # (n, 3): iqm, lower, upper
        ax.errorbar(
            x,
            y[:, 0],
            yerr=[y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]],
            marker="o",
            capsize=3,
            label=" ".join(
                f"{k}={v:g}" if k in ("width", "sparsity", "replay_ratio") else str(v)
                for k, v in zip([k for k in CONFIG_KEYS if k != x_key], line)
                if v is not None
            ),
        )
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"final IQM {score}")
    ax.legend(fontsize=7)
    return save(fig, os.path.join(out_dir, f"iqm_vs_{x_key}_{suite_name(suite)}.png"))


def save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    """Writes the figures and CSVs; returns {"written": [paths], "results": {(suite, config): {...}}}."""
    parser = argparse.ArgumentParser(prog="python -m common.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="directory holding run directories (each with config.json and event files)")
    parser.add_argument("--out", required=True, help="directory to write the PNGs and CSVs to")
    parser.add_argument(
        "--points", type=int, default=40, help="slices of each run: points of the curves; the last is the final score"
    )
    parser.add_argument(
        "--reps", type=int, default=50_000, help="bootstrap resamples of the final IQM's CI (rliable's default)"
    )
    parser.add_argument("--curve-reps", type=int, default=2_000, help="bootstrap resamples of the curves' CIs")
    parser.add_argument("--seed", type=int, default=0, help="random state of the bootstraps")
    parser.add_argument(
        "--score-table",
        default="dopamine",
        choices=sorted(atari_scores.TABLES),
        help="random and human Atari scores: Dopamine's (the paper's IQMs) or DQN Zoo's (common/atari_scores.py)",
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs_dir):
        parser.error(f"{args.runs_dir} is not a directory")
    if args.points < 1 or args.reps < 1 or args.curve_reps < 1:
        parser.error("--points, --reps and --curve-reps must be >= 1")
    records = load_runs(args.runs_dir, args.points, args.score_table)
    if not records:
        parser.error(f"no runs with logged returns below {args.runs_dir}")
    os.makedirs(args.out, exist_ok=True)

    results = {}
    for (suite, config), (scores, tasks, length) in sorted(score_matrices(records).items()):
        final = iqm_with_ci(scores[..., -1:], args.reps, args.seed)
        results[(suite, config)] = {
            "tasks": tasks,
            "runs": scores.shape[0],
            "length": length,
            "final": tuple(float(v[0]) for v in final),
            "curve": iqm_with_ci(scores, args.curve_reps, args.seed),
        }

    written = []
    with open(os.path.join(args.out, "aggregates.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["suite", *CONFIG_KEYS, "seeds", "tasks", "iqm", "ci_low", "ci_high", "score"])
        for (suite, config), r in sorted(results.items()):
            out.writerow(
                [
                    suite,
                    *config,
                    r["runs"],
                    len(r["tasks"]),
                    *r["final"],
                    f"hns_{args.score_table}" if suite == "atari" else "return",
                ]
            )
    with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["suite", *CONFIG_KEYS, "point", "step", "iqm", "ci_low", "ci_high"])
        for (suite, config), r in sorted(results.items()):
            for i in range(args.points):
                step = math.ceil((i + 1) / args.points * r["length"])
                out.writerow([suite, *config, i, step, *(float(v[i]) for v in r["curve"])])
    written += [os.path.join(args.out, "aggregates.csv"), os.path.join(args.out, "curves.csv")]
    for suite in sorted({s for s, _ in results}):
        in_suite = {config: r for (s, config), r in results.items() if s == suite}
        if len({tuple(r["tasks"]) for r in in_suite.values()}) > 1:
            print(f"warning: the configurations of suite {suite} cover different games; their IQMs are not comparable")
        score = f"human-normalized score ({args.score_table} table)" if suite == "atari" else f"return ({suite})"
        written.append(plot_curves(suite, in_suite, args.points, args.out, score))
        written.append(plot_final_against(suite, in_suite, "sparsity", args.out, score))
        written.append(plot_final_against(suite, in_suite, "width", args.out, score))
        ratios = {config[CONFIG_KEYS.index("replay_ratio")] for config in in_suite} - {None}
        if len(ratios) > 1:  # runs at more than one replay ratio (the paper's Fig. 5 and 17)
            written.append(plot_final_against(suite, in_suite, "replay_ratio", args.out, score))
    for path in written:
        print(f"wrote {path}")
    return {"written": written, "results": results}


if __name__ == "__main__":
    main()
