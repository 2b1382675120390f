"""Checkpoints and resume: a run killed with SIGKILL at a random moment and resumed ends bit-identical to an
uninterrupted run (params, every logged scalar but SPS, the offline dataset it writes); an interrupted checkpoint write
never replaces the good one; a non-finite loss stops the run with a resumable checkpoint; incompatible flags are
refused."""

import dataclasses
import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, read_scalars, run_script
from flax import serialization

import cql_pruned as cql
import dqn_pruned as dqn

CARTPOLE = [
    "--env-id",
    "CartPole-v1",
    "--network",
    "mlp",
    "--total-timesteps",
    "3000",
    "--learning-starts",
    "300",
    "--buffer-size",
    "3000",
    "--train-frequency",
    "1",
    "--target-network-frequency",
    "200",
    "--batch-size",
    "32",
    "--learning-rate",
    "1e-3",
    "--exploration-steps",
    "1500",
    "--sparsity",
    "0.9",
    "--prune-frequency-grad-steps",
    "100",
    "--log-frequency",
    "250",
    "--checkpoint-frequency",
    "500",
    "--metrics-frequency",
    "1000",
    "--metrics-batch-size",
    "32",
    "--metrics-grad-samples",
    "8",
    "--save-model",
    "--exp-name",
    "run",
]
FEWER_QUANTILES = ["--num-tau-samples", "8", "--num-tau-prime-samples", "8", "--num-quantile-samples", "4"]


def kill_after_first_checkpoint(command: list, cwd: str, delay: float) -> str:
    """Starts `command`, waits for its first checkpoint, lets it run `delay` seconds more and SIGKILLs it (it must still
    be running). Returns the run directory."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not glob.glob(os.path.join(cwd, "runs", "*", "checkpoint.pkl")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(delay)
    assert process.poll() is None, "the run ended before it could be killed: make it longer"
    process.send_signal(signal.SIGKILL)
    process.wait()
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return run_dir


def same_runs(reference: str, resumed: str, model: str) -> None:
    """Bit-identical final params and masks, and the same logged scalars (every tag but SPS: steps and values), no
    step logged twice."""
    with open(os.path.join(reference, model), "rb") as f:
        expected = serialization.msgpack_restore(f.read())
    with open(os.path.join(resumed, model), "rb") as f:
        got = serialization.msgpack_restore(f.read())
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    scalars_expected, scalars_got = read_scalars(reference), read_scalars(resumed)
    assert set(scalars_expected) == set(scalars_got)
    for tag in scalars_expected:
        if tag != "charts/SPS":
            assert scalars_got[tag] == scalars_expected[tag], tag
    returns = scalars_got.get("charts/episodic_return") or scalars_got["eval/episodic_return"]
    steps = [step for step, _ in returns]
    assert len(returns) > 5 and steps == sorted(set(steps))  # no duplicate step


TWO_STEPS = ["--train-frequency", "2", "--gradient-steps", "2"]  # two gradient steps every other env step
ONLINE = [
    ("dqn_pruned.py", "gmp", []),
    ("dqn_pruned.py", "rigl", []),
    ("dqn_pruned.py", "set", []),
    ("dqn_pruned.py", "static", []),
    ("dqn_pruned.py", "none", ["--eval-frequency", "1000", "--eval-episodes", "2"]),  # evaluations resumed too
    ("rainbow_pruned.py", "gmp", TWO_STEPS),
    ("iqn_pruned.py", "rigl", [*FEWER_QUANTILES, *TWO_STEPS]),
    ("miqn_pruned.py", "static", [*FEWER_QUANTILES, "--train-frequency", "2"]),
]


@pytest.mark.parametrize("script, method, extra", ONLINE)
def test_killed_and_resumed_run_is_bit_identical(tmp_path, script, method, extra):
    flags = [*CARTPOLE, "--pruning-method", method, *extra]
    (tmp_path / "reference").mkdir()
    (tmp_path / "killed").mkdir()
    result = run_script(script, *flags, cwd=str(tmp_path / "reference"))
    assert result.returncode == 0, result.stderr[-3000:]
    (reference,) = glob.glob(str(tmp_path / "reference" / "runs" / "*"))

    delay = float(np.random.default_rng(sum(map(ord, script + method))).uniform(0.0, 1.0))  # an arbitrary moment
    run_dir = kill_after_first_checkpoint(
        [sys.executable, os.path.join(ROOT, script), *flags], str(tmp_path / "killed"), delay
    )
    assert not os.path.exists(os.path.join(run_dir, "run.msgpack"))  # it did not finish
    result = run_script(
        script, "--resume", run_dir, cwd=str(tmp_path / "killed")
    )  # the run's own flags, from its config.json
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {run_dir} at env step" in result.stdout
    same_runs(reference, run_dir, "run.msgpack")


def write_cartpole_dataset(directory: str) -> None:
    """A run directory whose checkpoint holds 3000 random CartPole-like transitions: the offline tests' dataset."""
    from test_cql import write_run

    rng = np.random.default_rng(0)
    rb = dqn.ReplayBuffer(5000, (4,), np.float32, 1, 1, 0.99)
    frame = rng.normal(size=4).astype(np.float32)
    for _ in range(3000):
        next_frame = rng.normal(size=4).astype(np.float32)
        rb.add(frame, int(rng.integers(2)), float(rng.random() < 0.9), bool(rng.random() < 0.05), False, next_frame)
        frame = next_frame
    write_run(directory, rb.__getstate__(), env_id="CartPole-v1")


def test_killed_and_resumed_offline_run_is_bit_identical(tmp_path):
    write_cartpole_dataset(str(tmp_path / "data"))
    flags = [
        "--env-id",
        "CartPole-v1",
        "--network",
        "mlp",
        "--dataset-dir",
        str(tmp_path / "data"),
        "--num-iterations",
        "6",
        "--grad-steps-per-iteration",
        "800",
        "--eval-steps",
        "100",
        "--sparsity",
        "0.9",
        "--prune-frequency-grad-steps",
        "100",
        "--log-frequency",
        "200",
        "--checkpoint-frequency",
        "500",
        "--metrics-frequency",
        "1600",
        "--metrics-batch-size",
        "32",
        "--metrics-grad-samples",
        "8",
        "--save-model",
        "--exp-name",
        "run",
        "--c51",
    ]
    (tmp_path / "reference").mkdir()
    (tmp_path / "killed").mkdir()
    result = run_script("cql_pruned.py", *flags, cwd=str(tmp_path / "reference"))
    assert result.returncode == 0, result.stderr[-3000:]
    (reference,) = glob.glob(str(tmp_path / "reference" / "runs" / "*"))
    run_dir = kill_after_first_checkpoint(
        [sys.executable, os.path.join(ROOT, "cql_pruned.py"), *flags], str(tmp_path / "killed"), 0.7
    )
    result = run_script("cql_pruned.py", "--resume", run_dir, cwd=str(tmp_path / "killed"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed {run_dir} at gradient step" in result.stdout
    same_runs(reference, run_dir, "run.msgpack")


def small_args(**changes) -> dqn.Args:
    flags = dict(
        env_id="CartPole-v1",
        network="mlp",
        total_timesteps=1500,
        learning_starts=200,
        buffer_size=2000,
        train_frequency=1,
        batch_size=16,
        sparsity=0.8,
        prune_frequency_grad_steps=50,
        log_frequency=100,
        checkpoint_frequency=500,
        save_model=True,
        exp_name="small",
    )
    return dataclasses.replace(dqn.Args(**flags), **changes)


def test_interrupted_checkpoint_write_keeps_the_good_one(tmp_path, monkeypatch):
    """The second checkpoint's write dies half way (its temporary file holds half a pickle): checkpoint.pkl is still
    the first, whole; resuming from it ends where an uninterrupted run ends."""
    for name in ("reference", "interrupted"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "reference")
    reference = dqn.main(small_args())["run_dir"]

    real_dump, calls = pickle.dump, []

    def dump_dying_at_second_write(payload, f, protocol=None):
        calls.append(payload["global_step"])
        if len(calls) == 2:
            data = pickle.dumps(payload, protocol=protocol)
            f.write(data[: len(data) // 2])
            f.flush()
            raise KeyboardInterrupt  # the process dies here
        real_dump(payload, f, protocol=protocol)

    monkeypatch.chdir(tmp_path / "interrupted")
    monkeypatch.setattr(dqn.pickle, "dump", dump_dying_at_second_write)
    with pytest.raises(KeyboardInterrupt):
        dqn.main(small_args())
    monkeypatch.setattr(dqn.pickle, "dump", real_dump)
    (run_dir,) = glob.glob(str(tmp_path / "interrupted" / "runs" / "*"))
    assert calls == [499, 999]  # after env steps 499 and 999
    assert os.path.getsize(os.path.join(run_dir, "checkpoint.pkl.tmp")) > 0  # the half-written one
    saved = dqn.load_checkpoint(run_dir)
    assert saved["global_step"] == 499  # the good one, intact
    assert saved["grad_step"] == 300 and int(saved["train_state"][-3]) == 300  # leaves end: grad_step, key, finite

    assert dqn.main(small_args(resume=run_dir))["run_dir"] == run_dir  # the same directory, appended to
    same_runs(str(tmp_path / "reference" / reference), run_dir, "small.msgpack")


@pytest.mark.parametrize(
    "script", ["dqn_pruned.py", "rainbow_pruned.py"]
)  # Rainbow: its NaN priorities never reach the sum tree
def test_non_finite_loss_stops_with_a_resumable_checkpoint(tmp_path, script):
    """The update refuses the first non-finite step on the device; the loop sees it when it logs, checkpoints that last
    good state and stops (exit 1, one line); a resumed run starts exactly from there."""
    flags = [
        "--env-id",
        "CartPole-v1",
        "--network",
        "mlp",
        "--total-timesteps",
        "600",
        "--learning-starts",
        "100",
        "--batch-size",
        "16",
        "--buffer-size",
        "1000",
        "--train-frequency",
        "1",
        "--learning-rate",
        "1e30",
        "--log-frequency",
        "50",
        "--exp-name",
        "nan",
    ]
    result = run_script(script, *flags, cwd=str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: non-finite loss after gradient step ")
        and "Traceback" not in result.stderr
    )
    grad_step = int(lines[0].split(" gradient step ")[1].split(" ")[0])
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    saved = dqn.load_checkpoint(run_dir)
    assert saved["grad_step"] == grad_step and int(saved["train_state"][-3]) == grad_step  # the device's own count
    assert all(
        np.isfinite(leaf).all() for leaf in saved["train_state"] if leaf.dtype.kind == "f"
    )  # the last good state
    assert bool(saved["train_state"][-1])  # saved as a good state, so that a resumed run trains again
    stopped_at = saved["global_step"]  # the first log after the refused step
    assert (stopped_at + 1) % 50 == 0 and 100 + grad_step <= stopped_at < 100 + grad_step + 50
    scalars = read_scalars(run_dir)
    assert scalars["charts/SPS"][-1][0] == stopped_at  # logged, but not the refused step's loss:
    assert all(step < stopped_at for step, _ in scalars.get("losses/td_loss", []))
    # resumable with other flags that a resumed run may change; this state's own loss is not finite (a learning rate of
    # 1e30 made its weights huge in one step), so the resumed run refuses its first step again and stops the same way
    result = run_script(
        script, "--resume", run_dir, "--learning-rate", "1e-3", "--log-frequency", "25", cwd=str(tmp_path)
    )
    assert f"resumed {run_dir} at env step {stopped_at + 1}, gradient step {grad_step}" in result.stdout
    assert (
        result.returncode == 1 and f"after gradient step {grad_step} (env step <= {stopped_at + 25})" in result.stderr
    )
    config = dqn.saved_config(run_dir)  # the changed flags are the run's now, the defaults of a later --resume
    assert config["learning_rate"] == 1e-3 and config["log_frequency"] == 25
    assert config["resumed_at_step"] == [stopped_at + 1]
    assert dqn.load_checkpoint(run_dir)["global_step"] == stopped_at + 25


def test_offline_non_finite_loss_checkpoints_the_last_good_state(tmp_path, monkeypatch):
    """CQL refuses the non-finite step, and at the end of its iteration checkpoints that state, with only the
    evaluations of the iterations it had finished, and stops; a resumed run starts from exactly there."""
    write_cartpole_dataset(str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    args = cql.Args(
        env_id="CartPole-v1",
        network="mlp",
        dataset_dir=str(tmp_path / "data"),
        num_iterations=3,
        grad_steps_per_iteration=1,
        eval_steps=20,
        learning_rate=1e30,
        adam_eps=1e-8,
        batch_size=16,
        exp_name="nan",
        save_model=True,
    )
    with pytest.raises(
        cql.NonFiniteError, match=r"non-finite loss after gradient step (\d+); the last good train"
    ) as error:
        cql.main(args)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    saved = cql.load_checkpoint(run_dir)
    good = saved["grad_step"]
    assert f"after gradient step {good};" in str(error.value) and len(saved["eval_returns"]) == good
    assert all(np.isfinite(leaf).all() for leaf in saved["train_state"] if leaf.dtype.kind == "f")
    # this state's own loss is not finite (a learning rate of 1e30 made its weights huge in one step): a resumed run
    # with a sane learning rate starts from it and refuses its first step again
    with pytest.raises(cql.NonFiniteError, match=f"after gradient step {good};"):
        cql.main(dataclasses.replace(cql.resolve(args), learning_rate=1e-4, resume=run_dir))
    assert cql.saved_config(run_dir)["learning_rate"] == 1e-4


def test_resume_refuses_other_flags_and_names_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = dqn.main(small_args(total_timesteps=600))["run_dir"]
    with pytest.raises(
        dqn.ArgsError,
        match=r"cannot resume .* with other flags: --network 'mlp' in the run, 'cnn' now; "
        r"--pruning-method 'gmp' in the run, 'rigl' now; --sparsity 0.8 in the run, 0.95 now$",
    ):
        dqn.check_args(
            small_args(total_timesteps=600, resume=run_dir, network="cnn", sparsity=0.95, pruning_method="rigl")
        )
    dqn.check_args(
        small_args(total_timesteps=600, resume=run_dir, learning_rate=1e-4, log_frequency=7)
    )  # these may change
    defaults = dqn.resume_defaults(["--resume", run_dir])
    assert defaults == small_args(total_timesteps=600)  # the CLI's defaults are the run's flags
    result = run_script("dqn_pruned.py", "--resume", run_dir, "--width-scale", "2", cwd=str(tmp_path))
    assert result.returncode == 2 and "--width-scale 1 in the run, 2 now" in result.stderr
    config = dqn.saved_config(run_dir)  # a run written before a flag existed ran at that flag's default
    del config["gradient_steps"]
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(dqn.ArgsError, match=r"--gradient-steps 1 in the run, 2 now$"):
        dqn.check_args(small_args(total_timesteps=600, resume=run_dir, gradient_steps=2))
    dqn.check_args(small_args(total_timesteps=600, resume=run_dir))
    import rainbow_pruned as rainbow  # another script's run is refused even where every flag would fit

    with pytest.raises(rainbow.ArgsError, match="a run of dqn_pruned.py, not of rainbow_pruned.py"):
        fields = {field.name for field in dataclasses.fields(rainbow.Args)}  # DQN's own flags (--dueling) left out
        same = {k: v for k, v in dataclasses.asdict(small_args(total_timesteps=600)).items() if k in fields}
        rainbow.check_args(rainbow.Args(**{**same, "resume": run_dir}))
    path = os.path.join(run_dir, "checkpoint.pkl")  # a checkpoint of the layout before 2026-12-03: one line, exit 2
    with open(path, "rb") as f:
        saved = pickle.load(f)
    assert saved.pop("layout") == dqn.LAYOUT == 2
    saved["rng"], saved["metrics_rng"] = saved.pop("rngs")
    with open(path, "wb") as f:
        pickle.dump(saved, f)
    result = run_script("dqn_pruned.py", "--resume", run_dir, cwd=str(tmp_path))
    assert result.returncode == 2 and "checkpoint.pkl has layout 1, written by another version" in result.stderr


def test_a_resumed_writer_purges_the_killed_runs_later_events(tmp_path):
    """open_writer(purge_step=S) makes TensorBoard drop the events of earlier files at and after step S (those a killed
    run logged after its checkpoint), also when both writers open within the same second."""
    writer = dqn.open_writer(str(tmp_path))
    for step in range(10):
        writer.add_scalar("x", float(step), step)
    writer.close()
    writer = dqn.open_writer(str(tmp_path), purge_step=7)
    for step in range(7, 12):
        writer.add_scalar("x", 100.0 + step, step)
    writer.close()
    assert len(glob.glob(str(tmp_path / "*tfevents*"))) == 2  # two files, although opened within one second
    expected = [(step, float(step)) for step in range(7)] + [(step, 100.0 + step) for step in range(7, 12)]
    assert read_scalars(str(tmp_path))["x"] == expected
