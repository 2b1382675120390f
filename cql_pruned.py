"""Offline CQL and CQL+C51 with sparse training: gradual magnitude pruning (GMP), RigL, SET or static random sparsity.

Papers: Obando-Ceron, Courville & Castro, "In value-based deep RL, a pruned network is a good network" (ICML 2024,
Sec. 4.4); Kumar et al., "Conservative Q-learning for offline RL" (NeurIPS 2020, CQL(H)); Agarwal, Schuurmans &
Norouzi, "An optimistic perspective on offline RL" (ICML 2020, the DQN Replay Dataset); Bellemare et al. 2017 (C51).

CQL: the DQN network; the Huber loss of y - Q(s, a), y = r + gamma (1 - d) max_a' Q_target(s', a'), plus
alpha (logsumexp_a Q(s, a) - Q(s, a_data)) (the paper's Table 3; Dopamine's labs/offline_rl/jax/configs/jax_dr3.gin).
CQL+C51 (--c51): a dueling C51 head; the cross-entropy to the projected double-DQN target plus the same regularizer on
Q = sum_i z_i p_i (jax_rainbow.gin). Iterations of gradient steps on uniform batches of the dataset, each followed by
an evaluation in the environment. Sparse training is dqn_pruned.py's, over the offline gradient steps.
The data (--dataset-dir): a run of the DQN Replay Dataset, or an online script's run directory checkpointed with
--checkpoint-frequency (its replay buffer); frame stacks and n-step returns are rebuilt when a batch is drawn.

Deviations from the paper and its code (the README lists them with their sources)
    1-3, 6. Those of dqn_pruned.py: the forced final mask update and the window derived from the run, RigL/SET's
       optimizer step on mask-update steps, host-drawn random masks, a non-finite loss refused on the device.
    11. The checkpoints are loaded once, not 5 random ones re-read every iteration (Dopamine's gz path), and not the
       TFDS episodes: the defaults load the same 2.5M transitions the paper's 5% names.
    12. A transition is valid (Dopamine's rules) if it is outside invalid_range, its frame stack holds no earlier
       episode end, and its next state is loaded; near the end of the loaded slots a window cut short by a terminal is
       kept (Dopamine asks for the whole n-step window). In a full checkpoint the slots around the write cursor are
       also excluded for this reader's stack and n (the file's invalid_range holds the logging agent's n = 1).

Example: python cql_pruned.py --env-id ALE/Pong-v5 --dataset-dir dqn_replay/Pong/1 --width-scale 3   # README: more
"""

import dataclasses
import gzip
import json
import math
import os
import pickle
import sys
import time
import zlib
from collections import deque
from functools import partial
from typing import Any, Literal, NamedTuple, get_args, get_origin

import ale_py
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import serialization, struct
from tensorboardX import SummaryWriter

from common import metrics  # the analysis metrics, shared by every script

gym.register_envs(ale_py)  # makes the ALE/...-v5 ids known to gymnasium


# ============================================================================================================ Args
@dataclasses.dataclass(frozen=True)
class Args:
    # -------- experiment arguments of the offline run
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment; the run directory is runs/{env}__{exp_name}__{seed}__{unix time}"""
    seed: int = 1
    """seed of the run: one JAX root key and NumPy generators (batches, evaluation, masks)"""
    env_id: str = "ALE/Breakout-v5"
    """gymnasium id of the evaluation environment (the dataset's game): ALE/{Game}-v5 or a classic-control id"""
    dataset_dir: str | None = None
    """required: a DQN Replay Dataset run ({Game}/{run}/, or its replay_logs/), or an online script's run directory
    checkpointed with --checkpoint-frequency (its replay buffer)"""
    first_checkpoint: int = 0
    """DQN Replay Dataset: suffix of the first checkpoint file to load ($store$_observation_ckpt.{i}.gz)"""
    num_checkpoints: int = 50
    """DQN Replay Dataset: checkpoints to load, from --first-checkpoint on (the paper: 0-49)"""
    transitions_per_checkpoint: int = 50_000
    """DQN Replay Dataset: slots kept from the start of each checkpoint (the paper's 5%: 50,000 of 1M)"""
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
    """gradient steps between logs of losses, SPS and sparsity (evaluations: after every iteration)"""

    # -------- algorithm arguments (CQL, CQL+C51: the paper's Table 3; Dopamine's jax_dr3.gin and jax_rainbow.gin)
    c51: bool = False
    """CQL+C51: dueling C51 head, double-DQN target, and the CQL+C51 column of Table 3 for every unset flag"""
    learning_rate: float | None = None
    """Adam learning rate; unset: 5e-5 (CQL), 6.25e-5 (CQL+C51) (paper Table 3)"""
    adam_eps: float | None = None
    """Adam epsilon; unset: 3.125e-4 (CQL), 1.5e-4 (CQL+C51) (paper Table 3)"""
    n_step: int | None = None
    """n of the n-step return; unset: 1 (CQL), 3 (CQL+C51) (paper Table 3)"""
    target_update_period: int | None = None
    """gradient steps between hard copies into the target network; unset: 2000 (CQL), 100 (CQL+C51) (Dopamine's gins)"""
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
    """torso: Impala ResNet (16,32,32)*k (Espeholt et al. 2018; Dopamine's ImpalaDQNNetwork); Nature CNN (32,64,64)*k
    with SAME padding (cnn: Dopamine's) or VALID padding (nature: Mnih et al. 2015, CleanRL's); MLP for vectors"""
    width_scale: int = 1
    """width multiplier k of every conv channel count (MLP: of its hidden layer); the paper uses k=1 and k=3 offline"""
    scale_dense: bool | None = None
    """also multiply the 512-unit dense layer by k; unset: off for CQL, on for CQL+C51 (ParameterizedRainbowNetwork)"""
    use_bias: bool = True
    """biases in the hidden layers (Ganaie et al. remove them: --no-use-bias)"""
    use_output_bias: bool = True
    """bias in the output layer(s) (separate from --use-bias, as in Ganaie et al.'s ablation)"""

    # -------------------------------------------------------------------------------- shared: sparse and run args
    pruning_method: Literal["gmp", "rigl", "set", "static", "none"] = "gmp"
    """gmp: gradual magnitude pruning (Zhu & Gupta 2017); rigl (Evci et al. 2020) / set (Mocanu et al. 2018):
    dynamic sparse training; static: a random mask at init (Ma et al. 2025); none: dense"""
    sparsity: float = 0.95
    """final fraction of zero weights over all prunable kernels, in [0, 1) (paper: 0.95)"""
    sparsity_distribution: Literal["erk", "uniform"] = "erk"
    """per-layer sparsities: Erdos-Renyi-Kernel (Evci et al. 2020, the paper's) or the same in every layer"""
    prune_start_fraction: float | None = None
    """fraction of the run's gradient steps at which mask updates start; unset: 0.2 for gmp (paper Sec. 3), 0.0 for
    rigl/set (Graesser et al. 2022)"""
    prune_end_fraction: float = 0.8
    """fraction of the run's gradient steps at which mask updates stop; the mask is fixed afterwards (paper Sec. 3)"""
    prune_frequency_grad_steps: int | None = None
    """gradient steps between mask updates; unset: 1000 for gmp (JaxPruner's dqn.gin), 5000 for rigl/set
    (Graesser et al. 2022)"""
    drop_fraction: float = 0.3
    """rigl/set: initial fraction of each layer's active weights dropped and regrown per update, cosine-decayed to 0
    at the window's end (Graesser et al. 2022)"""
    mask_sampling: Literal["exact", "bernoulli"] = "exact"
    """random initial masks (static, rigl, set): exactly round(N(1-s)) kept weights per layer, or independent
    Bernoulli(1-s) entries (Ma et al.'s code)"""
    dense_warmup: bool = False
    """static, rigl, set: train dense until the window starts (--prune-start-fraction), then apply the random initial
    masks there; with rigl and --prune-start-fraction 0.2, RigL starts at 20% of training as in Ganaie et al."""

    metrics_frequency: int = 250_000
    """steps between logs of the analysis metrics (common/metrics.py: dormant and dead neurons, srank, norms,
    gradient covariance; env steps, gradient steps in cql_pruned.py); 0: off"""
    metrics_batch_size: int = 256
    """replay transitions in the one fixed batch the analysis metrics use (Dopamine's ReDo statistics use 256)"""
    metrics_grad_samples: int = 64
    """the first transitions of that batch whose per-sample gradients make the gradient covariance matrix
    (memory: samples x parameters floats)"""

    checkpoint_frequency: int = 0
    """steps between checkpoints of everything the run needs to go on, runs/{run_name}/checkpoint.pkl (env steps;
    gradient steps in cql_pruned.py); 0: off"""
    resume: str | None = None
    """a run directory to continue from its checkpoint, appending to its logs; its config.json gives every flag not
    given here, and flags that change the run are refused"""


# -------------------------------------------------------------------------------- algorithm defaults and checks
def resolve(args: Args) -> Args:
    """Fills the unset algorithm flags with the CQL or the CQL+C51 column of the paper's Table 3."""
    defaults = (6.25e-5, 1.5e-4, 3, 100, True) if args.c51 else (5e-5, 3.125e-4, 1, 2000, False)
    names = ("learning_rate", "adam_eps", "n_step", "target_update_period", "scale_dense")
    return dataclasses.replace(
        args, **{n: d if getattr(args, n) is None else getattr(args, n) for n, d in zip(names, defaults)}
    )


def run_checks(args: Args) -> list:
    """(ok, message) pairs for the offline loop's fields (data, schedule, evaluation); args resolved."""
    return [
        (args.dataset_dir is not None, "--dataset-dir is required: DQN Replay Dataset checkpoints or a run directory"),
        (args.first_checkpoint >= 0, "--first-checkpoint must be >= 0"),
        (args.num_checkpoints > 0, "--num-checkpoints must be > 0"),
        (args.transitions_per_checkpoint > 0, "--transitions-per-checkpoint must be > 0"),
        (args.num_iterations > 0, "--num-iterations must be > 0"),
        (args.grad_steps_per_iteration > 0, "--grad-steps-per-iteration must be > 0"),
        (args.eval_steps > 0, "--eval-steps must be > 0"),
        (0 <= args.eval_epsilon <= 1, "--eval-epsilon must be in [0, 1]"),
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


# -------------------------------------------------------------------------------- shared: arg checks
class ArgsError(ValueError):
    """A bad command-line value; reported as one line on stderr with exit code 2."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args: Args) -> None:
    """Raises ArgsError naming the first invalid field: the shared ones, then the run's (run_checks), the
    algorithm's (algorithm_checks) and a resumed run's (resume_checks)."""
    (start, end), every = prune_window_fractions(args), args.prune_frequency_grad_steps
    samples, batch, name = args.metrics_grad_samples, args.metrics_batch_size, args.exp_name
    checks = [(getattr(args, f) > 0, f"{flag(f)} must be > 0") for f in ("log_frequency", "metrics_batch_size")]
    off = ("metrics_frequency", "checkpoint_frequency")
    checks += [(getattr(args, f) >= 0, f"{flag(f)} must be >= 0 (0: off)") for f in off]
    checks += [
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.width_scale > 0, f"--width-scale must be a positive integer, got {args.width_scale}"),
        (name not in ("", ".", "..") and "/" not in name, f"--exp-name must be a name, not {name!r}"),
        (0 <= args.sparsity < 1, f"--sparsity must be in [0, 1), got {args.sparsity}"),
        (0 <= args.drop_fraction <= 1, "--drop-fraction must be in [0, 1]"),
        (every is None or every > 0, "--prune-frequency-grad-steps must be > 0"),
        (0 <= start < end <= 1, f"need 0 <= --prune-start-fraction ({start}) < --prune-end-fraction ({end}) <= 1"),
        (0 < samples <= batch, f"--metrics-grad-samples must be in [1, --metrics-batch-size ({batch})], got {samples}"),
        (
            not args.dense_warmup or args.pruning_method in ("static", "rigl", "set"),
            "--dense-warmup needs --pruning-method static, rigl or set",
        ),
        (
            not args.dense_warmup or start > 0,
            "--dense-warmup needs --prune-start-fraction > 0: its dense phase ends there",
        ),
    ]
    for field in dataclasses.fields(args):  # tyro checks these on the command line; main(Args(...)) too
        choices, value = get_args(field.type) if get_origin(field.type) is Literal else (), getattr(args, field.name)
        checks.append((not choices or value in choices, f"{flag(field.name)} must be one of {choices}"))
    for ok, message in checks + run_checks(args) + algorithm_checks(args) + resume_checks(args):
        if not ok:
            raise ArgsError(message)


# =================================================================================== environment (evaluation)
# ---------------------------------------------------------------- shared: environment
class AtariEnv:
    """Atari with Dopamine's protocol (Castro et al. 2018; atari_lib.AtariPreprocessing) on ale-py's AtariVectorEnv:
    the arguments below (sticky actions: Machado et al. 2018, "Revisiting the ALE"), and its defaults: max-pool of the
    last two grayscale frames, 84x84 INTER_AREA resize, minimal action set. Frames are single (84, 84) uint8, rewards
    unclipped. Truncation after 27k agent steps (108k frames) is done here: ale-py 0.12.1's leaves out the last frame.

    reset(seed) seeds the emulator and its sticky actions; reset() goes on from there, and reseeds (with a seed drawn
    from the last one) once RESEED_STEPS steps have passed since, as a seeded reset reloads the ROM (~70 ms). The env
    is thus its last seed and the actions, resets and count restarts since: a pickle holds them, and unpickling replays
    them on a new emulator, which then goes on bit-identically."""

    RESEED_STEPS, RESET, RESTART_COUNT = 10_000, 255, 254  # in the history, beside the actions (< 18)

    def __init__(self, game: str, sticky: float = 0.25, max_steps: int = 27_000):
        self.game, self.sticky, self.max_steps = game, sticky, max_steps
        self.seed, self.history, self.steps, self.done = None, bytearray(), 0, True
        self.vec = ale_py.vector_env.AtariVectorEnv(  # ale_py imports its vector_env module
            game, num_envs=1, repeat_action_probability=sticky, frameskip=4, noop_max=0, use_fire_reset=False,
            episodic_life=False, reward_clipping=False, stack_num=1,
            max_num_frames_per_episode=4 * max_steps + 1,  # never reached: step() truncates first
        )  # fmt: skip
        self.action_space = self.vec.single_action_space
        self.observation_space = gym.spaces.Box(0, 255, (84, 84), np.uint8)

    def reset(self, seed: int | None = None):
        if seed is None and len(self.history) < self.RESEED_STEPS:
            self.history.append(self.RESET)
            obs, info = self.vec.reset()
        else:
            self.seed = int(np.random.default_rng(self.seed).integers(2**31) if seed is None else seed % 2**31)
            self.history = bytearray()
            obs, info = self.vec.reset(seed=self.seed)
        self.steps, self.done, self.lives = 0, False, int(info["lives"][0])
        return obs[0, 0], {}  # (1, 1, 84, 84): one env, one frame

    def step(self, action: int):
        if self.done:  # the vector env would autoreset (NEXT_STEP): a reset's frame must never pass for a transition
            raise RuntimeError("AtariEnv.step after the episode ended: call reset() first")
        self.history.append(action)
        obs, reward, terminated, _, info = self.vec.step(np.array([action]))
        self.steps += 1
        terminated, truncated = bool(terminated[0]), not terminated[0] and self.steps >= self.max_steps
        self.done = terminated or truncated
        lives = int(info["lives"][0])
        life_lost, self.lives = lives < self.lives, lives
        return obs[0, 0], float(reward[0]), terminated, truncated, {"life_lost": life_lost}

    def restart_count(self):
        """The 27k-step limit counts from here: start_game calls it after its no-ops, as Dopamine's runner counts the
        agent's steps only (max_steps_per_episode)."""
        self.history.append(self.RESTART_COUNT)
        self.steps = 0

    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in ("game", "sticky", "max_steps", "seed", "history")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["game"], state["sticky"], state["max_steps"])
        if state["seed"] is not None:
            self.reset(state["seed"])
            for action in state["history"]:
                if action == self.RESET:
                    self.reset()
                elif action == self.RESTART_COUNT:
                    self.restart_count()
                else:
                    self.step(action)


def make_env(env_id: str, sticky_actions: bool = True):
    """Returns (env, is_atari). ALE/{Game}-v5 ids get AtariEnv (sticky actions 0.25, or none); other discrete-action
    gymnasium ids, gym.make."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as error:  # unknown id: gymnasium's message suggests close matches
        raise ArgsError(f"unknown --env-id {env_id!r}: {error}") from None
    if spec.entry_point == "ale_py.env:AtariEnv":
        return AtariEnv(spec.kwargs["game"], 0.25 if sticky_actions else 0.0), True
    env = gym.make(env_id)
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ArgsError(f"--env-id {env_id!r} has action space {env.action_space}; DQN needs a discrete one")
    return env, False


def start_game(env, rng: np.random.Generator, noop_max: int, seed: int | None = None):
    """Resets `env` (seeded, if `seed` is given), then takes a random 0 to noop_max - 1 no-op steps (action 0, their
    rewards dropped; drawn from `rng`, which noop_max 0 leaves untouched), as Dopamine's Atari 100k runner does with
    randint(0, max_noops). AtariEnv's 27k-step limit then counts from the agent's first step, as Dopamine's does.
    Returns the frame the agent starts from."""
    frame, _ = env.reset(seed=seed)
    for _ in range(int(rng.integers(noop_max)) if noop_max else 0):
        frame, _, terminated, truncated, _ = env.step(0)
        if terminated or truncated:
            frame, _ = env.reset()
    if noop_max:
        env.restart_count()
    return frame


# ===================================================================================================== network
# -------------------------------------------------------------------------------- shared: network torso
def conv(channels: int, kernel: int, stride: int = 1, padding: str = "SAME", **kwargs) -> nn.Conv:
    return nn.Conv(channels, (kernel, kernel), (stride, stride), padding=padding, **kwargs)


class ImpalaTorso(nn.Module):
    """Impala ResNet (Espeholt et al. 2018; Dopamine's ImpalaDQNNetwork, the paper's Sec. 4.1): 3 stacks of [conv,
    3x3/2 max-pool, 2 residual blocks], channels (16,32,32)*k. (B, 84, 84, 4) uint8 -> (B, 3872*k)."""

    width: int
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32) / 255.0
        for i, channels in enumerate((16, 32, 32)):
            channels *= self.width
            init = nn.initializers.xavier_uniform()
            x = conv(channels, 3, kernel_init=init, use_bias=self.use_bias, name=f"stack{i}_conv")(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for j in range(2):  # pre-activation residual blocks, flax-default (lecun_normal) init
                y = conv(channels, 3, use_bias=self.use_bias, name=f"stack{i}_block{j}_conv0")(nn.relu(x))
                y = conv(channels, 3, use_bias=self.use_bias, name=f"stack{i}_block{j}_conv1")(nn.relu(y))
                x = x + y
        x = nn.relu(x)
        return x.reshape(x.shape[0], -1)  # (B, 11*11*32k), HWC order


class NatureTorso(nn.Module):
    """Nature DQN CNN. SAME padding as in Dopamine's flax network: 84 -> 21 -> 11 -> 11, (B, 84, 84, 4) uint8 ->
    (B, 7744*k); VALID padding as in Mnih et al. (2015) and CleanRL: 84 -> 20 -> 9 -> 7, (B, 3136*k), 1.7x cheaper."""

    width: int
    use_bias: bool
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        x = x.astype(jnp.float32) / 255.0
        kwargs = {"kernel_init": nn.initializers.xavier_uniform(), "use_bias": self.use_bias}
        for i, (channels, kernel, stride) in enumerate(((32, 8, 4), (64, 4, 2), (64, 3, 1))):
            x = nn.relu(conv(channels * self.width, kernel, stride, self.padding, name=f"conv{i}", **kwargs)(x))
        return x.reshape(x.shape[0], -1)


class MLPTorso(nn.Module):
    """One hidden layer of 256*k ReLU units for vector observations. (B, ...) -> (B, 256*k)."""

    width: int
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        init = nn.initializers.xavier_uniform()
        return nn.relu(nn.Dense(256 * self.width, kernel_init=init, use_bias=self.use_bias, name="fc")(x))


TORSOS = {"resnet": ImpalaTorso, "cnn": NatureTorso, "nature": partial(NatureTorso, padding="VALID"), "mlp": MLPTorso}


# -------------------------------------------------------------------------------- shared: q network
class QNetwork(nn.Module):
    """Torso -> Dense 512 (*k with scale_dense) -> ReLU -> Dense A, xavier_uniform (Dopamine's Impala head); with
    dueling, two heads on the 512 features, Q = V + A - mean_a A (Wang et al. 2016; Dopamine's FullRainbowNetwork).
    (B, ...) -> (B, A)."""

    num_actions: int
    torso: str
    width: int
    scale_dense: bool
    use_bias: bool
    use_output_bias: bool
    dueling: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.xavier_uniform()
        x = TORSOS[self.torso](self.width, self.use_bias, name="torso")(x)
        hidden = 512 * (self.width if self.scale_dense else 1)
        x = nn.relu(nn.Dense(hidden, kernel_init=init, use_bias=self.use_bias, name="dense")(x))
        if not self.dueling:
            return nn.Dense(self.num_actions, kernel_init=init, use_bias=self.use_output_bias, name="q")(x)
        value = nn.Dense(1, kernel_init=init, use_bias=self.use_output_bias, name="value")(x)  # (B, 1)
        advantage = nn.Dense(self.num_actions, kernel_init=init, use_bias=self.use_output_bias, name="advantage")(x)
        return value + advantage - advantage.mean(axis=-1, keepdims=True)


# -------------------------------------------------------------------------------- CQL: network
class DuelingC51Network(nn.Module):
    """Torso -> Dense 512 (*k with scale_dense) -> ReLU -> dueling C51 head (Dopamine's offline
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
        init = nn.initializers.xavier_uniform()
        x = TORSOS[self.torso](self.width, self.use_bias, name="torso")(x)
        hidden = 512 * (self.width if self.scale_dense else 1)
        x = nn.relu(nn.Dense(hidden, kernel_init=init, use_bias=self.use_bias, name="dense")(x))
        value = nn.Dense(self.num_atoms, use_bias=self.use_output_bias, name="value")(x)  # (B, atoms)
        advantage = nn.Dense(self.num_actions * self.num_atoms, use_bias=self.use_output_bias, name="advantage")(x)
        advantage = advantage.reshape(x.shape[0], self.num_actions, self.num_atoms)  # (B, A, atoms)
        return value[:, None, :] + advantage - advantage.mean(axis=1, keepdims=True)


# ============================================================================================= offline dataset
# -------------------------------------------------------------------------------- shared: batch
class Batch(NamedTuple):
    obs: np.ndarray  # (B, *frame_shape, stack) state s_t
    actions: np.ndarray  # (B,) int32
    rewards: np.ndarray  # (B,) float32, n-step discounted sum of (clipped) rewards
    discounts: np.ndarray  # (B,) float32, gamma^k * (1 - terminated); k <= n steps actually taken
    next_obs: np.ndarray  # (B, *frame_shape, stack) state s_{t+k}


# -------------------------------------------------------------------------------- CQL: the dataset
def window_transitions(rewards, terminals, truncation, invalid, stack: int, n_step: int, gamma: float):
    """The valid slots j of slots laid out as in the DQN Replay Dataset (stack - 1 zero-frame padding slots start each
    episode) and their n-step transitions, as Dopamine's circular_replay_buffer.py builds them: R = sum_{k<K} gamma^k
    r_{j+k}, discount gamma^K (1 - terminal), next state at slot j + K, the window ending after n slots, at a terminal
    (included) or before a truncation slot (an episode's final observation, bootstrapped from). Valid: not invalid or a
    truncation slot, no episode end among slots j-stack+1..j-1, stack and next state inside the slots."""
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
    """The loaded slots' single frames and actions, and the valid transitions (start slot, n-step reward and discount,
    next slot); stacks of frames slot-stack+1..slot are rebuilt when a batch is drawn (the padding zeros them)."""

    def __init__(self, frames, actions, transitions: tuple, stack: int):
        self.frames, self.actions, self.stack = frames, actions, stack
        self.starts, self.rewards, self.discounts, self.next_slots = transitions

    def __len__(self) -> int:
        return len(self.starts)

    def stacked(self, slots: np.ndarray) -> np.ndarray:  # (B,) -> (B, *frame_shape, stack), oldest frame first
        return np.moveaxis(self.frames[slots[:, None] - np.arange(self.stack - 1, -1, -1)], 1, -1)

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """Uniform over the valid transitions."""
        i = rng.integers(0, len(self.starts), batch_size)
        slots, next_slots = self.starts[i], self.next_slots[i]
        return Batch(
            self.stacked(slots), self.actions[slots], self.rewards[i], self.discounts[i], self.stacked(next_slots)
        )


def load_dataset(args: Args, frame_shape: tuple, frame_dtype, num_actions: int, stack: int) -> ReplayDataset:
    """The data of --dataset-dir: a run directory's checkpointed replay buffer, or DQN Replay Dataset checkpoints."""
    from_run = os.path.isfile(os.path.join(args.dataset_dir, CHECKPOINT))
    load = load_replay_buffer if from_run else load_replay_logs
    frames, actions, transitions = load(args, frame_shape, frame_dtype, num_actions, stack)
    if len(transitions[0]) == 0:
        raise ArgsError(f"no valid transition in --dataset-dir {args.dataset_dir}")
    return ReplayDataset(frames, actions, transitions, stack)


def load_replay_buffer(args: Args, frame_shape: tuple, frame_dtype, num_actions: int, stack: int) -> tuple:
    """(frames, actions, transitions) of the replay buffer in a run directory's checkpoint (an online script's
    ReplayBuffer.__getstate__()), its slots laid out as the DQN Replay Dataset's: oldest first, stack - 1 zero-frame
    padding slots before each episode start, and an episode's final observation (no action) a truncation slot."""
    try:
        with open(os.path.join(args.dataset_dir, "config.json")) as f:
            env_id = json.load(f)["env_id"]
        with open(os.path.join(args.dataset_dir, CHECKPOINT), "rb") as f:
            replay = pickle.load(f)["replay"]
    except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as error:
        raise ArgsError(f"--dataset-dir {args.dataset_dir}: cannot read its run's replay buffer ({error!r})") from None
    if env_id != args.env_id:
        raise ArgsError(f"--dataset-dir {args.dataset_dir} is a run of {env_id}, not of --env-id {args.env_id}")
    if replay is None:
        raise ArgsError(
            f"--dataset-dir {args.dataset_dir}: its {CHECKPOINT} holds no replay buffer (--no-checkpoint-replay)"
        )
    size, count, capacity = min(replay["count"], replay["capacity"]), replay["count"], replay["capacity"]
    order = (np.arange(size) + (count if count > capacity else 0)) % capacity  # oldest slot first
    first = replay["first"][order]
    position = np.arange(size) + (stack - 1) * np.cumsum(first)  # stack - 1 padding slots before each episode start

    def laid_out(name):  # the slots' values at their positions, zeros in the padding (a piece at a time: one copy)
        out = np.zeros((size + (stack - 1) * int(first.sum()), *replay[name].shape[1:]), replay[name].dtype)
        for i in range(0, size, 1 << 16):
            out[position[i : i + (1 << 16)]] = replay[name][order[i : i + (1 << 16)]]
        return out

    rewards, terminals, truncation = laid_out("rewards"), laid_out("terminated"), laid_out("last")
    invalid = np.zeros(len(rewards), bool)
    transitions = window_transitions(rewards, terminals, truncation, invalid, stack, args.n_step, args.gamma)
    return laid_out("frames"), laid_out("actions"), transitions


# The DQN Replay Dataset (Agarwal et al. 2020), Dopamine's logged replay buffers: checkpoint i of a run is the files
# {name}_ckpt.{i}.gz of its replay_logs/ directory, each a gzip of one np.save array.
STORES = ("$store$_observation", "$store$_action", "$store$_reward", "$store$_terminal")  # one entry per slot
CHECKPOINT_ARRAYS = STORES + ("add_count", "invalid_range")


def replay_file(directory: str, name: str, suffix: int) -> str:
    return os.path.join(directory, f"{name}_ckpt.{suffix}.gz")


def checkpoint_files(directory: str) -> dict:
    """{suffix: set of array names} of the checkpoint files in `directory`."""
    found = {}
    for file_name in os.listdir(directory):
        name, _, rest = file_name.partition("_ckpt.")
        if rest.endswith(".gz") and rest[: -len(".gz")].isdigit():
            found.setdefault(int(rest[: -len(".gz")]), set()).add(name)
    return found


class NpyStream(NamedTuple):
    path: str
    stream: Any  # gzip stream positioned at the array's first byte
    shape: tuple
    dtype: np.dtype


def open_npy_gz(path: str) -> NpyStream:
    """Opens a gzip of one np.save array and reads its header; the data is read later, as far as needed."""
    try:
        stream = gzip.open(path, "rb")  # noqa: SIM115 (read_rows reads on and closes it)
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran_order, dtype = read_header[version](stream)
    except KeyError:
        raise ArgsError(f"{path}: unsupported .npy version {version}") from None
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise ArgsError(f"{path}: not a gzipped .npy array, truncated or corrupt ({error})") from None
    if fortran_order or dtype.hasobject:
        raise ArgsError(f"{path}: expected a C-ordered numeric array, got fortran_order={fortran_order}, dtype={dtype}")
    return NpyStream(path, stream, shape, dtype)


def read_rows(array: NpyStream, rows: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """The first `rows` rows of an opened array (all of it if None), into `out` if given, in 16 MiB pieces (no second
    copy of the frames); a short read is a truncated file. The gzip CRC is checked when the whole array is read."""
    rows = array.shape[0] if rows is None and array.shape else rows
    shape = (rows, *array.shape[1:]) if array.shape else ()
    out = np.empty(shape, array.dtype) if out is None else out
    view, done = memoryview(out.reshape(-1)).cast("B"), 0
    try:
        while done < len(view):
            read = array.stream.readinto(view[done : done + (1 << 24)])
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
        raise ArgsError(
            f"{array.path}: expected {what} of shape {shape}, got dtype {array.dtype} and shape {array.shape}"
        )


def read_checkpoint(directory: str, suffix: int, names: set, args: Args, frame_shape, frame_dtype, num_actions, stack):
    """Checks every file of one checkpoint and reads all but its frames: (frames path, slots kept, actions, the valid
    transitions). Slots kept: the first --transitions-per-checkpoint written ones."""
    missing = [replay_file(directory, name, suffix) for name in CHECKPOINT_ARRAYS if name not in names]
    if missing:
        raise ArgsError(f"checkpoint {suffix} in {directory} lacks {', '.join(missing)}")
    file = {name: open_npy_gz(replay_file(directory, name, suffix)) for name in CHECKPOINT_ARRAYS}
    observations = file[STORES[0]]
    observations.stream.close()  # its rows are read later, into the dataset's frames
    capacity = observations.shape[0] if observations.shape else 0
    if observations.shape != (capacity, *frame_shape) or observations.dtype != frame_dtype:
        raise ArgsError(
            f"{observations.path}: expected frames of shape (N, {', '.join(map(str, frame_shape))}) and dtype "
            f"{np.dtype(frame_dtype)} for {args.env_id}, got shape {observations.shape} and dtype {observations.dtype}"
        )
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
        raise ArgsError(
            f"{file[STORES[1]].path}: actions {actions.min()}..{actions.max()}, but {args.env_id} has "
            f"{num_actions} actions: a dataset of another game?"
        )
    invalid_slots = read_rows(file["invalid_range"])
    if add_count >= capacity:  # a full circular buffer: also Dopamine's invalid_range for this reader's stack and n
        cursor_range = (add_count - args.n_step + np.arange(stack + args.n_step)) % capacity
        invalid_slots = np.concatenate([invalid_slots, cursor_range])
    invalid = np.zeros(rows, bool)
    invalid[invalid_slots[(invalid_slots >= 0) & (invalid_slots < rows)]] = True
    terminals, rewards = read_rows(file[STORES[3]], rows).astype(bool), read_rows(file[STORES[2]], rows)
    transitions = window_transitions(rewards, terminals, np.zeros(rows, bool), invalid, stack, args.n_step, args.gamma)
    return observations.path, rows, actions.astype(np.int32), transitions


def load_replay_logs(args: Args, frame_shape: tuple, frame_dtype, num_actions: int, stack: int) -> tuple:
    """(frames, actions, transitions) of --num-checkpoints checkpoints from --first-checkpoint on, the first
    --transitions-per-checkpoint written slots of each, every file checked before any frame is read."""
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
        first = replay_file(directory, STORES[0], 0)
        raise ArgsError(f"--dataset-dir {directory} holds no replay checkpoints ({first}, ...) and no {CHECKPOINT}")
    wanted = range(args.first_checkpoint, args.first_checkpoint + args.num_checkpoints)
    if not set(wanted) <= set(found):
        raise ArgsError(
            f"--dataset-dir {directory} has checkpoints {sorted(found)}; --first-checkpoint {args.first_checkpoint} "
            f"--num-checkpoints {args.num_checkpoints} asks for {wanted.start}..{wanted.stop - 1}"
        )
    pieces = [
        read_checkpoint(directory, s, found[s], args, frame_shape, frame_dtype, num_actions, stack) for s in wanted
    ]
    offsets = np.cumsum([0] + [rows for _, rows, _, _ in pieces])
    try:
        frames = np.empty((offsets[-1], *frame_shape), frame_dtype)
    except MemoryError:
        gib = offsets[-1] * math.prod(frame_shape) * np.dtype(frame_dtype).itemsize / 2**30
        raise ArgsError(f"not enough memory for {gib:.1f} GiB of frames: lower --transitions-per-checkpoint") from None
    for (path, rows, _, _), offset in zip(pieces, offsets):
        read_rows(open_npy_gz(path), rows, out=frames[offset : offset + rows])
    starts, rewards, discounts, next_slots = (
        np.concatenate([t[i] + (offset if i in (0, 3) else 0) for (_, _, _, t), offset in zip(pieces, offsets)])
        for i in range(4)
    )
    return frames, np.concatenate([p[2] for p in pieces]), (starts, rewards, discounts, next_slots)


# ============================================================================================= sparse training
# ---------------------------------------------------------------- shared: sparse training
def is_prunable(leaf) -> bool:
    """Kernels (ndim > 1: every conv and dense kernel, first conv and output layer included) are prunable;
    biases are not (JaxPruner's default filter)."""
    return leaf.ndim > 1


def erk_sparsities(shapes: list, sparsity: float) -> list:
    """Erdos-Renyi-Kernel per-layer sparsities (Evci et al. 2020; JaxPruner's). Layer l keeps density
    eps * (sum of dims) / (prod of dims); layers that would exceed density 1 are made dense and eps is re-solved, so
    that the kept weights equal the uniform budget sum_l (N_l - floor(s N_l))."""
    sizes = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes)]
    layers, dense = range(len(shapes)), set()
    while len(dense) < len(shapes):
        free = [i for i in layers if i not in dense]
        kept = sum(sizes[i] - math.floor(sparsity * sizes[i]) for i in free)
        eps = (kept - sum(math.floor(sparsity * sizes[i]) for i in dense)) / sum(raw[i] * sizes[i] for i in free)
        max_raw = max(raw[i] for i in free)
        if eps * max_raw <= 1:
            return [0.0 if i in dense else 1.0 - eps * raw[i] for i in layers]
        dense |= {i for i in free if raw[i] == max_raw}
    return [0.0] * len(shapes)


def target_sparsities(params, sparsity: float, distribution: str):
    """Pytree like params: the final sparsity of each prunable kernel (ERK or uniform), 0.0 elsewhere."""
    leaves, treedef = jax.tree.flatten(params)
    prunable = [i for i, leaf in enumerate(leaves) if is_prunable(leaf)]
    shapes = [leaves[i].shape for i in prunable]
    layer_sparsity = erk_sparsities(shapes, sparsity) if distribution == "erk" else [sparsity] * len(shapes)
    by_leaf = dict(zip(prunable, layer_sparsity))
    return jax.tree.unflatten(treedef, [by_leaf.get(i, 0.0) for i in range(len(leaves))])


def keep_count(size: int, sparsity: float) -> int:
    """Weights kept in a layer of `size` weights at `sparsity`: max(1, round(size * (1 - sparsity)))."""
    return max(1, round(size * (1.0 - sparsity)))


def gmp_schedule(step: int, t_start: int, t_end: int) -> float:
    """Fraction of the final sparsity at gradient step `step`: 1 - (1 - p)^3 with
    p = clip(step + 1 - t_start, 0, t_end - t_start) / (t_end - t_start) (Zhu & Gupta 2017, with JaxPruner's +1)."""
    p = min(max(step + 1 - t_start, 0), t_end - t_start) / (t_end - t_start)
    return 1.0 - (1.0 - p) ** 3


def cosine_drop_fraction(step: int, t_start: int, t_end: int, drop_fraction: float) -> float:
    """RigL/SET drop fraction at gradient step `step`: f0 (1 + cos(pi q)) / 2, q = clip((step - t_start) / (t_end -
    t_start), 0, 1) (Evci et al. 2020)."""
    q = min(max((step - t_start) / (t_end - t_start), 0.0), 1.0)
    return drop_fraction * 0.5 * (1.0 + math.cos(math.pi * q))


def is_mask_update_step(method: str, step: int, t_start: int, t_end: int, frequency: int) -> bool:
    """Masks change every `frequency` gradient steps counted from t_start, and once more at t_end, for gmp/rigl/set."""
    if method not in ("gmp", "rigl", "set") or not t_start <= step <= t_end:
        return False
    return (step - t_start) % frequency == 0 or step == t_end


def mask_update_counts(args: Args, masks, targets, step: int, window: tuple):
    """None unless gradient step `step` of the window (t_start, t_end, frequency) updates the masks; then host-side,
    exact integers as a pytree like the masks: gmp: weights to keep per layer; rigl/set: weights to drop (and regrow),
    floor(active weights * drop fraction)."""
    (t_start, t_end, frequency), method = window, args.pruning_method
    if not is_mask_update_step(method, step, t_start, t_end, frequency):
        return None

    def count(mask, target):
        if not is_prunable(mask):  # biases: keep all, drop none
            return np.int32(mask.size if method == "gmp" else 0)
        if method == "gmp":
            return np.int32(keep_count(mask.size, target * gmp_schedule(step, t_start, t_end)))
        drop = cosine_drop_fraction(step, t_start, t_end, args.drop_fraction)
        return np.int32(math.floor(int(mask.sum()) * drop))

    return jax.tree.map(count, masks, targets)


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
    gmp: keep the counts[l] largest |theta|. rigl/set: drop the counts[l] smallest-|theta| active weights, then regrow
    as many inactive ones with the largest |grad| (rigl: Evci et al. 2020) or at random (set: Mocanu et al. 2018)."""
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


class TrainState(struct.PyTreeNode):
    params: Any
    target_params: Any
    masks: Any  # uint8 pytree like params; all ones for non-prunable leaves
    opt_state: Any
    grad_step: jax.Array  # c, gradient steps completed
    key: jax.Array  # raw uint32 key data (jax.random.PRNGKey), so that the state is plain arrays
    finite: jax.Array  # False once a step was refused for a non-finite loss: the state stays the last good one
    dense_until: Any = None  # --dense-warmup: (gradient step t_start, the random masks applied there); else None


def init_train_state(
    args: Args, params, tx: optax.GradientTransformation, mask_rng: np.random.Generator, key, t_start: int = 0
) -> tuple:
    """(TrainState, per-layer target sparsities): masks all ones for gmp and none, random at the targets for
    static/rigl/set (from mask_rng); params masked; the target network a copy of them. With --dense-warmup the random
    masks wait in the state (dense_until) and the masks stay all ones until gradient step t_start."""
    sparsity = args.sparsity if args.pruning_method != "none" else 0.0
    targets = target_sparsities(params, sparsity, args.sparsity_distribution)
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.uint8), params)
    dense_until = None
    if args.pruning_method in ("static", "rigl", "set"):
        drawn = random_masks(mask_rng, params, targets, args.mask_sampling == "bernoulli")
        masks, dense_until = (masks, (jnp.int32(t_start), drawn)) if args.dense_warmup else (drawn, None)
    params = apply_masks(params, masks)
    step, finite = jnp.zeros((), jnp.int32), jnp.ones((), bool)
    return TrainState(params, params, masks, tx.init(params), step, key, finite, dense_until), targets


def sparse_step(state: TrainState, loss, grads, counts, tx: optax.GradientTransformation, method: str) -> TrainState:
    """The optimizer step of sparse training, the same for every method:
    1. at a mask-update step (counts given), new masks from the pre-update params (and, for rigl/set, grads;
       rigl/set also zero Adam's moments where connections were grown);
    2. Adam on the unmasked gradient;
    3. theta <- (theta + u) * m after EVERY step (Adam keeps pushing pruned weights away from 0).
    With --dense-warmup, the step at gradient step t_start starts from the drawn masks (dense_warmup_switch).
    A step whose loss is not finite is refused on the device: the state stays as it was, with finite False, and
    stays so (the loop sees the flag when it logs, then checkpoints this last good state and stops)."""
    before = state
    if state.dense_until is not None:
        state = dense_warmup_switch(state)
    key, mask_key = jax.random.split(state.key)
    masks, opt_state = state.masks, state.opt_state
    if counts is not None:
        masks = next_masks(method, mask_key, state.params, grads, state.masks, counts)
        if method in ("rigl", "set"):  # GMP never touches Adam's moments (JaxPruner)
            grown = jax.tree.map(lambda new, old: new * (1 - old), masks, state.masks)
            adam, *rest = opt_state  # Adam's moments of the grown weights start at 0
            keep = jax.tree.map(lambda g: 1 - g, grown)
            opt_state = (adam._replace(mu=apply_masks(adam.mu, keep), nu=apply_masks(adam.nu, keep)), *rest)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = apply_masks(optax.apply_updates(state.params, updates), masks)
    new = state.replace(params=params, masks=masks, opt_state=opt_state, grad_step=state.grad_step + 1, key=key)
    ok = before.finite & jnp.isfinite(loss)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, before.replace(finite=ok))


def scheduled_fraction(args: Args, steps_done: int, window: tuple) -> float:
    """The fraction of the final sparsity the masks hold after `steps_done` gradient steps: GMP's schedule; for the
    other methods all of it, but none before t_start with --dense-warmup."""
    if args.pruning_method == "gmp":
        return gmp_schedule(steps_done - 1, *window[:2])
    return float(not args.dense_warmup or steps_done > window[0])


def active_masks(state: TrainState):
    """The masks whose per-layer counts RigL/SET's drop counts come from: with --dense-warmup the drawn ones (before
    t_start the masks are all ones; from t_start on, dropping and regrowing keep each layer's count)."""
    return state.masks if state.dense_until is None else state.dense_until[1]


def dense_warmup_switch(state: TrainState) -> TrainState:
    """--dense-warmup: at gradient step t_start the masks drawn at init replace the all-ones ones, the params are
    masked and Adam's moments of the removed weights zeroed (as RigL zeroes a grown weight's); at other steps, a
    no-op."""
    t_start, drawn = state.dense_until
    now = state.grad_step == t_start
    masks = jax.tree.map(lambda m, d: jnp.where(now, d, m), state.masks, drawn)
    keep = jax.tree.map(lambda m: jnp.where(now, m, 1).astype(m.dtype), masks)  # moments zeroed at t_start only
    adam, *rest = state.opt_state
    opt_state = (adam._replace(mu=apply_masks(adam.mu, keep), nu=apply_masks(adam.nu, keep)), *rest)
    return state.replace(params=apply_masks(state.params, masks), masks=masks, opt_state=opt_state)


def prune_window_fractions(args: Args) -> tuple:
    """(start, end) fractions of the gradient steps, with the method's default start."""
    default_start = 0.2 if args.pruning_method == "gmp" else 0.0
    start = default_start if args.prune_start_fraction is None else args.prune_start_fraction
    return start, args.prune_end_fraction


def pruning_window(args: Args, total_grad_steps: int) -> tuple:
    """(t_start, t_end, frequency) in gradient steps: round(fraction * G) of the run's G gradient steps."""
    start, end = prune_window_fractions(args)
    t_start = round(start * total_grad_steps)
    t_end = max(round(end * total_grad_steps), t_start + 1)
    frequency = args.prune_frequency_grad_steps or (1000 if args.pruning_method == "gmp" else 5000)
    return t_start, t_end, frequency


# ============================================================================================== algorithm: CQL
def huber_loss(errors: jax.Array, delta: float = 1.0) -> jax.Array:
    """0.5 x^2 if |x| <= delta, else delta (|x| - delta / 2), elementwise (Dopamine's TD loss for CQL)."""
    abs_errors = jnp.abs(errors)
    return jnp.where(abs_errors <= delta, 0.5 * errors**2, delta * (abs_errors - 0.5 * delta))


def cql_regularizer(q_values: jax.Array, actions: jax.Array) -> jax.Array:
    """CQL(H)'s regularizer before its coefficient: logsumexp_a Q(s, a) - Q(s, a_data) (Kumar et al. 2020, Eq. 4).
    (B, A), (B,) -> (B,), each >= 0 up to rounding."""
    q_data = jnp.take_along_axis(q_values, actions[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(q_values, axis=-1) - q_data


# -------------------------------------------------------------------------------- shared: categorical
def q_values(logits: jax.Array, support: jax.Array) -> jax.Array:
    """Q(s,a) = sum_i z_i softmax(logits)_i. (..., atoms), (atoms,) -> (...)."""
    return jax.nn.softmax(logits) @ support


def categorical_projection(
    next_probs: jax.Array, rewards: jax.Array, discounts: jax.Array, support: jax.Array
) -> jax.Array:
    """C51's projection (Bellemare et al. 2017, Alg. 1): the atoms z_j of the next-state distribution move
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


# -------------------------------------------------------------------------------- CQL: loss and update
def cql_loss(network: nn.Module, params, target_params, batch: Batch, alpha: float):
    """Huber TD loss on y = R + gamma^k (1 - d) max_a' Q_target(s', a'), plus alpha * the mean regularizer.
    Returns (loss, aux): aux holds the two terms (before alpha), and Q(s, a) and y, both (B,)."""
    next_q = network.apply({"params": target_params}, batch.next_obs)  # (B, A)
    targets = jax.lax.stop_gradient(batch.rewards + batch.discounts * next_q.max(axis=-1))  # (B,)
    q = network.apply({"params": params}, batch.obs)  # (B, A)
    q_taken = jnp.take_along_axis(q, batch.actions[:, None], axis=-1)[:, 0]  # (B,)
    td_loss = jnp.mean(huber_loss(targets - q_taken))
    regularizer = jnp.mean(cql_regularizer(q, batch.actions))
    aux = {"td_loss": td_loss, "cql_loss": regularizer, "q_taken": q_taken, "targets": targets}
    return td_loss + alpha * regularizer, aux


def cql_c51_loss(network: nn.Module, params, target_params, batch: Batch, alpha: float, support: jax.Array):
    """Cross-entropy to the projected double-DQN target distribution, plus alpha * the mean regularizer on
    Q = sum_i z_i p_i (Dopamine's offline_rainbow_agent.py with its CQL coefficient). Returns (loss, aux) as cql_loss
    does, with the target distribution's mean as y."""
    rows = jnp.arange(len(batch.actions))
    best = q_values(network.apply({"params": params}, batch.next_obs), support).argmax(axis=-1)  # (B,) a* online
    next_probs = jax.nn.softmax(network.apply({"params": target_params}, batch.next_obs)[rows, best])  # (B, atoms)
    target_probs = categorical_projection(next_probs, batch.rewards, batch.discounts, support)  # (B, atoms)
    logits = network.apply({"params": params}, batch.obs)  # (B, A, atoms)
    td_loss = jnp.mean(cross_entropy(logits[rows, batch.actions], target_probs))
    q = q_values(logits, support)  # (B, A)
    regularizer = jnp.mean(cql_regularizer(q, batch.actions))
    y = target_probs @ support  # (B,) the target distribution's mean
    aux = {"td_loss": td_loss, "cql_loss": regularizer, "q_taken": q[rows, batch.actions], "targets": y}
    return td_loss + alpha * regularizer, aux


def make_q_fn(network: nn.Module, args: Args, support: jax.Array):
    """q_fn(params, obs (B, ...), key) -> Q(s, .) (B, A) (with --c51: sum_i z_i p_i(s, .)), for acting and the analysis;
    the key is unused."""
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
    """The jitted update (state, batch, counts) -> (state, metrics). counts is None except at mask-update steps (then
    a pytree of ints from mask_update_counts); the two cases compile separately."""

    def update(state: TrainState, batch: Batch, counts):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.target_params, batch, None)
        state = sparse_step(state, loss, grads, counts, tx, method)  # masks, Adam, theta <- (theta + u) * m
        aux = dict(aux, total_loss=loss, q_values=aux["q_taken"].mean())
        return state, {f"losses/{name}": aux[name] for name in ("total_loss", "td_loss", "cql_loss", "q_values")}

    return jax.jit(update)


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


# ========================================================================================================== main
def main(args: Args) -> dict:
    """Trains offline; returns {"run_dir": ..., "eval_returns": [mean evaluation return after each iteration]}."""
    args = resolve(args)
    check_args(args)
    env, is_atari = make_env(args.env_id)
    stack = 4 if is_atari else 1  # frames per state
    if args.network != "mlp" and not is_atari:
        raise ArgsError(f"--network {args.network} needs Atari frames; use --network mlp for {args.env_id}")
    frame_shape, frame_dtype = env.observation_space.shape, env.observation_space.dtype
    dataset = load_dataset(args, frame_shape, frame_dtype, env.action_space.n, stack)
    print(f"loaded {len(dataset)} valid transitions ({len(dataset.frames)} slots) from {args.dataset_dir}", flush=True)
    # host generators: batches and evaluation; the masks' own; the analysis' own (logging it never changes training).
    # JAX keys: network init, training (SET regrowth), analysis
    rng, mask_rng, metrics_rng = (np.random.default_rng(seed) for seed in (args.seed, [args.seed, 1], [args.seed, 2]))
    init_key, train_key = jax.random.split(jax.random.PRNGKey(args.seed))
    metrics_key = jax.random.fold_in(jax.random.PRNGKey(args.seed), 2)
    env.reset(seed=int(rng.integers(2**31)))

    # -------- the network, its masks and optimizer, the update, acting and the analysis
    support = jnp.linspace(args.v_min, args.v_max, args.num_atoms)
    layers = (args.network, args.width_scale, args.scale_dense, args.use_bias, args.use_output_bias)
    n = env.action_space.n
    network = DuelingC51Network(n, args.num_atoms, *layers) if args.c51 else QNetwork(n, *layers)
    params = jax.jit(network.init)(init_key, np.zeros((1, *frame_shape, stack), frame_dtype))["params"]
    tx = optax.adam(args.learning_rate, eps=args.adam_eps)
    total_grad_steps = args.num_iterations * args.grad_steps_per_iteration
    window = pruning_window(args, total_grad_steps)  # (t_start, t_end, frequency)
    state, targets = init_train_state(args, params, tx, mask_rng, train_key, window[0])
    q_fn, loss_fn = make_q_fn(network, args, support), make_loss(network, args, support)
    update = make_update(loss_fn, tx, args.pruning_method)
    greedy_action = jax.jit(lambda params, obs: q_fn(params, obs[None], None).argmax(-1)[0])
    analysis = metrics.make_analysis(q_fn, loss_fn, args.metrics_grad_samples)
    final_sparsity, summarize = metrics.overall_sparsity(state.params, targets), jax.jit(metrics.sparsity_summary)

    # -------- start or resume: a new run, or a resumed one that goes on exactly where its checkpoint was written
    start, eval_returns, metrics_batch = 0, [], None
    if args.resume:
        saved = load_checkpoint(args.resume)
        state = restore_leaves(state, saved["train_state"])
        rng.bit_generator.state, metrics_rng.bit_generator.state = saved["rngs"]
        if is_atari:  # the Atari env replays its episode from its start
            env.__setstate__(saved["env"])
        else:
            env = saved["env"]
        start, eval_returns = saved["grad_step"], saved["eval_returns"]
        metrics_batch = saved["metrics_batch"] and Batch(*saved["metrics_batch"])
    extra_config = {"prune_window_grad_steps": list(window), "dataset_transitions": len(dataset)}
    run_dir, writer = open_run(args, extra_config, start + 1)  # the x-axis is gradient steps done: start + 1 is next
    if args.resume:
        print(f"resumed {run_dir} at gradient step {start}", flush=True)

    def checkpoint(grad_steps: int):  # everything the loop needs to go on after `grad_steps` gradient steps
        payload = {
            "grad_step": grad_steps,
            "train_state": saved_leaves(state),
            "rngs": (rng.bit_generator.state, metrics_rng.bit_generator.state),
            "env": env.__getstate__() if is_atari else env,
            "eval_returns": eval_returns[: grad_steps // args.grad_steps_per_iteration],  # the iterations done by then
            "metrics_batch": metrics_batch and tuple(metrics_batch),
        }
        return save_checkpoint(run_dir, writer, payload)

    window_time, last_print = time.time(), 0.0
    try:
        for grad_step in range(start + 1, total_grad_steps + 1):  # the number of gradient steps done after this one
            # -------- learn: a gradient step on a uniform batch (and the mask update when one is due), the target sync
            counts = mask_update_counts(args, active_masks(state), targets, grad_step - 1, window)
            state, update_metrics = update(state, dataset.sample(rng, args.batch_size), counts)
            if grad_step % args.target_update_period == 0:
                state = state.replace(target_params=state.params)

            # -------- log, evaluate and checkpoint: the only places the host waits for the device
            iteration_done = grad_step % args.grad_steps_per_iteration == 0
            if (grad_step % args.log_frequency == 0 or iteration_done) and not jax.device_get(state.finite):
                good = int(jax.device_get(state.grad_step))  # the update refused a step: the state is the last good one
                writer = checkpoint(good)
                raise NonFiniteError(
                    f"non-finite loss after gradient step {good}; the last good train state is checkpointed in "
                    f"{run_dir}"
                )
            if grad_step % args.log_frequency == 0:
                now = time.time()
                sps, window_time = args.log_frequency / max(now - window_time, 1e-9), now
                target = final_sparsity * scheduled_fraction(args, grad_step, window)
                scalars = {"charts/SPS": sps, "pruning/target_sparsity": target, **update_metrics}
                scalars = jax.device_get(dict(scalars, **summarize(state.params)))
                for tag, value in scalars.items():
                    writer.add_scalar(tag, float(value), grad_step)
                if now - last_print > 10:
                    last_print = now
                    print(
                        f"grad step {grad_step}/{total_grad_steps} | SPS {scalars['charts/SPS']:.0f} | td loss "
                        f"{float(scalars['losses/td_loss']):.4f} | sparsity {scalars['pruning/kernel_sparsity']:.3f}",
                        flush=True,
                    )
            if args.metrics_frequency and grad_step % args.metrics_frequency == 0:
                if metrics_batch is None:  # drawn once, then fixed
                    batch = dataset.sample(metrics_rng, args.metrics_batch_size)
                    metrics_batch = metrics.by_action(batch, args.metrics_grad_samples)
                results = analysis(state.params, state.target_params, state.masks, metrics_batch, metrics_key)
                metrics.write_analysis(writer, results, grad_step)
            if iteration_done:  # the iteration ends with an evaluation
                returns = evaluate(env, greedy_action, state.params, rng, args.eval_steps, args.eval_epsilon, stack)
                eval_returns.append(float(np.mean(returns)))
                writer.add_scalar("eval/episodic_return", eval_returns[-1], grad_step)
                writer.add_scalar("eval/episodes", len(returns), grad_step)
                print(
                    f"iteration {len(eval_returns)}/{args.num_iterations} | grad step {grad_step} | eval return "
                    f"{eval_returns[-1]:.1f} over {len(returns)} episodes",
                    flush=True,
                )
                window_time = time.time()  # the evaluation's time does not count against the gradient steps' SPS
            if args.checkpoint_frequency and grad_step % args.checkpoint_frequency == 0:
                writer = checkpoint(grad_step)
    finally:  # also when interrupted: the logs so far are kept
        writer.close()
    if args.save_model:
        save_model(args, run_dir, state)
    return {"run_dir": run_dir, "eval_returns": eval_returns}


# =====================================================================================================================
# Plumbing: run directories, checkpoints and the command line. Nothing below is part of the algorithm; a reader
# may stop here.
# =====================================================================================================================
# -------------------------------------------------------------------------------- shared: run files
def open_writer(run_dir: str, purge_step: int | None = None) -> SummaryWriter:
    """A TensorBoard writer on a new event file of run_dir, numbered (writers opened within one second would share a
    name). With purge_step, TensorBoard drops the events of earlier files at and after that step (a killed run's)."""
    count = sum("tfevents" in name for name in os.listdir(run_dir))
    return SummaryWriter(run_dir, purge_step=purge_step, flush_secs=30, filename_suffix=f".{count:04d}")


def open_run(args: Args, extra_config: dict, start: int) -> tuple:
    """(run_dir, writer). A new run: runs/{env}__{exp_name}__{seed}__{unix time}/ (or with _1, _2, ... appended) with
    config.json (every flag, the script's name and extra_config; common/plot.py groups runs by it). --resume: the run's
    own directory; the flags that may change on a resume are written to its config.json, and the events it logged at
    and after `start`, the first step to run again, are purged."""
    if args.resume:
        config = saved_config(args.resume)
        config.update({k: v for k, v in dataclasses.asdict(args).items() if k in RESUME_MAY_CHANGE and k != "resume"})
        config.setdefault("resumed_at_step", []).append(start)
        text = json.dumps(config, indent=2).encode()
        write_atomically(os.path.join(args.resume, "config.json"), lambda f: f.write(text))
        return args.resume, open_writer(args.resume, purge_step=start)
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir, suffix = os.path.join("runs", run_name), 0
    while True:  # two runs never share a directory
        try:
            os.makedirs(run_dir if not suffix else f"{run_dir}_{suffix}")
            break
        except FileExistsError:
            suffix += 1
    run_dir = run_dir if not suffix else f"{run_dir}_{suffix}"
    writer, config = open_writer(run_dir), dataclasses.asdict(args)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
    config.update(run_name=run_name, script=os.path.basename(__file__), **extra_config)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return run_dir, writer


def save_model(args: Args, run_dir: str, state) -> None:
    """runs/.../{exp_name}.msgpack: the flax msgpack of the plain dict {"params": ..., "masks": ...}."""
    model_path = os.path.join(run_dir, f"{args.exp_name}.msgpack")
    with open(model_path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get({"params": state.params, "masks": state.masks})))
    print(f"model saved to {model_path}")


# -------------------------------------------------------------------------------- shared: checkpoints
CHECKPOINT, LAYOUT = "checkpoint.pkl", 2  # LAYOUT: of the payload, raised when its keys change (2: rngs, episode, ...)
# flags a resumed run may change: what is logged, saved or checkpointed, and the step size of what follows
RESUME_MAY_CHANGE = ("resume", "save_model", "log_frequency", "metrics_frequency", "checkpoint_frequency")
RESUME_MAY_CHANGE += ("checkpoint_replay", "learning_rate", "adam_eps")


class NonFiniteError(RuntimeError):
    """A non-finite loss: the run stopped after checkpointing its last good train state."""


def saved_config(run_dir: str) -> dict:
    """The config.json of a run directory (ArgsError if there is none)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ArgsError(f"--resume {run_dir}: cannot read its config.json ({error})") from None


def resume_defaults(argv: list) -> Args | None:
    """With --resume RUN_DIR on the command line: Args holding the run's saved flags, the defaults of the others."""
    for i, arg in enumerate(argv):
        if arg == "--resume" and i + 1 < len(argv) or arg.startswith("--resume="):
            config = saved_config(argv[i + 1] if arg == "--resume" else arg.split("=", 1)[1])
            return Args(
                **{field.name: config[field.name] for field in dataclasses.fields(Args) if field.name in config}
            )
    return None


def resume_checks(args: Args) -> list:
    """(ok, message) pairs for --resume: the run must be this script's, have a checkpoint and the same flags (but
    RESUME_MAY_CHANGE), every difference listed."""
    if not args.resume:
        return []
    config, script = saved_config(args.resume), os.path.basename(__file__)
    saved = {field.name: config.get(field.name, field.default) for field in dataclasses.fields(Args)}  # older runs
    differences = [
        f"{flag(name)} {saved[name]!r} in the run, {value!r} now"
        for name, value in dataclasses.asdict(args).items()
        if name not in RESUME_MAY_CHANGE and saved[name] != value
    ]
    theirs = config.get("script", script)
    return [
        (theirs == script, f"--resume {args.resume}: a run of {theirs}, not of {script}"),
        (not differences, f"cannot resume {args.resume} with other flags: {'; '.join(differences)}"),
        (os.path.isfile(os.path.join(args.resume, CHECKPOINT)), f"--resume {args.resume}: it has no {CHECKPOINT}"),
    ]


def saved_leaves(state) -> list:
    """A train state's leaves as host arrays, for a checkpoint; a refused state is saved as a good one (finite True),
    so that a resumed run trains again."""
    return jax.device_get(jax.tree.leaves(state.replace(finite=jnp.ones((), bool))))


def restore_leaves(template, leaves: list):
    """A train state like `template` holding a checkpoint's leaves (ArgsError if they do not fit it)."""
    if [(x.shape, x.dtype) for x in jax.tree.leaves(template)] != [(x.shape, x.dtype) for x in leaves]:
        raise ArgsError("the checkpoint's train state does not fit this run's network and optimizer")
    return jax.tree.unflatten(jax.tree.structure(template), [jnp.asarray(x) for x in leaves])


def write_atomically(path: str, write) -> None:
    """Writes `path` by write(file) into a temporary file, fsynced, then renamed over it: a kill leaves the old file
    or the new one, never a part."""
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def save_checkpoint(run_dir: str, writer, payload: dict) -> SummaryWriter:
    """Writes `payload` as run_dir/checkpoint.pkl, atomically. The TensorBoard writer is closed first, so that every
    event logged so far is on disk; returns a new writer."""
    writer.close()
    payload = {**payload, "layout": LAYOUT}
    write_atomically(os.path.join(run_dir, CHECKPOINT), lambda f: pickle.dump(payload, f, pickle.HIGHEST_PROTOCOL))
    return open_writer(run_dir)


def load_checkpoint(run_dir: str) -> dict:
    """The payload of run_dir/checkpoint.pkl (a leftover checkpoint.pkl.tmp, cut short, is never read)."""
    try:
        with open(os.path.join(run_dir, CHECKPOINT), "rb") as f:
            saved = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as error:
        raise ArgsError(f"--resume {run_dir}: cannot read its {CHECKPOINT} ({error})") from None
    layout = saved.get("layout", 1)  # 1: the checkpoints written before there was a layout number
    if layout != LAYOUT:
        raise ArgsError(
            f"--resume {run_dir}: its {CHECKPOINT} has layout {layout}, written by another version of this "
            f"script; this one reads layout {LAYOUT}"
        )
    return saved


# -------------------------------------------------------------------------------- shared: command line
if __name__ == "__main__":
    try:
        main(tyro.cli(Args, default=resume_defaults(sys.argv[1:])))
    except (ArgsError, NonFiniteError) as error:  # a bad flag (nothing was written): 2; a non-finite loss: 1
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ArgsError) else 1)
