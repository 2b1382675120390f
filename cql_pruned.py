"""Offline CQL and CQL+C51 on DQN Replay Dataset checkpoints, with sparse training: GMP, RigL, SET or static sparsity.

Papers
    Obando-Ceron, Courville & Castro, "In value-based deep RL, a pruned network is a good network", ICML 2024 (§4.4).
    Kumar, Zhou, Tucker & Levine, "Conservative Q-learning for offline RL", NeurIPS 2020 (CQL(H)).
    Agarwal, Schuurmans & Norouzi, "An optimistic perspective on offline RL", ICML 2020 (the DQN Replay Dataset).
    Bellemare, Dabney & Munos, ICML 2017 (C51); Ganaie et al. (RigL vs pruning); Ma et al., ICML 2025 (static sparsity).

The agents (SPEC 3.5)
    CQL: the DQN network (torso -> Dense 512 -> ReLU -> Dense A). Loss: Huber (delta 1) of y - Q(s, a) with
    y = r + gamma (1 - d) max_a' Q_target(s', a'), plus alpha * (logsumexp_a Q(s, a) - Q(s, a_data)), both batch means,
    alpha 0.1, 1-step, Adam 5e-5 / eps 3.125e-4, target copy every 2000 gradient steps.
    CQL+C51 (--c51): torso -> Dense 512*k -> ReLU -> dueling C51 head (logits = V + A - mean_a A over 51 atoms on
    [-10, 10]); cross-entropy to the categorical projection of the double-DQN target (a* from the online network, its
    distribution from the target network), plus the same alpha * regularizer on Q = sum_i z_i p_i; 3-step,
    Adam 6.25e-5 / eps 1.5e-4, target copy every 100 gradient steps.
    Training is offline: iterations of 62,500 gradient steps on uniform batches of 32 from the loaded dataset, each
    followed by an evaluation in the real environment (whole episodes until 125,000 env steps, epsilon 0.001).

The data (METHODS 7): a run's replay_logs/ of the DQN Replay Dataset, or one written by an online script's
    --save-replay-dir. --first-checkpoint/--num-checkpoints choose the checkpoints and --transitions-per-checkpoint
    keeps the first slots of each: the defaults, checkpoints 0-49 and 50,000 slots each, are the paper's 5% (2.5M
    transitions, ~18 GB of frames). Stacks and n-step returns are rebuilt from single frames when a batch is drawn.

What is pruned, when, and how (the default, --pruning-method gmp): as in dqn_pruned.py, over the offline gradient
    steps: masks recomputed every 1000 gradient steps between 20% and 80% of them (2.5M to 10M of the paper's 12.5M),
    ERK per-layer sparsities, theta <- (theta + adam_update) * mask after EVERY step.

Deviations from the paper and its code (the same list is in the README)
    1-3. Those of dqn_pruned.py: the forced final mask update and the window derived from the run, RigL/SET's optimizer
       step on mask-update steps, host-drawn random masks.
    10. The checkpoints are loaded once, not 5 random ones re-read every iteration (Dopamine's gz path), and not the
       TFDS episodes: the defaults load the same 2.5M transitions the paper's 5% names.
    11. A transition is valid (Dopamine's rules) if it is outside invalid_range, its frame stack holds no earlier
       episode end, and its next state is loaded; Dopamine asks for the whole n-step window, so near the end of a
       loaded range a window cut short by a terminal is kept here. Slots listed in truncation_ckpt (written by
       --save-replay-dir, absent from the public data) end windows with a bootstrap and are never sampled. In a full
       checkpoint the slots around the write cursor are also excluded for this reader's stack and n (the file's
       invalid_range holds the logging agent's n = 1): a 3-step window never ends on the stale slot there.

Analysis, checkpoints (the README explains both)
    --metrics-frequency N logs common/metrics.py's analysis metrics (dormant and dead neurons, srank, norms, gradient
    covariance) on one fixed batch every N steps. --checkpoint-frequency N writes everything the run needs to go on
    every N steps (runs/.../checkpoint.pkl, atomically); --resume RUN_DIR continues it bit-identically on CPU. A
    non-finite loss stops the run after checkpointing the last good train state.

Examples (the README explains them)
    python dqn_pruned.py --env-id CartPole-v1 ... --save-replay-dir data/cartpole           # make a dataset (CPU)
    python cql_pruned.py --env-id CartPole-v1 --network mlp --dataset-dir data/cartpole ...  # train on it (CPU)
    python cql_pruned.py --env-id ALE/Pong-v5 --dataset-dir dqn_replay/Pong/1 --width-scale 3  # the paper's, a GPU job
"""

# ======================================================================================= imports
import dataclasses
import functools
import gzip
import json
import math
import os
import pickle
import sys
import time
import zlib
from collections import deque
from typing import Any, Literal, NamedTuple, Optional, get_args, get_origin

import ale_py
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import serialization, struct
from jax.flatten_util import ravel_pytree
from tensorboardX import SummaryWriter

from common import metrics  # the analysis metrics: the one module of common/ the scripts import

gym.register_envs(ale_py)  # makes the ALE/...-v5 ids known to gymnasium
ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no ALE banner on stderr


# ========================================================================================== Args
@dataclasses.dataclass(frozen=True)
class Args:
    # experiment arguments of the offline run
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment; the run directory is runs/{env}__{exp_name}__{seed}__{unix time}"""
    seed: int = 1
    """seed of the run: one JAX root key and one NumPy Generator (batch sampling, evaluation)"""
    env_id: str = "ALE/Breakout-v5"
    """gymnasium id of the evaluation environment, the game the dataset comes from: ALE/{Game}-v5 (SPEC 4) or classic control"""
    dataset_dir: Optional[str] = None
    """directory of a run's DQN Replay checkpoints ({Game}/{run}/replay_logs/, or the {Game}/{run}/ above it) fetched by you, or a --save-replay-dir; required"""
    first_checkpoint: int = 0
    """suffix of the first checkpoint file to load ($store$_observation_ckpt.{i}.gz)"""
    num_checkpoints: int = 50
    """checkpoints to load, suffixes first-checkpoint .. first-checkpoint + num - 1 (the paper: 0-49)"""
    transitions_per_checkpoint: int = 50_000
    """slots kept from the start of each checkpoint (the paper's 5%: 50,000 of 1M); fewer use less RAM"""
    num_iterations: int = 200
    """iterations of training, each followed by an evaluation (the paper: 200, Fig. 8)"""
    grad_steps_per_iteration: int = 62_500
    """gradient steps per iteration (the paper: 62,500; 12.5M in all)"""
    eval_steps: int = 125_000
    """env steps of each evaluation, in whole episodes (Dopamine's 125,000)"""
    eval_epsilon: float = 0.001
    """epsilon of the epsilon-greedy evaluation policy (Dopamine's 0.001)"""
    save_model: bool = False
    """write runs/{run_name}/{exp_name}.msgpack: flax msgpack of the plain dict {"params": ..., "masks": ...}"""
    log_frequency: int = 1000
    """gradient steps between TensorBoard logs of losses, SPS and sparsity (evaluations are logged after every iteration)"""

    # algorithm specific arguments (CQL, CQL+C51; SPEC 3.5)
    c51: bool = False
    """CQL+C51: dueling C51 head, double-DQN target, 3-step, and the CQL+C51 column of SPEC 3.5 for every unset flag"""
    learning_rate: Optional[float] = None
    """Adam learning rate; unset: 5e-5 (CQL), 6.25e-5 (CQL+C51) (paper Table 3)"""
    adam_eps: Optional[float] = None
    """Adam epsilon; unset: 3.125e-4 (CQL), 1.5e-4 (CQL+C51) (paper Table 3)"""
    n_step: Optional[int] = None
    """n of the n-step return; unset: 1 (CQL), 3 (CQL+C51) (paper Table 3)"""
    target_update_period: Optional[int] = None
    """gradient steps between hard copies into the target network; unset: 2000 (CQL), 100 (CQL+C51) (Dopamine's gins, SPEC 3.5)"""
    cql_alpha: float = 0.1
    """alpha, the weight of the CQL regularizer logsumexp_a Q(s,a) - Q(s,a_data) (paper Table 3)"""
    batch_size: int = 32
    """transitions per gradient step (paper Table 3)"""
    gamma: float = 0.99
    """discount factor (paper Table 3)"""
    num_atoms: int = 51
    """--c51: atoms of the return distribution (paper Table 3)"""
    v_min: float = -10.0
    """--c51: smallest atom of the support"""
    v_max: float = 10.0
    """--c51: largest atom of the support (paper Table 3)"""
    network: Literal["resnet", "cnn", "nature", "mlp"] = "resnet"
    """torso: Impala ResNet (16,32,32)*k (SPEC 1.2), Nature CNN (32,64,64)*k with SAME padding (SPEC 1.3, Dopamine's) or with VALID padding (nature: Mnih et al. 2015's, CleanRL's), or an MLP for vector observations"""
    width_scale: int = 1
    """width multiplier k of every conv channel count (MLP: of its hidden layer); the paper uses k=1 and k=3 offline"""
    scale_dense: Optional[bool] = None
    """also multiply the 512-unit dense layer by k; unset: off for CQL (the DQN network), on for CQL+C51 (SPEC 1.4)"""
    use_bias: bool = True
    """biases in the hidden layers (Ganaie et al. remove them: --no-use-bias)"""
    use_output_bias: bool = True
    """bias in the output layer(s) (separate from --use-bias, METHODS 1.5)"""

    # ---------------------------------------------------------------- shared: pruning args
    pruning_method: Literal["gmp", "rigl", "set", "static", "none"] = "gmp"
    """gmp: gradual magnitude pruning (SPEC 2); rigl/set: dynamic sparse training (METHODS 1.3); static: random mask at init (Ma et al. 2025); none: dense"""
    sparsity: float = 0.95
    """final fraction of zero weights over all prunable kernels, in [0, 1) (paper: 0.95)"""
    sparsity_distribution: Literal["erk", "uniform"] = "erk"
    """per-layer sparsities: Erdos-Renyi-Kernel (SPEC 2.4, the paper's) or the same sparsity in every layer"""
    prune_start_fraction: Optional[float] = None
    """fraction of the run's gradient steps at which mask updates start; unset: 0.2 for gmp (SPEC 2.1), 0.0 for rigl/set (Graesser et al. 2022)"""
    prune_end_fraction: float = 0.8
    """fraction of the run's gradient steps at which mask updates stop; the mask is fixed afterwards (SPEC 2.1)"""
    prune_frequency_grad_steps: Optional[int] = None
    """gradient steps between mask updates; unset: 1000 for gmp (JaxPruner dqn.gin), 5000 for rigl/set (Graesser et al. 2022)"""
    drop_fraction: float = 0.3
    """rigl/set: initial fraction of each layer's active weights dropped and regrown per update, cosine-decayed to 0 at the window's end (METHODS 1.4)"""
    mask_sampling: Literal["exact", "bernoulli"] = "exact"
    """random initial masks (static, rigl, set): exactly round(N(1-s)) kept weights per layer, or independent Bernoulli(1-s) entries (Ma et al. code)"""
    # ------------------------------------------------------------ end shared: pruning args

    # ---------------------------------------------------------------- shared: analysis args
    metrics_frequency: int = 250_000
    """steps between logs of the analysis metrics (common/metrics.py: dormant and dead neurons, srank, norms, gradient covariance; env steps, gradient steps in cql_pruned.py); 0: off"""
    metrics_batch_size: int = 256
    """replay transitions in the one fixed batch the analysis metrics are computed on (Dopamine's ReDo statistics use 256)"""
    metrics_grad_samples: int = 64
    """the first transitions of that batch whose per-sample gradients make the gradient covariance matrix (memory: samples x parameters floats)"""
    # ------------------------------------------------------------ end shared: analysis args

    # ---------------------------------------------------------------- shared: checkpoint args
    checkpoint_frequency: int = 0
    """steps between checkpoints of everything the run needs to go on, runs/{run_name}/checkpoint.pkl (env steps; gradient steps in cql_pruned.py); 0: off"""
    resume: Optional[str] = None
    """a run directory to continue from its checkpoint, appending to its logs; its config.json gives every flag not given here, and flags that change the run are refused"""
    # ------------------------------------------------------------ end shared: checkpoint args


# ---------------------------------------------------------------- shared: arg checks
class ArgsError(ValueError):
    """A bad command-line value; reported as one line on stderr with exit code 2."""


def check_args(args: Args) -> None:
    """Raises ArgsError naming the first invalid field (or combination of fields): the run's fields (run_checks), the
    network width, sparse training's fields (pruning_checks), the analysis metrics' (analysis_checks), checkpointing
    and resuming (checkpoint_checks), then the algorithm's own (algorithm_checks)."""
    checks = run_checks(args) + [(args.width_scale > 0, f"--width-scale must be a positive integer, got {args.width_scale}"),
                                 (args.exp_name not in ("", ".", "..") and "/" not in args.exp_name, f"--exp-name must be a name, not {args.exp_name!r}")]
    for field in dataclasses.fields(args):  # tyro checks these on the command line; main(Args(...)) too
        choices = get_args(field.type) if get_origin(field.type) is Literal else ()
        checks.append((not choices or getattr(args, field.name) in choices, f"--{field.name.replace('_', '-')} must be one of {choices}"))
    for ok, message in checks + pruning_checks(args) + analysis_checks(args) + checkpoint_checks(args) + algorithm_checks(args):
        if not ok:
            raise ArgsError(message)
# ------------------------------------------------------------ end shared: arg checks


def resolve(args: Args) -> Args:
    """Fills the unset algorithm flags with the CQL or the CQL+C51 column of SPEC 3.5."""
    defaults = (6.25e-5, 1.5e-4, 3, 100, True) if args.c51 else (5e-5, 3.125e-4, 1, 2000, False)
    names = ("learning_rate", "adam_eps", "n_step", "target_update_period", "scale_dense")
    return dataclasses.replace(args, **{n: d if getattr(args, n) is None else getattr(args, n) for n, d in zip(names, defaults)})


def run_checks(args: Args) -> list:
    """(ok, message) pairs for the fields of the offline loop (data, schedule, evaluation, logging); args resolved."""
    return [
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.dataset_dir is not None, "--dataset-dir is required: a directory of DQN Replay checkpoints (see the README)"),
        (args.first_checkpoint >= 0, "--first-checkpoint must be >= 0"),
        (args.num_checkpoints > 0, "--num-checkpoints must be > 0"),
        (args.transitions_per_checkpoint > 0, "--transitions-per-checkpoint must be > 0"),
        (args.num_iterations > 0, "--num-iterations must be > 0"),
        (args.grad_steps_per_iteration > 0, "--grad-steps-per-iteration must be > 0"),
        (args.eval_steps > 0, "--eval-steps must be > 0"),
        (0 <= args.eval_epsilon <= 1, "--eval-epsilon must be in [0, 1]"),
        (args.log_frequency > 0, "--log-frequency must be > 0"),
        (args.learning_rate > 0, "--learning-rate must be > 0"),
        (args.adam_eps > 0, "--adam-eps must be > 0"),
        (args.n_step >= 1, "--n-step must be >= 1"),
        (args.target_update_period > 0, "--target-update-period must be > 0"),
        (args.batch_size > 0, "--batch-size must be > 0"),
        (0 < args.gamma <= 1, "--gamma must be in (0, 1]"),
    ]


def algorithm_checks(args: Args) -> list:
    """(ok, message) pairs for the CQL and C51 fields."""
    return [
        (args.cql_alpha >= 0, f"--cql-alpha must be >= 0, got {args.cql_alpha}"),
        (args.num_atoms >= 2, f"--num-atoms must be >= 2, got {args.num_atoms}"),
        (args.v_min < args.v_max, f"need --v-min ({args.v_min}) < --v-max ({args.v_max})"),
    ]


# =================================================================================== environment
# ---------------------------------------------------------------- shared: environment
def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of area interpolation (OpenCV INTER_AREA when shrinking): output pixel i averages
    input interval [i * n_in / n_out, (i + 1) * n_in / n_out), each input pixel weighted by its overlap."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    left, right = np.arange(n_in)[None, :], np.arange(n_in)[None, :] + 1
    overlap = np.clip(np.minimum(right, lo + scale) - np.maximum(left, lo), 0, None)
    return (overlap / scale).astype(np.float32)


def banded_taps(matrix: np.ndarray) -> tuple:
    """The non-zeros of each row of a banded matrix: (rows, taps) column indices and weights, zero-padded.
    Resizing with a few taps per pixel avoids BLAS, whose threads contend with XLA's during training."""
    taps = int((matrix > 0).sum(axis=1).max())
    columns = np.argsort(matrix <= 0, axis=1, kind="stable")[:, :taps]  # non-zero columns first, in order
    return columns, np.take_along_axis(matrix, columns, axis=1)


class AtariEnv:
    """Atari with Dopamine's protocol (SPEC 4), on ale-py's ALEInterface.

    Sticky actions p=0.25, frame skip 4 (rewards summed), max-pool of the last two grayscale frames, 84x84 area
    resize, minimal action set, life loss not terminal, no no-op or FIRE starts, episodes truncated after 27,000
    agent steps (108k frames). Observations are single (84, 84) uint8 frames: the agent stacks 4 of them.
    Rewards are returned unclipped; the training loop clips what it stores.
    """

    def __init__(self, game: str, frame_skip: int = 4, sticky: float = 0.25, max_steps: int = 27_000):
        self.ale = ale_py.ALEInterface()
        self.ale.setFloat("repeat_action_probability", sticky)
        self.rom = ale_py.roms.get_rom_path(game)
        self.ale.loadROM(self.rom)
        self.frame_skip, self.sticky, self.max_steps, self.steps = frame_skip, sticky, max_steps, 0
        self.actions = self.ale.getMinimalActionSet()
        self.action_space = gym.spaces.Discrete(len(self.actions))
        self.observation_space = gym.spaces.Box(0, 255, (84, 84), np.uint8)
        height, width = self.ale.getScreenDims()
        self.screens = np.zeros((2, height, width), np.uint8)  # the last two frames of a step, max-pooled
        self.row_taps, self.col_taps = banded_taps(area_resize_matrix(height, 84)), banded_taps(area_resize_matrix(width, 84))

    def _observation(self) -> np.ndarray:
        pooled = np.maximum(self.screens[0], self.screens[1]).astype(np.float32)  # (210, 160)
        (row_idx, row_w), (col_idx, col_w) = self.row_taps, self.col_taps
        rows = np.einsum("ot,otw->ow", row_w, pooled[row_idx])  # (84, 160)
        resized = np.einsum("hot,ot->ho", rows[:, col_idx], col_w)  # (84, 84)
        return np.clip(np.rint(resized), 0, 255).astype(np.uint8)

    def reset(self, seed: Optional[int] = None):
        if seed is not None:  # ALE takes its seed when a ROM is loaded
            self.ale.setInt("random_seed", seed % 2**31)
            self.ale.loadROM(self.rom)
        self.ale.reset_game()
        self.steps, self.start_state, self.episode_actions = 0, self.ale.cloneState(include_rng=True), []
        self.ale.getScreenGrayscale(self.screens[0])
        self.screens[1].fill(0)
        return self._observation(), {}

    def __getstate__(self) -> dict:
        """Pickling (checkpoints). ALE's cloned state leaves out the last action, which sticky actions repeat, so the
        episode so far is kept instead: its start state (random generator included) and its actions."""
        return {name: value for name, value in self.__dict__.items() if name != "ale"}

    def __setstate__(self, state: dict) -> None:
        """Unpickling: a new emulator replays the episode's actions from its start state."""
        self.__dict__.update(state)
        self.ale = ale_py.ALEInterface()
        self.ale.setFloat("repeat_action_probability", self.sticky)
        self.ale.loadROM(self.rom)
        self.ale.restoreState(self.start_state)
        actions, self.episode_actions, self.steps = self.episode_actions, [], 0
        for action in actions:
            self.step(action)
        self.screens = state["screens"]

    def step(self, action: int):
        self.episode_actions.append(action)
        reward = 0.0
        for t in range(self.frame_skip):
            reward += self.ale.act(self.actions[action])
            if self.ale.game_over():
                break
            if t >= self.frame_skip - 2:
                self.ale.getScreenGrayscale(self.screens[t - (self.frame_skip - 2)])
        self.steps += 1
        terminated = self.ale.game_over()
        truncated = not terminated and self.steps >= self.max_steps
        return self._observation(), reward, terminated, truncated, {}


def make_env(env_id: str):
    """Returns (env, is_atari). ALE/{Game}-v5 ids get AtariEnv; other discrete-action gymnasium ids, gym.make."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as error:  # unknown id: gymnasium's message suggests close matches
        raise ArgsError(f"unknown --env-id {env_id!r}: {error}") from None
    if spec.entry_point == "ale_py.env:AtariEnv":
        return AtariEnv(spec.kwargs["game"]), True
    env = gym.make(env_id)
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ArgsError(f"--env-id {env_id!r} has action space {env.action_space}; DQN needs a discrete one")
    return env, False
# ------------------------------------------------------------ end shared: environment


# ======================================================================================= network
# ---------------------------------------------------------------- shared: network torso
class ImpalaTorso(nn.Module):
    """Impala ResNet (SPEC 1.2): 3 stacks of [conv, 3x3/2 max-pool, 2 residual blocks], channels (16,32,32)*k.
    (B, 84, 84, 4) uint8 -> (B, 3872*k)."""

    width: int
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32) / 255.0
        for i, channels in enumerate((16, 32, 32)):
            channels *= self.width
            x = nn.Conv(channels, (3, 3), kernel_init=nn.initializers.xavier_uniform(), use_bias=self.use_bias, name=f"stack{i}_conv")(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for j in range(2):  # pre-activation residual blocks, flax-default (lecun_normal) init
                y = nn.Conv(channels, (3, 3), use_bias=self.use_bias, name=f"stack{i}_block{j}_conv0")(nn.relu(x))
                y = nn.Conv(channels, (3, 3), use_bias=self.use_bias, name=f"stack{i}_block{j}_conv1")(nn.relu(y))
                x = x + y
        x = nn.relu(x)
        return x.reshape(x.shape[0], -1)  # (B, 11*11*32k), HWC order


class NatureTorso(nn.Module):
    """Nature DQN CNN. SAME padding as in Dopamine's flax network (SPEC 1.3): 84 -> 21 -> 11 -> 11,
    (B, 84, 84, 4) uint8 -> (B, 7744*k); VALID padding as in Mnih et al. (2015) and CleanRL: 84 -> 20 -> 9 -> 7,
    (B, 84, 84, 4) -> (B, 3136*k), 1.7x fewer multiply-adds."""

    width: int
    use_bias: bool
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32) / 255.0
        for i, (channels, kernel, stride) in enumerate(((32, 8, 4), (64, 4, 2), (64, 3, 1))):
            x = nn.Conv(channels * self.width, (kernel, kernel), (stride, stride), padding=self.padding, kernel_init=nn.initializers.xavier_uniform(), use_bias=self.use_bias, name=f"conv{i}")(x)
            x = nn.relu(x)
        return x.reshape(x.shape[0], -1)


class MLPTorso(nn.Module):
    """One hidden layer of 256*k ReLU units for vector observations. (B, ...) -> (B, 256*k)."""

    width: int
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        return nn.relu(nn.Dense(256 * self.width, kernel_init=nn.initializers.xavier_uniform(), use_bias=self.use_bias, name="fc")(x))


TORSOS = {"resnet": ImpalaTorso, "cnn": NatureTorso, "nature": functools.partial(NatureTorso, padding="VALID"), "mlp": MLPTorso}
# ------------------------------------------------------------ end shared: network torso


# ---------------------------------------------------------------- shared: q network
class QNetwork(nn.Module):
    """Torso -> Dense 512 (*k with scale_dense) -> ReLU -> Dense A (xavier_uniform, SPEC 1.2). (B, ...) -> (B, A)."""

    num_actions: int
    torso: str
    width: int
    scale_dense: bool
    use_bias: bool
    use_output_bias: bool

    @nn.compact
    def __call__(self, x):
        x = TORSOS[self.torso](self.width, self.use_bias, name="torso")(x)
        hidden = 512 * (self.width if self.scale_dense else 1)
        x = nn.relu(nn.Dense(hidden, kernel_init=nn.initializers.xavier_uniform(), use_bias=self.use_bias, name="dense")(x))
        return nn.Dense(self.num_actions, kernel_init=nn.initializers.xavier_uniform(), use_bias=self.use_output_bias, name="q")(x)
# ------------------------------------------------------------ end shared: q network


class DuelingC51Network(nn.Module):
    """Torso -> Dense 512 (*k with scale_dense) -> ReLU -> dueling C51 head (SPEC 1.4, Dopamine's offline
    ParameterizedRainbowNetwork): logits = V(s) + A(s, a) - mean_a A(s, a), V (1, atoms) and A (A, atoms) from two
    Dense layers with flax's default init. (B, ...) -> (B, A, atoms) logits."""

    num_actions: int
    num_atoms: int
    torso: str
    width: int
    scale_dense: bool
    use_bias: bool
    use_output_bias: bool

    @nn.compact
    def __call__(self, x):
        x = TORSOS[self.torso](self.width, self.use_bias, name="torso")(x)
        hidden = 512 * (self.width if self.scale_dense else 1)
        x = nn.relu(nn.Dense(hidden, kernel_init=nn.initializers.xavier_uniform(), use_bias=self.use_bias, name="dense")(x))
        value = nn.Dense(self.num_atoms, use_bias=self.use_output_bias, name="value")(x)  # (B, atoms)
        advantage = nn.Dense(self.num_actions * self.num_atoms, use_bias=self.use_output_bias, name="advantage")(x)
        advantage = advantage.reshape(x.shape[0], self.num_actions, self.num_atoms)  # (B, A, atoms)
        return value[:, None, :] + advantage - advantage.mean(axis=1, keepdims=True)


# ================================================================================ offline dataset
# ---------------------------------------------------------------- shared: batch
class Batch(NamedTuple):
    obs: np.ndarray  # (B, *frame_shape, stack) state s_t
    actions: np.ndarray  # (B,) int32
    rewards: np.ndarray  # (B,) float32, n-step discounted sum of (clipped) rewards
    discounts: np.ndarray  # (B,) float32, gamma^k * (1 - terminated); k <= n steps actually taken
    next_obs: np.ndarray  # (B, *frame_shape, stack) state s_{t+k}
# ------------------------------------------------------------ end shared: batch


# ---------------------------------------------------------------- shared: dataset format
# The DQN Replay Dataset (Agarwal et al. 2020; METHODS 7.2), the format of Dopamine's logged replay buffers: checkpoint
# i of a run is the files {name}_ckpt.{i}.gz of its replay_logs/ directory, each a gzip of one np.save array.
STORES = ("$store$_observation", "$store$_action", "$store$_reward", "$store$_terminal")  # one entry per slot
CHECKPOINT_ARRAYS = STORES + ("add_count", "invalid_range")
TRUNCATION = "truncation"  # not in Dopamine's format: slots holding a truncated episode's final observation


def replay_file(directory: str, name: str, suffix: int) -> str:
    """Path of array `name` of checkpoint `suffix`."""
    return os.path.join(directory, f"{name}_ckpt.{suffix}.gz")


def checkpoint_files(directory: str) -> dict:
    """{suffix: set of array names} of the checkpoint files in `directory` ({} if it holds none)."""
    found = {}
    for file_name in os.listdir(directory) if os.path.isdir(directory) else []:
        name, _, rest = file_name.partition("_ckpt.")
        suffix = rest[: -len(".gz")] if rest.endswith(".gz") else ""
        if suffix.isdigit():
            found.setdefault(int(suffix), set()).add(name)
    return found


def dopamine_invalid_range(cursor: int, capacity: int, stack: int, n_step: int) -> np.ndarray:
    """Dopamine's invalid_range: the stack + n slots around the write cursor whose frame stack or n-step window
    would cross it, (cursor - n + i) % capacity for i < stack + n."""
    return np.array([(cursor - n_step + i) % capacity for i in range(stack + n_step)], np.int64)
# ------------------------------------------------------------ end shared: dataset format


class NpyStream(NamedTuple):
    path: str
    stream: Any  # gzip stream positioned at the array's first byte
    shape: tuple
    dtype: np.dtype


def open_npy_gz(path: str) -> NpyStream:
    """Opens a gzip of one np.save array and reads its header; the data is read later, as far as needed."""
    try:
        stream = gzip.open(path, "rb")
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read_header(stream)
    except KeyError:
        raise ArgsError(f"{path}: unsupported .npy version {version}") from None
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise ArgsError(f"{path}: not a gzipped .npy array, truncated or corrupt ({error})") from None
    if fortran_order or dtype.hasobject:
        raise ArgsError(f"{path}: expected a C-ordered numeric array, got fortran_order={fortran_order}, dtype={dtype}")
    return NpyStream(path, stream, shape, dtype)


def read_rows(array: NpyStream, rows: Optional[int] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The first `rows` rows of an opened array (all of it if None), into `out` if given, in 16 MiB pieces (no second
    copy of the frames); a short read is a truncated file. Only what is read is checked: the gzip CRC, at the end of
    the file, when the whole array is read."""
    rows = array.shape[0] if rows is None and array.shape else rows
    shape = (rows, *array.shape[1:]) if array.shape else ()
    out = np.empty(shape, array.dtype) if out is None else out
    view, done = memoryview(out.reshape(-1)).cast("B"), 0
    try:
        while done < len(view):
            read = array.stream.readinto(view[done:done + (1 << 24)])
            if not read:
                break
            done += read
        if done == len(view) and shape == array.shape:  # the whole array: reading on to the end checks the gzip CRC
            array.stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ArgsError(f"{array.path}: truncated or corrupt ({error})") from None
    finally:
        array.stream.close()
    if done < len(view):
        raise ArgsError(f"{array.path}: truncated: {done} of the {len(view)} bytes of shape {shape} are there")
    return out


def check_array(array: NpyStream, shape: tuple, kinds: str, what: str) -> None:
    """Shape and dtype kind (numpy's 'i', 'u', 'f', 'b') of a checkpoint array, or an ArgsError naming the file."""
    if array.shape != shape or array.dtype.kind not in kinds:
        raise ArgsError(f"{array.path}: expected {what} of shape {shape}, got dtype {array.dtype} and shape {array.shape}")


def window_transitions(rewards, terminals, truncation, invalid, stack: int, n_step: int, gamma: float):
    """Every sampleable slot j of one checkpoint's loaded slots, and its n-step transition, as Dopamine defines them
    (METHODS 7.3): R = sum_{k<K} gamma^k r_{j+k}, discount gamma^K (1 - terminal), next state at slot j + K, where the
    window stops after K = n slots, at a terminal (included, no bootstrap), or before a truncation slot (bootstrap).
    Valid: not in invalid_range, not a truncation slot, no episode end (terminal or truncation slot) among the frames
    j-stack+1..j-1 of its stack (which starts with zero padding after an episode start), and stack and next state
    inside the loaded slots. (L,) arrays -> (valid slots, rewards, discounts, next slots)."""
    size = len(rewards)
    slots = np.arange(size)
    returns, steps = np.zeros(size, np.float64), np.zeros(size, np.int64)
    alive, terminal = np.ones(size, bool), np.zeros(size, bool)
    for k in range(n_step):
        j = np.minimum(slots + k, size - 1)
        returns += np.where(alive, gamma**k * rewards[j], 0.0)
        terminal |= alive & terminals[j]
        steps += alive
        alive &= ~terminals[j] & ~truncation[np.minimum(j + 1, size - 1)]
    ends_before = np.concatenate([[0], np.cumsum(terminals | truncation)])  # episode ends among slots [0, i)
    ends_in_stack = ends_before[slots] - ends_before[np.maximum(slots - stack + 1, 0)]  # among [j-stack+1, j)
    valid = (slots >= stack - 1) & (slots + steps <= size - 1) & ~truncation & ~invalid & (ends_in_stack == 0)
    discounts = gamma**steps * ~terminal
    return slots[valid], returns[valid].astype(np.float32), discounts[valid].astype(np.float32), (slots + steps)[valid]


class ReplayDataset:
    """The loaded checkpoints: single frames and actions of every kept slot, one after the other, and the valid
    transitions (start slot, n-step reward and discount, next slot); stacks are rebuilt when a batch is drawn."""

    def __init__(self, frames, actions, starts, rewards, discounts, next_slots, stack: int):
        self.frames, self.actions, self.stack = frames, actions, stack
        self.starts, self.rewards, self.discounts, self.next_slots = starts, rewards, discounts, next_slots

    def __len__(self) -> int:
        return len(self.starts)

    def stacked(self, slots: np.ndarray) -> np.ndarray:
        """(B,) slots -> (B, *frame_shape, stack): frames slot-stack+1..slot, oldest first (never across an episode
        start: validity and the zero padding at episode starts see to that)."""
        frames = self.frames[slots[:, None] - np.arange(self.stack - 1, -1, -1)[None, :]]  # (B, stack, *frame_shape)
        return np.moveaxis(frames, 1, -1)

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """Uniform over the valid transitions."""
        i = rng.integers(0, len(self.starts), batch_size)
        slots = self.starts[i]
        return Batch(self.stacked(slots), self.actions[slots], self.rewards[i], self.discounts[i], self.stacked(self.next_slots[i]))


def read_checkpoint(directory: str, suffix: int, names: set, args: Args, frame_shape: tuple, frame_dtype, num_actions: int, stack: int):
    """Checks every file of one checkpoint and reads all but its frames: (frames path, slots kept, actions, the
    valid transitions of window_transitions). Slots kept: the first --transitions-per-checkpoint written ones."""
    missing = [name for name in CHECKPOINT_ARRAYS if name not in names]
    if missing:
        raise ArgsError(f"checkpoint {suffix} in {directory} lacks {', '.join(replay_file(directory, m, suffix) for m in missing)}")
    file = {name: open_npy_gz(replay_file(directory, name, suffix)) for name in CHECKPOINT_ARRAYS}
    observations = file[STORES[0]]
    observations.stream.close()  # its rows are read later, into the dataset's frames
    capacity = observations.shape[0] if observations.shape else 0
    if observations.shape != (capacity, *frame_shape) or observations.dtype != frame_dtype:
        raise ArgsError(f"{observations.path}: expected frames of shape (N, {', '.join(map(str, frame_shape))}) and dtype "
                        f"{np.dtype(frame_dtype)} for {args.env_id}, got shape {observations.shape} and dtype {observations.dtype}")
    check_array(file[STORES[1]], (capacity,), "iu", "integer actions")
    check_array(file[STORES[2]], (capacity,), "f", "float rewards")
    check_array(file[STORES[3]], (capacity,), "iub", "integer terminal flags")
    check_array(file["add_count"], (), "iu", "an integer add_count")
    check_array(file["invalid_range"], file["invalid_range"].shape[:1], "iu", "integer invalid_range slots")
    add_count = int(read_rows(file["add_count"]))
    if add_count < 0:
        raise ArgsError(f"{file['add_count'].path}: add_count {add_count} < 0")
    rows = min(add_count, capacity, args.transitions_per_checkpoint)
    actions = read_rows(file[STORES[1]], rows)
    if rows and not 0 <= actions.min() <= actions.max() < num_actions:
        raise ArgsError(f"{file[STORES[1]].path}: actions {actions.min()}..{actions.max()}, but {args.env_id} has "
                        f"{num_actions} actions: a dataset of another game?")
    invalid_slots = [read_rows(file["invalid_range"])]
    if add_count >= capacity:  # a full circular buffer: also the slots around its cursor for this reader's stack and n
        invalid_slots.append(dopamine_invalid_range(add_count % capacity, capacity, stack, args.n_step))
    truncation_slots = []
    if TRUNCATION in names:
        truncation_file = open_npy_gz(replay_file(directory, TRUNCATION, suffix))
        check_array(truncation_file, truncation_file.shape[:1], "iu", "integer truncation slots")
        truncation_slots.append(read_rows(truncation_file))

    def flags(slot_lists):  # (rows,) bool: True at the listed slots that were kept
        out = np.zeros(rows, bool)
        for slots in slot_lists:
            out[slots[(slots >= 0) & (slots < rows)]] = True
        return out

    terminals = read_rows(file[STORES[3]], rows).astype(bool)
    transitions = window_transitions(read_rows(file[STORES[2]], rows), terminals, flags(truncation_slots), flags(invalid_slots),
                                     stack, args.n_step, args.gamma)
    return observations.path, rows, actions.astype(np.int32), transitions


def load_dataset(args: Args, frame_shape: tuple, frame_dtype, num_actions: int, stack: int) -> ReplayDataset:
    """Reads --num-checkpoints checkpoints from --first-checkpoint on, the first --transitions-per-checkpoint written
    slots of each (a checkpoint holds min(add_count, capacity)), checking every file before any frame is read."""
    directory = args.dataset_dir
    if os.path.isdir(os.path.join(directory, "replay_logs")):
        directory = os.path.join(directory, "replay_logs")
    if not os.path.isdir(directory):
        raise ArgsError(f"--dataset-dir {args.dataset_dir} is not a directory")
    try:
        found = checkpoint_files(directory)
    except OSError as error:
        raise ArgsError(f"--dataset-dir {directory}: {error}") from None
    if not found:
        raise ArgsError(f"--dataset-dir {directory} holds no replay checkpoints ({replay_file(directory, STORES[0], 0)}, ...)")
    wanted = range(args.first_checkpoint, args.first_checkpoint + args.num_checkpoints)
    if not set(wanted) <= set(found):
        raise ArgsError(f"--dataset-dir {directory} has checkpoints {sorted(found)}; --first-checkpoint {args.first_checkpoint} "
                        f"--num-checkpoints {args.num_checkpoints} asks for {wanted.start}..{wanted.stop - 1}")
    pieces = [read_checkpoint(directory, s, found[s], args, frame_shape, frame_dtype, num_actions, stack) for s in wanted]
    offsets = np.cumsum([0] + [rows for _, rows, _, _ in pieces])
    try:
        frames = np.empty((offsets[-1], *frame_shape), frame_dtype)
    except MemoryError:
        raise ArgsError(f"not enough memory for {offsets[-1]} frames ({offsets[-1] * math.prod(frame_shape) * np.dtype(frame_dtype).itemsize / 2**30:.1f} GiB): "
                        "lower --transitions-per-checkpoint or --num-checkpoints") from None
    for (path, rows, _, _), offset in zip(pieces, offsets):
        read_rows(open_npy_gz(path), rows, out=frames[offset:offset + rows])
    starts, rewards, discounts, next_slots = (np.concatenate([t[i] + (o if i in (0, 3) else 0) for (_, _, _, t), o in zip(pieces, offsets)])
                                              for i in range(4))
    dataset = ReplayDataset(frames, np.concatenate([p[2] for p in pieces]), starts, rewards, discounts, next_slots, stack)
    if len(dataset) == 0:
        raise ArgsError(f"no valid transition in checkpoints {wanted.start}..{wanted.stop - 1} of {directory}")
    return dataset


# ============================================================================ sparse training core
# ---------------------------------------------------------------- shared: sparse training
def is_prunable(leaf) -> bool:
    """Kernels (ndim > 1: every conv and dense kernel, first conv and output layer included) are prunable;
    biases are not (JaxPruner's default filter, SPEC 2.3)."""
    return leaf.ndim > 1


def layer_name(path) -> str:
    """Tree path -> 'torso/stack0_conv/kernel'."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def erk_sparsities(shapes: list, sparsity: float) -> list:
    """Erdos-Renyi-Kernel per-layer sparsities (SPEC 2.4). Layer l keeps density eps * (sum of dims)/(prod of dims);
    layers that would exceed density 1 are made dense and eps is re-solved, so that the kept weights equal the
    uniform budget sum_l (N_l - floor(s N_l))."""
    sizes = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes)]
    dense = set()
    while len(dense) < len(shapes):
        free = [l for l in range(len(shapes)) if l not in dense]
        rhs = sum(sizes[l] - math.floor(sparsity * sizes[l]) for l in free) - sum(math.floor(sparsity * sizes[l]) for l in dense)
        eps = rhs / sum(raw[l] * sizes[l] for l in free)
        max_raw = max(raw[l] for l in free)
        if eps * max_raw <= 1:
            return [0.0 if l in dense else 1.0 - eps * raw[l] for l in range(len(shapes))]
        dense |= {l for l in free if raw[l] == max_raw}
    return [0.0] * len(shapes)


def target_sparsities(params, sparsity: float, distribution: str):
    """Pytree like params: the final sparsity of each prunable kernel (ERK or uniform), 0.0 elsewhere."""
    leaves, treedef = jax.tree.flatten(params)
    prunable = [l for l, leaf in enumerate(leaves) if is_prunable(leaf)]
    if distribution == "erk":
        layer_sparsity = erk_sparsities([leaves[l].shape for l in prunable], sparsity)
    else:
        layer_sparsity = [sparsity] * len(prunable)
    out = [0.0] * len(leaves)
    for l, s in zip(prunable, layer_sparsity):
        out[l] = s
    return jax.tree.unflatten(treedef, out)


def keep_count(size: int, sparsity: float) -> int:
    """Weights kept in a layer of `size` weights at `sparsity`: max(1, round(size * (1 - sparsity)))."""
    return max(1, round(size * (1.0 - sparsity)))


def gmp_schedule(step: int, t_start: int, t_end: int) -> float:
    """Fraction of the final sparsity at gradient step `step`: 1 - (1 - p)^3 with
    p = clip(step + 1 - t_start, 0, t_end - t_start) / (t_end - t_start) (Zhu & Gupta 2017; JaxPruner's +1, SPEC 2.2)."""
    p = min(max(step + 1 - t_start, 0), t_end - t_start) / (t_end - t_start)
    return 1.0 - (1.0 - p) ** 3


def cosine_drop_fraction(step: int, t_start: int, t_end: int, drop_fraction: float) -> float:
    """RigL/SET drop fraction at gradient step `step`: f0 * (1 + cos(pi * q)) / 2, q = clip((step - t_start)/(t_end - t_start), 0, 1)."""
    q = min(max((step - t_start) / (t_end - t_start), 0.0), 1.0)
    return drop_fraction * 0.5 * (1.0 + math.cos(math.pi * q))


def is_mask_update_step(method: str, step: int, t_start: int, t_end: int, frequency: int) -> bool:
    """Masks change every `frequency` gradient steps counted from t_start, and once more at t_end, for gmp/rigl/set."""
    if method not in ("gmp", "rigl", "set") or not t_start <= step <= t_end:
        return False
    return (step - t_start) % frequency == 0 or step == t_end


def mask_update_counts(method: str, masks, targets, step: int, t_start: int, t_end: int, drop_fraction: float):
    """Host-side, exact integers for a mask update at gradient step `step`, as a pytree like the masks:
    gmp: weights to keep per layer; rigl/set: weights to drop (and regrow), floor(active weights * drop fraction)."""
    def count(mask, target):
        if not is_prunable(mask):  # biases: keep all, drop none
            return np.int32(mask.size if method == "gmp" else 0)
        if method == "gmp":
            return np.int32(keep_count(mask.size, target * gmp_schedule(step, t_start, t_end)))
        return np.int32(math.floor(int(mask.sum()) * cosine_drop_fraction(step, t_start, t_end, drop_fraction)))
    return jax.tree.map(count, masks, targets)


def overall_sparsity(params, targets) -> float:
    """Sparsity over all prunable kernels implied by per-layer sparsities: sum_l N_l s_l / sum_l N_l."""
    pairs = [(p.size, s) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(targets)) if is_prunable(p)]
    return sum(n * s for n, s in pairs) / max(sum(n for n, _ in pairs), 1)


@jax.jit  # one compiled kernel per shape, also when called outside the update
def keep_top_k(scores: jax.Array, k) -> jax.Array:
    """uint8 mask with exactly k ones at the k largest scores; ties go to the lower flattened index.

    No sort: the k-th largest score is found bit by bit (radix select, 32 passes over the scores) on uint32 keys
    that order like the floats, which is ~20x faster than an argsort for a 4M-weight layer on CPU."""
    flat = jnp.where(scores == 0, 0.0, scores).reshape(-1).astype(jnp.float32)  # -0.0 -> +0.0
    bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # order-preserving float -> uint32

    def set_bit_if_enough(i, threshold):  # largest threshold with at least k keys >= threshold
        candidate = threshold | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(keys >= candidate) >= k, candidate, threshold)

    threshold = jax.lax.fori_loop(0, 32, set_bit_if_enough, jnp.uint32(0))
    above, tie = keys > threshold, keys == threshold
    tie_rank = jnp.cumsum(tie)  # 1, 2, ... along the ties, in index order
    keep = above | (tie & (tie_rank <= k - jnp.sum(above)))
    return keep.astype(jnp.uint8).reshape(scores.shape)


def random_masks(rng: np.random.Generator, params, targets, bernoulli: bool):
    """Random masks at the target sparsities, drawn on the host once (static, rigl and set start from these):
    an exact random subset of keep_count(N, s) weights per layer, or independent Bernoulli(1 - s) entries
    (Ma et al.'s code). Non-prunable leaves (s = 0) get all-ones masks."""
    def draw(param, sparsity):
        if bernoulli:
            return (rng.random(param.shape) < 1.0 - sparsity).astype(np.uint8)
        mask = np.zeros(param.size, np.uint8)
        mask[rng.choice(param.size, keep_count(param.size, sparsity), replace=False)] = 1
        return mask.reshape(param.shape)
    return jax.tree.map(draw, params, targets)


def apply_masks(params, masks):
    """theta * m, leaf by leaf."""
    return jax.tree.map(lambda p, m: p * m, params, masks)


def next_masks(method: str, key: jax.Array, params, grads, masks, counts):
    """New masks at a mask-update step, computed from the pre-update parameters.
    gmp: keep the counts[l] largest |theta| (SPEC 2.2). rigl/set: drop the counts[l] smallest-|theta| active weights,
    then regrow as many inactive ones with the largest |grad| (rigl) or at random (set) (METHODS 1.3)."""
    if method == "gmp":
        return jax.tree.map(lambda p, k: keep_top_k(jnp.abs(p), k), params, counts)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))

    def drop_and_grow(p, g, m, n_drop, leaf_key):
        n_active = m.sum(dtype=jnp.int32)
        kept = keep_top_k(jnp.where(m > 0, jnp.abs(p), -jnp.inf), n_active - n_drop)
        grow_score = jnp.abs(g) if method == "rigl" else jax.random.uniform(leaf_key, p.shape)
        return keep_top_k(jnp.where(kept > 0, jnp.inf, grow_score), n_active)

    return jax.tree.map(drop_and_grow, params, grads, masks, counts, keys)


def reset_adam_moments(opt_state, keep):
    """Multiplies Adam's mu and nu by `keep` (0 where a connection was just grown)."""
    adam, *rest = opt_state
    return (adam._replace(mu=apply_masks(adam.mu, keep), nu=apply_masks(adam.nu, keep)), *rest)


class TrainState(struct.PyTreeNode):
    params: Any
    target_params: Any
    masks: Any  # uint8 pytree like params; all ones for non-prunable leaves
    opt_state: Any
    grad_step: jax.Array  # c, gradient steps completed
    key: jax.Array


def init_train_state(args: Args, params, tx: optax.GradientTransformation, mask_rng: np.random.Generator, key: jax.Array) -> tuple:
    """(TrainState, per-layer target sparsities): masks all ones for gmp and none, random at the targets for
    static/rigl/set (from mask_rng); params masked; the target network a copy of them."""
    targets = target_sparsities(params, args.sparsity if args.pruning_method != "none" else 0.0, args.sparsity_distribution)
    if args.pruning_method in ("static", "rigl", "set"):
        masks = random_masks(mask_rng, params, targets, args.mask_sampling == "bernoulli")
    else:
        masks = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.uint8), params)
    params = apply_masks(params, masks)
    state = TrainState(params=params, target_params=params, masks=masks, opt_state=tx.init(params), grad_step=jnp.zeros((), jnp.int32), key=key)
    return state, targets


def sparse_step(state: TrainState, grads, counts, tx: optax.GradientTransformation, method: str) -> TrainState:
    """The optimizer step of sparse training, the same for every method:
    1. at a mask-update step (counts given), new masks from the pre-update params (and, for rigl/set, grads;
       rigl/set also zero Adam's moments where connections were grown);
    2. Adam on the unmasked gradient;
    3. theta <- (theta + u) * m after EVERY step (Adam keeps pushing pruned weights away from 0)."""
    key, mask_key = jax.random.split(state.key)
    masks, opt_state = state.masks, state.opt_state
    if counts is not None:
        masks = next_masks(method, mask_key, state.params, grads, state.masks, counts)
        if method in ("rigl", "set"):  # GMP never touches Adam's moments (SPEC 2.2)
            grown = jax.tree.map(lambda new, old: new * (1 - old), masks, state.masks)
            opt_state = reset_adam_moments(opt_state, jax.tree.map(lambda g: 1 - g, grown))
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = apply_masks(optax.apply_updates(state.params, updates), masks)
    return state.replace(params=params, masks=masks, opt_state=opt_state, grad_step=state.grad_step + 1, key=key)


def sparsity_summary(params) -> dict:
    """Achieved sparsity (exact zeros): per prunable layer, over all prunable kernels, and over all parameters."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    summary, zeros, size, kernel_zeros, kernel_size = {}, 0, 0, 0, 0
    for path, leaf in flat:
        leaf_zeros = jnp.sum(leaf == 0)
        zeros, size = zeros + leaf_zeros, size + leaf.size
        if is_prunable(leaf):
            summary[f"pruning/layer/{layer_name(path)}"] = leaf_zeros / leaf.size
            kernel_zeros, kernel_size = kernel_zeros + leaf_zeros, kernel_size + leaf.size
    summary["pruning/kernel_sparsity"] = kernel_zeros / max(kernel_size, 1)
    summary["pruning/total_sparsity"] = zeros / size
    return summary


def pruning_checks(args: Args) -> list:
    """(ok, message) pairs for the pruning flags."""
    start, end = prune_window_fractions(args)
    return [
        (0 <= args.sparsity < 1, f"--sparsity must be in [0, 1), got {args.sparsity}"),
        (0 <= args.drop_fraction <= 1, "--drop-fraction must be in [0, 1]"),
        (args.prune_frequency_grad_steps is None or args.prune_frequency_grad_steps > 0, "--prune-frequency-grad-steps must be > 0"),
        (0 <= start < end <= 1, f"need 0 <= --prune-start-fraction ({start}) < --prune-end-fraction ({end}) <= 1"),
    ]


def prune_window_fractions(args: Args) -> tuple:
    """(start, end) fractions of the gradient steps, with the method's default start."""
    default_start = 0.2 if args.pruning_method == "gmp" else 0.0
    start = default_start if args.prune_start_fraction is None else args.prune_start_fraction
    return start, args.prune_end_fraction


def pruning_window(args: Args, total_grad_steps: int) -> tuple:
    """(t_start, t_end, frequency) in gradient steps: round(fraction * G) of the run's G gradient steps (SPEC 7)."""
    start, end = prune_window_fractions(args)
    t_start = round(start * total_grad_steps)
    t_end = max(round(end * total_grad_steps), t_start + 1)
    frequency = args.prune_frequency_grad_steps or (1000 if args.pruning_method == "gmp" else 5000)
    return t_start, t_end, frequency
# ------------------------------------------------------------ end shared: sparse training


# ============================================================================ algorithm: CQL
def huber_loss(errors: jax.Array, delta: float = 1.0) -> jax.Array:
    """0.5 x^2 if |x| <= delta, else delta (|x| - delta / 2), elementwise (Dopamine's TD loss for CQL)."""
    abs_errors = jnp.abs(errors)
    return jnp.where(abs_errors <= delta, 0.5 * errors**2, delta * (abs_errors - 0.5 * delta))


def cql_regularizer(q_values: jax.Array, actions: jax.Array) -> jax.Array:
    """CQL(H)'s regularizer before its coefficient: logsumexp_a Q(s, a) - Q(s, a_data) (Kumar et al. 2020, Eq. 4).
    (B, A), (B,) -> (B,), each >= 0 up to rounding."""
    q_data = jnp.take_along_axis(q_values, actions[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(q_values, axis=-1) - q_data


# ---------------------------------------------------------------- shared: categorical
def q_values(logits: jax.Array, support: jax.Array) -> jax.Array:
    """Q(s,a) = sum_i z_i softmax(logits)_i. (..., atoms), (atoms,) -> (...)."""
    return jax.nn.softmax(logits) @ support


def categorical_projection(next_probs: jax.Array, rewards: jax.Array, discounts: jax.Array, support: jax.Array) -> jax.Array:
    """C51's projection (Bellemare et al. 2017, Alg. 1; SPEC 3.2): the atoms z_j of the next-state distribution move
    to Tz_j = clip(r + discount * z_j, v_min, v_max); each moved atom splits its probability between its two
    neighbours on the support, m_i = sum_j clip(1 - |Tz_j - z_i| / dz, 0, 1) p_j. `discounts` already holds
    gamma^n (1 - terminal). (B, atoms), (B,), (B,), (atoms,) -> (B, atoms), rows summing to 1."""
    v_min, v_max, dz = support[0], support[-1], support[1] - support[0]
    moved = jnp.clip(rewards[:, None] + discounts[:, None] * support[None, :], v_min, v_max)  # (B, atoms_j)
    share = jnp.clip(1.0 - jnp.abs(moved[:, None, :] - support[None, :, None]) / dz, 0.0, 1.0)  # (B, atoms_i, atoms_j)
    return jnp.sum(share * next_probs[:, None, :], axis=-1)


def cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """-sum_i m_i log softmax(logits)_i per transition, the target held fixed. (B, atoms), (B, atoms) -> (B,)."""
    return -jnp.sum(jax.lax.stop_gradient(target_probs) * jax.nn.log_softmax(logits), axis=-1)
# ------------------------------------------------------------ end shared: categorical


def cql_loss(network: nn.Module, params, target_params, batch: Batch, alpha: float):
    """Huber TD loss on y = R + gamma^k (1 - d) max_a' Q_target(s', a'), plus alpha * the mean regularizer.
    Returns (loss, aux): aux holds the two terms (before alpha), and Q(s, a) and y, both (B,)."""
    next_q = network.apply({"params": target_params}, batch.next_obs)  # (B, A)
    targets = jax.lax.stop_gradient(batch.rewards + batch.discounts * next_q.max(axis=-1))  # (B,)
    q = network.apply({"params": params}, batch.obs)  # (B, A)
    q_taken = jnp.take_along_axis(q, batch.actions[:, None], axis=-1)[:, 0]  # (B,)
    td_loss = jnp.mean(huber_loss(targets - q_taken))
    regularizer = jnp.mean(cql_regularizer(q, batch.actions))
    return td_loss + alpha * regularizer, {"td_loss": td_loss, "cql_loss": regularizer, "q_taken": q_taken, "targets": targets}


def cql_c51_loss(network: nn.Module, params, target_params, batch: Batch, alpha: float, support: jax.Array):
    """Cross-entropy to the projected double-DQN target distribution, plus alpha * the mean regularizer on
    Q = sum_i z_i p_i (Dopamine's offline Rainbow with its CQL coefficient, SPEC 3.5). Returns (loss, aux) as
    cql_loss does, with the target distribution's mean as y."""
    rows = jnp.arange(len(batch.actions))
    best = q_values(network.apply({"params": params}, batch.next_obs), support).argmax(axis=-1)  # (B,) a* online
    next_probs = jax.nn.softmax(network.apply({"params": target_params}, batch.next_obs)[rows, best])  # (B, atoms)
    target_probs = categorical_projection(next_probs, batch.rewards, batch.discounts, support)  # (B, atoms)
    logits = network.apply({"params": params}, batch.obs)  # (B, A, atoms)
    td_loss = jnp.mean(cross_entropy(logits[rows, batch.actions], target_probs))
    q = q_values(logits, support)  # (B, A)
    regularizer = jnp.mean(cql_regularizer(q, batch.actions))
    return td_loss + alpha * regularizer, {"td_loss": td_loss, "cql_loss": regularizer, "q_taken": q[rows, batch.actions], "targets": target_probs @ support}


def make_q_fn(network: nn.Module, args: Args, support: jax.Array):
    """q_fn(params, obs (B, ...), key) -> Q(s, .) (B, A) (with --c51: sum_i z_i p_i(s, .)), for acting and the analysis;
    the key is unused (IQN draws its quantile fractions from it)."""
    if args.c51:
        return lambda params, obs, key: q_values(network.apply({"params": params}, obs), support)
    return lambda params, obs, key: network.apply({"params": params}, obs)


def make_loss(network: nn.Module, args: Args, support: jax.Array):
    """loss_fn(params, target_params, batch, key) -> (loss, aux) of CQL or, with --c51, CQL+C51; the key is unused.
    The update differentiates it; the analysis also takes per-sample gradients of it."""

    def loss_fn(params, target_params, batch: Batch, key):
        if args.c51:
            return cql_c51_loss(network, params, target_params, batch, args.cql_alpha, support)
        return cql_loss(network, params, target_params, batch, args.cql_alpha)

    return loss_fn


def make_update(loss_fn, tx: optax.GradientTransformation, method: str):
    """Builds the jitted update (state, batch, counts) -> (state, metrics). counts is None except at mask-update
    steps (then a pytree of ints from mask_update_counts); the two cases compile separately."""

    def update(state: TrainState, batch: Batch, counts):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.target_params, batch, None)
        state = sparse_step(state, grads, counts, tx, method)  # masks, Adam, theta <- (theta + u) * m
        return state, {"losses/total_loss": loss, "losses/td_loss": aux["td_loss"], "losses/cql_loss": aux["cql_loss"],
                       "losses/q_values": aux["q_taken"].mean()}

    return jax.jit(update)


# ---------------------------------------------------------------- shared: analysis
OUTPUT_LAYERS = ("q", "logits", "value", "advantage")  # the heads' output layers; every other conv/dense layer is hidden


def analysis_checks(args: Args) -> list:
    """(ok, message) pairs for the analysis flags."""
    return [
        (args.metrics_frequency >= 0, "--metrics-frequency must be >= 0 (0: off)"),
        (args.metrics_batch_size > 0, "--metrics-batch-size must be > 0"),
        (0 < args.metrics_grad_samples <= args.metrics_batch_size,
         f"--metrics-grad-samples must be in [1, --metrics-batch-size ({args.metrics_batch_size})], got {args.metrics_grad_samples}"),
    ]


def hidden_activations(q_fn, params, obs, key) -> tuple:
    """(Q(s, .) (B, A), {layer: ReLU(output)} of every hidden conv and dense layer), recorded while q_fn runs. A unit's
    activation is the ReLU of its layer's output: what the next layer sees in the CNN, the MLP and the heads; in the
    ResNet, the ReLU of each conv's own contribution to the residual stream."""
    outputs = {}

    def record(call, call_args, call_kwargs, context):
        out = call(*call_args, **call_kwargs)
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            outputs["/".join(context.module.path)] = out
        return out

    with nn.intercept_methods(record):
        q = q_fn(params, obs, key)
    return q, {name: nn.relu(out) for name, out in outputs.items() if name.split("/")[-1] not in OUTPUT_LAYERS}


def make_analysis(q_fn, loss_fn, grad_samples: int):
    """Builds the jitted analysis (params, target_params, masks, batch, key) -> (scalars, gradient covariance (n, n)):
    the metrics of common/metrics.py on one batch (README, "Analysis metrics"). Per-sample gradients are those of the
    loss on each of the batch's first `grad_samples` transitions alone, masked like the updates they would make."""

    def analysis(params, target_params, masks, batch: Batch, key):
        q, activations = hidden_activations(q_fn, params, batch.obs, key)
        scalars = {"metrics/dormant_0.025": metrics.dormant_fractions(activations, 0.025)[1]}
        per_layer, scalars["metrics/dormant_0.1"] = metrics.dormant_fractions(activations, 0.1)
        scalars.update({f"metrics/dormant_0.1/{name}": value for name, value in per_layer.items()})
        kernel_masks = {layer_name(path[:-1]): m for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]
                        if layer_name(path[:-1]) in activations and is_prunable(m)}
        per_layer, scalars["metrics/dead_fraction"] = metrics.dead_neuron_fractions(kernel_masks)
        scalars.update({f"metrics/dead/{name}": value for name, value in per_layer.items()})
        features = activations["dense"]  # the penultimate layer, (B, 512) ((B, K, 512) in IQN)
        scalars["metrics/srank"] = metrics.srank(features.reshape(-1, features.shape[-1]))
        scalars["metrics/param_norm"] = metrics.param_norm(params)
        scalars["metrics/q_norm"] = metrics.q_norm(q)
        scalars["metrics/target_variance"] = metrics.target_variance(loss_fn(params, target_params, batch, key)[1]["targets"])

        def sample_gradient(sample: Batch, sample_key):  # the flat, masked gradient of one transition's loss
            one = jax.tree.map(lambda x: x[None], sample)
            grads = jax.grad(lambda p: loss_fn(p, target_params, one, sample_key)[0])(params)
            return ravel_pytree(apply_masks(grads, masks))[0]  # (P,)

        few = jax.tree.map(lambda x: x[:grad_samples], batch)
        grads = jax.vmap(sample_gradient)(few, jax.random.split(key, grad_samples))  # (n, P)
        covariance = metrics.gradient_covariance(grads)  # (n, n)
        scalars["metrics/grad_cosine_abs"], scalars["metrics/grad_interference"] = metrics.interference(covariance)
        return scalars, covariance

    return jax.jit(analysis)


def by_action(batch: Batch, first: int) -> Batch:
    """The batch with its first `first` transitions (those of the gradient covariance, a random subset) reordered by
    action (stable), so that its heat map shows transitions of the same action side by side."""
    order = np.concatenate([np.argsort(batch.actions[:first], kind="stable"), np.arange(first, len(batch.actions))])
    return Batch(*(field[order] for field in batch))


def write_analysis(writer, results: tuple, step: int) -> None:
    """TensorBoard: the analysis scalars, and the covariance matrix as a gray image (C = -1 black, +1 white)."""
    scalars, covariance = jax.device_get(results)
    for tag, value in scalars.items():
        writer.add_scalar(tag, float(value), step)
    writer.add_image("metrics/grad_covariance", (np.asarray(covariance) + 1.0) / 2.0, step, dataformats="HW")
# ------------------------------------------------------------ end shared: analysis


# ========================================================================================== main
# ---------------------------------------------------------------- shared: run files
def make_run_dir(path: str) -> str:
    """Creates and returns a new directory `path`, or `path_1`, `path_2`, ... if it exists (two runs never share logs)."""
    candidate, suffix = path, 0
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = f"{path}_{suffix}"


def open_writer(run_dir: str) -> SummaryWriter:
    """A TensorBoard writer on a new event file of run_dir (numbered, so that reopening never reuses a name)."""
    count = sum("tfevents" in name for name in os.listdir(run_dir))
    return SummaryWriter(run_dir, flush_secs=30, filename_suffix=f".{count:04d}")


def fsync_directory(path: str) -> None:
    """Makes the renames in directory `path` reach the disk."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def open_run(args: Args, extra_config: dict, last_logged_step: Optional[int] = None):
    """Creates runs/{env}__{exp_name}__{seed}__{unix time}/ with config.json (every flag, the script's file name and
    `extra_config`; common/plot.py groups runs by it) and returns (run_dir, TensorBoard writer). With --resume, the
    run's own directory instead: its config.json takes the flags that may change on a resume, and its events logged
    after `last_logged_step` (its checkpoint's) are dropped."""
    if args.resume:  # the flags it may change become the run's own, the defaults of a later --resume
        config = saved_config(args.resume)
        config.update({name: value for name, value in dataclasses.asdict(args).items() if name in RESUME_MAY_CHANGE and name != "resume"})
        config.setdefault("resumed_after_step", []).append(last_logged_step)
        with open(os.path.join(args.resume, "config.json.tmp"), "w") as f:
            json.dump(config, f, indent=2)
        os.replace(os.path.join(args.resume, "config.json.tmp"), os.path.join(args.resume, "config.json"))
        trim_events(args.resume, last_logged_step)
        return args.resume, open_writer(args.resume)
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = make_run_dir(os.path.join("runs", run_name))
    writer = open_writer(run_dir)
    config = dataclasses.asdict(args)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**config, "run_name": run_name, "script": os.path.basename(__file__), **extra_config}, f, indent=2)
    return run_dir, writer


def save_model(args: Args, run_dir: str, state) -> None:
    """runs/.../{exp_name}.msgpack: the flax msgpack of the plain dict {"params": ..., "masks": ...}."""
    model_path = os.path.join(run_dir, f"{args.exp_name}.msgpack")
    with open(model_path, "wb") as f:
        f.write(serialization.msgpack_serialize({"params": jax.device_get(state.params), "masks": jax.device_get(state.masks)}))
    print(f"model saved to {model_path}")
# ------------------------------------------------------------ end shared: run files


# ---------------------------------------------------------------- shared: checkpoints
CHECKPOINT = "checkpoint.pkl"
# flags a resumed run may change: they decide what is logged, saved or checkpointed, or the step size of what follows
RESUME_MAY_CHANGE = ("resume", "save_model", "log_frequency", "metrics_frequency", "checkpoint_frequency", "checkpoint_replay",
                     "learning_rate", "adam_eps")


class NonFiniteError(RuntimeError):
    """A non-finite loss: the run stopped after checkpointing its last good train state."""


def saved_config(run_dir: str) -> dict:
    """The config.json of a run directory (ArgsError if there is none)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ArgsError(f"--resume {run_dir}: cannot read its config.json ({error})") from None


def resume_defaults(argv: list) -> Optional[Args]:
    """With --resume RUN_DIR on the command line: Args holding the run's saved flags, the defaults of every flag not given."""
    for i, flag in enumerate(argv):
        if flag == "--resume" and i + 1 < len(argv) or flag.startswith("--resume="):
            config = saved_config(argv[i + 1] if flag == "--resume" else flag.split("=", 1)[1])
            return Args(**{field.name: config[field.name] for field in dataclasses.fields(Args) if field.name in config})
    return None


def checkpoint_checks(args: Args) -> list:
    """(ok, message) pairs for the checkpoint flags; a resumed run must be this script's, have its checkpoint and the
    run's flags (but RESUME_MAY_CHANGE), every difference listed."""
    checks = [(args.checkpoint_frequency >= 0, "--checkpoint-frequency must be >= 0 (0: off)")]
    if args.resume:
        config = saved_config(args.resume)
        script = config.get("script", os.path.basename(__file__))
        differences = [f"--{name.replace('_', '-')} {config[name]!r} in the run, {value!r} now" for name, value in dataclasses.asdict(args).items()
                       if name in config and name not in RESUME_MAY_CHANGE and config[name] != value]
        checks += [(script == os.path.basename(__file__), f"--resume {args.resume}: a run of {script}, not of {os.path.basename(__file__)}"),
                   (not differences, f"cannot resume {args.resume} with other flags: {'; '.join(differences)}"),
                   (os.path.isfile(os.path.join(args.resume, CHECKPOINT)), f"--resume {args.resume}: it has no {CHECKPOINT}")]
    return checks


def object_state(obj) -> dict:
    """The attributes of one of this script's objects (a replay buffer, an AtariEnv) as plain data, nested objects of
    the script (a sum tree) as dicts too: a checkpoint never names the script's classes, which do not unpickle
    where the script is not __main__."""
    own = type(obj).__module__
    state = obj.__getstate__() if isinstance(obj, AtariEnv) else vars(obj)
    return {name: object_state(value) if type(value).__module__ == own and hasattr(value, "__dict__") else value for name, value in state.items()}


def restore_object(obj, state: dict) -> None:
    """Puts object_state(...) back into an object of the same class, in place."""
    if isinstance(obj, AtariEnv):
        obj.__setstate__(state)
        return
    for name, value in state.items():
        current = getattr(obj, name, None)
        if isinstance(value, dict) and type(current).__module__ == type(obj).__module__ and hasattr(current, "__dict__"):
            restore_object(current, value)
        else:
            setattr(obj, name, value)


def host_leaves(state) -> list:
    """The leaves of a train state as NumPy arrays (random keys as their key data)."""
    return [np.asarray(jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf) for leaf in jax.tree.leaves(state)]


def restore_leaves(template, leaves: list):
    """A train state like `template` holding saved host_leaves (ArgsError if their shapes or dtypes do not fit it)."""
    template_leaves, treedef = jax.tree.flatten(template)
    restored = []
    for like, saved in zip(template_leaves, leaves):
        if jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
            restored.append(jax.random.wrap_key_data(saved))
        elif like.shape == saved.shape and like.dtype == saved.dtype:
            restored.append(jnp.asarray(saved))
        else:
            raise ArgsError(f"the checkpoint holds a {saved.dtype}{list(saved.shape)} where this run has a {like.dtype}{list(like.shape)}")
    if len(leaves) != len(template_leaves):
        raise ArgsError(f"the checkpoint holds {len(leaves)} arrays of train state where this run has {len(template_leaves)}")
    return jax.tree.unflatten(treedef, restored)


def save_checkpoint(run_dir: str, writer, payload: dict):
    """Writes `payload` as run_dir/checkpoint.pkl (pickle): into a temporary file, fsynced, then renamed over the
    previous checkpoint, which stays whole until then. The TensorBoard writer is closed first, so that every event
    logged so far is on disk (a resume drops the later ones); returns a new writer."""
    writer.close()
    path = os.path.join(run_dir, CHECKPOINT)
    with open(path + ".tmp", "wb") as f:
        pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_directory(run_dir)
    return open_writer(run_dir)


def load_checkpoint(run_dir: str) -> dict:
    """The payload of run_dir/checkpoint.pkl (a leftover checkpoint.pkl.tmp, cut short, is never read)."""
    try:
        with open(os.path.join(run_dir, CHECKPOINT), "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise ArgsError(f"--resume {run_dir}: cannot read its {CHECKPOINT} ({error})") from None


def trim_events(run_dir: str, last_step: int) -> None:
    """Drops from the run's TensorBoard event files every event after `last_step` (logged by a run killed after its
    last checkpoint) and a last record cut short, so that a resumed run's events follow without duplicate steps.
    The records (8-byte length, 4-byte CRC, Event proto, 4-byte CRC) are copied unchanged into a file renamed over."""
    from tensorboard.compat.proto.event_pb2 import Event

    for name in os.listdir(run_dir):
        if "tfevents" in name and name.endswith(".tmp"):  # a rewrite cut short by a kill: its file is still whole
            os.remove(os.path.join(run_dir, name))
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        kept, position = [], 0
        while position + 12 <= len(data):
            length = int.from_bytes(data[position: position + 8], "little")
            end = position + 12 + length + 4
            if end > len(data):
                break
            if Event.FromString(data[position + 12: end - 4]).step <= last_step:
                kept.append(data[position:end])
            position = end
        with open(path + ".tmp", "wb") as f:
            f.write(b"".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
# ------------------------------------------------------------ end shared: checkpoints


def evaluate(env, greedy_action, params, rng: np.random.Generator, num_steps: int, epsilon: float, stack: int) -> list:
    """Returns of whole episodes played epsilon-greedily until `num_steps` env steps are done; the episode running at
    that point finishes (Dopamine's evaluation phase). Frame stacks are zero-filled at episode start."""
    returns, steps = [], 0
    while steps < num_steps:
        frame, _ = env.reset()
        frames = deque([np.zeros_like(frame)] * (stack - 1) + [frame], maxlen=stack)
        episode_return, done = 0.0, False
        while not done:
            if rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            else:
                action = int(greedy_action(params, np.stack(frames, axis=-1)))
            frame, reward, terminated, truncated, _ = env.step(action)
            frames.append(frame)
            episode_return, steps, done = episode_return + float(reward), steps + 1, terminated or truncated
        returns.append(episode_return)
    return returns


def main(args: Args) -> dict:
    """Trains offline; returns {"run_dir": ..., "eval_returns": [mean evaluation return after each iteration]}."""
    args = resolve(args)
    check_args(args)
    env, is_atari = make_env(args.env_id)
    if args.network != "mlp" and not is_atari:
        raise ArgsError(f"--network {args.network} needs Atari frames; use --network mlp for {args.env_id}")
    stack = 4 if is_atari else 1
    frame_shape, frame_dtype = env.observation_space.shape, env.observation_space.dtype
    dataset = load_dataset(args, frame_shape, frame_dtype, env.action_space.n, stack)
    print(f"loaded {len(dataset)} valid transitions ({len(dataset.frames)} slots) from {args.dataset_dir}", flush=True)

    # seeding: a NumPy generator for the host (batches, evaluation and its env seed), one for random masks, and one
    # JAX root key (network init, SET regrowth)
    rng, mask_rng = np.random.default_rng(args.seed), np.random.default_rng([args.seed, 1])
    # the analysis draws its batch and key from streams of its own, so that logging it never changes training
    metrics_rng, metrics_key = np.random.default_rng([args.seed, 2]), jax.random.fold_in(jax.random.key(args.seed), 2)
    init_key, train_key = jax.random.split(jax.random.key(args.seed))
    env.reset(seed=int(rng.integers(2**31)))

    # network, masks, optimizer
    support = jnp.linspace(args.v_min, args.v_max, args.num_atoms)
    if args.c51:
        network = DuelingC51Network(env.action_space.n, args.num_atoms, args.network, args.width_scale, args.scale_dense, args.use_bias, args.use_output_bias)
    else:
        network = QNetwork(env.action_space.n, args.network, args.width_scale, args.scale_dense, args.use_bias, args.use_output_bias)
    q_fn, loss_fn = make_q_fn(network, args, support), make_loss(network, args, support)
    greedy_action = jax.jit(lambda params, obs: q_fn(params, obs[None], None).argmax(-1)[0])
    params = jax.jit(network.init)(init_key, np.zeros((1, *frame_shape, stack), frame_dtype))["params"]
    tx = optax.adam(args.learning_rate, eps=args.adam_eps)
    state, targets = init_train_state(args, params, tx, mask_rng, train_key)
    update = make_update(loss_fn, tx, args.pruning_method)
    total_grad_steps = args.num_iterations * args.grad_steps_per_iteration
    t_start, t_end, prune_frequency = pruning_window(args, total_grad_steps)
    final_sparsity = overall_sparsity(params, targets)

    # logging (x-axis: gradient steps); a resumed run goes on from its checkpoint
    saved = load_checkpoint(args.resume) if args.resume else None
    run_dir, writer = open_run(args, {"prune_window_grad_steps": [t_start, t_end, prune_frequency], "dataset_transitions": len(dataset)},
                               saved and saved["grad_step"])
    summarize = jax.jit(sparsity_summary)
    analysis, metrics_batch = make_analysis(q_fn, loss_fn, args.metrics_grad_samples), None
    eval_returns, start, window_time, last_print = [], 0, time.time(), 0.0
    last_good = state  # the train state before the last update whose loss was finite
    if saved is not None:
        state, last_good = restore_leaves(state, saved["train_state"]), restore_leaves(state, saved["last_good"])
        rng.bit_generator.state, metrics_rng.bit_generator.state = saved["rng"], saved["metrics_rng"]
        if is_atari:
            restore_object(env, saved["env"])
        else:
            env = saved["env"]
        start, eval_returns = saved["grad_step"], saved["eval_returns"]
        metrics_batch = None if saved["metrics_batch"] is None else Batch(*saved["metrics_batch"])
        print(f"resumed {run_dir} at gradient step {start}", flush=True)

    def checkpoint(grad_steps: int, train_state: TrainState):  # everything the loop needs after `grad_steps` gradient steps
        return save_checkpoint(run_dir, writer, {
            "grad_step": grad_steps, "train_state": host_leaves(train_state), "last_good": host_leaves(last_good),
            "rng": rng.bit_generator.state, "metrics_rng": metrics_rng.bit_generator.state, "env": object_state(env) if is_atari else env,
            "eval_returns": eval_returns[: grad_steps // args.grad_steps_per_iteration],  # those of iterations done by then
            "metrics_batch": None if metrics_batch is None else tuple(metrics_batch)})

    try:
        for grad_step in range(start + 1, total_grad_steps + 1):  # the number of gradient steps done after this one
            counts = None
            if is_mask_update_step(args.pruning_method, grad_step - 1, t_start, t_end, prune_frequency):
                counts = mask_update_counts(args.pruning_method, state.masks, targets, grad_step - 1, t_start, t_end, args.drop_fraction)
            before, (state, update_metrics) = state, update(state, dataset.sample(rng, args.batch_size), counts)
            if not np.isfinite(float(update_metrics["losses/total_loss"])):  # the params this loss came from are suspect too
                writer = checkpoint(int(last_good.grad_step), last_good)
                raise NonFiniteError(f"non-finite loss at gradient step {grad_step - 1}; the last good train state (gradient step "
                                     f"{int(last_good.grad_step)}) is checkpointed in {run_dir}")
            last_good = before
            if grad_step % args.target_update_period == 0:
                state = state.replace(target_params=state.params)
            if grad_step % args.log_frequency == 0:
                now = time.time()
                schedule = gmp_schedule(grad_step - 1, t_start, t_end) if args.pruning_method == "gmp" else 1.0
                scalars = {"charts/SPS": args.log_frequency / max(now - window_time, 1e-9), "pruning/target_sparsity": final_sparsity * schedule}
                scalars.update(jax.device_get(summarize(state.params)))
                scalars.update(jax.device_get(update_metrics))
                for tag, value in scalars.items():
                    writer.add_scalar(tag, float(value), grad_step)
                window_time = now
                if now - last_print > 10:
                    last_print = now
                    print(f"grad step {grad_step}/{total_grad_steps} | SPS {scalars['charts/SPS']:.0f} | td loss "
                          f"{float(update_metrics['losses/td_loss']):.4f} | sparsity {float(scalars['pruning/kernel_sparsity']):.3f}", flush=True)
            if args.metrics_frequency and grad_step % args.metrics_frequency == 0:
                if metrics_batch is None:
                    metrics_batch = by_action(dataset.sample(metrics_rng, args.metrics_batch_size), args.metrics_grad_samples)  # drawn once, then fixed
                write_analysis(writer, analysis(state.params, state.target_params, state.masks, metrics_batch, metrics_key), grad_step)

            if grad_step % args.grad_steps_per_iteration == 0:  # the iteration ends with an evaluation
                returns = evaluate(env, greedy_action, state.params, rng, args.eval_steps, args.eval_epsilon, stack)
                eval_returns.append(float(np.mean(returns)))
                writer.add_scalar("charts/eval_return", eval_returns[-1], grad_step)
                writer.add_scalar("charts/eval_episodes", len(returns), grad_step)
                print(f"iteration {len(eval_returns)}/{args.num_iterations} | grad step {grad_step} | eval return {eval_returns[-1]:.1f} "
                      f"over {len(returns)} episodes", flush=True)
                window_time = time.time()  # the evaluation's time does not count against the gradient steps' SPS
            if args.checkpoint_frequency and grad_step % args.checkpoint_frequency == 0:
                writer = checkpoint(grad_step, state)
    finally:
        writer.close()

    if args.save_model:
        save_model(args, run_dir, state)
    return {"run_dir": run_dir, "eval_returns": eval_returns}


# ---------------------------------------------------------------- shared: command line
if __name__ == "__main__":
    try:
        main(tyro.cli(Args, default=resume_defaults(sys.argv[1:])))
    except ArgsError as error:  # a bad flag: nothing was written
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
# ------------------------------------------------------------ end shared: command line
