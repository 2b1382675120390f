"""Every agent script through its real command line: --help, tiny runs for every pruning method, bad inputs."""

import dataclasses
import glob
import json
import os

import jax
import pytest
from conftest import args_docstrings, check_metric_logs, check_saved_masks, read_scalars, run_script

import cql_pruned as cql
import dqn_pruned as dqn
import iqn_pruned as iqn
import miqn_pruned as miqn
import rainbow_pruned as rainbow

# script -> (module, name of the output layer)
SCRIPTS = {
    "dqn_pruned.py": (dqn, "q"),
    "rainbow_pruned.py": (rainbow, "logits"),
    "iqn_pruned.py": (iqn, "q"),
    "miqn_pruned.py": (miqn, "q"),
}
FEWER_QUANTILES = ["--num-tau-samples", "8", "--num-tau-prime-samples", "8", "--num-quantile-samples", "4"]  # tiny runs

TINY_PONG = [
    "--env-id",
    "ALE/Pong-v5",
    "--total-timesteps",
    "240",
    "--learning-starts",
    "80",
    "--batch-size",
    "8",
    "--buffer-size",
    "1000",
    "--train-frequency",
    "4",
    "--target-network-frequency",
    "50",
    "--exploration-steps",
    "100",
    "--prune-frequency-grad-steps",
    "10",
    "--sparsity",
    "0.8",
    "--log-frequency",
    "40",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag(tmp_path, script):
    result = run_script(script, "--help", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    for field in dataclasses.fields(SCRIPTS[script][0].Args):
        assert "--" + field.name.replace("_", "-") in result.stdout, field.name
    assert "gradient steps" in result.stdout and "env steps" in result.stdout  # units are documented
    assert not os.path.exists(tmp_path / "runs")


# every method through DQN's loop on Atari; the other agents share that sparse-training code byte for byte (a test
# checks it), so their loops run GMP on Atari, and RigL and dense on CartPole's MLP (which compiles in seconds)
RUNS = [("dqn_pruned.py", method, "cnn") for method in ("gmp", "rigl", "set", "none")] + [
    ("dqn_pruned.py", "static", "nature"),
    ("dqn_pruned.py", "gmp", "resnet"),
]
RUNS += [
    (script, method, "cnn" if method == "gmp" else "mlp")
    for script in SCRIPTS
    if script != "dqn_pruned.py"
    for method in ("gmp", "rigl", "none")
]


# runs that also log the analysis metrics (every network and every agent's head once)
ANALYSED = {("dqn_pruned.py", "gmp", "resnet"), ("dqn_pruned.py", "rigl", "cnn")} | {
    (s, "rigl", "mlp") for s in SCRIPTS
}
HIDDEN_LAYERS = {
    "resnet": [f"torso/stack{i}_conv" for i in range(3)]
    + [f"torso/stack{i}_block{j}_conv{k}" for i in range(3) for j in range(2) for k in range(2)],
    "cnn": ["torso/conv0", "torso/conv1", "torso/conv2"],
    "mlp": ["torso/fc"],
}
# the ResNet's dormant neurons as ReDo's code records them: per block, its input stream and its first conv's ReLU
REDO_LAYERS = [f"torso/stack{i}_block{j}_{unit}" for i in range(3) for j in range(2) for unit in ("input", "conv0")]


@pytest.mark.parametrize("script, method, network", RUNS)
def test_tiny_run(tmp_path, script, method, network):
    module, output_layer = SCRIPTS[script]
    extra = FEWER_QUANTILES if module in (iqn, miqn) else []
    analysed = (script, method, network) in ANALYSED
    if analysed:
        extra = extra + ["--metrics-frequency", "80", "--metrics-batch-size", "32", "--metrics-grad-samples", "8"]
    if network == "mlp":
        extra = extra + ["--env-id", "CartPole-v1"]
    result = run_script(
        script,
        *TINY_PONG,
        *extra,
        "--pruning-method",
        method,
        "--network",
        network,
        "--save-model",
        "--exp-name",
        f"tiny_{method}",
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    env_name = "CartPole-v1" if network == "mlp" else "ALE_Pong-v5"
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"{env_name}__tiny_{method}__1__*"))
    params, kept, total = check_saved_masks(
        module, os.path.join(run_dir, f"tiny_{method}.msgpack"), 0.0 if method == "none" else 0.8
    )
    target = 0.0 if method == "none" else 0.8

    scalars = read_scalars(run_dir)
    for tag in (
        "losses/td_loss",
        "losses/q_values",
        "charts/SPS",
        "charts/epsilon",
        "pruning/target_sparsity",
        "pruning/kernel_sparsity",
        "pruning/total_sparsity",
        f"pruning/layer/{output_layer}/kernel",
    ):
        assert tag in scalars, tag
    # achieved sparsity counts exact zeros in the params (JaxPruner's definition): it equals the mask's sparsity,
    # except that rigl/set grown weights start at 0 and stay there while their gradient is exactly 0
    achieved = scalars["pruning/kernel_sparsity"][-1][1]
    zeros = sum(int((p == 0).sum()) for p in jax.tree.leaves(params) if p.ndim > 1)
    assert achieved == pytest.approx(zeros / total, abs=1e-6)  # logged = what the saved params show
    assert 1 - kept / total - 1e-6 <= achieved <= 1 - kept / total + (0.03 if method in ("rigl", "set") else 1e-3)
    assert scalars["pruning/target_sparsity"][-1][1] == pytest.approx(target, abs=1e-3)
    assert scalars["pruning/total_sparsity"][-1][1] < achieved or method == "none"  # biases are dense
    assert [step for step, _ in scalars["charts/SPS"]] == [39, 79, 119, 159, 199, 239]  # x-axis: env steps
    # the loop does exactly the gradient steps the pruning window was derived from
    assert scalars["charts/grad_steps"][-1][1] == module.num_grad_steps(240, 80, 4) == 40
    if method == "gmp":  # sparsity rose during the run instead of being there from the start
        assert scalars["pruning/kernel_sparsity"][0][1] == 0.0
    if analysed:  # after learning starts (env step 80), every 80 env steps
        head = ["dense"] + (["quantile_embedding"] if module in (iqn, miqn) else [])
        dormant = (REDO_LAYERS if network == "resnet" else HIDDEN_LAYERS[network]) + head
        check_metric_logs(run_dir, scalars, [159, 239], HIDDEN_LAYERS[network] + head, dormant)
    else:
        assert not any(
            tag.startswith("metrics/") for tag in scalars
        )  # --metrics-frequency 250000 (default) > 240 steps


BAD_INPUTS = [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--width-scale", "0"], "--width-scale must be a positive integer"),
    (
        ["--prune-start-fraction", "0.8", "--prune-end-fraction", "0.5"],
        "--prune-start-fraction (0.8) < --prune-end-fraction (0.5)",
    ),
    (["--env-id", "ALE/Pongg-v5"], "unknown --env-id 'ALE/Pongg-v5'"),
    (["--buffer-size", "16", "--batch-size", "32"], "--buffer-size (16) must be >= --batch-size (32)"),
    (["--env-id", "CartPole-v1"], "--network resnet needs Atari frames"),
    (["--learning-starts", "100", "--total-timesteps", "50"], "--learning-starts must be < --total-timesteps"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (
        ["--buffer-size", "4", "--batch-size", "2", "--learning-starts", "8"],
        "--buffer-size (4) must be >= frame stack + n-step (5)",
    ),
    (["--env-id", "CartPol-v1"], "Did you mean: `CartPole`?"),  # close matches of an unknown id
    (["--learning-starts", "16", "--batch-size", "32"], "--learning-starts (16) must be >= --batch-size (32)"),
    (["--prune-frequency-grad-steps", "0"], "--prune-frequency-grad-steps must be > 0"),
    (["--drop-fraction", "1.5"], "--drop-fraction must be in [0, 1]"),
    (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--start-e", "0.1", "--end-e", "0.5"], "need 0 <= --end-e <= --start-e <= 1"),
    (["--train-frequency", "0"], "--train-frequency must be > 0"),
    (["--gradient-steps", "0"], "--gradient-steps must be > 0"),
    (["--dense-warmup"], "--dense-warmup needs --pruning-method static, rigl or set"),  # gmp, the default
    (["--dense-warmup", "--pruning-method", "rigl"], "--dense-warmup needs --prune-start-fraction > 0"),
    (["--eval-epsilon", "2"], "--eval-epsilon must be in [0, 1]"),
    (["--target-network-frequency", "0"], "--target-network-frequency must be > 0"),
    (["--log-frequency", "0"], "--log-frequency must be > 0"),
    (["--learning-rate", "0"], "--learning-rate must be > 0"),
    (["--n-step", "0"], "--n-step must be >= 1"),
    (["--exp-name", "a/b"], "--exp-name must be a name, not 'a/b'"),
    (["--metrics-frequency", "-1"], "--metrics-frequency must be >= 0 (0: off)"),
    (["--metrics-grad-samples", "300"], "--metrics-grad-samples must be in [1, --metrics-batch-size (256)], got 300"),
    (["--checkpoint-frequency", "-5"], "--checkpoint-frequency must be >= 0 (0: off)"),
    (["--resume", "nowhere"], "--resume nowhere: cannot read its config.json"),
    (["--resume", "other_run"], "cannot resume other_run with other flags: --network 'cnn' in the run, 'resnet' now"),
    (["--resume", "no_checkpoint"], "--resume no_checkpoint: it has no checkpoint.pkl"),
]


BAD_RAINBOW_INPUTS = [
    (["--num-atoms", "1"], "--num-atoms must be >= 2, got 1"),
    (["--v-min", "5", "--v-max", "5"], "need --v-min (5.0) < --v-max (5.0)"),
    (
        ["--buffer-size", "6", "--batch-size", "2", "--learning-starts", "8"],
        "--buffer-size (6) must be >= frame stack + n-step (7)",
    ),
]
BAD_IQN_INPUTS = [
    (["--kappa", "0"], "--kappa must be > 0, got 0.0"),
    (["--num-tau-samples", "0"], "--num-tau-samples must be > 0"),
]
BAD_MIQN_INPUTS = [
    (["--munchausen-tau", "0"], "--munchausen-tau must be > 0, got 0.0"),
    (["--munchausen-clip", "0.5"], "--munchausen-clip must be <= 0"),
]
CASES = (
    [("dqn_pruned.py", *case) for case in BAD_INPUTS]
    + [("rainbow_pruned.py", *case) for case in BAD_RAINBOW_INPUTS + BAD_INPUTS[:2]]
    + [("iqn_pruned.py", *case) for case in BAD_IQN_INPUTS + BAD_INPUTS[:2]]
    + [("miqn_pruned.py", *case) for case in BAD_MIQN_INPUTS + BAD_IQN_INPUTS[:1]]
)


@pytest.mark.parametrize("script, flags, message", CASES, ids=[f"{c[0][:-10]}: {c[2][:30]}" for c in CASES])
def test_bad_input_fails_cleanly(tmp_path, script, flags, message):
    if (
        "--resume" in flags
    ):  # run directories to resume: one of another run (its network differs), one never checkpointed
        module = SCRIPTS[script][0]
        for name, network in (("other_run", "cnn"), ("no_checkpoint", "resnet")):
            os.makedirs(tmp_path / name)
            with open(tmp_path / name / "config.json", "w") as f:
                json.dump(dataclasses.asdict(module.Args(network=network)), f)
        flags = [*flags, "--network", "resnet"] if flags[1] == "other_run" else flags
        open(tmp_path / "other_run" / "checkpoint.pkl", "wb").close()
    result = run_script(script, *flags, cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[len('error: ') :]}"]  # one line
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "runs")  # nothing written
    assert sorted(os.listdir(tmp_path)) == sorted(["other_run", "no_checkpoint"] if "--resume" in flags else [])


def readme_flag_rows(script: str) -> str:
    """The README's flag table of `script`: dqn_pruned.py's full table, or another script's table of its differences."""
    from conftest import ROOT

    with open(os.path.join(ROOT, "README.md")) as f:
        flags = f.read().split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    tables = flags.split("\n### ")
    if script == "dqn_pruned.py":
        return tables[0]
    return next(t for t in tables[1:] if f"`{script}`" in t.splitlines()[0])  # the table under `### ...script...`


@pytest.mark.parametrize("script", [*SCRIPTS, "cql_pruned.py"])
def test_readme_flag_table_matches_args(script):
    """Every flag is in the README with its current default and help text (the tables cannot drift from Args): in
    dqn_pruned.py's table, or in the script's own table where its default or help text differs from DQN's."""
    module = cql if script == "cql_pruned.py" else SCRIPTS[script][0]
    own, dqn_docs = args_docstrings(script), args_docstrings("dqn_pruned.py")
    dqn_fields = {f.name: f for f in dataclasses.fields(dqn.Args)}
    for field in dataclasses.fields(module.Args):
        if field.name == "exp_name":  # its default is the script's name
            continue
        default = "unset" if field.default is None else field.default
        if field.name == "preset":  # its help lists what each preset sets (--help; test_atari_100k checks it)
            row = next(r for r in readme_flag_rows(script).splitlines() if r.startswith("| `--preset` | `paper` |"))
            assert all(f"`{name}`" in row for name in module.PRESETS), row
            continue
        row = f"| `--{field.name.replace('_', '-')}` | `{default}` | {own[field.name]} |"
        same_as_dqn = (
            field.name in dqn_fields
            and dqn_fields[field.name].default == field.default
            and dqn_docs[field.name] == own[field.name]
        )
        table = readme_flag_rows("dqn_pruned.py" if same_as_dqn else script)
        assert row in table, f"{script}: README row missing or stale: {row}"
