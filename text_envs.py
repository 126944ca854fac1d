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
import io
import string
from collections import deque
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import minigrid  # noqa: F401  (registers the MiniGrid and BabyAI ids)
import numpy as np
from gymnasium.envs.toy_text.frozen_lake import generate_random_map
from gymnasium.vector.utils import create_shared_memory
from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT
from minigrid.core.grid import Grid
from minigrid.core.world_object import Door, Goal, Key, WorldObj
from minigrid.envs import FetchEnv, GoToDoorEnv, GoToObjectEnv, UnlockEnv, UnlockPickupEnv
from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel
from minigrid.envs.babyai.core.verifier import GoToInstr
from minigrid.minigrid_env import MiniGridEnv

from text_envs_cards import BlackjackEnv, EZPointsEnv, NumberLineEnv, Points24Env

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
CARD_ENVS = {"NumberLine": NumberLineEnv, "EZPoints": EZPointsEnv, "Points24": Points24Env, "Blackjack": BlackjackEnv}
SHORT_IDS = ["FrozenLake8x8", *GRID_ENVS, *CARD_ENVS]
DEFAULT_IMAGE_SIZE = 256
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
        base = gym.make("FrozenLake-v1", desc=generate_random_map(size=8, seed=seed), is_slippery=False,
                        max_episode_steps=100, **kwargs)
        env: gym.Env = FrozenLakeText(base, image_size or DEFAULT_IMAGE_SIZE, with_image)
    elif env_id.startswith("FrozenLake") and env_id in gym.registry:
        env = FrozenLakeText(gym.make(env_id, **kwargs), image_size or DEFAULT_IMAGE_SIZE, with_image)
    elif full_id.startswith(("MiniGrid-", "BabyAI-")) and full_id in gym.registry:
        base = gym.make(full_id, **kwargs)
        if action_set == "macro":
            base = MacroActions(base)
        env = MiniGridText(base, image_size or DEFAULT_IMAGE_SIZE, with_image, action_set)
    elif env_id in CARD_ENVS:
        env = CARD_ENVS[env_id](**({"image_size": image_size} if image_size else {}), with_image=with_image, **kwargs)
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
    """Uses the seed given to `make_env` for the first reset (and the action space), so one call reproduces."""

    def __init__(self, env: gym.Env, seed: int | None):
        super().__init__(env)
        self._first_seed = seed
        self.action_space.seed(seed)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is None:
            seed, self._first_seed = self._first_seed, None
        else:
            self._first_seed = None
        return self.env.reset(seed=seed, options=options)


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
        self.tile = max(4, image_size // max(self.rows, self.cols))
        self.observation_space = obs_space(
            (self.rows * self.tile, self.cols * self.tile, 3) if with_image else None,
            gym.spaces.Box(0, 1, (self.rows, self.cols, 3), np.uint8),
        )
        self._background: np.ndarray | None = None
        self._image: np.ndarray | None = None

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
                img[r * t:(r + 1) * t, c * t:(c + 1) * t] = tile
        return img

    def _render(self) -> np.ndarray:
        if self._background is None:
            self._background = self._draw_background()
            yy, xx = np.mgrid[0:self.tile, 0:self.tile]
            self._agent_mask = np.abs(yy - self.tile / 2 + 0.5) + np.abs(xx - self.tile / 2 + 0.5) <= 0.3 * self.tile
        t, (r, c) = self.tile, self._pos()
        img = self._background.copy()
        img[r * t:(r + 1) * t, c * t:(c + 1) * t][self._agent_mask] = (220, 30, 30)
        return img

    def describe(self) -> str:
        """Position, neighbouring holes and edges, and where the goal lies."""
        grid, (r, c) = self.grid, self._pos()
        text = f"You are on row {r + 1}, column {c + 1} of the {self.rows}x{self.cols} frozen lake (row 1 is the north edge, column 1 the west edge)."
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
        text += " There is a hole to the " + " and to the ".join(holes) + "." if holes else " There is no hole next to you."
        if edges:
            text += " The edge of the lake is to the " + " and to the ".join(edges) + "."
        gr, gc = map(int, np.argwhere(grid == "G")[0])
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
        """First move of a shortest hole-free path to the goal (BFS)."""
        start = self._pos()
        first: dict[tuple[int, int], int | None] = {start: None}
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for a, (dr, dc) in enumerate(FROZENLAKE_MOVES):
                nxt = (r + dr, c + dc)
                if not (0 <= nxt[0] < self.rows and 0 <= nxt[1] < self.cols) or self.grid[nxt] == "H" or nxt in first:
                    continue
                first[nxt] = a if first[(r, c)] is None else first[(r, c)]
                if self.grid[nxt] == "G":
                    return first[nxt]
                queue.append(nxt)
        return 0  # no path to the goal: any move


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
    for (i, j), where in [((ax, ay - 1), "in front of you"), ((ax - 1, ay), "on your left"), ((ax + 1, ay), "on your right")]:
        kind = IDX_TO_OBJECT[int(view[i, j, 0])]
        if kind in ("wall", "lava"):
            sentences.append(f"There is {'a wall' if kind == 'wall' else 'lava'} {where}.")
    if IDX_TO_OBJECT[int(view[ax, ay, 0])] not in ("empty", "unseen", "agent"):
        sentences.append(f"You carry {_name_cell(*view[ax, ay])}.")
    sentences.append(f"Your mission: {mission}.")
    return " ".join(sentences)


class MiniGridText(gym.Wrapper):
    """MiniGrid / BabyAI with a full-grid render, the description of the agent's view, and that view as state."""

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
            self.env.observation_space["image"],
        )
        self._image: np.ndarray | None = None

    def _render(self) -> np.ndarray:
        """The full grid drawn at the wanted size from MiniGrid's tile cache (no highlight, no resizing)."""
        u, t = self.env.unwrapped, self.tile
        img = np.empty((u.height * t, u.width * t, 3), np.uint8)
        ax, ay = u.agent_pos
        for j in range(u.height):
            for i in range(u.width):
                agent_dir = u.agent_dir if (i == ax and j == ay) else None
                img[j * t:(j + 1) * t, i * t:(i + 1) * t] = Grid.render_tile(u.grid.get(i, j), agent_dir, False, t)
        return img

    def _obs(self, obs: dict[str, Any]) -> dict[str, Any]:
        u = self.env.unwrapped
        out: dict[str, Any] = {
            "text": describe_view(obs["image"], u.agent_dir, u.mission),
            "mission": u.mission,
            "state": obs["image"],
        }
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
                if not macro and action == u.actions.forward and cell is not None and cell.type == "door" and not cell.is_open:
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
