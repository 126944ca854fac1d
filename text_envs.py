"""Environments that speak English: every observation is an image, a description, a mission and a state.

The one module the scripts share. `make_env(env_id)` returns a Gymnasium env whose observations are
dicts with
  - "image":   H x W x 3 uint8, what a VLM sees (full-grid render, or the card table);
  - "text":    an exact English description of the state;
  - "mission": the task in words;
  - "state":   a small numeric array of the true state, for CNN / MLP students.
The env's action words are `env.get_wrapper_attr("action_names")`, and `expert_action(env)` returns
an optimal next action from the true state. Nothing algorithmic lives here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import string
from collections import deque
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid and BabyAI ids)
import numpy as np
from gymnasium.envs.toy_text.frozen_lake import generate_random_map
from gymnasium.vector.utils import create_shared_memory
from minigrid.core.constants import COLOR_TO_IDX, IDX_TO_COLOR, IDX_TO_OBJECT, OBJECT_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.world_object import Door, Goal, Key, WorldObj
from minigrid.envs import FetchEnv, GoToDoorEnv, GoToObjectEnv, UnlockEnv, UnlockPickupEnv
from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel
from minigrid.envs.babyai.core.verifier import GoToInstr
from minigrid.minigrid_env import MiniGridEnv
from PIL import Image, ImageDraw, ImageFont

GRID_ENVS = {
    "Fetch": "MiniGrid-Fetch-5x5-N2-v0",
    "GoToRedBallGrey": "BabyAI-GoToRedBallGrey-v0",
    "LavaGap": "MiniGrid-LavaGapS7-v0",
    "DynamicObstacles": "MiniGrid-Dynamic-Obstacles-6x6-v0",
    "GoToDoor": "MiniGrid-GoToDoor-6x6-v0",
    "DoorKey": "MiniGrid-DoorKey-6x6-v0",
    "Unlock": "MiniGrid-Unlock-v0",
    "UnlockPickup": "MiniGrid-UnlockPickup-v0",
}
CARD_ENVS = ["NumberLine", "EZPoints", "Points24", "Blackjack"]
SHORT_IDS = ["FrozenLake8x8", *GRID_ENVS, *CARD_ENVS]
DEFAULT_IMAGE_SIZE = 256
DEFAULT_CARD_IMAGE_SIZE = 300  # RL4VLM's GymCards images
TEXT_CHARSET = string.printable
MAX_TEXT_LENGTH = 4096

# Idefics-Agent macro actions (bonetta2024): each is a turn (in quarter turns to the right) then a step forward.
MACRO_ACTION_NAMES = ["move forward", "move left", "move right", "move back", "pick up"]
MACRO_TURNS = [0, -1, 1, 2]
PRIMITIVE_ACTION_NAMES = ["turn left", "turn right", "move forward", "pick up", "drop", "toggle", "done"]
FROZENLAKE_ACTION_NAMES = ["move west", "move south", "move east", "move north"]  # Gymnasium's 0..3
DIR_TO_VEC = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # MiniGrid's agent_dir: east, south, west, north
DIR_NAMES = ["east", "south", "west", "north"]


class TextSpace(gym.spaces.Text):
    """A description or a mission: printable text of any length up to MAX_TEXT_LENGTH."""

    def __init__(self):
        super().__init__(max_length=MAX_TEXT_LENGTH, charset=TEXT_CHARSET)


@create_shared_memory.register(TextSpace)
def _no_shared_text(space: TextSpace, n: int = 1, ctx: Any = None) -> None:
    # Gymnasium <= 1.4 reads shared text once, when the vector env is built, so it would never update.
    raise TypeError("Text observations cannot live in shared memory: use AsyncVectorEnv(..., shared_memory=False).")


def obs_space(image_shape: tuple[int, ...] | None, state_space: gym.spaces.Box) -> gym.spaces.Dict:
    """The dict observation space shared by every family ("image" left out when images are off)."""
    spaces: dict[str, gym.Space] = {}
    if image_shape is not None:
        spaces["image"] = gym.spaces.Box(0, 255, image_shape, np.uint8)
    spaces.update(text=TextSpace(), mission=TextSpace(), state=state_space)
    return gym.spaces.Dict(spaces)


def make_env(env_id: str, seed: int | None = None, **kwargs: Any) -> gym.Env:
    """Build an env with image + text observations.

    Keyword arguments: `image_size` (pixels of the longer image side), `with_image` (False skips
    rendering, for state-only students), `action_set` ("primitive" or "macro", MiniGrid / BabyAI only);
    anything else goes to the underlying env's constructor.
    """
    image_size = kwargs.pop("image_size", None)
    with_image = kwargs.pop("with_image", True)
    action_set = kwargs.pop("action_set", "primitive")
    if action_set not in ("primitive", "macro"):
        raise ValueError(f"action_set must be 'primitive' or 'macro', not {action_set!r}.")
    full_id = GRID_ENVS.get(env_id, env_id)
    if action_set == "macro" and not full_id.startswith(("MiniGrid-", "BabyAI-")):
        raise ValueError(f"The macro action set exists for MiniGrid / BabyAI envs only, not {env_id!r}.")

    if env_id == "FrozenLake8x8":  # the Idefics-Agent setting: a random map fixed per env instance
        base = gym.make(
            "FrozenLake-v1",
            desc=generate_random_map(size=8, seed=seed),
            is_slippery=False,
            max_episode_steps=100,
            **kwargs,
        )
        env: gym.Env = FrozenLakeText(base, image_size or DEFAULT_IMAGE_SIZE, with_image)
    elif env_id.startswith("FrozenLake") and env_id in gym.registry:
        env = FrozenLakeText(gym.make(env_id, **kwargs), image_size or DEFAULT_IMAGE_SIZE, with_image)
    elif full_id.startswith(("MiniGrid-", "BabyAI-")) and full_id in gym.registry:
        base = gym.make(full_id, **kwargs)
        if action_set == "macro":
            base = MacroActions(base)
        env = MiniGridText(base, image_size or DEFAULT_IMAGE_SIZE, with_image, action_set)
    elif env_id in CARD_ENVS:
        card_env = {
            "NumberLine": NumberLineEnv,
            "EZPoints": EZPointsEnv,
            "Points24": Points24Env,
            "Blackjack": BlackjackEnv,
        }
        env = card_env[env_id](image_size=image_size or DEFAULT_CARD_IMAGE_SIZE, with_image=with_image, **kwargs)
    else:
        raise ValueError(
            f"Unknown env id {env_id!r}. Known short ids: {', '.join(SHORT_IDS)}; "
            "full MiniGrid-*/BabyAI-*/FrozenLake* ids work too."
        )
    return SeededEnv(env, seed)


def expert_action(env: gym.Env) -> int:
    """An optimal next action from the env's true current state."""
    return env.get_wrapper_attr("expert_action")()


class SeededEnv(gym.Wrapper):
    """Uses the seed given to `make_env` for the first reset (and the action space), so one call reproduces.

    It also records how the current episode began (its reset seed, or the env's RNG state before an unseeded
    reset) and the actions taken since: `episode_record`, plain numbers from which `replay_episode` rebuilds the
    env, so that a checkpoint stores envs without pickling them."""

    def __init__(self, env: gym.Env, seed: int | None):
        super().__init__(env)
        self._first_seed = seed
        self.action_space.seed(seed)
        self.episode_record: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed, self._first_seed = self._first_seed, None
        else:
            self._first_seed = None
        rng = self.unwrapped.np_random.bit_generator.state if seed is None else None
        self.episode_record = {"seed": seed, "rng": rng, "options": options, "actions": []}
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        self.episode_record["actions"].append(int(action))
        return self.env.step(action)


def replay_episode(env: gym.Env, record: dict[str, Any]) -> None:
    """Bring a fresh env (and the wrappers around it) to where the env of `record` stood: the same reset, then the
    same actions. All randomness comes from the env's np_random, so the replay reaches the same state."""
    if record["seed"] is None:
        env.reset()  # the first reset creates the env's RNG, whose state is then set to the recorded one
        env.unwrapped.np_random.bit_generator.state = record["rng"]
    env.reset(seed=record["seed"], options=record["options"])
    for action in record["actions"]:
        env.step(action)


# ---------------------------------------------------------------------------------------------
# FrozenLake
# ---------------------------------------------------------------------------------------------
FROZENLAKE_MOVES = [(0, -1), (1, 0), (0, 1), (-1, 0)]  # (d_row, d_col) for west, south, east, north
FROZENLAKE_COLORS = {"F": (200, 230, 250), "S": (200, 230, 250), "H": (20, 40, 90), "G": (250, 200, 40)}


def _steps(n: int, word: str) -> str:
    return f"{n} step{'s' if n != 1 else ''} {word}"


class FrozenLakeText(gym.Wrapper):
    """FrozenLake with a tile-rendered image, a description and a (rows, cols, 3) hole / goal / agent grid."""

    render_mode = "rgb_array"

    def __init__(self, env: gym.Env, image_size: int, with_image: bool):
        super().__init__(env)
        self.action_names = FROZENLAKE_ACTION_NAMES
        self.with_image = with_image
        self.mission = "reach the goal without falling into a hole"
        self.grid = self.env.unwrapped.desc.astype(str)  # fixed for the env's lifetime
        self.rows, self.cols = self.grid.shape
        self.goal = tuple(int(v) for v in np.argwhere(self.grid == "G")[0])
        self.tile = max(4, image_size // max(self.rows, self.cols))
        self.observation_space = obs_space(
            (self.rows * self.tile, self.cols * self.tile, 3) if with_image else None,
            gym.spaces.Box(0, 1, (self.rows, self.cols, 3), np.uint8),
        )
        self._background: np.ndarray | None = None
        self._image: np.ndarray | None = None
        self._horizon = self.env.get_wrapper_attr("_max_episode_steps")  # gym.make's time limit
        self._plan: np.ndarray | None = None

    def _pos(self) -> tuple[int, int]:
        return divmod(int(self.env.unwrapped.s), self.cols)

    def _draw_background(self) -> np.ndarray:
        t, grid = self.tile, self.grid
        img = np.empty((self.rows * t, self.cols * t, 3), np.uint8)
        yy, xx = np.mgrid[0:t, 0:t]
        disc = (yy - t / 2 + 0.5) ** 2 + (xx - t / 2 + 0.5) ** 2 <= (0.4 * t) ** 2
        for r in range(self.rows):
            for c in range(self.cols):
                tile = np.empty((t, t, 3), np.uint8)
                tile[:] = FROZENLAKE_COLORS["F"]
                if grid[r, c] in "HG":
                    tile[disc] = FROZENLAKE_COLORS[grid[r, c]]
                tile[0, :] = tile[:, 0] = (120, 150, 180)  # grid lines
                img[r * t : (r + 1) * t, c * t : (c + 1) * t] = tile
        return img

    def _render(self) -> np.ndarray:
        if self._background is None:
            self._background = self._draw_background()
            yy, xx = np.mgrid[0 : self.tile, 0 : self.tile]
            self._agent_mask = np.abs(yy - self.tile / 2 + 0.5) + np.abs(xx - self.tile / 2 + 0.5) <= 0.3 * self.tile
        t, (r, c) = self.tile, self._pos()
        img = self._background.copy()
        img[r * t : (r + 1) * t, c * t : (c + 1) * t][self._agent_mask] = (220, 30, 30)
        return img

    def describe(self) -> str:
        """Position, neighbouring holes and edges, and where the goal lies."""
        grid, (r, c) = self.grid, self._pos()
        text = (
            f"You are on row {r + 1}, column {c + 1} of the {self.rows}x{self.cols} frozen lake "
            "(row 1 is the north edge, column 1 the west edge)."
        )
        holes, edges = [], []
        for name, (dr, dc) in zip(["west", "south", "east", "north"], FROZENLAKE_MOVES):
            rr, cc = r + dr, c + dc
            if not (0 <= rr < self.rows and 0 <= cc < self.cols):
                edges.append(name)
            elif grid[rr, cc] == "H":
                holes.append(name)
        if grid[r, c] == "H":
            text += " You fell into a hole."
        elif grid[r, c] == "G":
            text += " You are on the goal."
        text += (
            " There is a hole to the " + " and to the ".join(holes) + "." if holes else " There is no hole next to you."
        )
        if edges:
            text += " The edge of the lake is to the " + " and to the ".join(edges) + "."
        gr, gc = self.goal
        if (gr, gc) != (r, c):
            parts = [_steps(abs(gr - r), "south" if gr > r else "north")] if gr != r else []
            parts += [_steps(abs(gc - c), "east" if gc > c else "west")] if gc != c else []
            text += " The goal is " + " and ".join(parts) + " from you."
        return text

    def _obs(self) -> dict[str, Any]:
        grid, (r, c) = self.grid, self._pos()
        state = np.zeros((self.rows, self.cols, 3), np.uint8)
        state[..., 0] = grid == "H"
        state[..., 1] = grid == "G"
        state[r, c, 2] = 1
        obs: dict[str, Any] = {"text": self.describe(), "mission": self.mission, "state": state}
        if self.with_image:
            self._image = obs["image"] = self._render()
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        _, info = self.env.reset(seed=seed, options=options)
        return self._obs(), {**info, "success": False}

    def step(self, action: int):
        _, reward, terminated, truncated, info = self.env.step(action)
        return self._obs(), reward, terminated, truncated, {**info, "success": bool(reward > 0)}

    def render(self) -> np.ndarray:
        return self._image if self._image is not None else self._render()

    def expert_action(self) -> int:
        """The move with the best chance of reaching the goal in the steps left (see `frozenlake_plan`)."""
        if self._plan is None:
            table = tuple(tuple(tuple(moves) for moves in acts.values()) for acts in self.env.unwrapped.P.values())
            self._plan = frozenlake_plan(table, self._horizon)
        elapsed = self.env.get_wrapper_attr("_elapsed_steps") or 0
        return int(self._plan[self._horizon - elapsed, int(self.env.unwrapped.s)])


@functools.cache
def frozenlake_plan(table: tuple, horizon: int) -> np.ndarray:
    """plan[k, s]: the move that maximises the chance of reaching the goal from s within k steps.

    Finite-horizon value iteration on Gymnasium's transition table (table[s][a] = P[s][a], a list of
    (probability, next state, reward, terminated)): V_k(s) = max_a sum_s' p(s' | s, a) (r + V_{k-1}(s')).
    Holes and the goal only lead to themselves with reward 0, so V stays 0 there. Among equally good
    moves the one whose chances within fewer steps add up to more wins: it gets there sooner, which
    on the deterministic maps is the first move of a shortest path. Cached: computed once per map.
    """
    n_states, n_actions = len(table), len(table[0])
    transition = np.zeros((n_states, n_actions, n_states))
    reward = np.zeros((n_states, n_actions))
    for s, acts in enumerate(table):
        for a, moves in enumerate(acts):
            for p, s2, r, _ in moves:
                transition[s, a, s2] += p
                reward[s, a] += p * r
    plan = np.zeros((horizon + 1, n_states), np.int64)
    value, sooner = np.zeros(n_states), np.zeros((n_states, n_actions))
    for k in range(1, horizon + 1):
        q = reward + transition @ value  # chance of success within k steps, per first move
        sooner += q
        best = q == q.max(axis=1, keepdims=True)
        plan[k] = np.where(best, sooner, -np.inf).argmax(axis=1)
        value = q.max(axis=1)
    return plan


# ---------------------------------------------------------------------------------------------
# MiniGrid / BabyAI
# ---------------------------------------------------------------------------------------------
class MacroActions(gym.Wrapper):
    """The Idefics-Agent macro actions: move forward / left / right / back (turn, then forward), pick up."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.action_space = gym.spaces.Discrete(len(MACRO_ACTION_NAMES))

    def step(self, action: int):
        actions = self.env.unwrapped.actions
        if action == 4:
            return self.env.step(actions.pickup)
        turns = MACRO_TURNS[action]
        primitives = [actions.right] * turns if turns > 0 else [actions.left] * -turns
        total = 0.0
        for primitive in [*primitives, actions.forward]:
            obs, reward, terminated, truncated, info = self.env.step(primitive)
            total += reward
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _name_cell(obj_idx: int, color_idx: int, state: int) -> str:
    """'a locked red door', 'a green goal', 'a blue key' from one cell of MiniGrid's encoding."""
    kind, color = IDX_TO_OBJECT[obj_idx], IDX_TO_COLOR[color_idx]
    if kind == "door":
        return _article(f"{['open', 'closed', 'locked'][state]} {color} door")
    return _article(f"{color} {kind}")


def _relative_position(ahead: int, right: int) -> str:
    """'2 steps ahead and 1 step to the left' for offsets in the agent's frame."""
    parts = [_steps(ahead, "ahead")] if ahead else []
    if right:
        parts.append(_steps(abs(right), "to the right" if right > 0 else "to the left"))
    return " and ".join(parts)


def describe_view(view: np.ndarray, direction: int, mission: str) -> str:
    """The English description of MiniGrid's egocentric view encoding (agent at the bottom centre, facing up)."""
    size = view.shape[0]
    ax, ay = size // 2, size - 1
    sentences = [f"You are facing {DIR_NAMES[direction]}."]
    for j in range(ay, -1, -1):  # nearest rows first
        for i in range(size):
            obj = int(view[i, j, 0])
            if (i, j) == (ax, ay) or IDX_TO_OBJECT[obj] in ("unseen", "empty", "wall", "lava", "floor", "agent"):
                continue
            sentences.append(f"You see {_name_cell(*view[i, j])} {_relative_position(ay - j, i - ax)}.")
    for (i, j), where in [
        ((ax, ay - 1), "in front of you"),
        ((ax - 1, ay), "on your left"),
        ((ax + 1, ay), "on your right"),
    ]:
        kind = IDX_TO_OBJECT[int(view[i, j, 0])]
        if kind in ("wall", "lava"):
            sentences.append(f"There is {'a wall' if kind == 'wall' else 'lava'} {where}.")
    if IDX_TO_OBJECT[int(view[ax, ay, 0])] not in ("empty", "unseen", "agent"):
        sentences.append(f"You carry {_name_cell(*view[ax, ay])}.")
    sentences.append(f"Your mission: {mission}.")
    return " ".join(sentences)


def mission_target(mission: str) -> tuple[int, int]:
    """The first object word and colour word of a mission as (OBJECT_TO_IDX, COLOR_TO_IDX + 1); 0 = none named."""
    words = mission.replace(",", " ").split()
    obj = next((OBJECT_TO_IDX[w] for w in words if w in OBJECT_TO_IDX and w not in ("empty", "unseen", "agent")), 0)
    color = next((COLOR_TO_IDX[w] + 1 for w in words if w in COLOR_TO_IDX), 0)
    return obj, color


class MiniGridText(gym.Wrapper):
    """MiniGrid / BabyAI with a full-grid render, the description of the agent's view, and that view as state.

    The state is MiniGrid's 7x7x3 view encoding plus two constant planes naming the mission's target
    (object and colour, `mission_target`), so that a state-only student can tell "go to the red door"
    from "go to the blue door" (7x7x5).
    """

    render_mode = "rgb_array"

    def __init__(self, env: gym.Env, image_size: int, with_image: bool, action_set: str):
        super().__init__(env)
        u = self.env.unwrapped
        self.action_set = action_set
        self.action_names = MACRO_ACTION_NAMES if action_set == "macro" else PRIMITIVE_ACTION_NAMES[: u.action_space.n]
        self.with_image = with_image
        self.tile = max(4, image_size // max(u.width, u.height))
        self.observation_space = obs_space(
            (u.height * self.tile, u.width * self.tile, 3) if with_image else None,
            gym.spaces.Box(0, 255, (*self.env.observation_space["image"].shape[:2], 5), np.uint8),
        )
        self._image: np.ndarray | None = None
        self._last_frame: dict[str, Any] | None = None

    def _render(self) -> np.ndarray:
        """The full grid drawn at the wanted size from MiniGrid's tile cache (no highlight, no resizing).

        After the first frame of an episode only the cells that can have changed are drawn again: those whose
        object was replaced or removed, the agent's old and new cells, and the cells it faced before and after
        (the only place where an object changes in place: a door it opens or closes)."""
        u, t = self.env.unwrapped, self.tile
        objects, agent, front = (
            list(u.grid.grid),
            (tuple(map(int, u.agent_pos)), int(u.agent_dir)),
            tuple(map(int, u.front_pos)),
        )
        last = self._last_frame
        if last is None or last["grid"] is not u.grid:  # a new episode: every cell
            img = np.empty((u.height * t, u.width * t, 3), np.uint8)
            cells = {(i, j) for j in range(u.height) for i in range(u.width)}
        else:
            img = last["image"].copy()
            cells = {
                (k % u.width, k // u.width) for k, (a, b) in enumerate(zip(objects, last["objects"])) if a is not b
            }
            cells |= {last["agent"][0], agent[0], last["front"], front}
        for i, j in cells:
            if 0 <= i < u.width and 0 <= j < u.height:
                agent_dir = agent[1] if (i, j) == agent[0] else None
                img[j * t : (j + 1) * t, i * t : (i + 1) * t] = Grid.render_tile(u.grid.get(i, j), agent_dir, False, t)
        self._last_frame = {"grid": u.grid, "image": img, "objects": objects, "agent": agent, "front": front}
        return img

    def _obs(self, obs: dict[str, Any]) -> dict[str, Any]:
        u = self.env.unwrapped
        out: dict[str, Any] = {
            "text": describe_view(obs["image"], u.agent_dir, u.mission),
            "mission": u.mission,
            "state": np.concatenate([obs["image"], np.empty((*obs["image"].shape[:2], 2), np.uint8)], axis=2),
        }
        out["state"][..., 3:] = mission_target(u.mission)
        if self.with_image:
            self._image = out["image"] = self._render()
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        with contextlib.redirect_stdout(io.StringIO()):  # BabyAI prints every layout it rejects while sampling
            obs, info = self.env.reset(seed=seed, options=options)
        return self._obs(obs), {**info, "success": False}

    def step(self, action: int):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._obs(obs), reward, terminated, truncated, {**info, "success": bool(terminated and reward > 0)}

    def render(self) -> np.ndarray:
        return self._image if self._image is not None else self._render()

    def expert_action(self) -> int:
        """An optimal next action for the go-to / pick-up / door / key / goal tasks."""
        return minigrid_expert_action(self.env.unwrapped, self.action_set == "macro")


Cell = tuple[int, int]


def _passable(u: MiniGridEnv, x: int, y: int, open_doors: bool) -> bool:
    """Can the agent step onto (x, y)? Closed unlocked doors count when `open_doors` (toggled on the way)."""
    cell = u.grid.get(x, y)
    if cell is None or cell.type in ("goal", "floor"):
        return True
    if cell.type == "door":
        return cell.is_open or (open_doors and not cell.is_locked)
    return False


def _front(pos: Cell, d: int) -> Cell:
    return pos[0] + DIR_TO_VEC[d][0], pos[1] + DIR_TO_VEC[d][1]


def _plan(u: MiniGridEnv, done: Callable[[Cell, int], bool], macro: bool, open_doors: bool) -> int | None:
    """BFS over (position, direction): the first action of a shortest path to a state where `done` holds."""
    start = (tuple(int(v) for v in u.agent_pos), int(u.agent_dir))
    if done(*start):
        return None

    def moves(pos: Cell, d: int):
        if macro:
            for a, turn in enumerate(MACRO_TURNS):
                d2 = (d + turn) % 4
                front = _front(pos, d2)
                yield a, (front if _passable(u, *front, False) else pos, d2)
        else:
            yield u.actions.left, (pos, (d - 1) % 4)
            yield u.actions.right, (pos, (d + 1) % 4)
            front = _front(pos, d)
            if _passable(u, *front, open_doors):
                yield u.actions.forward, (front, d)

    first: dict[tuple[Cell, int], int | None] = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for a, nxt in moves(*state):
            if nxt in first:
                continue
            first[nxt] = a if first[state] is None else first[state]
            if done(*nxt):
                action = first[nxt]
                front = u.front_pos
                cell = u.grid.get(*front)
                if (
                    not macro
                    and action == u.actions.forward
                    and cell is not None
                    and cell.type == "door"
                    and not cell.is_open
                ):
                    return int(u.actions.toggle)  # open the closed door in the way
                return int(action)
            queue.append(nxt)
    raise RuntimeError("The expert found no path in this MiniGrid layout.")


def _find(u: MiniGridEnv, kind: type = WorldObj) -> list[Cell]:
    return [(x, y) for x in range(u.width) for y in range(u.height) if isinstance(u.grid.get(x, y), kind)]


def minigrid_expert_action(u: MiniGridEnv, macro: bool = False) -> int:
    """An optimal next action for the unwrapped MiniGrid / BabyAI env `u` (primitive or macro action set)."""
    act = u.actions
    pickup = 4 if macro else int(act.pickup)

    def face(targets: list[Cell], then: int) -> int:
        """Walk to face one of `targets`, then do `then`."""
        step = _plan(u, lambda p, d: _front(p, d) in targets, macro, open_doors=True)
        return then if step is None else step

    def need_primitive(task: str) -> None:
        if macro:
            raise ValueError(f"{task} needs toggle / drop / done, which the macro action set does not have.")

    if isinstance(u, FetchEnv):
        targets = [p for p in _find(u) if (o := u.grid.get(*p)).type == u.targetType and o.color == u.targetColor]
        return face(targets, pickup)
    if isinstance(u, (GoToDoorEnv, GoToObjectEnv)):
        need_primitive("GoToDoor / GoToObject")
        tx, ty = u.target_pos
        adjacent = [(tx + dx, ty + dy) for dx, dy in DIR_TO_VEC]
        step = _plan(u, lambda p, d: p in adjacent, macro, open_doors=False)
        return int(act.done) if step is None else step
    if isinstance(u, RoomGridLevel) and isinstance(u.instrs, GoToInstr):
        targets = [tuple(int(v) for v in p) for p in u.instrs.desc.obj_poss]
        return face(targets, int(act.done) if not macro else 0)

    # Key, door and goal tasks: fetch the key, unlock the door, then reach the goal or the box.
    doors = [p for p in _find(u, Door) if u.grid.get(*p).is_locked]
    carrying = u.carrying
    if doors:
        need_primitive("Unlocking a door")
        door = u.grid.get(*doors[0])
        if carrying is not None and carrying.type == "key" and carrying.color == door.color:
            return face(doors[:1], int(act.toggle))
        keys = [p for p in _find(u, Key) if u.grid.get(*p).color == door.color]
        return face(keys, pickup)
    if isinstance(u, UnlockEnv):
        return face(_find(u, Door), int(act.toggle))
    if isinstance(u, UnlockPickupEnv):
        if carrying is not None and carrying is not u.obj:
            need_primitive("Dropping the key")
            door_side = {_front(p, d) for p in _find(u, Door) for d in range(4)}

            def free(p: Cell, d: int) -> bool:  # an empty cell to drop the key on, clear of the doorway
                return u.grid.get(*_front(p, d)) is None and _front(p, d) not in door_side

            step = _plan(u, free, macro, open_doors=False)
            return int(act.drop) if step is None else step
        return face([tuple(int(v) for v in u.obj.cur_pos)], pickup)
    goals = _find(u, Goal)
    if goals:
        try:
            step = _plan(u, lambda p, d: p in goals, macro, open_doors=not macro)
        except RuntimeError:  # moving obstacles block every path for now: wait by turning
            return int(act.left)
        return 0 if step is None else step
    raise NotImplementedError(f"No expert for {type(u).__name__}: it knows go-to, pick-up, key / door and goal tasks.")


# ---------------------------------------------------------------------------------------------
# GymCards: NumberLine, EZPoints, Points24, Blackjack
# ---------------------------------------------------------------------------------------------
# The four card games of RL4VLM (Zhai et al. 2024).  NumberLine, EZPoints, Points24 and Blackjack
# follow the paper and its released gym-cards code, with these choices where the rules leave room (or where the
# released code had defects):
#   - All randomness comes from `self.np_random`, so one seed gives one episode (images included).
#   - Formulas are read by a small exact parser (Fractions, + - * / with precedence and parentheses);
#     numbers are binary-operator operands only: no unary minus, no '**', no digit concatenation
#     ('1' then '2' is two numbers side by side, an invalid formula, never twelve).
#   - A number the hand does not hold (or holds fewer times than the formula already uses it) is
#     refused: reward -1, formula unchanged, episode goes on.  A token that would make the formula
#     longer than its limit (5 for EZPoints, 20 for Points24) gives -1 and truncates.
#   - Step limits, so that repeated refused numbers still end an episode: 10 steps for NumberLine
#     (as released), 20 for EZPoints (4 x its token limit), 40 for Points24 (2 x its token limit);
#     hitting one truncates.  Blackjack always ends on its own (every hit raises the total).
#   - `reset(options=...)` can fix a hand for tests and demos: NumberLine {"target", "current"},
#     EZPoints / Points24 {"ranks": [1..13, ...]}, Blackjack {"player", "dealer", "next_cards"} (ranks;
#     "next_cards" are dealt, in order, before random cards).
# Card ranks are 1 (A) .. 13 (K); J, Q and K count 10, an ace 1 (11 when usable in Blackjack).
CARD_RANK_NAMES = ["", "A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]  # index = rank
CARD_FELT = (53, 101, 77)  # gym-cards' table green, #35654d
CARD_NUMBER_TOKENS = [str(n) for n in range(1, 11)]
FORMULA_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def card_value(rank: int) -> int:
    """Points of a card: A = 1, 2..10 at face value, J / Q / K = 10."""
    return min(rank, 10)


def _card_list(names: list[str]) -> str:
    """'3 and K', 'A, 5, 10 and Q'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _card_value_note(ranks: list[int]) -> str:
    """' (A counts as 1; J and K count as 10)' for the aces and face cards among `ranks`, else ''."""
    notes = []
    if 1 in ranks:
        notes.append("A counts as 1")
    faces = [CARD_RANK_NAMES[r] for r in (11, 12, 13) if r in ranks]
    if faces:
        notes.append(f"{_card_list(faces)} count{'s' if len(faces) == 1 else ''} as 10")
    return f" ({'; '.join(notes)})" if notes else ""


# --- exact formula arithmetic -----------------------------------------------------------------
# A parse state is (values, operators, expecting_operand): a shunting-yard stack of Fractions and of
# pending operators / open parentheses, reduced eagerly, so equal partial formulas share one state.
def _formula_apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b  # division by zero: an invalid formula


def _formula_reduce(vals: tuple, ops: tuple) -> tuple[tuple, tuple] | None:
    result = _formula_apply(ops[-1], vals[-2], vals[-1])
    return None if result is None else (vals[:-2] + (result,), ops[:-1])


def _formula_feed(state: tuple, token: str) -> tuple | None:
    """The parse state after one more token, or None when the formula can no longer be valid."""
    vals, ops, expect_operand = state
    if token.isdigit():
        return (vals + (Fraction(int(token)),), ops, False) if expect_operand else None
    if token == "(":
        return (vals, ops + ("(",), True) if expect_operand else None
    if expect_operand:  # an operator or ')' where a number belongs
        return None
    if token == ")":
        if "(" not in ops:
            return None
        while ops[-1] != "(":
            reduced = _formula_reduce(vals, ops)
            if reduced is None:
                return None
            vals, ops = reduced
        return vals, ops[:-1], False
    if token not in FORMULA_PRECEDENCE:
        return None
    while ops and ops[-1] != "(" and FORMULA_PRECEDENCE[ops[-1]] >= FORMULA_PRECEDENCE[token]:
        reduced = _formula_reduce(vals, ops)
        if reduced is None:
            return None
        vals, ops = reduced
    return vals, ops + (token,), True


def _formula_finish(state: tuple | None) -> Fraction | None:
    """The value of a complete formula, or None when it is incomplete or invalid."""
    if state is None:
        return None
    vals, ops, expect_operand = state
    if expect_operand or "(" in ops:
        return None
    while ops:
        reduced = _formula_reduce(vals, ops)
        if reduced is None:
            return None
        vals, ops = reduced
    return vals[0]


def _formula_parse(tokens: list[str]) -> tuple | None:
    state: tuple | None = ((), (), True)
    for token in tokens:
        state = _formula_feed(state, token)
        if state is None:
            return None
    return state


def evaluate_formula(tokens: list[str]) -> Fraction | None:
    """Exact value of a token list such as ['8', '/', '(', '3', '-', '8', '/', '3', ')'], None if invalid."""
    return _formula_finish(_formula_parse(tokens))


def _submultisets(items: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every way to split a sorted multiset into (part, rest), each part once."""
    seen: dict[tuple[int, ...], tuple[int, ...]] = {}
    for mask in range(1 << len(items)):
        part = tuple(v for i, v in enumerate(items) if mask >> i & 1)
        seen.setdefault(part, tuple(v for i, v in enumerate(items) if not mask >> i & 1))
    return list(seen.items())


@functools.lru_cache(maxsize=8192)
def _formula_values(numbers: tuple[int, ...], operators: str) -> frozenset:
    """Every value of an expression (any tree, parentheses as needed) using each of `numbers` once."""
    if len(numbers) == 1:
        return frozenset([Fraction(numbers[0])])
    out: set[Fraction] = set()
    for part, rest in _submultisets(numbers):
        if not part or not rest or part > rest:
            continue  # each unordered split once; both operand orders are tried below
        for x in _formula_values(part, operators):
            for y in _formula_values(rest, operators):
                for op in operators:
                    for a, b in ((x, y), (y, x)) if op in "-/" else ((x, y),):
                        value = _formula_apply(op, a, b)
                        if value is not None:
                            out.add(value)
    return frozenset(out)


def _formula_level_values(vals: tuple, ops: tuple, numbers: tuple[int, ...], operators: str) -> set:
    """Values a parenthesis level can end with: it holds `vals` / `ops` (no '(') and waits for an
    operand; the rest of the level uses exactly `numbers` (non-empty), parentheses allowed."""
    mul = bool(ops) and ops[-1] in "*/"
    if not mul:  # "" or "A +": the rest is one expression x
        return (
            set(_formula_values(numbers, operators))
            if not ops
            else {
                v for x in _formula_values(numbers, operators) if (v := _formula_apply(ops[0], vals[0], x)) is not None
            }
        )
    m, mop = vals[-1], ops[-1]  # "M *" or "A + M *": the term goes on with x, then maybe +/- y
    head = (vals[0], ops[0]) if len(ops) == 2 else None
    out: set[Fraction] = set()
    for part, rest in _submultisets(numbers):
        if not part:
            continue
        ys = _formula_values(rest, operators) if rest else ()
        for x in _formula_values(part, operators):
            term = _formula_apply(mop, m, x)
            if term is None:
                continue
            base = term if head is None else _formula_apply(head[1], head[0], term)
            if not rest:
                out.add(base)
                continue
            for y in ys:
                if "+" in operators:
                    out.add(base + y)
                if "-" in operators:
                    out.add(base - y)
    return out


def _formula_level_after(vals: tuple, ops: tuple, operands: set, numbers: tuple[int, ...], operators: str) -> set:
    """Values a level can end with when its next operand is any of `operands` (a value or a closed
    parenthesis) and the rest of the level uses exactly `numbers` (maybe none)."""
    out: set[Fraction] = set()
    for w in operands:
        if not numbers:
            value = _formula_finish((vals + (w,), ops, False))
            if value is not None:
                out.add(value)
            continue
        for op in operators:
            nxt = _formula_feed((vals + (w,), ops, False), op)
            if nxt is not None:
                out |= _formula_level_values(nxt[0], nxt[1], numbers, operators)
    return out


@functools.lru_cache(maxsize=1 << 15)
def _formula_feasible(state: tuple, remaining: tuple[int, ...], target: int, operators: str) -> bool:
    """Can the partial formula `state` be completed (no length limit, parentheses allowed) into one
    equal to `target` that uses exactly the `remaining` numbers?  Exact value sets, level by level."""
    vals, ops, expect_operand = state
    levels: list[list] = [[]]
    for op in ops:
        if op == "(":
            levels.append([])
        else:
            levels[-1].append(op)
    level_vals, i = [], 0
    for k, level_ops in enumerate(levels):
        n = len(level_ops) + (1 if k == len(levels) - 1 and not expect_operand else 0)
        level_vals.append(vals[i : i + n])
        i += n
    inner_vals, inner_ops = level_vals[-1], tuple(levels[-1])
    table: dict[tuple[int, ...], set] = {}
    for part, _ in _submultisets(remaining):
        if len(levels) == 1 and len(part) != len(remaining):
            continue  # the outermost level must use every remaining number
        if expect_operand:
            table[part] = _formula_level_values(inner_vals, inner_ops, part, operators) if part else set()
        else:
            table[part] = _formula_level_after(inner_vals[:-1], inner_ops, {inner_vals[-1]}, part, operators)
    for k in range(len(levels) - 2, -1, -1):
        new: dict[tuple[int, ...], set] = {}
        for used, operands in table.items():
            if not operands:
                continue
            left = list(remaining)
            for v in used:
                left.remove(v)
            for part, _ in _submultisets(tuple(left)):
                if k == 0 and len(part) != len(left):
                    continue
                key = tuple(sorted(used + part))
                new.setdefault(key, set()).update(
                    _formula_level_after(level_vals[k], tuple(levels[k]), operands, part, operators)
                )
        table = new
    return target in table.get(remaining, ())


@functools.lru_cache(maxsize=1 << 16)
def _formula_complete(
    state: tuple, remaining: tuple[int, ...], budget: int, target: int, operators: str, parens: bool
) -> tuple[str, ...] | None:
    """Tokens that turn the partial formula `state` into one equal to `target` using exactly the
    `remaining` numbers (sorted), in at most `budget` more tokens; () when it already is; None if none.
    A depth-first search over tokens, pruned by length and by the exact value sets of
    `_formula_feasible`, so it seldom backtracks."""
    _, ops, expect_operand = state
    n, n_open = len(remaining), ops.count("(")
    if expect_operand and n == 0:
        return None
    needed = (2 * n - 1 if expect_operand else 2 * n) + n_open
    if needed > budget:
        return None
    if not expect_operand and n == 0 and n_open == 0:
        return () if _formula_finish(state) == target else None
    if not _formula_feasible(state, remaining, target, operators):
        return None
    moves: list[tuple[str, tuple[int, ...]]] = []
    if expect_operand:
        for i, v in enumerate(remaining):
            if i == 0 or v != remaining[i - 1]:
                moves.append((str(v), remaining[:i] + remaining[i + 1 :]))
        if parens and n >= 2 and needed + 2 <= budget:  # a new '(' must enclose an operation
            moves.append(("(", remaining))
    else:
        if n:
            moves += [(op, remaining) for op in operators]
        if n_open:
            moves.append((")", remaining))
    for token, rest in moves:
        nxt = _formula_feed(state, token)
        if nxt is None:
            continue
        tail = _formula_complete(nxt, rest, budget - 1, target, operators, parens)
        if tail is not None:
            return (token,) + tail
    return None


def formula_solvable(values: list[int], target: int, operators: str) -> bool:
    """Does some expression (parentheses allowed) use each of `values` once and equal `target`?"""
    return Fraction(target) in _formula_values(tuple(sorted(values)), operators)


def solve_formula(
    values: list[int], prefix: list[str], target: int, operators: str, parens: bool, max_tokens: int
) -> list[str] | None:
    """A completion of `prefix` into a formula of at most `max_tokens` tokens that uses each of
    `values` exactly once and equals `target` ([] if `prefix` already is one), or None if none exists."""
    remaining = list(values)
    for token in prefix:
        if token.isdigit():
            if int(token) not in remaining:
                return None
            remaining.remove(int(token))
    state = _formula_parse(prefix)
    if state is None:
        return None
    tail = _formula_complete(state, tuple(sorted(remaining)), max_tokens - len(prefix), target, operators, parens)
    return None if tail is None else list(tail)


def formula_text(tokens: list[str]) -> str:
    """Tokens joined as written ('3+10'), with a space only between two adjacent numbers ('1 2')."""
    out = ""
    for i, token in enumerate(tokens):
        if i and token.isdigit() and tokens[i - 1].isdigit():
            out += " "
        out += token
    return out


# --- drawing ----------------------------------------------------------------------------------
_CARD_FONTS: dict[int, ImageFont.FreeTypeFont] = {}
_CARD_SPRITES: dict[tuple[int, int, int, int], np.ndarray] = {}


def _card_font(size: float) -> ImageFont.FreeTypeFont:
    size = max(6, round(size))
    if size not in _CARD_FONTS:
        _CARD_FONTS[size] = ImageFont.load_default(size=size)
    return _CARD_FONTS[size]


def _draw_suit(draw: ImageDraw.ImageDraw, suit: int, cx: float, cy: float, r: float, color: tuple) -> None:
    """Suit 0 clubs, 1 diamonds, 2 hearts, 3 spades, drawn as shapes of radius about `r`."""

    def disc(x: float, y: float, rad: float) -> None:
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=color)

    if suit == 1:
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=color)
    elif suit == 2:
        disc(cx - 0.5 * r, cy - 0.3 * r, 0.52 * r)
        disc(cx + 0.5 * r, cy - 0.3 * r, 0.52 * r)
        draw.polygon([(cx - r, cy - 0.15 * r), (cx + r, cy - 0.15 * r), (cx, cy + r)], fill=color)
    elif suit == 3:
        disc(cx - 0.5 * r, cy + 0.2 * r, 0.5 * r)
        disc(cx + 0.5 * r, cy + 0.2 * r, 0.5 * r)
        draw.polygon([(cx - r, cy + 0.1 * r), (cx + r, cy + 0.1 * r), (cx, cy - r)], fill=color)
        draw.polygon([(cx, cy + 0.2 * r), (cx - 0.35 * r, cy + r), (cx + 0.35 * r, cy + r)], fill=color)
    else:
        disc(cx, cy - 0.45 * r, 0.42 * r)
        disc(cx - 0.47 * r, cy + 0.15 * r, 0.42 * r)
        disc(cx + 0.47 * r, cy + 0.15 * r, 0.42 * r)
        draw.polygon([(cx, cy), (cx - 0.35 * r, cy + r), (cx + 0.35 * r, cy + r)], fill=color)


def card_sprite(rank: int, suit: int, width: int, height: int) -> np.ndarray:
    """A face-up card (rank 1..13, suit 0..3), or the back of a card for rank 0, as a height x width x 3
    uint8 array on the table green; cached per size."""
    key = (rank, suit, width, height)
    if key in _CARD_SPRITES:
        return _CARD_SPRITES[key]
    img = Image.new("RGB", (width, height), CARD_FELT)
    draw = ImageDraw.Draw(img)
    radius = max(2, width // 12)
    if rank == 0:
        draw.rounded_rectangle([0, 0, width - 1, height - 1], radius, fill=(245, 245, 245), outline=(60, 60, 60))
        m = max(2, width // 10)
        draw.rounded_rectangle([m, m, width - 1 - m, height - 1 - m], max(1, radius // 2), fill=(40, 70, 160))
        step = max(4, width // 6)
        for k in range(-height, width + height, step):  # diagonal lattice
            draw.line([(k, m), (k + height, m + height)], fill=(90, 120, 200), width=1)
            draw.line([(k, m + height), (k + height, m)], fill=(90, 120, 200), width=1)
        draw.rectangle([0, 0, width - 1, m - 1], fill=(245, 245, 245))
        draw.rectangle([0, height - m, width - 1, height - 1], fill=(245, 245, 245))
        draw.rectangle([0, 0, m - 1, height - 1], fill=(245, 245, 245))
        draw.rectangle([width - m, 0, width - 1, height - 1], fill=(245, 245, 245))
        draw.rounded_rectangle([0, 0, width - 1, height - 1], radius, outline=(60, 60, 60))
    else:
        color = (200, 20, 30) if suit in (1, 2) else (20, 20, 20)
        draw.rounded_rectangle(
            [0, 0, width - 1, height - 1], radius, fill=(255, 255, 255), outline=(60, 60, 60), width=max(1, width // 60)
        )
        name = CARD_RANK_NAMES[rank]
        corner = _card_font(0.2 * width)
        draw.text((0.06 * width, 0.04 * height), name, fill=color, font=corner)
        _draw_suit(draw, suit, 0.06 * width + 0.09 * width, 0.04 * height + 0.27 * width, 0.08 * width, color)
        if rank > 10:  # a frame marks the face cards
            draw.rectangle(
                [0.24 * width, 0.22 * height, 0.76 * width, 0.84 * height], outline=color, width=max(1, width // 40)
            )
        big = _card_font((0.36 if len(name) > 1 else 0.46) * width)
        draw.text((0.5 * width, 0.48 * height), name, fill=color, font=big, anchor="mm")
        _draw_suit(draw, suit, 0.5 * width, 0.7 * height, 0.09 * width, color)
    _CARD_SPRITES[key] = np.array(img)
    return _CARD_SPRITES[key]


_TEXT_MASKS: dict[tuple[str, int], np.ndarray] = {}


def _text_mask(text: str, size: int) -> np.ndarray:
    """Coverage (0..1, float32, H x W x 1) of `text` in the default font, baseline at the font's
    ascent, so masks of one size line up; cached, for cheap per-step text."""
    key = (text, size)
    if key not in _TEXT_MASKS:
        font = _card_font(size)
        ascent, descent = font.getmetrics()
        img = Image.new("L", (max(1, int(np.ceil(font.getlength(text)))), ascent + descent), 0)
        ImageDraw.Draw(img).text((0, ascent), text, fill=255, font=font, anchor="ls")
        _TEXT_MASKS[key] = (np.asarray(img, np.float32) / 255.0)[..., None]
    return _TEXT_MASKS[key]


_FELT_TABLES: dict[int, np.ndarray] = {}


def _felt(size: int) -> np.ndarray:
    """A fresh size x size table-green image (copied from a cached one: filling is slow in numpy)."""
    if size not in _FELT_TABLES:
        _FELT_TABLES[size] = np.array(Image.new("RGB", (size, size), CARD_FELT))
    return _FELT_TABLES[size].copy()


def _place(image: np.ndarray, sprite: np.ndarray, x: int, y: int) -> None:
    """Copy `sprite` into `image` with its top left at (x, y), clipped to the image."""
    h, w = min(sprite.shape[0], image.shape[0] - y), min(sprite.shape[1], image.shape[1] - x)
    if h > 0 and w > 0:
        image[y : y + h, x : x + w] = sprite[:h, :w]


def _blit_text(image: np.ndarray, mask: np.ndarray, x: int, y: int, color: tuple) -> None:
    """Blend `color` into `image` (H x W x 3 uint8) through `mask`, top left at (x, y), clipped."""
    h = min(mask.shape[0], image.shape[0] - y)
    w = min(mask.shape[1], image.shape[1] - x)
    if h <= 0 or w <= 0:
        return
    region = image[y : y + h, x : x + w]
    alpha = mask[:h, :w]
    region[:] = (region * (1.0 - alpha) + np.asarray(color, np.float32) * alpha + 0.5).astype(np.uint8)


# --- the envs ---------------------------------------------------------------------------------
class _CardTableEnv(gym.Env):
    """Shared plumbing: the dict observation, the action words, render() and the image toggle."""

    metadata = {"render_modes": ["rgb_array"]}
    render_mode = "rgb_array"
    mission = ""

    def __init__(self, action_names: list[str], state_space: gym.spaces.Box, image_size: int, with_image: bool):
        self.action_names = list(action_names)
        self.action_space = gym.spaces.Discrete(len(self.action_names))
        self.image_size = int(image_size)
        self.with_image = bool(with_image)
        self.observation_space = obs_space((self.image_size, self.image_size, 3) if with_image else None, state_space)
        self.success = False
        self._started = False
        self._image: np.ndarray | None = None

    def _check_action(self, action) -> int:
        a = int(action)
        if not 0 <= a < len(self.action_names):
            raise ValueError(f"Action {action!r} is outside 0..{len(self.action_names) - 1}.")
        return a

    def _obs(self) -> dict:
        obs = {"text": self.describe(), "mission": self.mission, "state": self._state()}
        if self.with_image:
            self._image = obs["image"] = self._draw()
        return obs

    def render(self) -> np.ndarray:
        if not self._started:
            return np.zeros((self.image_size, self.image_size, 3), np.uint8)
        if self.with_image and self._image is not None:
            return self._image
        return self._draw()

    def describe(self) -> str:
        raise NotImplementedError

    def _state(self) -> np.ndarray:
        raise NotImplementedError

    def _draw(self) -> np.ndarray:
        raise NotImplementedError


class NumberLineEnv(_CardTableEnv):
    """Move the current number (0..5) to the target with '-' / '+'.

    Rewards: +1 and terminate on reaching the target; -1 when the distance did not shrink (pushing
    against 0 or 5 included); 0 otherwise.  Truncated after 10 steps.  State: [target, current].
    """

    max_position = 5
    max_steps = 10
    mission = "move the current number to the target number by adding or subtracting one"

    def __init__(self, image_size: int = 300, with_image: bool = True):
        super().__init__(["-", "+"], gym.spaces.Box(0, self.max_position, (2,), np.int64), image_size, with_image)
        self.target = self.current = self.steps = 0
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        start = int(self.np_random.integers(0, self.max_position + 1))
        target = int(self.np_random.integers(0, self.max_position))
        target += target >= start  # uniform over the other positions
        self.current = int(options.get("current", start))
        self.target = int(options.get("target", target))
        self.steps, self.success, self._started = 0, False, True
        return self._obs(), self._info()

    def step(self, action):
        a = self._check_action(action)
        self.steps += 1
        before = abs(self.target - self.current)
        self.current = min(self.max_position, max(0, self.current + (1 if a == 1 else -1)))
        after = abs(self.target - self.current)
        terminated = after == 0
        self.success = self.success or terminated
        reward = 1.0 if terminated else (-1.0 if after >= before else 0.0)
        truncated = not terminated and self.steps >= self.max_steps
        return self._obs(), reward, terminated, truncated, self._info()

    def _info(self) -> dict:
        return {"success": self.success, "target": self.target, "current": self.current}

    def _state(self) -> np.ndarray:
        return np.array([self.target, self.current], np.int64)

    def describe(self) -> str:
        text = f"The target number is {self.target} and the current number is {self.current}."
        if self.current == self.target:
            text += " You reached the target."
        return text

    def _draw(self) -> np.ndarray:
        key = (self.target, self.current)
        if key not in self._cache:
            s = self.image_size
            img = Image.new("RGB", (s, s), "white")
            draw = ImageDraw.Draw(img)
            font = _card_font(0.12 * s)
            draw.text((0.1 * s, 0.2 * s), f"Target: {self.target}", fill="black", font=font)
            draw.text((0.1 * s, 0.6 * s), f"Current: {self.current}", fill="black", font=font)
            self._cache[key] = np.array(img)
        return self._cache[key].copy()

    def expert_action(self) -> int:
        return 1 if self.target > self.current else 0


class _FormulaCardEnv(_CardTableEnv):
    """Write a formula over the cards, one token per step, then '='; see EZPointsEnv / Points24Env."""

    target = 0
    n_cards = 0
    operators = ""
    parens = False
    max_tokens = 0
    max_steps = 0
    card_width = 0.0  # fraction of the image side
    formula_top = 0.0

    def __init__(self, image_size: int, with_image: bool):
        names = CARD_NUMBER_TOKENS + list(self.operators) + (["(", ")"] if self.parens else []) + ["="]
        state_space = gym.spaces.Box(0, len(names), (self.n_cards + self.max_tokens,), np.int64)
        super().__init__(names, state_space, image_size, with_image)
        self.ranks: list[int] = []
        self.suits: list[int] = []
        self.values: list[int] = []
        self.formula: list[str] = []
        self.steps = 0
        self.submitted = False
        self._table: np.ndarray | None = None

    def _deal(self) -> list[int]:
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        ranks = self._deal()
        if options and "ranks" in options:
            ranks = [int(r) for r in options["ranks"]]
            if len(ranks) != self.n_cards or not all(1 <= r <= 13 for r in ranks):
                raise ValueError(f"options['ranks'] must hold {self.n_cards} ranks in 1..13.")
        self.ranks = ranks
        self.suits = [int(s) for s in self.np_random.integers(0, 4, self.n_cards)]
        self.values = [card_value(r) for r in ranks]
        self.formula, self.steps, self.submitted, self.success, self._started = [], 0, False, False, True
        self._table = self._draw_table() if self.with_image else None
        return self._obs(), self._info()

    def _numbers_used(self) -> list[int]:
        return [int(t) for t in self.formula if t.isdigit()]

    def is_correct(self) -> bool:
        """Does the formula use every card exactly once and equal the target?"""
        return sorted(self._numbers_used()) == sorted(self.values) and evaluate_formula(self.formula) == self.target

    def step(self, action):
        token = self.action_names[self._check_action(action)]
        self.steps += 1
        reward, terminated, truncated = 0.0, False, False
        if token == "=":
            terminated, self.submitted = True, True
            self.success = self.is_correct()
            reward = 10.0 if self.success else -1.0
        elif token.isdigit() and self._numbers_used().count(int(token)) >= self.values.count(int(token)):
            reward = -1.0  # a card the hand does not hold (or not that many times): refused
        elif len(self.formula) >= self.max_tokens:
            reward, truncated = -1.0, True  # the formula would grow past its limit
        else:
            self.formula.append(token)
        if not terminated and self.steps >= self.max_steps:
            truncated = True
        return self._obs(), reward, terminated, truncated, self._info()

    def _info(self) -> dict:
        return {
            "success": self.success,
            "cards": [CARD_RANK_NAMES[r] for r in self.ranks],
            "numbers": list(self.values),
            "formula": formula_text(self.formula),
        }

    def _state(self) -> np.ndarray:
        state = np.zeros(self.n_cards + self.max_tokens, np.int64)
        state[: self.n_cards] = self.values
        state[self.n_cards : self.n_cards + len(self.formula)] = [self.action_names.index(t) + 1 for t in self.formula]
        return state

    def describe(self) -> str:
        text = f"Your cards are {_card_list([CARD_RANK_NAMES[r] for r in self.ranks])}{_card_value_note(self.ranks)}."
        formula = f"'{formula_text(self.formula)}'" if self.formula else "empty"
        text += f" The current formula is {formula}."
        if self.submitted:
            text += " You submitted it: it is correct." if self.success else " You submitted it: it is not correct."
        return text

    def _draw_table(self) -> np.ndarray:
        """The cards and the 'Formula:' label: drawn once per episode."""
        s = self.image_size
        table = _felt(s)
        w = max(8, int(self.card_width * s))
        h = round(w * 1.4)
        gap = (s - self.n_cards * w) / (self.n_cards + 1)
        for i, (rank, suit) in enumerate(zip(self.ranks, self.suits, strict=True)):
            _place(table, card_sprite(rank, suit, w, h), int(gap + i * (w + gap)), int(0.07 * s))
        _blit_text(
            table, _text_mask("Formula:", self._font_size()), int(0.05 * s), int(self.formula_top * s), (255, 255, 255)
        )
        return table

    def _font_size(self) -> int:
        return max(6, round(0.075 * self.image_size))

    def _draw(self) -> np.ndarray:
        """The table with the formula, token by token from cached glyph masks, wrapped at the right edge."""
        s, size = self.image_size, self._font_size()
        img = (self._table if self._table is not None else self._draw_table()).copy()
        left = int(0.05 * s)
        x, y = left + _text_mask("Formula: ", size).shape[1], int(self.formula_top * s)
        for i, token in enumerate(self.formula):
            if i and token.isdigit() and self.formula[i - 1].isdigit():
                x += _text_mask(" ", size).shape[1]
            mask = _text_mask(token, size)
            if x + mask.shape[1] > s - left:
                x, y = left, y + int(0.1 * s)
            _blit_text(img, mask, x, y, (255, 255, 255))
            x += mask.shape[1]
        return img

    def solvable(self) -> bool:
        """Can the hand make the target at all (any expression tree)?"""
        return formula_solvable(self.values, self.target, self.operators)

    def expert_action(self) -> int:
        """The next token of a correct formula that extends the current one, else '='."""
        tail = solve_formula(self.values, self.formula, self.target, self.operators, self.parens, self.max_tokens)
        return self.action_names.index(tail[0] if tail else "=")


class EZPointsEnv(_FormulaCardEnv):
    """Two cards, + and *, target 12; every hand is solvable.

    Actions '1'..'10', '+', '*', '=' (13).  Appending a number the hand does not hold: -1, formula
    unchanged.  A 6th token: -1 and truncate.  '=': +10 if the formula equals 12 and uses both cards
    once each, else -1; terminate.  Truncated after 20 steps.  State: [card values] + formula tokens
    (action index + 1, padded with 0 to 5).
    Hands as in gym-cards: a first card of rank 2..13; the second makes 12 with it, by * (half the time
    when the first is worth 2, 3, 4 or 6) or else by +, and is never a face card; random order.
    """

    target = 12
    n_cards = 2
    operators = "+*"
    parens = False
    max_tokens = 5
    max_steps = 20
    card_width = 0.36
    formula_top = 0.72
    mission = "use both cards and + or * to write a formula equal to 12, then choose '='"

    def __init__(self, image_size: int = 300, with_image: bool = True):
        super().__init__(image_size, with_image)

    def _deal(self) -> list[int]:
        first = int(self.np_random.integers(2, 14))
        value = card_value(first)
        by_product = self.np_random.random() < 0.5
        second = 12 // value if value in (2, 3, 4, 6) and by_product else 12 - value
        return [second, first] if self.np_random.random() < 0.5 else [first, second]


class Points24Env(_FormulaCardEnv):
    """Four cards (A..K, J / Q / K count 10; not every hand is solvable), + - * / ( ), target 24.

    Actions '1'..'10', '+', '-', '*', '/', '(', ')', '=' (17).  Same rules as EZPoints with a 20-token
    formula limit and a 40-step limit.  State: [4 card values] + formula tokens (padded to 20).
    """

    target = 24
    n_cards = 4
    operators = "+-*/"
    parens = True
    max_tokens = 20
    max_steps = 40
    card_width = 0.2
    formula_top = 0.47
    mission = (
        "use all four cards once each with + - * / and parentheses to write a formula equal to 24, then choose '='"
    )

    def __init__(self, image_size: int = 300, with_image: bool = True):
        super().__init__(image_size, with_image)

    def _deal(self) -> list[int]:
        return [int(r) for r in self.np_random.integers(1, 14, self.n_cards)]


def blackjack_total(ranks: list[int]) -> tuple[int, bool]:
    """(total, usable ace) of a hand: an ace counts 11 when that does not bust it."""
    total = sum(card_value(r) for r in ranks)
    usable = 1 in ranks and total + 10 <= 21
    return total + 10 * usable, usable


class BlackjackEnv(_CardTableEnv):
    """Gymnasium's Blackjack-v1 (natural=False, sab=False) with cards drawn from `self.np_random`.

    Infinite deck; J / Q / K count 10; an ace 1 or 11.  Actions 'stand' (0) / 'hit' (1).  Hit: a card;
    over 21 is a bust (-1, terminate), else 0.  Stand: the dealer reveals the hole card and draws while
    below 17 (a soft 17 stands), then +1 / 0 / -1 by who is closer to 21 (a dealer bust loses); terminate.
    State: [player total, dealer's showing card value (ace 1), usable ace].  The image and the text show the
    cards and no totals, as RL4VLM's do: reading the cards and adding them up is the task.
    """

    mission = (
        "beat the dealer: get a card total closer to 21 than the dealer's without going over 21 "
        "(J, Q and K count as 10, an ace as 1 or 11)"
    )

    def __init__(self, image_size: int = 300, with_image: bool = True):
        super().__init__(["stand", "hit"], gym.spaces.Box(0, 31, (3,), np.int64), image_size, with_image)
        self.player: list[tuple[int, int]] = []  # (rank, suit)
        self.dealer: list[tuple[int, int]] = []
        self.done = False
        self.outcome = ""
        self._next_ranks: list[int] = []

    def _draw_card(self) -> tuple[int, int]:
        rank = self._next_ranks.pop(0) if self._next_ranks else int(self.np_random.integers(1, 14))
        return int(rank), int(self.np_random.integers(0, 4))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        self._next_ranks = []
        self.dealer = [self._draw_card(), self._draw_card()]
        self.player = [self._draw_card(), self._draw_card()]
        for key in ("dealer", "player"):
            if key in options:
                setattr(self, key, [(int(r), int(self.np_random.integers(0, 4))) for r in options[key]])
        self._next_ranks = [int(r) for r in options.get("next_cards", [])]
        self.done, self.outcome, self.success, self._started = False, "", False, True
        return self._obs(), self._info()

    def _ranks(self, hand: list[tuple[int, int]]) -> list[int]:
        return [r for r, _ in hand]

    def step(self, action):
        a = self._check_action(action)
        if a == 1:
            self.player.append(self._draw_card())
            total, _ = blackjack_total(self._ranks(self.player))
            terminated = total > 21
            reward = -1.0 if terminated else 0.0
            if terminated:
                self.outcome = "bust"
        else:
            terminated = True
            while blackjack_total(self._ranks(self.dealer))[0] < 17:
                self.dealer.append(self._draw_card())
            mine, theirs = (blackjack_total(self._ranks(h))[0] for h in (self.player, self.dealer))
            mine, theirs = (0 if t > 21 else t for t in (mine, theirs))
            reward = float((mine > theirs) - (mine < theirs))
            self.outcome = {1.0: "win", 0.0: "draw", -1.0: "lose"}[reward]
        self.done = self.done or terminated
        self.success = reward > 0
        return self._obs(), reward, terminated, False, self._info()

    def _info(self) -> dict:
        return {
            "success": self.success,
            "player": [CARD_RANK_NAMES[r] for r in self._ranks(self.player)],
            "dealer": [CARD_RANK_NAMES[r] for r in self._ranks(self.dealer)],
        }

    def _state(self) -> np.ndarray:
        total, usable = blackjack_total(self._ranks(self.player))
        return np.array([total, card_value(self.dealer[0][0]), int(usable)], np.int64)

    def describe(self) -> str:
        """The cards, as RL4VLM's text observation gives them: adding them up is left to the agent."""
        text = f"Your cards are {_card_list([CARD_RANK_NAMES[r] for r in self._ranks(self.player)])}."
        dealer_ranks = self._ranks(self.dealer)
        if self.done:
            text += " You went bust." if self.outcome == "bust" else " You stood."
            text += f" The dealer's cards are {_card_list([CARD_RANK_NAMES[r] for r in dealer_ranks])}."
            text += " The dealer went bust." if blackjack_total(dealer_ranks)[0] > 21 else ""
            text += {"win": " You win.", "draw": " It is a draw."}.get(self.outcome, " You lose.")
        else:
            text += f" The dealer shows {CARD_RANK_NAMES[dealer_ranks[0]]}."
        return text

    def _draw(self) -> np.ndarray:
        """RL4VLM's table: 'Dealer' over the dealer's cards (the hole card face down until the player stands),
        'Player' over the player's cards, no totals; once the game is over, its result."""
        s = self.image_size
        img = _felt(s)
        size = max(6, round(0.06 * s))
        w = max(8, int(0.2 * s))
        h = round(w * 1.4)
        dealer_cards = self.dealer if self.done else [self.dealer[0], (0, 0)]  # (0, 0): the hole card's back
        for label, cards, top in [("Dealer", dealer_cards, 0.02), ("Player", self.player, 0.48)]:
            _blit_text(img, _text_mask(label, size), int(0.03 * s), int(top * s), (255, 255, 255))
            x_step = min(w + 0.02 * s, (0.94 * s - w) / max(1, len(cards) - 1))
            for i, (rank, suit) in enumerate(cards):
                _place(img, card_sprite(rank, suit, w, h), int(0.03 * s + i * x_step), int((top + 0.08) * s))
        if self.outcome:
            result = {"bust": "Bust: you lose", "win": "You win", "draw": "Draw", "lose": "You lose"}[self.outcome]
            _blit_text(img, _text_mask(result, size), int(0.03 * s), int(0.9 * s), (255, 255, 255))
        return img

    def expert_action(self) -> int:
        """Basic strategy: hit below 12; hit a soft total up to 17; stand on hard 17+; with a hard
        12..16, stand when the dealer shows 2..6, else hit."""
        total, usable = blackjack_total(self._ranks(self.player))
        dealer = card_value(self.dealer[0][0])
        if total < 12:
            return 1
        if usable:
            return 1 if total <= 17 else 0
        if total >= 17:
            return 0
        return 0 if 2 <= dealer <= 6 else 1
