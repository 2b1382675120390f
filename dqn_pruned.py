"""DQN with sparse training: gradual magnitude pruning (GMP), RigL, SET or static random sparsity.

Papers: Obando-Ceron, Courville & Castro, "In value-based deep RL, a pruned network is a good network" (ICML 2024);
Ganaie et al., "A Closer Look at Sparse Training in Deep RL" (RigL vs pruning, no biases); Ma et al., "Network
Sparsity Unlocks the Scaling Potential of Deep RL" (ICML 2025, static random sparsity); Mnih et al. 2015 (DQN).

GMP (the default): every kernel (ndim > 1, first conv and output layer included) is pruned, biases never. Per-layer
target sparsities come from ERK (Evci et al. 2020). Between 20% and 80% of the run's gradient steps, every 1000 steps,
each layer keeps its top-k weights by magnitude, k following s(c) = s_F (1 - (1 - p)^3) (Zhu & Gupta 2017, with
JaxPruner's +1 offset in p). After every gradient step theta <- (theta + adam_update) * mask; Adam's moments are never
masked. The target network is a hard copy of the masked online parameters.

Deviations from the paper and its code (the README lists them with their sources)
    1. A final mask update is forced at the window's end step; the window is 20%/80% of this run's gradient steps
       (499,000 to 1,996,000 in the paper's run, not JaxPruner's released 500k/2M).
    2. RigL/SET do not skip the optimizer step on mask-update steps (JaxPruner does): grown weights start at 0 with
       zeroed Adam moments. The cosine decay of the drop fraction starts at the window's start.
    3. Random initial masks are an exact-size random subset per layer, drawn from a NumPy generator of their own.
    4. Training returns are logged; an evaluation phase is off by default (--eval-frequency: whole episodes at
       epsilon 0.001 on an env of their own, not Dopamine's 125k-step phase after each iteration).
    5. Gradient steps (--gradient-steps of them) happen at env steps t >= learning_starts with t % train_frequency ==
       0 (Dopamine also waits for 20k transitions in the buffer and tries a step at every episode start).
    6. A non-finite loss is refused on the device (the step is not taken) and stops the run at the next log.
    7. --preset drq-eps follows Dopamine's DrQ_eps.gin and atari_100k_rainbow_agent.py, but ale-py reports a lost
       life after the step's 4 frames (Dopamine's preprocessing stops the frame skip there).

Example: python dqn_pruned.py --env-id ALE/Pong-v5 --width-scale 3   # the paper's setting (a GPU job); README: more
"""

import dataclasses
import json
import math
import os
import pickle
import sys
import time
from collections import deque
from functools import partial
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

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
# --preset NAME: named defaults, each flag given on the command line still wins; the run's config.json records them
PRESETS = {
    "paper": {},  # the pruning paper's DQN: the defaults below (its Table 2; Dopamine's dqn.gin)
    "drq-eps": {  # DrQ(eps) on Atari 100k (Kostrikov et al. 2020; Agarwal et al. 2021's epsilons), as in Dopamine's
        # labs/atari_100k/configs/DrQ_eps.gin and atari_100k_rainbow_agent.py
        "total_timesteps": 100_000,
        "sticky_actions": False,
        "terminal_on_life_loss": True,
        "eval_frequency": 100_000,  # one evaluation, after the last step: 100 episodes at epsilon 0.001
        "eval_episodes": 100,
        "eval_epsilon": 0.001,
        "noop_max": 30,  # Dopamine's DataEfficientAtariRunner
        "learning_rate": 1e-4,
        "adam_eps": 1.5e-4,
        "buffer_size": 100_000,  # the whole run (Dopamine: 1M "as a proxy for unbounded memory")
        "gamma": 0.99,
        "n_step": 10,
        "target_network_frequency": 1,
        "batch_size": 32,
        "end_e": 0.01,
        "exploration_steps": 5_000,
        "learning_starts": 1_600,
        "train_frequency": 1,
        "network": "cnn",
        "dueling": True,
        "double_q": True,
        "loss": "huber",
        "augmentation": True,
    },
}


# -------------------------------------------------------------------------------- shared: presets
def preset_help() -> str:
    """--preset's help: every preset and the flags it sets."""

    def as_flag(name: str, value) -> str:
        name = name.replace("_", "-")
        return (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"

    sets = [
        f"{name}: {', '.join(as_flag(*kv) for kv in values.items()) or 'the defaults'}"
        for name, values in PRESETS.items()
    ]
    return "named defaults that any flag given still overrides. " + "; ".join(sets)


@dataclasses.dataclass(frozen=True)
class Args:
    # -------------------------------------------------------------------------------- shared: experiment args
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment; the run directory is runs/{env}__{exp_name}__{seed}__{unix time}"""
    seed: int = 1
    """seed of the run: one JAX root key and NumPy generators (env seeds, exploration, replay sampling, masks)"""
    env_id: str = "ALE/Breakout-v5"
    """gymnasium id: ALE/{Game}-v5 runs Dopamine's Atari protocol; a classic-control id (CartPole-v1) runs as is"""
    sticky_actions: bool = True
    """Atari: the emulator repeats the previous action with probability 0.25 (Machado et al. 2018; the paper's Table
    2); Atari 100k has none (Dopamine's DrQ_eps.gin and DER.gin): --no-sticky-actions"""
    terminal_on_life_loss: bool = False
    """Atari: a lost life ends the stored episode (terminal; the frame stack starts again) while the game goes on, and
    the logged return is the whole game's (Dopamine's Atari 100k protocol)"""
    noop_max: int = 0
    """Atari: every game starts with a random 0 to noop-max - 1 no-op steps, in training and evaluation (Dopamine's
    Atari 100k runner: 30); 0: none (the paper's protocol, which has sticky actions)"""
    total_timesteps: int = 10_000_000
    """env steps (agent steps) of the run; 10M = 40M frames, the paper's 40 iterations of 250k steps"""
    gradient_steps: int = 1
    """gradient steps at each training event (every --train-frequency env steps), each on its own batch, all in one
    jitted call; the replay ratio is gradient-steps / train-frequency (the paper's Fig. 5 and 17: 0.25 to 2)"""
    save_model: bool = False
    """write runs/{run_name}/{exp_name}.msgpack: flax msgpack of the plain dict {"params": ..., "masks": ...}"""
    log_frequency: int = 1000
    """env steps between logs of losses, epsilon, SPS and sparsity (episode returns: at every episode end)"""
    eval_frequency: int = 0
    """env steps between evaluations, and one after the last step: eval/episodic_return, the mean return of
    --eval-episodes whole episodes on an env of their own, epsilon-greedy on the current params; 0: off"""
    eval_episodes: int = 10
    """episodes of each evaluation"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation episodes (Dopamine's evaluation phase: 0.001)"""
    checkpoint_replay: bool = True
    """checkpoints hold the replay buffer (off: smaller ones, but a resumed run refills it first, so not exactly)"""

    # -------- algorithm arguments (DQN: Mnih et al. 2015; the paper's Table 2 and Dopamine's dqn.gin)
    preset: Annotated[Literal["paper", "drq-eps"], tyro.conf.arg(help=preset_help())] = "paper"
    """named defaults (PRESETS above; --help lists them): the command line's --preset NAME sets them, preset_args in
    Python"""
    learning_rate: float = 6.25e-5
    """Adam learning rate (paper Table 2; Dopamine dqn.gin)"""
    adam_eps: float = 1.5e-4
    """Adam epsilon (paper Table 2 and Dopamine dqn.gin; the paper's App. G.4 prints 1.5e-5)"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions, stored as single uint8 frames (paper Table 2)"""
    gamma: float = 0.99
    """discount factor (paper Table 2)"""
    n_step: int = 1
    """n of the n-step return sum_{i<n} gamma^i r_{t+i}, bootstrapped with gamma^n (DQN: 1; paper App. G.11: 3)"""
    target_network_frequency: int = 8000
    """env steps between hard copies of the online parameters into the target network (Dopamine dqn.gin)"""
    batch_size: int = 32
    """transitions per gradient step (paper Table 2)"""
    start_e: float = 1.0
    """initial epsilon of epsilon-greedy exploration"""
    end_e: float = 0.01
    """final epsilon (paper Table 2)"""
    exploration_steps: int = 250_000
    """env steps after learning starts over which epsilon decays linearly from start-e to end-e (paper Table 2)"""
    learning_starts: int = 20_000
    """env steps of pure exploration before the first gradient step (min replay history, paper Table 2)"""
    train_frequency: int = 4
    """env steps between training events of --gradient-steps gradient steps (update period 4, a replay ratio of 0.25;
    paper Table 2)"""
    network: Literal["resnet", "cnn", "nature", "mlp"] = "resnet"
    """torso: Impala ResNet (16,32,32)*k (Espeholt et al. 2018; Dopamine's ImpalaDQNNetwork); Nature CNN (32,64,64)*k
    with SAME padding (cnn: Dopamine's) or VALID padding (nature: Mnih et al. 2015, CleanRL's); MLP for vectors"""
    width_scale: int = 1
    """width multiplier k of every conv channel count (MLP: of its hidden layer); the paper's headline is k=3"""
    scale_dense: bool = False
    """also multiply the 512-unit dense layer by k (off for DQN, as in Dopamine's ImpalaDQNNetwork)"""
    use_bias: bool = True
    """biases in the hidden layers (Ganaie et al. remove them: --no-use-bias)"""
    use_output_bias: bool = True
    """bias in the output layer (separate from --use-bias, as in Ganaie et al.'s ablation)"""
    dueling: bool = False
    """dueling head, Q = V + A - mean_a A (Wang et al. 2016; Dopamine's FullRainbowNetwork, DrQ_eps.gin)"""
    double_q: bool = False
    """double-Q target: the online network picks a* = argmax_a Q(s', a), the target network values it (van Hasselt
    et al. 2016; Dopamine's DrQ_eps.gin)"""
    loss: Literal["mse", "huber"] = "mse"
    """TD loss: mse, (y - q)^2 (Dopamine's JAX DQN, the paper's); huber, delta 1 (Dopamine's Atari 100k agents)"""
    augmentation: bool = False
    """DrQ's augmentation of both states of every sampled transition: pad 4 by edge replication, a random 84x84
    crop, intensity x (1 + 0.05 clip(N(0,1), -2, 2)) (Kostrikov et al. 2020; Dopamine's atari_100k_rainbow_agent.py)"""

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


# -------------------------------------------------------------------------------- algorithm checks
def algorithm_checks(args: Args) -> list:
    """(ok, message) pairs for the DQN-only fields."""
    return [
        (args.preset in PRESETS, f"--preset {args.preset!r}: the presets are {', '.join(PRESETS)}"),
        (not args.augmentation or args.network != "mlp", "--augmentation crops images: it needs an image torso"),
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


# -------------------------------------------------------------------------------- shared: online checks
def run_checks(args: Args) -> list:
    """(ok, message) pairs for the online loop's fields (replay, exploration, schedule)."""
    a, starts, batch = args, args.learning_starts, args.batch_size
    positive = ("total_timesteps", "learning_rate", "adam_eps", "batch_size", "train_frequency", "gradient_steps")
    positive += ("exploration_steps", "target_network_frequency", "eval_episodes")
    return [(getattr(a, f) > 0, f"{flag(f)} must be > 0") for f in positive] + [
        (a.eval_frequency >= 0, "--eval-frequency must be >= 0 (0: off)"),
        (a.noop_max >= 0, "--noop-max must be >= 0 (0: none)"),
        (0 <= a.eval_epsilon <= 1, "--eval-epsilon must be in [0, 1]"),
        (a.buffer_size >= batch, f"--buffer-size ({a.buffer_size}) must be >= --batch-size ({batch})"),
        (0 < a.gamma <= 1, "--gamma must be in (0, 1]"),
        (a.n_step >= 1, "--n-step must be >= 1"),
        (0 <= a.end_e <= a.start_e <= 1, "need 0 <= --end-e <= --start-e <= 1"),
        (starts >= batch, f"--learning-starts ({starts}) must be >= --batch-size ({batch})"),
        (starts < a.total_timesteps, "--learning-starts must be < --total-timesteps (no gradient step would run)"),
    ]


# =================================================================================== environment
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


# =============================================================================================== replay buffer
# -------------------------------------------------------------------------------- shared: batch
class Batch(NamedTuple):
    obs: np.ndarray  # (B, *frame_shape, stack) state s_t
    actions: np.ndarray  # (B,) int32
    rewards: np.ndarray  # (B,) float32, n-step discounted sum of (clipped) rewards
    discounts: np.ndarray  # (B,) float32, gamma^k * (1 - terminated); k <= n steps actually taken
    next_obs: np.ndarray  # (B, *frame_shape, stack) state s_{t+k}


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

    def __setstate__(self, state: dict) -> None:  # a checkpoint's __getstate__(), back in place
        self.__dict__.update(state)

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


# ===================================================================================================== schedules
# -------------------------------------------------------------------------------- shared: schedules
def linear_epsilon(args: Args, step: int) -> float:
    """Epsilon at env step `step`: --start-e until learning starts, then linear to --end-e over --exploration-steps."""
    fraction = min(max((step - args.learning_starts) / args.exploration_steps, 0.0), 1.0)
    return args.start_e + fraction * (args.end_e - args.start_e)


def num_grad_steps(total_timesteps: int, learning_starts: int, train_frequency: int) -> int:
    """Training events of a run (its gradient steps at --gradient-steps 1): one at every env step t >= learning_starts,
    t < total, t % train_frequency == 0."""
    first = -(-learning_starts // train_frequency) * train_frequency
    return len(range(first, total_timesteps, train_frequency))


def prune_window(args: Args) -> tuple:
    """(t_start, t_end, frequency) of the pruning window over this run's gradient steps (--gradient-steps per event)."""
    events = num_grad_steps(args.total_timesteps, args.learning_starts, args.train_frequency)
    return pruning_window(args, events * args.gradient_steps)


# ==================================================================================================== evaluation
# -------------------------------------------------------------------------------- shared: evaluation
def evaluate(args: Args, env, greedy_action, params, stack: int, step: int) -> list:
    """Returns of --eval-episodes whole episodes on `env`, the evaluation's own instance, epsilon-greedy with
    --eval-epsilon on `params` (frame stacks zero-filled at each episode's start, as in training). The env seeds and
    the random actions come from a generator of (seed, step) alone: an evaluation never touches training's random
    streams, and one redone after a resume is the same."""
    rng, returns, t = np.random.default_rng([args.seed, 3, step]), [], 0
    for _ in range(args.eval_episodes):
        frame = start_game(env, rng, args.noop_max, seed=int(rng.integers(2**31)))
        frames = deque([np.zeros_like(frame)] * (stack - 1) + [frame], maxlen=stack)
        episode_return, done = 0.0, False
        while not done:
            if rng.random() < args.eval_epsilon:
                action = int(rng.integers(env.action_space.n))
            else:  # IQN draws its acting fractions from the step given: here the evaluation's step count
                action = int(jax.device_get(greedy_action(params, np.stack(frames, axis=-1), t)))
            frame, reward, terminated, truncated, info = env.step(action)
            if args.terminal_on_life_loss and info.get("life_lost", False):  # a new stack, as in training
                frames.extend([np.zeros_like(frame)] * (stack - 1))
            frames.append(frame)
            episode_return, done, t = episode_return + float(reward), terminated or truncated, t + 1
        returns.append(episode_return)
    return returns


# ============================================================================================== algorithm: DQN
def dqn_targets(rewards: jax.Array, discounts: jax.Array, next_q_target: jax.Array, next_q_online=None) -> jax.Array:
    """y = R + gamma^k (1 - d) max_a' Q_target(s', a') (DQN); with next_q_online (double-Q), y = R + gamma^k (1 - d)
    Q_target(s', a*), a* = argmax_a' Q_online(s', a'). (B,), (B,), (B, A)[, (B, A)] -> (B,)"""
    if next_q_online is None:
        return rewards + discounts * next_q_target.max(axis=-1)
    best = next_q_online.argmax(axis=-1)  # (B,)
    return rewards + discounts * jnp.take_along_axis(next_q_target, best[:, None], axis=-1)[:, 0]


def mse_loss(q_taken: jax.Array, targets: jax.Array) -> jax.Array:
    """mean over the batch of (y - q)^2, no 1/2 factor (Dopamine's JAX DQN default loss). (B,), (B,) -> ()."""
    return jnp.mean((jax.lax.stop_gradient(targets) - q_taken) ** 2)


def huber_loss(q_taken: jax.Array, targets: jax.Array) -> jax.Array:
    """mean over the batch of the Huber loss of y - q with delta 1: x^2 / 2 if |x| <= 1, else |x| - 1/2 (Dopamine's
    losses.huber_loss, the Atari 100k agents' loss). (B,), (B,) -> ()."""
    error = jnp.abs(jax.lax.stop_gradient(targets) - q_taken)
    return jnp.mean(jnp.where(error <= 1.0, 0.5 * error**2, error - 0.5))


def augment(key: jax.Array, obs: jax.Array) -> jax.Array:
    """DrQ's augmentation as Dopamine's Atari 100k agent applies it (Kostrikov et al. 2020): each image padded by 4
    pixels replicating its edge, a random 84x84 crop (one per sample, the same for its 4 frames; offsets 0..7 on each
    axis, as Dopamine's randint(0, 92 - 84) draws them: its upper bound is exclusive), then an intensity jitter
    x (1 + 0.05 clip(N(0, 1), -2, 2)), one draw per sample, not clipped (Schwarzer et al. 2021). On raw pixels: the
    network's /255 gives Dopamine's values (it divides first; both are linear). (B, H, W, C) -> float32 (B, H, W, C)."""
    crop_key, intensity_key = jax.random.split(key)
    b, h, w, c = obs.shape
    padded = jnp.pad(obs.astype(jnp.float32), ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")  # (B, H+8, W+8, C)
    offsets = jax.random.randint(crop_key, (b, 2), 0, 8)
    crop = jax.vmap(lambda image, at: jax.lax.dynamic_slice(image, (at[0], at[1], 0), (h, w, c)))
    scale = 1.0 + 0.05 * jnp.clip(jax.random.normal(intensity_key, (b, 1, 1, 1)), -2.0, 2.0)
    return crop(padded, offsets) * scale


def make_q_fn(network: nn.Module):
    """q_fn(params, obs (B, ...), key) -> Q(s, .) (B, A), for acting and the analysis (the key is unused)."""
    return lambda params, obs, key: network.apply({"params": params}, obs)


def make_loss(network: nn.Module, double_q: bool = False, huber: bool = False):
    """loss_fn(params, target_params, batch, key) -> (MSE or Huber loss, aux): aux holds the batch's Q(s, a) and TD
    targets y, both (B,) (double_q: the online network picks the target's action). The key is unused. The update
    differentiates it; the analysis also takes per-sample gradients of it."""

    def loss_fn(params, target_params, batch: Batch, key):
        next_q = network.apply({"params": target_params}, batch.next_obs)  # (B, A)
        next_online = network.apply({"params": params}, batch.next_obs) if double_q else None  # (B, A)
        targets = dqn_targets(batch.rewards, batch.discounts, next_q, next_online)  # (B,)
        q = network.apply({"params": params}, batch.obs)  # (B, A)
        q_taken = jnp.take_along_axis(q, batch.actions[:, None], axis=-1)[:, 0]  # (B,)
        return (huber_loss if huber else mse_loss)(q_taken, targets), {"q_taken": q_taken, "targets": targets}

    return loss_fn


def make_update(loss_fn, tx: optax.GradientTransformation, method: str, augmentation: bool = False):
    """The jitted update (state, batches, counts) -> (state, metrics of the last step): a gradient step on each batch
    of the tuple `batches` in turn, all in one call (jit unrolls the loop: the same numbers as a call per batch).
    counts holds an entry per batch, None except at mask-update steps (then a pytree of ints from mask_update_counts);
    each pattern of entries compiles once. With augmentation, the states and next states of each batch are augmented
    with independent keys (as Dopamine does) drawn from the state's key, which moves on at every step."""

    def step(state: TrainState, batch: Batch, counts):
        if augmentation:
            obs_key, next_key = jax.random.split(jax.random.fold_in(state.key, 2))  # not split(state.key)'s keys
            batch = batch._replace(obs=augment(obs_key, batch.obs), next_obs=augment(next_key, batch.next_obs))
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.target_params, batch, None)
        state = sparse_step(state, loss, grads, counts, tx, method)  # masks, Adam, theta <- (theta + u) * m
        return state, {"losses/td_loss": loss, "losses/q_values": aux["q_taken"].mean()}

    def update(state: TrainState, batches: tuple, counts: tuple):
        for batch, step_counts in zip(batches, counts, strict=True):
            state, metrics = step(state, batch, step_counts)
        return state, metrics

    return jax.jit(update)


# ========================================================================================================== main
def main(args: Args) -> dict:
    """Trains; returns {"run_dir": ..., "episodic_returns": [...]}."""
    # -------------------------------------------------------------------------------- shared: setup
    check_args(args)
    env, is_atari = make_env(args.env_id, args.sticky_actions)
    eval_env = make_env(args.env_id, args.sticky_actions)[0] if args.eval_frequency else None  # the evaluations' own
    stack = 4 if is_atari else 1  # frames per state
    if args.network != "mlp" and not is_atari:
        raise ArgsError(f"--network {args.network} needs Atari frames; use --network mlp for {args.env_id}")
    if args.noop_max and not is_atari:
        raise ArgsError(f"--noop-max starts Atari games; {args.env_id} is not one")
    if args.buffer_size < stack + args.n_step:  # the smallest buffer that holds one whole transition
        raise ArgsError(f"--buffer-size ({args.buffer_size}) must be >= frame stack + n-step ({stack + args.n_step})")
    frame_shape, frame_dtype = env.observation_space.shape, env.observation_space.dtype
    # host generators: env seeds, exploration and replay; the masks' own (every method sees the same env seeds); the
    # analysis' own (logging it never changes training). JAX keys: network init, training (SET regrowth), analysis
    rng, mask_rng, metrics_rng = (np.random.default_rng(seed) for seed in (args.seed, [args.seed, 1], [args.seed, 2]))
    init_key, train_key = jax.random.split(jax.random.PRNGKey(args.seed))
    metrics_key = jax.random.fold_in(jax.random.PRNGKey(args.seed), 2)

    # -------- the network, its masks and optimizer, the update, acting and replay
    layers = (args.network, args.width_scale, args.scale_dense, args.use_bias, args.use_output_bias, args.dueling)
    network = QNetwork(env.action_space.n, *layers)
    params = jax.jit(network.init)(init_key, np.zeros((1, *frame_shape, stack), frame_dtype))["params"]
    tx = optax.adam(args.learning_rate, eps=args.adam_eps)
    state, targets = init_train_state(args, params, tx, mask_rng, train_key, prune_window(args)[0])
    loss_fn = make_loss(network, args.double_q, args.loss == "huber")
    update = make_update(loss_fn, tx, args.pruning_method, args.augmentation)
    q_fn = make_q_fn(network)
    greedy_action = jax.jit(lambda params, obs, step: q_fn(params, obs[None], None).argmax(-1)[0])
    eval_action = greedy_action  # evaluations act as training does
    rb = ReplayBuffer(args.buffer_size, frame_shape, frame_dtype, stack, args.n_step, args.gamma)

    # -------------------------------------------------------------------------------- shared: start or resume
    analysis = metrics.make_analysis(q_fn, loss_fn, args.metrics_grad_samples)
    window = prune_window(args)  # (t_start, t_end, frequency) in gradient steps
    final_sparsity, summarize = metrics.overall_sparsity(state.params, targets), jax.jit(metrics.sparsity_summary)
    obs_frame = start_game(env, rng, args.noop_max, seed=int(rng.integers(2**31)))
    frames = deque([np.zeros_like(obs_frame)] * (stack - 1) + [obs_frame], maxlen=stack)  # zeros before the start
    start, grad_step, episode_return, episode_length, returns = 0, 0, 0.0, 0, []
    update_metrics = metrics_batch = None
    learning_starts = args.learning_starts
    if args.resume:  # go on exactly where the checkpoint was written
        saved = load_checkpoint(args.resume)
        state = restore_leaves(state, saved["train_state"])
        rng.bit_generator.state, metrics_rng.bit_generator.state = saved["rngs"]
        if is_atari:  # the Atari env replays its episode from its start
            env.__setstate__(saved["env"])
        else:
            env = saved["env"]
        obs_frame, frames, episode_return, episode_length, returns = saved["episode"]
        frames, start, grad_step = deque(frames, maxlen=stack), saved["global_step"] + 1, saved["grad_step"]
        update_metrics, metrics_batch = saved["metrics"]
        metrics_batch = metrics_batch and Batch(*metrics_batch)
        if saved["replay"] is not None:
            rb.__setstate__(saved["replay"])
        else:  # refill the buffer before learning again
            learning_starts = start + args.learning_starts
    replay_ratio = args.gradient_steps / args.train_frequency  # gradient steps per env step
    run_dir, writer = open_run(args, {"prune_window_grad_steps": list(window), "replay_ratio": replay_ratio}, start)
    if args.resume:
        print(f"resumed {run_dir} at env step {start}, gradient step {grad_step}", flush=True)

    def checkpoint(global_step: int):  # everything the loop needs to go on after env step `global_step`
        payload = {
            "global_step": global_step,
            "grad_step": int(jax.device_get(state.grad_step)),
            "train_state": saved_leaves(state),
            "rngs": (rng.bit_generator.state, metrics_rng.bit_generator.state),
            "env": env.__getstate__() if is_atari else env,
            "episode": (obs_frame, list(frames), episode_return, episode_length, returns),  # returns: of those done
            "metrics": (jax.device_get(update_metrics), metrics_batch and tuple(metrics_batch)),
            "replay": rb.__getstate__() if args.checkpoint_replay else None,
        }
        return save_checkpoint(run_dir, writer, payload)

    window_step, window_time, last_print = start, time.time(), time.time()
    try:
        for global_step in range(start, args.total_timesteps):
            # -------------------------------------------------------------------- shared: act and store
            epsilon = linear_epsilon(args, global_step)
            if rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            else:  # the one device-to-host transfer of an ordinary step
                action = int(jax.device_get(greedy_action(state.params, np.stack(frames, axis=-1), global_step)))
            next_frame, reward, terminated, truncated, info = env.step(action)
            life_lost = args.terminal_on_life_loss and info.get("life_lost", False)  # the agent's episode ends there
            stored_reward = np.clip(reward, -1.0, 1.0) if is_atari else reward  # Atari: learn from clipped rewards
            rb.add(obs_frame, action, stored_reward, terminated or life_lost, truncated, next_frame)
            episode_return, episode_length = episode_return + float(reward), episode_length + 1
            if terminated or truncated:  # log the whole, unclipped return of the episode
                writer.add_scalar("charts/episodic_return", episode_return, global_step)
                writer.add_scalar("charts/episodic_length", episode_length, global_step)
                returns.append(episode_return)
                episode_return, episode_length = 0.0, 0
                next_frame = start_game(env, rng, args.noop_max)
            if terminated or truncated or life_lost:  # the agent's next episode, its stack zero-filled (at a life loss
                frames.extend([np.zeros_like(next_frame)] * (stack - 1))  # the game goes on, as in Dopamine's 100k)
            frames.append(next_frame)
            obs_frame = next_frame

            # -------- learn: every train_frequency env steps, gradient_steps gradient steps (with the mask updates due)
            if global_step >= learning_starts:
                if global_step % args.train_frequency == 0:
                    steps = range(grad_step, grad_step + args.gradient_steps)
                    counts = tuple(mask_update_counts(args, active_masks(state), targets, c, window) for c in steps)
                    batches = tuple(rb.sample(rng, args.batch_size) for _ in steps)
                    state, update_metrics = update(state, batches, counts)
                    grad_step += args.gradient_steps
                if global_step % args.target_network_frequency == 0:
                    state = state.replace(target_params=state.params)

            # -------------------------------------------------------------------- shared: log and checkpoint
            done = global_step + 1  # env steps done
            if done % args.log_frequency == 0 or done == args.total_timesteps:
                now = time.time()
                sps = (done - window_step) / max(now - window_time, 1e-9)
                window_step, window_time = done, now
                scheduled = final_sparsity * scheduled_fraction(args, grad_step, window)
                scalars = {"charts/SPS": sps, "charts/epsilon": epsilon, "charts/grad_steps": grad_step}
                scalars.update({"pruning/target_sparsity": scheduled, **(update_metrics or {})})
                scalars, finite = jax.device_get((dict(scalars, **summarize(state.params)), state.finite))
                for tag, value in scalars.items():
                    if np.isfinite(value):  # a refused step's loss is not
                        writer.add_scalar(tag, float(value), global_step)
                if not finite:  # the update refused a non-finite step: the state is the last good one
                    writer = checkpoint(global_step)
                    good = int(jax.device_get(state.grad_step))
                    raise NonFiniteError(
                        f"non-finite loss after gradient step {good} (env step <= {global_step}); "
                        f"the last good train state is checkpointed in {run_dir}"
                    )
                if now - last_print > 10 or done == args.total_timesteps:
                    last_print, recent = now, f"{np.mean(returns[-20:]):.1f}" if returns else "n/a"
                    print(
                        f"step {done}/{args.total_timesteps} | SPS {sps:.0f} | grad steps {grad_step} (replay ratio "
                        f"{replay_ratio:g}) | return (last 20) {recent} "
                        f"| sparsity {scalars['pruning/kernel_sparsity']:.3f} (target {scheduled:.3f})",
                        flush=True,
                    )
            if args.metrics_frequency and global_step >= learning_starts and done % args.metrics_frequency == 0:
                if metrics_batch is None:  # drawn once, then fixed
                    batch = rb.sample_slots(metrics_rng, args.metrics_batch_size)[0]
                    metrics_batch = metrics.by_action(batch, args.metrics_grad_samples)
                results = analysis(state.params, state.target_params, state.masks, metrics_batch, metrics_key)
                metrics.write_analysis(writer, results, global_step)
            if args.eval_frequency and (done % args.eval_frequency == 0 or done == args.total_timesteps):
                began = time.time()
                eval_returns = evaluate(args, eval_env, eval_action, state.params, stack, global_step)
                writer.add_scalar("eval/episodic_return", np.mean(eval_returns), global_step)
                print(f"step {done} | eval return {np.mean(eval_returns):.1f} over {len(eval_returns)} episodes")
                window_time += time.time() - began  # the evaluation's time does not count against the SPS
            if args.checkpoint_frequency and done % args.checkpoint_frequency == 0:
                writer = checkpoint(global_step)
    finally:  # also when interrupted: the logs so far are kept
        writer.close()
    if args.save_model:
        save_model(args, run_dir, state)
    return {"run_dir": run_dir, "episodic_returns": returns}


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


# -------------------------------------------------------------------------------- shared: command line with presets
def preset_args(name: str, **flags) -> Args:
    """Args with a preset's values, then `flags` over them: what --preset NAME --flag ... gives on the command line."""
    if name not in PRESETS:
        raise ArgsError(f"--preset {name!r}: the presets are {', '.join(PRESETS)}")
    return Args(**{**PRESETS[name], "preset": name, **flags})


def preset_defaults(argv: list) -> Args:
    """Args holding the defaults of the command line's --preset NAME (its last one; none: paper)."""
    name = "paper"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
    return preset_args(name)


if __name__ == "__main__":
    try:  # a resumed run's saved flags are its defaults (its preset included); else the preset's
        argv = sys.argv[1:]
        main(tyro.cli(Args, default=resume_defaults(argv) or preset_defaults(argv)))
    except (ArgsError, NonFiniteError) as error:  # a bad flag (nothing was written): 2; a non-finite loss: 1
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ArgsError) else 1)
