"""common/plot.py on synthetic runs (config.json + TensorBoard event files), against rliable called directly, and
common/atari_scores.py's tables."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from tensorboardX import SummaryWriter

from common import atari_scores, plot

LENGTH = 1000  # env steps of every fake run


def fake_run(
    runs_dir: str,
    script: str,
    env_id: str,
    method: str,
    sparsity: float,
    width: int,
    seed: int,
    returns: list,
    **more_config,
) -> None:
    """A run directory as the scripts write it: config.json, and episodic returns at the given (step, return) pairs."""
    suffix = "".join(f"_{key}{value}" for key, value in more_config.items())
    run_dir = os.path.join(runs_dir, f"{env_id.replace('/', '_')}__{script}__{seed}__{method}{sparsity}{width}{suffix}")
    writer = SummaryWriter(run_dir)
    for step, value in returns:
        writer.add_scalar("charts/episodic_return", value, step)
        writer.add_scalar("charts/SPS", 100.0, step)
    writer.close()
    config = {
        "env_id": env_id,
        "exp_name": "whatever",
        "script": script,
        "network": "cnn",
        "pruning_method": method,
        "sparsity": sparsity,
        "width_scale": width,
        "seed": seed,
        "total_timesteps": LENGTH,
        **more_config,
    }
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)


# (script, method, sparsity, width) -> final return offset, so every configuration scores differently
CONFIGS = {
    ("dqn_pruned.py", "none", 0.95, 1): 0.0,
    ("dqn_pruned.py", "gmp", 0.95, 1): 5.0,
    ("dqn_pruned.py", "gmp", 0.9, 1): 3.0,
    ("dqn_pruned.py", "none", 0.95, 3): -2.0,
    ("dqn_pruned.py", "gmp", 0.95, 3): 8.0,
    ("rainbow_pruned.py", "gmp", 0.95, 1): 1.0,
}
GAMES = {"ALE/Pong-v5": 3, "ALE/Breakout-v5": 4}  # game -> seeds (Breakout's fourth seed is dropped: Pong has 3)


def final_return(game: str, config: tuple, seed: int) -> float:
    return {"ALE/Pong-v5": -20.0, "ALE/Breakout-v5": 2.0}[game] + CONFIGS[config] * (1 + 0.1 * seed) + seed


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    runs_dir = str(tmp_path_factory.mktemp("runs"))
    rng = np.random.default_rng(0)
    for config in CONFIGS:
        for game, seeds in GAMES.items():
            for seed in range(1, seeds + 1):
                early = [
                    (int(s), float(rng.normal(-25.0, 1.0))) for s in rng.integers(0, 900, 20)
                ]  # before the last slice
                last = final_return(game, config, seed)
                fake_run(runs_dir, *config[:1], game, *config[1:], seed, early + [(960, last - 1.0), (990, last + 1.0)])
        for seed in (1, 2):  # a classic-control suite of its own, raw returns
            fake_run(
                runs_dir,
                config[0],
                "CartPole-v1",
                *config[1:],
                seed,
                [(100, 10.0), (995, 100.0 + CONFIGS[config] + seed)],
            )
    os.makedirs(os.path.join(runs_dir, "not_a_run"))  # no config.json: ignored
    return runs_dir


def test_plot_command_writes_figures_and_csv_matching_rliable(runs, tmp_path):
    out = tmp_path / "figures"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "common.plot",
            runs,
            "--out",
            str(out),
            "--points",
            "10",
            "--reps",
            "2000",
            "--curve-reps",
            "200",
            "--seed",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for suite in ("atari", "CartPole-v1"):
        for name in ("curves", "iqm_vs_sparsity", "iqm_vs_width"):
            path = out / f"{name}_{suite}.png"
            assert path.stat().st_size > 5000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with open(out / "aggregates.csv") as f:
        rows = {
            (r["suite"], r["script"], r["pruning_method"], float(r["sparsity"]), int(r["width"])): r
            for r in csv.DictReader(f)
            if r["network"] == "cnn"
        }
    assert len(rows) == 2 * len(CONFIGS)

    from rliable import library as rly
    from rliable import metrics

    for config in CONFIGS:
        # the final score: the mean of the two returns in the last slice (900-999), human-normalized; seeds 1-3 in
        # both games
        scores = np.array(
            [
                [atari_scores.human_normalized(game[4:-3], final_return(game, config, seed)) for game in sorted(GAMES)]
                for seed in (1, 2, 3)
            ]
        )  # (runs, games), games in name order
        np.random.seed(3)  # rliable's bootstrap draws from NumPy's global generator
        point, interval = rly.get_interval_estimates(
            {"x": scores[..., None]}, lambda x: np.array([metrics.aggregate_iqm(x[..., 0])]), reps=2000
        )
        dense_sparsity = 0.0 if config[1] == "none" else config[2]
        row = rows[("atari", config[0], config[1], dense_sparsity, config[3])]
        assert (int(row["seeds"]), int(row["tasks"]), row["score"]) == (3, 2, "hns_dopamine")
        np.testing.assert_allclose(
            [float(row["iqm"]), float(row["ci_low"]), float(row["ci_high"])],
            [point["x"][0], interval["x"][0][0], interval["x"][1][0]],
            rtol=1e-6,
        )  # float32 in the event files
        middle = np.sort(scores.ravel())[1:-1]  # IQM of 6 scores: trim_mean(0.25) drops int(1.5) = 1 at each end
        assert float(row["iqm"]) == pytest.approx(middle.mean(), rel=1e-6)
        cartpole = rows[("CartPole-v1", config[0], config[1], dense_sparsity, config[3])]
        assert float(cartpole["iqm"]) == pytest.approx(100.0 + CONFIGS[config] + 1.5)  # raw returns, mean of seeds 1, 2
    with open(out / "curves.csv") as f:
        curve = [
            r for r in csv.DictReader(f) if r["suite"] == "atari" and r["pruning_method"] == "gmp" and r["width"] == "3"
        ]
    assert [int(r["step"]) for r in curve] == [100 * (i + 1) for i in range(10)]
    assert float(curve[-1]["iqm"]) == pytest.approx(
        float(rows[("atari", "dqn_pruned.py", "gmp", 0.95, 3)]["iqm"]), rel=1e-9
    )


def test_sliced_scores_fill_empty_slices():
    returns = [(250, 4.0), (260, 6.0), (700, 1.0)]  # slices of 100 steps: 2 -> 5, 7 -> 1
    np.testing.assert_allclose(plot.sliced_scores(returns, 1000, 10), [5, 5, 5, 5, 5, 5, 5, 1, 1, 1])
    assert plot.sliced_scores([(1000, 3.0)], 1000, 4)[-1] == 3.0  # the last step belongs to the last slice
    assert np.isnan(plot.sliced_scores([], 1000, 3)).all()


def test_offline_evaluations_unfinished_and_repeated_runs(tmp_path, capsys):
    """cql_pruned.py logs an evaluation at the gradient steps done after each iteration (k * 250 of 1000 here): each
    lands in its own slice. An unfinished run and a second run of one configuration and seed are left out, saying so.
    Runs written before the online agents evaluated logged charts/eval_return: read too. A training return logged
    beside them is not."""

    def offline_run(name: str, evaluations: list, tag: str = "eval/episodic_return") -> None:
        run_dir = tmp_path / name
        writer = SummaryWriter(str(run_dir))
        for step, value in evaluations:
            writer.add_scalar(tag, value, step)
            writer.add_scalar("charts/episodic_return", -1.0, step)
        writer.close()
        config = {
            "env_id": "CartPole-v1",
            "exp_name": "cql",
            "script": "cql_pruned.py",
            "c51": True,
            "network": "mlp",
            "pruning_method": "gmp",
            "sparsity": 0.9,
            "width_scale": 1,
            "seed": 1,
            "num_iterations": 4,
            "grad_steps_per_iteration": 250,
        }
        (run_dir / "config.json").write_text(json.dumps(config))

    offline_run("a", [(250, 10.0), (500, 20.0), (750, 30.0), (1000, 40.0)])
    offline_run("b", [(250, 99.0), (500, 99.0), (750, 99.0), (1000, 99.0)], "charts/eval_return")  # the same again
    offline_run("c", [(250, 5.0)])  # unfinished
    records = plot.load_runs(str(tmp_path), 4)
    assert [r["run_dir"][-1] for r in records] == ["a", "b"] and records[0]["script"] == "cql_pruned.py --c51"
    np.testing.assert_allclose(records[0]["scores"], [10, 20, 30, 40])
    np.testing.assert_allclose(records[1]["scores"], [99, 99, 99, 99])  # the older tag
    matrices = plot.score_matrices(records)
    ((scores, tasks, length),) = matrices.values()
    np.testing.assert_allclose(scores[:, 0, :], [[10, 20, 30, 40]])  # one run: the second was left out
    out = capsys.readouterr().out
    assert "unfinished" in out and "a second run of CartPole-v1, seed 1" in out


def test_replay_ratios_are_configurations_of_their_own(tmp_path):
    """Runs alike but for the replay ratio (config.json's replay_ratio; 1 / train_frequency in runs written before
    --gradient-steps) are configurations of their own, and a suite with several ratios gets iqm_vs_replay_ratio."""
    runs, out = str(tmp_path / "runs"), str(tmp_path / "figures")
    ratios = {
        0.25: {"train_frequency": 4},
        0.5: {"train_frequency": 2, "replay_ratio": 0.5},
        2.0: {"replay_ratio": 2.0},
    }
    for seed in (1, 2):
        for ratio, config in ratios.items():
            fake_run(runs, "dqn_pruned.py", "CartPole-v1", "gmp", 0.9, 1, seed, [(995, 10 * ratio + seed)], **config)
    result = plot.main([runs, "--out", out, "--points", "1", "--reps", "100", "--curve-reps", "20"])
    finals = {config[-1]: r["final"][0] for (_, config), r in result["results"].items()}
    assert finals == pytest.approx({0.25: 4.0, 0.5: 6.5, 2.0: 21.5})  # the mean of seeds 1 and 2 each
    assert os.path.join(out, "iqm_vs_replay_ratio_CartPole-v1.png") in result["written"]
    assert plot.label(("dqn_pruned.py", "cnn", "gmp", 0.9, 1, 2.0)) == "dqn_pruned.py cnn gmp 0.9 k=1 rr=2"
    assert plot.label(("cql_pruned.py", "cnn", "none", 0.0, 3, None)) == "cql_pruned.py cnn none k=3"


def test_score_table_option(tmp_path, capsys):
    """--score-table: Dopamine's table by default, DQN Zoo's on request; a game without a human score in the table is
    left out with a line saying so. Pong (the same in both), VideoPinball (random 0.0 vs 16,256.9) and Defender (no
    human score in Dopamine's), 3 seeds each."""
    runs = str(tmp_path / "runs")
    raw = {
        "ALE/Pong-v5": (-20.0, 0.0, 10.0),
        "ALE/VideoPinball-v5": (20_000.0, 30_000.0, 60_000.0),
        "ALE/Defender-v5": (3000.0, 5000.0, 8000.0),
    }
    for game, returns in raw.items():
        for seed, value in enumerate(returns, start=1):
            fake_run(runs, "dqn_pruned.py", game, "gmp", 0.95, 1, seed, [(995, value)])
    finals, rows = {}, {}
    for table in ("dopamine", "dqn_zoo"):
        out = str(tmp_path / table)
        flags = ["--out", out, "--points", "1", "--reps", "2000", "--curve-reps", "20", "--score-table", table]
        (result,) = plot.main([runs, *flags])["results"].values()
        finals[table] = result["final"][0]
        with open(os.path.join(out, "aggregates.csv")) as f:
            (rows[table],) = csv.DictReader(f)
        printed = capsys.readouterr().out
        assert ("Defender has no human score in the dopamine table" in printed) == (table == "dopamine")
        assert result["tasks"] == ["ALE/Defender-v5", "ALE/Pong-v5", "ALE/VideoPinball-v5"][table == "dopamine" :]
    pong = [(v + 20.7) / 35.3 for v in raw["ALE/Pong-v5"]]
    defender = [(v - 2874.5) / (18688.9 - 2874.5) for v in raw["ALE/Defender-v5"]]
    for table, random, more, trimmed in (("dopamine", 0.0, [], 1), ("dqn_zoo", 16256.9, defender, 2)):
        pinball = [(v - random) / (17667.9 - random) for v in raw["ALE/VideoPinball-v5"]]
        scores = sorted(pong + pinball + more)  # the IQM of 6 (9) scores trims int(6 / 4) = 1 (int(9 / 4) = 2) per end
        assert finals[table] == pytest.approx(np.mean(scores[trimmed:-trimmed]), rel=1e-5)
        assert rows[table]["score"] == f"hns_{table}"


def test_dense_warmup_runs_are_a_configuration_of_their_own(tmp_path):
    """RigL from 20% (--dense-warmup) and plain RigL, same seed: two configurations, neither skipped."""
    for warmup in (False, True):
        fake_run(
            str(tmp_path),
            "dqn_pruned.py",
            "CartPole-v1",
            "rigl",
            0.9,
            1,
            1,
            [(995, 10.0 + warmup)],
            dense_warmup=warmup,
        )
    matrices = plot.score_matrices(plot.load_runs(str(tmp_path), 1))
    methods = {config[2]: scores[0, 0, 0] for (_, config), (scores, _, _) in matrices.items()}
    assert methods == {"rigl": 10.0, "rigl+warmup": 11.0}
    assert (
        plot.label(("dqn_pruned.py", "mlp", "rigl+warmup", 0.9, 1, 0.25))
        == "dqn_pruned.py mlp rigl+warmup 0.9 k=1 rr=0.25"
    )


def test_plot_refuses_an_empty_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "common.plot", str(tmp_path), "--out", str(tmp_path / "f")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "no runs with logged returns" in result.stderr


def test_atari_tables():
    zoo, dopamine = atari_scores.TABLES["dqn_zoo"], atari_scores.TABLES["dopamine"]
    assert len(zoo) == 57 and len(dopamine) == 55 and len(atari_scores.GAMES_60) == 60
    for games in (atari_scores.GAMES_15, atari_scores.GAMES_100K):  # every game the paper or Atari 100k uses
        assert set(games) <= set(dopamine) and set(games) <= set(zoo)
    assert len(set(atari_scores.GAMES_15)) == 15 and len(set(atari_scores.GAMES_100K)) == 26
    assert set(atari_scores.GAMES_60) - set(dopamine) == set(atari_scores.NO_HUMAN_SCORE)
    # where the tables differ, against their sources: Dopamine's labs/atari_100k/normalization_utils.py (no human
    # score for Defender and Surround, VideoPinball's random score 0.0) and DQN Zoo's atari_data.py
    assert dopamine["VideoPinball"] == (0.0, 17667.9) and zoo["VideoPinball"] == (16256.9, 17667.9)
    assert zoo["Defender"] == (2874.5, 18688.9) and zoo["Surround"] == (-10.0, 6.5)
    assert set(zoo) - set(dopamine) == {"Defender", "Surround"}
    assert [game for game in dopamine if dopamine[game] != zoo[game]] == ["VideoPinball"]
    assert zoo["Pong"] == dopamine["Pong"] == (-20.7, 14.6) and dopamine["Qbert"] == (163.9, 13455.0)
    # the example: a raw 30,000 on VideoPinball
    assert atari_scores.human_normalized("VideoPinball", 30_000.0) == pytest.approx(30_000 / 17667.9)  # 1.70
    assert atari_scores.human_normalized("VideoPinball", 30_000.0, "dqn_zoo") == pytest.approx(13743.1 / 1411.0)  # 9.74
    assert atari_scores.human_normalized("Breakout", 30.5) == pytest.approx(1.0)
    assert atari_scores.human_normalized("Breakout", 1.7) == pytest.approx(0.0)
    assert atari_scores.game_of("ALE/MsPacman-v5") == "MsPacman" and atari_scores.game_of("CartPole-v1") is None
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    for game in atari_scores.GAMES_60:  # every listed name is a real ALE game id
        gym.spec(f"ALE/{game}-v5")
