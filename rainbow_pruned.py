"""Compact Rainbow (C51, n-step returns, prioritized replay) with sparse training: GMP, RigL, SET or static sparsity.

Papers: Obando-Ceron, Courville & Castro, "In value-based deep RL, a pruned network is a good network" (ICML 2024);
Bellemare et al. 2017 (C51); Schaul et al. 2016 (prioritized replay); Hessel et al. 2018 (Rainbow); Ganaie et al., "A
Closer Look at Sparse Training in Deep RL" (RigL vs pruning, no biases); Ma et al. (ICML 2025, static random sparsity).

Dopamine's "compact" Rainbow, as in the paper (Sec. 4.1; Dopamine's rainbow_agent.py and rainbow.gin): a C51 head
(51 atoms z on [-10, 10], Q = sum_i z_i p_i), 3-step returns, prioritized replay, epsilon-greedy; no noisy nets,
dueling or double-Q (--noisy, --dueling, --double-q: DER's, all three set by --preset der for Atari 100k). The target
distribution p_target(s', a*), a* = argmax_a Q_target(s', a), moves to r + gamma^n (1 - d) z and is projected back
onto z; the loss is the cross-entropy to it times the importance weights, and a sampled transition's priority becomes
sqrt(cross-entropy + 1e-10). Adam 6.25e-5 / eps 1.5e-4. Sparse training is dqn_pruned.py's (GMP by default); the C51
output kernel is pruned like every kernel.

Deviations from the paper and its code (the README lists them with their sources)
    1-6. Those of dqn_pruned.py: the pruning window and its forced final mask update, RigL/SET's optimizer step on
       mask updates, host-drawn random masks, training returns (evaluation off), the update gating, non-finite steps.
    7. Prioritized sampling draws i.i.d. in proportion to priority (Dopamine's JAX sampler), not stratified over the
       sum tree (its 2023 TF buffer). A transition whose n-step window or frame stack is not complete yet is redrawn;
       the importance weight uses its unconditioned probability p_i / sum_j p_j, as Dopamine's does.
    8. Priorities live in a sum tree over the buffer's frame slots; the extra slot at each episode end holds the
       final observation and has priority 0, so it is never drawn.
    9. With --gradient-steps N > 1 the N batches of a training event are drawn first, all from the priorities as they
       were before it (the N steps run in one jitted call); each step's new priorities are written back after the
       call, in step order. At N = 1 (the paper's Rainbow) this is Dopamine's sample, step, write back.
    10. --preset der follows Dopamine's DER.gin and full_rainbow_agent.py, but each noisy layer draws its own noise
       (Dopamine's share a key) and both noisy kernels, mu and sigma, are pruned, each a layer of its own.

Example: python rainbow_pruned.py --env-id ALE/Pong-v5 --width-scale 3   # the paper's setting (a GPU job); README: more
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
    "paper": {},  # the pruning paper's Rainbow: the defaults below (its Table 2; Dopamine's rainbow.gin)
    "der": {  # data-efficient Rainbow on Atari 100k (van Hasselt et al. 2019), as in Dopamine's
        # labs/atari_100k/configs/DER.gin and its full_rainbow_agent.py
        "total_timesteps": 100_000,
        "sticky_actions": False,
        "terminal_on_life_loss": True,
        "eval_frequency": 100_000,  # one evaluation, after the last step: 100 episodes at epsilon 0.001, no noise
        "eval_episodes": 100,
        "eval_epsilon": 0.001,
        "noop_max": 30,  # Dopamine's DataEfficientAtariRunner
        "learning_rate": 1e-4,
        "adam_eps": 1.5e-4,
        "buffer_size": 100_000,  # the whole run (Dopamine: 1M "as a proxy for unbounded memory")
        "gamma": 0.99,
        "n_step": 10,
        "target_network_frequency": 2_000,
        "batch_size": 32,
        "start_e": 0.0,  # noisy nets explore: Dopamine's agent acts at epsilon 0 with them (zero_epsilon), whatever
        "end_e": 0.0,  # DER.gin's epsilon_train 0.01 says
        "learning_starts": 1_600,
        "train_frequency": 1,
        "network": "cnn",
        "num_atoms": 51,
        "v_min": -10.0,
        "v_max": 10.0,
        "noisy": True,
        "dueling": True,
        "double_q": True,
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

    # -------- algorithm arguments (compact Rainbow: the paper's Table 2 and Dopamine's rainbow.gin)
    preset: Annotated[Literal["paper", "der"], tyro.conf.arg(help=preset_help())] = "paper"
    """named defaults (PRESETS above; --help lists them): the command line's --preset NAME sets them, preset_args in
    Python"""
    learning_rate: float = 6.25e-5
    """Adam learning rate (paper Table 2; Dopamine rainbow.gin)"""
    adam_eps: float = 1.5e-4
    """Adam epsilon (paper Table 2 and Dopamine rainbow.gin; the paper's App. G.4 prints 1.5e-5)"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions, stored as single uint8 frames with a priority each (paper Table 2)"""
    gamma: float = 0.99
    """discount factor (paper Table 2)"""
    n_step: int = 3
    """n of the n-step return sum_{i<n} gamma^i r_{t+i}, bootstrapped with gamma^n (Rainbow: 3, paper Table 2)"""
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
    """also multiply the 512-unit dense layer by k (off, as for DQN: Dopamine's Impala heads keep 512 units)"""
    use_bias: bool = True
    """biases in the hidden layers (Ganaie et al. remove them: --no-use-bias)"""
    use_output_bias: bool = True
    """bias in the output layer (separate from --use-bias, as in Ganaie et al.'s ablation)"""
    num_atoms: int = 51
    """atoms of the categorical return distribution (C51; paper Table 2)"""
    v_min: float = -10.0
    """lowest atom of the support, in (clipped) reward units (paper Table 2)"""
    v_max: float = 10.0
    """highest atom of the support; the support is linspace(v_min, v_max, num_atoms) (paper Table 2)"""
    noisy: bool = False
    """noisy nets for the dense layers (Fortunato et al. 2018, factorized Gaussian, sigma_0 = 0.1 as in Dopamine's
    NoisyNetwork): new noise at every forward pass (training: from the state's key; acting: from the seed and the env
    step), none in evaluations. Dopamine acts at epsilon
    0 with them: --start-e 0 --end-e 0 (the der preset sets both)"""
    dueling: bool = False
    """dueling head on the logits, value + advantage - mean_a advantage per atom (Wang et al. 2016; Dopamine's
    FullRainbowNetwork, DER.gin)"""
    double_q: bool = False
    """double-Q target: the online network picks a* = argmax_a Q(s', a), the target network's distribution of it is
    projected (van Hasselt et al. 2016; Dopamine's full_rainbow_agent.py, DER.gin)"""

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
    """(ok, message) pairs for the Rainbow-only fields."""
    return [
        (args.preset in PRESETS, f"--preset {args.preset!r}: the presets are {', '.join(PRESETS)}"),
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


# -------------------------------------------------------------------------------- Rainbow: network
class NoisyDense(nn.Module):
    """A dense layer with factorized Gaussian noise (Fortunato et al. 2018, Eq. 10-11; Dopamine's NoisyNetwork):
    w = mu_w + sigma_w * f(e_in) f(e_out)^T, b = mu_b + sigma_b * f(e_out), f(x) = sign(x) sqrt(|x|), e ~ N(0, 1)
    drawn from the "noise" rng at every call (one draw for the whole batch); mu ~ U(+-1/sqrt(fan_in)), sigma =
    0.1/sqrt(fan_in) (Dopamine's sigma_0; Fortunato et al.'s is 0.5). Without noise (evaluation), w = mu_w.
    Parameters kernel, kernel_sigma, bias, bias_sigma: both kernels are prunable, each a layer of its own, as every
    parameter of more than one dimension is: a pruned mu leaves a connection of zero-mean noise, a pruned sigma one
    without noise, and magnitude pruning decides which of the two a weight loses."""

    features: int
    use_bias: bool

    @nn.compact
    def __call__(self, x, noise: bool):
        fan_in = x.shape[-1]
        bound = 1.0 / math.sqrt(fan_in)
        mu_init = partial(jax.random.uniform, minval=-bound, maxval=bound)
        sigma_init = nn.initializers.constant(0.1 / math.sqrt(fan_in))
        kernel = self.param("kernel", mu_init, (fan_in, self.features))
        kernel_sigma = self.param("kernel_sigma", sigma_init, (fan_in, self.features))
        if noise:
            in_key, out_key = jax.random.split(self.make_rng("noise"))
            f = lambda e: jnp.sign(e) * jnp.sqrt(jnp.abs(e))  # noqa: E731
            noise_in, noise_out = (
                f(jax.random.normal(in_key, (fan_in,))),
                f(jax.random.normal(out_key, (self.features,))),
            )
            kernel = kernel + kernel_sigma * jnp.outer(noise_in, noise_out)
        y = x @ kernel
        if self.use_bias:
            bias = self.param("bias", mu_init, (self.features,))
            bias_sigma = self.param("bias_sigma", sigma_init, (self.features,))
            y = y + (bias + bias_sigma * noise_out if noise else bias)[None, :]  # (B, features)
        return y


class RainbowNetwork(nn.Module):
    """Torso -> Dense 512 (*k with scale_dense) -> ReLU -> Dense A*atoms, xavier_uniform (Dopamine's Impala heads);
    with dueling, value (atoms) and advantage (A*atoms) heads, logits = value + advantage - mean_a advantage; with
    noisy, the dense layers are NoisyDense (Dopamine's FullRainbowNetwork). (B, ...) -> logits (B, A, atoms); a softmax
    over the last axis gives each action's return distribution. noise: the noisy layers draw noise (rng "noise")."""

    num_actions: int
    num_atoms: int
    torso: str
    width: int
    scale_dense: bool
    use_bias: bool
    use_output_bias: bool
    dueling: bool = False
    noisy: bool = False

    @nn.compact
    def __call__(self, x, noise: bool = True):
        def dense(features: int, use_bias: bool, name: str):
            if self.noisy:
                return lambda x: NoisyDense(features, use_bias, name=name)(x, noise)
            return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(), use_bias=use_bias, name=name)

        x = TORSOS[self.torso](self.width, self.use_bias, name="torso")(x)
        hidden = 512 * (self.width if self.scale_dense else 1)
        x = nn.relu(dense(hidden, self.use_bias, "dense")(x))
        shape = (x.shape[0], self.num_actions, self.num_atoms)
        if not self.dueling:
            return dense(self.num_actions * self.num_atoms, self.use_output_bias, "logits")(x).reshape(shape)
        value = dense(self.num_atoms, self.use_output_bias, "value")(x)[:, None, :]  # (B, 1, atoms)
        advantage = dense(self.num_actions * self.num_atoms, self.use_output_bias, "advantage")(x).reshape(shape)
        return value + advantage - advantage.mean(axis=1, keepdims=True)


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


# -------------------------------------------------------------------------------- Rainbow: prioritized replay
class SumTree:
    """Priorities of `capacity` slots in a binary tree of sums, O(log capacity) per update and draw. Node 1 is the
    root, node i has children 2i and 2i+1, slot j is leaf node `leaves + j` (`leaves`: the smallest power of two >=
    capacity; spare leaves stay 0). float64, inner nodes recomputed (never incremented): no rounding error builds up."""

    def __init__(self, capacity: int):
        self.leaves = 1 << max(capacity - 1, 0).bit_length()
        self.nodes = np.zeros(2 * self.leaves, np.float64)

    def total(self) -> float:
        return float(self.nodes[1])

    def get(self, idx) -> np.ndarray:
        return self.nodes[self.leaves + np.asarray(idx)]

    def set(self, idx, priorities) -> None:
        """Sets the priorities of slots `idx` (a repeated slot takes its last value), then refreshes their ancestors."""
        if np.ndim(idx) == 0:  # one slot (every env step): a plain loop up the tree, several times faster
            node, value = int(idx) + self.leaves, float(priorities)
            if not 0 <= value < math.inf:
                raise ValueError("priorities must be finite and >= 0")
            self.nodes[node] = value
            while node > 1:
                node >>= 1
                self.nodes[node] = self.nodes[2 * node] + self.nodes[2 * node + 1]
            return
        idx = np.atleast_1d(idx).astype(np.int64)
        priorities = np.broadcast_to(priorities, idx.shape)
        if len(idx) > 1:  # keep the last occurrence of each slot
            last = len(idx) - 1 - np.unique(idx[::-1], return_index=True)[1]
            idx, priorities = idx[last], priorities[last]
        if np.any(priorities < 0) or not np.all(np.isfinite(priorities)):
            raise ValueError("priorities must be finite and >= 0")
        nodes = idx + self.leaves
        self.nodes[nodes] = priorities
        while nodes[0] > 1:  # all nodes are on one level; a repeated parent gets the same sum twice, harmlessly
            nodes = nodes >> 1
            self.nodes[nodes] = self.nodes[2 * nodes] + self.nodes[2 * nodes + 1]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n slots drawn independently with probability priority / total (the total must be > 0)."""
        mass = rng.random(n) * self.total()  # a point in [0, total) per draw, found by descending the tree
        nodes = np.ones(n, np.int64)
        while nodes[0] < self.leaves:
            left = self.nodes[2 * nodes]
            go_right = (mass >= left) & (self.nodes[2 * nodes + 1] > 0)  # never step into an empty subtree (rounding)
            mass = np.where(go_right, mass - left, mass)
            nodes = 2 * nodes + go_right
        return nodes - self.leaves


class PrioritizedReplayBuffer(ReplayBuffer):
    """The replay buffer plus one priority per frame slot (Schaul et al. 2016; Dopamine's compact Rainbow). A new slot
    gets the largest priority set so far (1.0 at first), an episode's final-observation slot 0 (never drawn). Slots
    are drawn in proportion to priority; those whose n-step window or frame stack is incomplete are redrawn."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree = SumTree(self.capacity)
        self.max_priority = 1.0

    def __getstate__(self) -> dict:  # checkpoints: plain data, the sum tree as its array of nodes
        return {**self.__dict__, "tree": self.tree.nodes}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__({**state, "tree": SumTree(state["capacity"])})
        self.tree.nodes = state["tree"]

    def _write(self, frame, action, reward, terminated, first, last):
        self.tree.set(self.count % self.capacity, 0.0 if last else self.max_priority)
        super()._write(frame, action, reward, terminated, first, last)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.tree.sample(rng, n)

    def sample(self, rng: np.random.Generator, batch_size: int):
        """Returns (batch, slots, probabilities p_i / sum_j p_j) for the importance weights."""
        batch, idx = self.sample_slots(rng, batch_size)
        return batch, idx, (self.tree.get(idx) / self.tree.total()).astype(np.float32)

    def update_priorities(self, idx: np.ndarray, priorities: np.ndarray) -> None:
        self.tree.set(idx, priorities)
        self.max_priority = max(self.max_priority, float(np.max(priorities)))


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


# ========================================================================================== algorithm: Rainbow
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


# -------------------------------------------------------------------------------- Rainbow: loss and update
def importance_weights(probs: jax.Array) -> jax.Array:
    """PER weights (P_i + 1e-10)^-1/2 over their batch maximum (Dopamine's rainbow_agent.py). (B,) -> (B,) in (0, 1]."""
    weights = 1.0 / jnp.sqrt(probs + 1e-10)
    return weights / jnp.max(weights)


def priorities_from_loss(losses: jax.Array) -> jax.Array:
    """New priorities sqrt(loss + 1e-10), exponent 1/2 on the cross-entropy (Dopamine's rainbow_agent.py). (B,)."""
    return jnp.sqrt(losses + 1e-10)


def apply_network(network: nn.Module, params, obs: jax.Array, key) -> jax.Array:
    """The network's logits (B, A, atoms); noisy layers draw their noise from `key`, none with key None."""
    if key is None:
        return network.apply({"params": params}, obs, False)
    return network.apply({"params": params}, obs, True, rngs={"noise": key})


def make_q_fn(network: nn.Module, support: jax.Array):
    """q_fn(params, obs (B, ...), key) -> Q(s, .) = sum_i z_i p_i(s, .) (B, A), for acting and analysis; noisy layers
    draw their noise from the key, none with key None (evaluation)."""
    return lambda params, obs, key: q_values(apply_network(network, params, obs, key), support)


def make_loss(network: nn.Module, support: jax.Array, double_q: bool = False):
    """loss_fn(params, target_params, batch, key, weights=None) -> (mean of the cross-entropies times the importance
    weights (None: 1), aux): aux holds the cross-entropies (for the priorities), Q(s, a) and the target distribution's
    mean, all (B,). double_q: the online network picks the target's action. Noisy layers draw their noise from the key
    (one draw for the states, another for the next states, shared there by the target and the online network, as in
    Dopamine's full_rainbow_agent.py); without them the key is unused. The update differentiates it; the analysis
    takes per-sample gradients of it."""

    def loss_fn(params, target_params, batch: Batch, key, weights=None):
        key_now, key_next = (None, None) if key is None else jax.random.split(key)
        apply = partial(apply_network, network)
        next_logits = apply(target_params, batch.next_obs, key_next)  # (B, A, atoms)
        next_choice = apply(params, batch.next_obs, key_next) if double_q else next_logits  # (B, A, atoms)
        best = q_values(next_choice, support).argmax(axis=-1)  # (B,) a*: online (double-Q) or target network's
        next_probs = jax.nn.softmax(next_logits[jnp.arange(len(best)), best])  # (B, atoms)
        target_probs = categorical_projection(next_probs, batch.rewards, batch.discounts, support)  # (B, atoms)
        logits = apply(params, batch.obs, key_now)  # (B, A, atoms)
        logits_taken = logits[jnp.arange(len(batch.actions)), batch.actions]  # (B, atoms)
        losses = cross_entropy(logits_taken, target_probs)  # (B,)
        weighted = losses if weights is None else weights * losses
        aux = {"losses": losses, "q_taken": q_values(logits_taken, support), "targets": target_probs @ support}
        return jnp.mean(weighted), aux

    return loss_fn


def make_update(loss_fn, tx: optax.GradientTransformation, method: str):
    """The jitted update (state, batches, probs, counts) -> (state, metrics of the last step, new priorities (N, B)): a
    gradient step on each of the N batches of the tuple `batches` in turn, all in one call (jit unrolls the loop: the
    same numbers as a call per batch); probs: each batch's sampling probabilities. counts holds an entry per batch,
    None except at mask-update steps (then a pytree of ints from mask_update_counts); each pattern of entries compiles
    once. A refused (non-finite) step's priorities are NaN."""

    def step(state: TrainState, batch: Batch, probs, counts):
        weights = importance_weights(probs)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        noise_key = jax.random.fold_in(state.key, 2)  # noisy nets' (not split(state.key)'s keys; new at every step)
        (loss, aux), grads = grad_fn(state.params, state.target_params, batch, noise_key, weights)
        state = sparse_step(state, loss, grads, counts, tx, method)  # masks, Adam, theta <- (theta + u) * m
        priorities = jnp.where(state.finite, priorities_from_loss(aux["losses"]), jnp.nan)
        return state, {"losses/td_loss": loss, "losses/q_values": aux["q_taken"].mean()}, priorities

    def update(state: TrainState, batches: tuple, probs: tuple, counts: tuple):
        priorities = []
        for batch, batch_probs, step_counts in zip(batches, probs, counts, strict=True):
            state, metrics, step_priorities = step(state, batch, batch_probs, step_counts)
            priorities.append(step_priorities)
        return state, metrics, jnp.stack(priorities)

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
    layers = (args.network, args.width_scale, args.scale_dense, args.use_bias, args.use_output_bias)
    network = RainbowNetwork(env.action_space.n, args.num_atoms, *layers, args.dueling, args.noisy)
    support = jnp.linspace(args.v_min, args.v_max, args.num_atoms)
    params = jax.jit(network.init)(init_key, np.zeros((1, *frame_shape, stack), frame_dtype))["params"]
    tx = optax.adam(args.learning_rate, eps=args.adam_eps)
    state, targets = init_train_state(args, params, tx, mask_rng, train_key, prune_window(args)[0])
    loss_fn = make_loss(network, support, args.double_q)
    update = make_update(loss_fn, tx, args.pruning_method)
    q_fn = make_q_fn(network, support)
    act_key = jax.random.fold_in(jax.random.PRNGKey(args.seed), 3)  # noisy nets' acting noise: fold_in(act_key, t)
    greedy_action = jax.jit(
        lambda params, obs, t: q_fn(params, obs[None], jax.random.fold_in(act_key, t)).argmax(-1)[0]
    )
    eval_action = jax.jit(lambda params, obs, t: q_fn(params, obs[None], None).argmax(-1)[0])  # evaluation: no noise
    rb = PrioritizedReplayBuffer(args.buffer_size, frame_shape, frame_dtype, stack, args.n_step, args.gamma)

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
                    batches, slots, probs = zip(*(rb.sample(rng, args.batch_size) for _ in steps))  # prioritized
                    state, update_metrics, priorities = update(state, batches, probs, counts)
                    priorities = jax.device_get(priorities)  # PER's own device-to-host transfer, every training event
                    for step_slots, step_priorities in zip(slots, priorities):  # in step order: the last one wins
                        if np.isfinite(step_priorities).all():  # a refused step's are NaN: never written to the tree
                            rb.update_priorities(step_slots, step_priorities)
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
