"""The hand-written Atari environment that dqn_pruned.py used before ale-py's AtariVectorEnv (Dopamine's protocol on
ale_py.ALEInterface, OpenCV's INTER_AREA computed from its area weights): the independent reference that
test_atari_env.py checks the library environment against."""

import ale_py
import gymnasium as gym
import numpy as np

ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no ALE banner on stderr


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
    """Atari with Dopamine's protocol, on ale-py's ALEInterface.

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
        self.row_taps, self.col_taps = (
            banded_taps(area_resize_matrix(height, 84)),
            banded_taps(area_resize_matrix(width, 84)),
        )

    def _observation(self) -> np.ndarray:
        pooled = np.maximum(self.screens[0], self.screens[1]).astype(np.float32)  # (210, 160)
        (row_idx, row_w), (col_idx, col_w) = self.row_taps, self.col_taps
        rows = np.einsum("ot,otw->ow", row_w, pooled[row_idx])  # (84, 160)
        resized = np.einsum("hot,ot->ho", rows[:, col_idx], col_w)  # (84, 84)
        return np.clip(np.rint(resized), 0, 255).astype(np.uint8)

    def reset(self, seed: int | None = None):
        if seed is not None:  # ALE takes its seed when a ROM is loaded
            self.ale.setInt("random_seed", seed % 2**31)
            self.ale.loadROM(self.rom)
        self.ale.reset_game()
        self.steps, self.start_state, self.episode_actions = 0, self.ale.cloneState(include_rng=True), []
        self.lives = self.ale.lives()
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
        life_lost, self.lives = self.ale.lives() < self.lives, self.ale.lives()  # after the whole frame skip
        return self._observation(), reward, terminated, truncated, {"life_lost": life_lost}
