"""DQN with sparse training: gradual magnitude pruning (GMP), RigL, SET or static random sparsity.

Papers
    Obando-Ceron, Courville & Castro, "In value-based deep RL, a pruned network is a good network", ICML 2024.
    Ganaie et al., "A Closer Look at Sparse Training in Deep RL" (RigL vs pruning, bias ablation).
    Ma et al., "Network Sparsity Unlocks the Scaling Potential of Deep RL", ICML 2025 (static random sparsity).

What is pruned, when, and how (the default, --pruning-method gmp)
    Every kernel with ndim > 1 (all convs and dense layers, the first conv and the output layer included);
    biases never. Per-layer target sparsities come from ERK (Erdos-Renyi-Kernel). Masks are recomputed every
    1000 gradient steps from the pre-update weights between 20% and 80% of the run's gradient steps, following
    the cubic schedule s(c) = s_F * (1 - (1 - p)^3), p = clip(c + 1 - t_start, 0, t_end - t_start) / (t_end - t_start)
    (Zhu & Gupta 2017, JaxPruner's +1 offset), keeping the exact top-k weights by magnitude in each layer.
    After EVERY gradient step the parameters are multiplied by the masks: theta <- (theta + adam_update) * mask.
    Adam's moments are never masked. The target network is a hard copy of the (masked) online parameters.

Deviations from the paper and its code (the same list is in the README)
    1. A final mask update is forced at the pruning end step, so the target is reached when t_end is not a multiple
       of the mask-update frequency; mask updates are counted from t_start. The window is derived from the run
       (20%/80% of its gradient steps, SPEC 7): 499,000 to 1,996,000 for the paper's run, not the released 500k/2M.
    2. RigL/SET do not skip the optimizer step on mask-update steps (JaxPruner does): grown weights start at 0 with
       zeroed Adam moments and take that step's update. The drop fraction's cosine decay is offset to the start of
       the mask-update window, which equals JaxPruner's and RigL's when the window starts at 0 (the RigL/SET default).
    3. Random initial masks are drawn on the host from a NumPy generator of their own (seeded by --seed): an exact-size
       random subset per layer, not JaxPruner's top-k of JAX-random scores.
    4. Training returns are logged; there is no separate evaluation phase yet (SPEC 5 recommends both).
    5. Dopamine gates the first update on the buffer holding more than 20k transitions and also attempts a train step
       at every episode start; here gradient steps happen only at env steps t >= learning_starts with t divisible by
       train_frequency, so the update phase, epsilon and target syncs count env steps alone.
    The Atari frames follow Dopamine exactly; the INTER_AREA resize is computed from its area weights (3 taps per
    pixel and axis), so OpenCV is not needed.

Offline data
    --save-replay-dir DIR also writes every stored transition as DQN Replay Dataset checkpoints, the data of
    cql_pruned.py (the shared "dataset writer" section; every online script has the flag).

Analysis, checkpoints (the README explains both)
    --metrics-frequency N logs common/metrics.py's analysis metrics (dormant and dead neurons, srank, norms, gradient
    covariance) on one fixed batch every N steps. --checkpoint-frequency N writes everything the run needs to go on
    every N steps (runs/.../checkpoint.pkl, atomically); --resume RUN_DIR continues it bit-identically on CPU. A
    non-finite loss stops the run after checkpointing the last good train state.

Examples (the README explains both)
    python dqn_pruned.py --env-id CartPole-v1 --network mlp --sparsity 0.9 ...   # the README's 2-minute CPU main job
    python dqn_pruned.py --env-id ALE/Pong-v5 --width-scale 3                     # the paper's setting, a GPU job
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
    # ---------------------------------------------------------------- shared: experiment args
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment; the run directory is runs/{env}__{exp_name}__{seed}__{unix time}"""
    seed: int = 1
    """seed of the run: one JAX root key and one NumPy Generator (replay sampling, exploration, env seeds)"""
    env_id: str = "ALE/Breakout-v5"
    """gymnasium id: ALE/{Game}-v5 runs the Atari protocol of SPEC 4 (Dopamine); a classic-control id (e.g. CartPole-v1) runs as is"""
    total_timesteps: int = 10_000_000
    """env steps (agent steps) of the run; 10M = 40M frames = the paper's 40 iterations (SPEC 3)"""
    save_model: bool = False
    """write runs/{run_name}/{exp_name}.msgpack: flax msgpack of the plain dict {"params": ..., "masks": ...}"""
    log_frequency: int = 1000
    """env steps between TensorBoard logs of losses, epsilon, SPS and sparsity (episode stats are logged at every episode end)"""
    save_replay_dir: Optional[str] = None
    """also write every stored transition to this directory as DQN Replay Dataset checkpoints (METHODS 7.2), an offline dataset for cql_pruned.py; unset: off"""
    save_replay_checkpoint_size: int = 1_000_000
    """slots per checkpoint of --save-replay-dir (Dopamine's logged buffers hold 1M)"""
    checkpoint_replay: bool = True
    """checkpoints include the replay buffer (--no-checkpoint-replay: much smaller ones, but a resumed run refills its buffer for --learning-starts env steps before it learns again, so it is not exact)"""
    # ------------------------------------------------------------ end shared: experiment args

    # algorithm specific arguments (DQN; SPEC 3, 3.1)
    learning_rate: float = 6.25e-5
    """Adam learning rate (paper Table 2; Dopamine dqn.gin)"""
    adam_eps: float = 1.5e-4
    """Adam epsilon (paper Table 2; App. G.4's 1.5e-5 is a typo, SPEC 8.9)"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions, stored as single uint8 frames (paper Table 2)"""
    gamma: float = 0.99
    """discount factor (paper Table 2)"""
    n_step: int = 1
    """n of the n-step return R = sum_{i<n} gamma^i r_{t+i}, bootstrapped with gamma^n (DQN: 1; paper App. G.11 tries 3)"""
    target_network_frequency: int = 8000
    """env steps between hard copies of the online parameters into the target network (Dopamine dqn.gin)"""
    batch_size: int = 32
    """transitions per gradient step (paper Table 2)"""
    start_e: float = 1.0
    """initial epsilon of epsilon-greedy exploration"""
    end_e: float = 0.01
    """final epsilon (paper Table 2)"""
    exploration_steps: int = 250_000
    """env steps, counted after learning starts, over which epsilon decays linearly from start-e to end-e (paper Table 2)"""
    learning_starts: int = 20_000
    """env steps of pure exploration before the first gradient step (min replay history, paper Table 2)"""
    train_frequency: int = 4
    """env steps between gradient steps (update period 4 = replay ratio 0.25, paper Table 2)"""
    network: Literal["resnet", "cnn", "nature", "mlp"] = "resnet"
    """torso: Impala ResNet (16,32,32)*k (SPEC 1.2), Nature CNN (32,64,64)*k with SAME padding (SPEC 1.3, Dopamine's) or with VALID padding (nature: Mnih et al. 2015's, CleanRL's), or an MLP for vector observations"""
    width_scale: int = 1
    """width multiplier k of every conv channel count (MLP: of its hidden layer); the paper's headline is k=3"""
    scale_dense: bool = False
    """also multiply the 512-unit dense layer by k (off for DQN, as in Dopamine's ImpalaDQNNetwork, SPEC 1.2)"""
    use_bias: bool = True
    """biases in the hidden layers (Ganaie et al. remove them: --no-use-bias)"""
    use_output_bias: bool = True
    """bias in the output layer (separate from --use-bias, METHODS 1.5)"""

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


def algorithm_checks(args: Args) -> list:
    """(ok, message) pairs for the DQN-only fields: none beyond the shared checks."""
    return []


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


# ================================================================================= replay buffer
# ---------------------------------------------------------------- shared: batch
class Batch(NamedTuple):
    obs: np.ndarray  # (B, *frame_shape, stack) state s_t
    actions: np.ndarray  # (B,) int32
    rewards: np.ndarray  # (B,) float32, n-step discounted sum of (clipped) rewards
    discounts: np.ndarray  # (B,) float32, gamma^k * (1 - terminated); k <= n steps actually taken
    next_obs: np.ndarray  # (B, *frame_shape, stack) state s_{t+k}
# ------------------------------------------------------------ end shared: batch


# ---------------------------------------------------------------- shared: replay buffer
class ReplayBuffer:
    """Circular buffer of single frames; frame stacks and n-step returns are rebuilt at sample time.

    One slot per observation: the frame, the action taken, the reward received and whether the episode
    terminated. At each episode end one more slot holds the final observation (no action, never sampled), so
    a truncated episode can still bootstrap. A stack never reaches back across an episode start: those frames
    are zeros, as at the start of an episode. An n-step window stops at a termination (no bootstrap) or at a
    truncation (bootstrap with gamma^k from the final observation, k < n).
    """

    def __init__(self, capacity: int, frame_shape: tuple, frame_dtype, stack: int, n_step: int, gamma: float):
        self.capacity, self.stack, self.n_step, self.gamma = capacity, stack, n_step, gamma
        self.frames = np.zeros((capacity, *frame_shape), frame_dtype)  # pages are only touched when written
        self.actions = np.zeros(capacity, np.int32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, bool)  # the step from this slot ended the episode by termination
        self.first = np.zeros(capacity, bool)  # this slot is the first observation of an episode
        self.last = np.zeros(capacity, bool)  # this slot is an episode's final observation (no action)
        self.count = 0  # slots ever written
        self.episode_start = True

    def _write(self, frame, action, reward, terminated, first, last):
        i = self.count % self.capacity
        self.frames[i], self.actions[i], self.rewards[i] = frame, action, reward
        self.terminated[i], self.first[i], self.last[i] = terminated, first, last
        self.count += 1

    def add(self, frame, action: int, reward: float, terminated: bool, truncated: bool, next_frame) -> None:
        """Stores one env step: `frame` is the newest frame of s_t, `next_frame` that of s_{t+1}."""
        self._write(frame, action, reward, terminated, self.episode_start, False)
        self.episode_start = terminated or truncated
        if self.episode_start:
            self._write(next_frame, 0, 0.0, False, False, True)

    @property
    def size(self) -> int:
        return min(self.count, self.capacity)

    def _age(self, idx):
        """Position of slots in write order: 0 is the oldest slot still stored."""
        return (idx - self.count) % self.capacity if self.count > self.capacity else idx

    def stacked(self, idx: np.ndarray) -> np.ndarray:
        """(B,) slots -> (B, *frame_shape, stack): frames idx-stack+1..idx, zeros before the episode start."""
        offsets = np.arange(self.stack - 1, -1, -1)  # oldest frame first
        slots = (idx[:, None] - offsets[None, :]) % self.capacity  # (B, stack)
        # a frame is kept iff no slot after it (up to idx) starts an episode
        starts_after = np.cumsum(self.first[slots][:, ::-1], axis=1)[:, ::-1]  # (B, stack): starts in slots[j..]
        keep = (starts_after - self.first[slots]) == 0  # (B, stack)
        frames = self.frames[slots] * keep.reshape(keep.shape + (1,) * (self.frames.ndim - 1)).astype(self.frames.dtype)
        return np.moveaxis(frames, 1, -1)

    def n_step_window(self, idx: np.ndarray):
        """(B,) start slots -> n-step (rewards, discounts, next slots, valid)."""
        returns = np.zeros(len(idx), np.float32)
        alive = np.ones(len(idx), bool)  # window not yet closed by an episode end
        terminal = np.zeros(len(idx), bool)
        steps = np.zeros(len(idx), np.int64)
        for k in range(self.n_step):
            j = (idx + k) % self.capacity
            returns += alive * np.float32(self.gamma**k) * self.rewards[j]
            terminal |= alive & self.terminated[j]
            steps += alive
            alive &= ~self.terminated[j] & ~self.last[(j + 1) % self.capacity]
        discounts = (self.gamma**steps * ~terminal).astype(np.float32)
        # every slot read (up to the next observation at idx + steps) must already be written
        valid = ~self.last[idx] & (self._age(idx) + steps <= self.size - 1)
        if self.count > self.capacity:  # the oldest slots' stacks reach into overwritten frames
            valid &= self._age(idx) >= self.stack - 1
        return returns, discounts, (idx + steps) % self.capacity, valid

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n stored slots, uniformly (a prioritized buffer overrides this)."""
        return rng.integers(0, self.size, n)

    def sample_slots(self, rng: np.random.Generator, batch_size: int):
        """(batch, slots): slots from draw(); those whose n-step window or frame stack is incomplete are redrawn."""
        idx = self.draw(rng, batch_size)
        for _ in range(1000):
            returns, discounts, next_idx, valid = self.n_step_window(idx)
            if valid.all():
                return Batch(self.stacked(idx), self.actions[idx], returns, discounts, self.stacked(next_idx)), idx
            idx[~valid] = self.draw(rng, int((~valid).sum()))
        raise RuntimeError("no valid transition found in 1000 draws; increase --learning-starts or --buffer-size")

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """Uniform over valid slots (rejection sampling)."""
        return self.sample_slots(rng, batch_size)[0]
# ------------------------------------------------------------ end shared: replay buffer


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


# ---------------------------------------------------------------- shared: dataset writer
class DatasetWriter:
    """Writes every transition the agent stores as DQN Replay Dataset checkpoints of `capacity` slots each, in
    `directory`, so an online run makes an offline dataset for cql_pruned.py. Same arguments as ReplayBuffer.add.

    Slots follow Dopamine's logged buffers: every episode starts with stack - 1 padding slots (zero frame, action 0,
    reward 0, not terminal), then one slot per env step (its newest frame, action, stored reward, terminated). A
    terminated episode's final observation is not stored; a truncated one's is, as one more slot (action 0, reward 0,
    not terminal) listed in truncation_ckpt.{i}.gz, so that the last transition can bootstrap from it (Dopamine
    has no such slot: a reader that ignores the file samples these few slots as ordinary transitions).
    A checkpoint is written when its `capacity` slots are full (add_count: slots written so far) and by close()
    (add_count: the slots in this last checkpoint; zeros fill its arrays). Frames stream into the gzip file as they
    come (no second copy in memory). Every file is written under a temporary name and fsynced; then they are renamed,
    the frames file last, so a checkpoint that has its frames file is complete.
    """

    def __init__(self, directory: str, capacity: int, frame_shape: tuple, frame_dtype, stack: int, n_step: int):
        self.directory, self.capacity, self.stack, self.n_step = directory, capacity, stack, n_step
        self.frame_shape, self.frame_dtype = tuple(frame_shape), np.dtype(frame_dtype)
        self.actions = np.zeros(capacity, np.int32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminals = np.zeros(capacity, np.uint8)
        self.truncations = []  # slots of this checkpoint holding a truncated episode's final observation
        self.suffix, self.cursor, self.add_count = 0, 0, 0
        self.observations = None  # (raw file, gzip stream) of this checkpoint's frames, opened at its first slot
        self.episode_start = True
        os.makedirs(directory, exist_ok=True)

    def _temporary(self, name: str) -> str:
        return replay_file(self.directory, name, self.suffix) + ".tmp"

    def _slot(self, frame, action: int, reward: float, terminal: bool) -> None:
        if self.observations is None:
            raw = open(self._temporary(STORES[0]), "wb")
            stream = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)
            header = {"descr": np.lib.format.dtype_to_descr(self.frame_dtype), "fortran_order": False, "shape": (self.capacity, *self.frame_shape)}
            np.lib.format.write_array_header_1_0(stream, header)
            self.observations = (raw, stream)
        self.observations[1].write(np.ascontiguousarray(frame, self.frame_dtype).tobytes())
        self.actions[self.cursor], self.rewards[self.cursor], self.terminals[self.cursor] = action, reward, terminal
        self.cursor, self.add_count = self.cursor + 1, self.add_count + 1
        if self.cursor == self.capacity:
            self._write_checkpoint(self.add_count)

    def add(self, frame, action: int, reward: float, terminated: bool, truncated: bool, next_frame) -> None:
        if self.episode_start:
            for _ in range(self.stack - 1):
                self._slot(np.zeros(self.frame_shape, self.frame_dtype), 0, 0.0, False)
        self._slot(frame, action, reward, terminated)
        if truncated and not terminated:
            self.truncations.append(self.cursor)
            self._slot(next_frame, 0, 0.0, False)
        self.episode_start = terminated or truncated

    def _write_checkpoint(self, add_count: int) -> None:
        (raw, stream), self.observations = self.observations, None  # an interrupted write is not retried by close()
        stream.close()  # ends the gzip member, not the file under it
        # A last, partial checkpoint is zero-filled to its declared shape, in further gzip members (readers join the
        # members of a file): one member of 16 MiB of zeros compressed once and repeated, not 7 GB deflated anew.
        missing = (self.capacity - self.cursor) * self.frame_dtype.itemsize * math.prod(self.frame_shape)
        chunk = 1 << 24
        if missing >= chunk:
            member = gzip.compress(bytes(chunk), mtime=0)
            for _ in range(missing // chunk):
                raw.write(member)
        if missing % chunk:
            raw.write(gzip.compress(bytes(missing % chunk), mtime=0))
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()
        arrays = {STORES[1]: self.actions, STORES[2]: self.rewards, STORES[3]: self.terminals, "add_count": np.array(add_count),
                  "invalid_range": dopamine_invalid_range(self.cursor % self.capacity, self.capacity, self.stack, self.n_step),
                  TRUNCATION: np.array(self.truncations, np.int64)}
        for name, array in arrays.items():
            with open(self._temporary(name), "wb") as f:
                with gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as stream:
                    np.save(stream, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        for name in (*arrays, STORES[0]):  # the frames last: a checkpoint with its frames file is complete
            os.replace(self._temporary(name), replay_file(self.directory, name, self.suffix))
        fsync_directory(self.directory)  # the renames themselves reach the disk
        self.suffix, self.cursor, self.truncations = self.suffix + 1, 0, []
        for array in (self.actions, self.rewards, self.terminals):
            array.fill(0)

    def close(self) -> None:
        """Writes the last, partial checkpoint (if any slot is pending)."""
        if self.observations is not None:
            self._write_checkpoint(self.cursor)

    def checkpoint(self) -> dict:
        """The writer's state for a run checkpoint. The frames written so far end their gzip member and reach the disk,
        so that resume() can cut the frames file back to exactly them (later frames go on in a new member)."""
        frames_bytes = 0
        if self.observations is not None:
            raw, stream = self.observations
            stream.close()  # ends the gzip member, not the file under it
            raw.flush()
            os.fsync(raw.fileno())
            frames_bytes = raw.tell()
            self.observations = (raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0))
        return {"suffix": self.suffix, "cursor": self.cursor, "add_count": self.add_count, "episode_start": self.episode_start,
                "actions": self.actions[: self.cursor].copy(), "rewards": self.rewards[: self.cursor].copy(),
                "terminals": self.terminals[: self.cursor].copy(), "truncations": list(self.truncations), "frames_bytes": frames_bytes}

    def resume(self, saved: dict) -> None:
        """Goes on from a run checkpoint's writer state: files of the checkpoint then pending, or of later ones, go
        (a checkpoint finished after the run's own is rewritten), except the pending frames, cut back to `frames_bytes`."""
        self.suffix, self.cursor, self.add_count, self.episode_start = saved["suffix"], saved["cursor"], saved["add_count"], saved["episode_start"]
        for array, name in ((self.actions, "actions"), (self.rewards, "rewards"), (self.terminals, "terminals")):
            array[: self.cursor] = saved[name]
        self.truncations = list(saved["truncations"])
        frames = self._temporary(STORES[0])
        if saved["frames_bytes"]:
            finished = replay_file(self.directory, STORES[0], self.suffix)
            if not os.path.exists(frames):  # the checkpoint was finished after the run's: its frames start the same
                os.replace(finished, frames)
            raw = open(frames, "r+b")
            raw.truncate(saved["frames_bytes"])
            raw.seek(saved["frames_bytes"])
            self.observations = (raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0))
        for file_name in os.listdir(self.directory):
            name, _, rest = file_name.partition("_ckpt.")
            suffix = rest.split(".")[0]
            path = os.path.join(self.directory, file_name)
            if suffix.isdigit() and int(suffix) >= self.suffix and path != frames:
                os.remove(path)
# ------------------------------------------------------------ end shared: dataset writer


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


# ================================================================================ algorithm: DQN
def dqn_targets(rewards: jax.Array, discounts: jax.Array, next_q_target: jax.Array) -> jax.Array:
    """y = R + gamma^k (1 - d) max_a' Q_target(s', a') (no double-Q, SPEC 3.1). (B,), (B,), (B, A) -> (B,)."""
    return rewards + discounts * next_q_target.max(axis=-1)


def mse_loss(q_taken: jax.Array, targets: jax.Array) -> jax.Array:
    """mean over the batch of (y - q)^2, no 1/2 factor (Dopamine's JAX DQN default, SPEC 3.1). (B,), (B,) -> ()."""
    return jnp.mean((jax.lax.stop_gradient(targets) - q_taken) ** 2)


def make_q_fn(network: nn.Module):
    """q_fn(params, obs (B, ...), key) -> Q(s, .) (B, A), for acting and the analysis; the key is unused (IQN draws its
    quantile fractions from it)."""
    return lambda params, obs, key: network.apply({"params": params}, obs)


def make_loss(network: nn.Module):
    """loss_fn(params, target_params, batch, key) -> (MSE loss, aux): aux holds the batch's Q(s, a) and TD targets y,
    both (B,). The key is unused. The update differentiates it; the analysis also takes per-sample gradients of it."""

    def loss_fn(params, target_params, batch: Batch, key):
        next_q = network.apply({"params": target_params}, batch.next_obs)  # (B, A)
        targets = dqn_targets(batch.rewards, batch.discounts, next_q)  # (B,)
        q = network.apply({"params": params}, batch.obs)  # (B, A)
        q_taken = jnp.take_along_axis(q, batch.actions[:, None], axis=-1)[:, 0]  # (B,)
        return mse_loss(q_taken, targets), {"q_taken": q_taken, "targets": targets}

    return loss_fn


def make_update(loss_fn, tx: optax.GradientTransformation, method: str):
    """Builds the jitted update (state, batch, counts) -> (state, metrics). counts is None except at mask-update
    steps (then a pytree of ints from mask_update_counts); the two cases compile separately."""

    def update(state: TrainState, batch: Batch, counts):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.target_params, batch, None)
        state = sparse_step(state, grads, counts, tx, method)  # masks, Adam, theta <- (theta + u) * m
        return state, {"losses/td_loss": loss, "losses/q_values": aux["q_taken"].mean()}

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
# ---------------------------------------------------------------- shared: run helpers
def run_checks(args: Args) -> list:
    """(ok, message) pairs for the fields of the online loop (replay, exploration, schedule, logging)."""
    return [
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.total_timesteps > 0, "--total-timesteps must be > 0"),
        (args.log_frequency > 0, "--log-frequency must be > 0"),
        (args.learning_rate > 0, "--learning-rate must be > 0"),
        (args.adam_eps > 0, "--adam-eps must be > 0"),
        (args.batch_size > 0, "--batch-size must be > 0"),
        (args.buffer_size >= args.batch_size, f"--buffer-size ({args.buffer_size}) must be >= --batch-size ({args.batch_size})"),
        (0 < args.gamma <= 1, "--gamma must be in (0, 1]"),
        (args.n_step >= 1, "--n-step must be >= 1"),
        (args.target_network_frequency > 0, "--target-network-frequency must be > 0"),
        (0 <= args.end_e <= args.start_e <= 1, "need 0 <= --end-e <= --start-e <= 1"),
        (args.exploration_steps > 0, "--exploration-steps must be > 0"),
        (args.learning_starts >= args.batch_size, f"--learning-starts ({args.learning_starts}) must be >= --batch-size ({args.batch_size})"),
        (args.learning_starts < args.total_timesteps, "--learning-starts must be < --total-timesteps (no gradient step would run)"),
        (args.train_frequency > 0, "--train-frequency must be > 0"),
        (args.save_replay_checkpoint_size > 0, "--save-replay-checkpoint-size must be > 0"),
        (not args.save_replay_dir or args.resume or not checkpoint_files(args.save_replay_dir),
         f"--save-replay-dir {args.save_replay_dir} already holds replay checkpoints; choose a new directory"),
    ]


def linear_epsilon(step: int, start_e: float, end_e: float, exploration_steps: int, learning_starts: int) -> float:
    """Epsilon at env step `step`: start_e until learning starts, then linear to end_e over exploration_steps (SPEC 3)."""
    fraction = min(max((step - learning_starts) / exploration_steps, 0.0), 1.0)
    return start_e + fraction * (end_e - start_e)


def num_grad_steps(total_timesteps: int, learning_starts: int, train_frequency: int) -> int:
    """Gradient steps of a run: one at every env step t with learning_starts <= t < total and t % train_frequency == 0."""
    first = -(-learning_starts // train_frequency) * train_frequency
    return len(range(first, total_timesteps, train_frequency))


def prune_window(args: Args) -> tuple:
    """(t_start, t_end, frequency) of the pruning window over this run's gradient steps."""
    return pruning_window(args, num_grad_steps(args.total_timesteps, args.learning_starts, args.train_frequency))


class RunLogger:
    """TensorBoard scalars (x-axis: env steps) at every episode end and every `--log-frequency` env steps, and a
    progress line on stdout every 10 s."""

    def __init__(self, args: Args, writer, final_sparsity: float, window: tuple):
        self.args, self.writer, self.final_sparsity, self.window = args, writer, final_sparsity, window
        self.summarize = jax.jit(sparsity_summary)
        self.returns = []  # unclipped return of every finished episode
        self.window_start, self.window_time, self.last_print = 0, time.time(), time.time()

    def episode(self, global_step: int, episode_return: float, episode_length: int) -> None:
        self.writer.add_scalar("charts/episodic_return", episode_return, global_step)
        self.writer.add_scalar("charts/episodic_length", episode_length, global_step)
        self.returns.append(episode_return)

    def step(self, global_step: int, epsilon: float, grad_step: int, params, update_metrics) -> None:
        """Called after every env step; writes only at the logging cadence and at the last step."""
        last = global_step + 1 == self.args.total_timesteps
        if (global_step + 1) % self.args.log_frequency != 0 and not last:
            return
        now = time.time()
        sps = (global_step + 1 - self.window_start) / max(now - self.window_time, 1e-9)
        self.window_start, self.window_time = global_step + 1, now
        t_start, t_end, _ = self.window
        schedule = gmp_schedule(grad_step - 1, t_start, t_end) if self.args.pruning_method == "gmp" else 1.0
        scheduled = self.final_sparsity * schedule
        scalars = {"charts/SPS": sps, "charts/epsilon": epsilon, "charts/grad_steps": grad_step, "pruning/target_sparsity": scheduled}
        scalars.update(jax.device_get(self.summarize(params)))
        if update_metrics is not None:
            scalars.update(jax.device_get(update_metrics))
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), global_step)
        if now - self.last_print > 10 or last:
            self.last_print = now
            recent = f"{np.mean(self.returns[-20:]):.1f}" if self.returns else "n/a"
            print(f"step {global_step + 1}/{self.args.total_timesteps} | SPS {sps:.0f} | return (last 20) {recent} | "
                  f"sparsity {float(scalars['pruning/kernel_sparsity']):.3f} (target {scheduled:.3f})", flush=True)
# ------------------------------------------------------------ end shared: run helpers


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


# ---------------------------------------------------------------- shared: online loop
def checked_env(args: Args) -> tuple:
    """check_args, then (env, is_atari, frame stack); ArgsError for a network that does not fit the observations or a
    buffer too small for one transition."""
    check_args(args)
    env, is_atari = make_env(args.env_id)
    if args.network != "mlp" and not is_atari:
        raise ArgsError(f"--network {args.network} needs Atari frames; use --network mlp for {args.env_id}")
    stack = 4 if is_atari else 1
    if args.buffer_size < stack + args.n_step:  # the smallest buffer that can hold one whole transition
        raise ArgsError(f"--buffer-size ({args.buffer_size}) must be >= frame stack + n-step ({stack + args.n_step})")
    return env, is_atari, stack


def train_online(args: Args, env, is_atari: bool, state: TrainState, targets, rb, rng: np.random.Generator, learn, greedy_action, analysis) -> dict:
    """The online agents' loop: act epsilon-greedily, store the transition, take a gradient step every
    --train-frequency env steps once learning starts (learn(state, counts) -> (state, metrics) samples its own batch;
    counts are set at mask-update steps), copy the target network, log, checkpoint. Stops with NonFiniteError at a
    non-finite loss. Returns {"run_dir": ..., "episodic_returns": [...]}."""
    stack = 4 if is_atari else 1
    frame_shape, frame_dtype = env.observation_space.shape, env.observation_space.dtype
    t_start, t_end, prune_frequency = prune_window(args)
    # the analysis draws its batch and key from streams of its own, so that logging it never changes training
    metrics_rng, metrics_key = np.random.default_rng([args.seed, 2]), jax.random.fold_in(jax.random.key(args.seed), 2)
    dataset = None
    if args.save_replay_dir:
        dataset = DatasetWriter(args.save_replay_dir, args.save_replay_checkpoint_size, frame_shape, frame_dtype, stack, args.n_step)
    saved = load_checkpoint(args.resume) if args.resume else None
    run_dir, writer = open_run(args, {"prune_window_grad_steps": [t_start, t_end, prune_frequency]}, saved and saved["logged_step"])
    logger = RunLogger(args, writer, overall_sparsity(state.params, targets), (t_start, t_end, prune_frequency))

    obs_frame, _ = env.reset(seed=int(rng.integers(2**31)))
    frames = deque([np.zeros_like(obs_frame)] * (stack - 1) + [obs_frame], maxlen=stack)  # zero-filled at episode start
    start, grad_step, episode_return, episode_length, update_metrics, metrics_batch = 0, 0, 0.0, 0, None, None
    learning_starts = args.learning_starts
    last_good = state  # the train state before the last update whose loss was finite
    if saved is not None:  # go on exactly where the checkpoint was written
        state, last_good = restore_leaves(state, saved["train_state"]), restore_leaves(state, saved["last_good"])
        rng.bit_generator.state, metrics_rng.bit_generator.state = saved["rng"], saved["metrics_rng"]
        if is_atari:
            restore_object(env, saved["env"])
        else:
            env = saved["env"]
        obs_frame, frames = saved["obs_frame"], deque(saved["frames"], maxlen=stack)
        start, grad_step, episode_return, episode_length = saved["global_step"], saved["grad_step"], saved["episode_return"], saved["episode_length"]
        update_metrics, logger.returns, logger.window_start = saved["update_metrics"], saved["returns"], start
        metrics_batch = None if saved["metrics_batch"] is None else Batch(*saved["metrics_batch"])
        if saved["replay"] is not None:
            restore_object(rb, saved["replay"])
        else:  # refill the buffer before learning again
            learning_starts = start + args.learning_starts
        if dataset is not None:
            dataset.resume(saved["dataset"])
        print(f"resumed {run_dir} at env step {start}, gradient step {grad_step}", flush=True)

    def checkpoint(global_step: int, train_state: TrainState, grad_steps: int):  # everything the loop needs after `global_step`
        return save_checkpoint(run_dir, writer, {
            "logged_step": global_step, "global_step": global_step + 1, "grad_step": grad_steps, "train_state": host_leaves(train_state),
            "last_good": host_leaves(last_good),
            "rng": rng.bit_generator.state, "metrics_rng": metrics_rng.bit_generator.state, "env": object_state(env) if is_atari else env,
            "obs_frame": obs_frame, "frames": list(frames), "episode_return": episode_return, "episode_length": episode_length,
            "update_metrics": jax.device_get(update_metrics), "metrics_batch": None if metrics_batch is None else tuple(metrics_batch),
            "returns": logger.returns, "replay": object_state(rb) if args.checkpoint_replay else None,
            "dataset": dataset.checkpoint() if dataset is not None else None})

    try:
        for global_step in range(start, args.total_timesteps):
            # act: epsilon-greedy on the stacked observation
            epsilon = linear_epsilon(global_step, args.start_e, args.end_e, args.exploration_steps, args.learning_starts)
            if rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            else:
                action = int(greedy_action(state.params, np.stack(frames, axis=-1), global_step))

            # step the env; store the clipped reward (Atari protocol), log the unclipped return
            next_frame, reward, terminated, truncated, _ = env.step(action)
            stored_reward = np.clip(reward, -1.0, 1.0) if is_atari else reward
            rb.add(obs_frame, action, stored_reward, terminated, truncated, next_frame)
            if dataset is not None:
                dataset.add(obs_frame, action, stored_reward, terminated, truncated, next_frame)
            episode_return, episode_length = episode_return + float(reward), episode_length + 1
            if terminated or truncated:
                logger.episode(global_step, episode_return, episode_length)
                episode_return, episode_length = 0.0, 0
                next_frame, _ = env.reset()
                frames.extend([np.zeros_like(next_frame)] * (stack - 1))
            frames.append(next_frame)
            obs_frame = next_frame

            # learn
            if global_step >= learning_starts:
                if global_step % args.train_frequency == 0:
                    counts = None
                    if is_mask_update_step(args.pruning_method, grad_step, t_start, t_end, prune_frequency):
                        counts = mask_update_counts(args.pruning_method, state.masks, targets, grad_step, t_start, t_end, args.drop_fraction)
                    before, (state, update_metrics) = state, learn(state, counts)
                    if not np.isfinite(float(update_metrics["losses/td_loss"])):  # the params this loss came from are suspect too
                        update_metrics = None
                        writer = checkpoint(global_step, last_good, int(last_good.grad_step))
                        raise NonFiniteError(f"non-finite loss at env step {global_step}, gradient step {grad_step}; the last good "
                                             f"train state (gradient step {int(last_good.grad_step)}) is checkpointed in {run_dir}")
                    last_good = before
                    grad_step += 1
                if global_step % args.target_network_frequency == 0:
                    state = state.replace(target_params=state.params)

            logger.step(global_step, epsilon, grad_step, state.params, update_metrics)
            if args.metrics_frequency and global_step >= learning_starts and (global_step + 1) % args.metrics_frequency == 0:
                if metrics_batch is None:
                    metrics_batch = by_action(rb.sample_slots(metrics_rng, args.metrics_batch_size)[0], args.metrics_grad_samples)  # drawn once, then fixed
                write_analysis(writer, analysis(state.params, state.target_params, state.masks, metrics_batch, metrics_key), global_step)
            if args.checkpoint_frequency and (global_step + 1) % args.checkpoint_frequency == 0:
                writer = logger.writer = checkpoint(global_step, state, grad_step)
    finally:  # also when interrupted: the logs and the dataset so far are kept
        writer.close()
        if dataset is not None:
            dataset.close()

    if args.save_model:
        save_model(args, run_dir, state)
    return {"run_dir": run_dir, "episodic_returns": logger.returns}
# ------------------------------------------------------------ end shared: online loop


def main(args: Args) -> dict:
    """Trains; returns {"run_dir": ..., "episodic_returns": [...]}."""
    env, is_atari, stack = checked_env(args)

    # seeding: NumPy generators for the host (env seeds, exploration, replay; random masks on their own stream, so
    # that every method sees the same env seeds for a seed) and one JAX root key (network init, SET regrowth)
    rng, mask_rng = np.random.default_rng(args.seed), np.random.default_rng([args.seed, 1])
    init_key, train_key = jax.random.split(jax.random.key(args.seed))

    # network, masks, optimizer, update, acting
    frame_shape, frame_dtype = env.observation_space.shape, env.observation_space.dtype
    network = QNetwork(env.action_space.n, args.network, args.width_scale, args.scale_dense, args.use_bias, args.use_output_bias)
    params = jax.jit(network.init)(init_key, np.zeros((1, *frame_shape, stack), frame_dtype))["params"]
    tx = optax.adam(args.learning_rate, eps=args.adam_eps)
    state, targets = init_train_state(args, params, tx, mask_rng, train_key)
    q_fn, loss_fn = make_q_fn(network), make_loss(network)
    update = make_update(loss_fn, tx, args.pruning_method)
    greedy_action = jax.jit(lambda params, obs, step: q_fn(params, obs[None], None).argmax(-1)[0])
    rb = ReplayBuffer(args.buffer_size, frame_shape, frame_dtype, stack, args.n_step, args.gamma)

    def learn(state: TrainState, counts):  # one gradient step on a uniform replay batch
        return update(state, rb.sample(rng, args.batch_size), counts)

    return train_online(args, env, is_atari, state, targets, rb, rng, learn, greedy_action, make_analysis(q_fn, loss_fn, args.metrics_grad_samples))


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
