"""text_envs: FrozenLake and MiniGrid / BabyAI rules, descriptions, experts, seeding and vector envs."""

import re
from fractions import Fraction

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.toy_text.frozen_lake import MAPS
from minigrid.core.constants import COLOR_TO_IDX, IDX_TO_COLOR, IDX_TO_OBJECT, OBJECT_TO_IDX
from minigrid.core.grid import Grid

import text_envs
from text_envs import expert_action, make_env

GRID_IDS = ["LavaGap", "Fetch", "GoToRedBallGrey", "GoToDoor", "DoorKey", "Unlock", "UnlockPickup", "DynamicObstacles"]


def run_episode(env: gym.Env, policy, seed: int, max_steps: int = 500):
    """Roll out one episode; return the list of (obs, reward, terminated, truncated, info)."""
    obs, info = env.reset(seed=seed)
    steps = [(obs, 0.0, False, False, info)]
    for _ in range(max_steps):
        obs, reward, terminated, truncated, info = env.step(policy(env))
        steps.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return steps


def test_unknown_env_id_lists_short_ids():
    with pytest.raises(ValueError, match="Known short ids: FrozenLake8x8, Fetch.*NumberLine"):
        make_env("NoSuchEnv")


def test_macro_actions_only_for_grids():
    with pytest.raises(ValueError, match="macro"):
        make_env("FrozenLake8x8", action_set="macro")
    with pytest.raises(ValueError, match="action_set"):
        make_env("Fetch", action_set="big")


@pytest.mark.parametrize(
    "env_id", ["FrozenLake8x8", "FrozenLake8x8-v1", *GRID_IDS, "MiniGrid-Empty-5x5-v0", *text_envs.CARD_ENVS]
)
def test_observations_fit_their_space(env_id):
    env = make_env(env_id, seed=0)
    obs, info = env.reset()
    assert set(obs) == {"image", "text", "mission", "state"} and info["success"] is False
    assert env.observation_space.contains(obs)
    assert obs["image"].dtype == np.uint8 and obs["image"].ndim == 3 and obs["image"].shape[2] == 3
    assert 224 <= max(obs["image"].shape[:2]) <= 336
    assert len(env.get_wrapper_attr("action_names")) == env.action_space.n
    assert np.array_equal(env.render(), obs["image"])
    no_image = make_env(env_id, seed=0, with_image=False)
    obs2, _ = no_image.reset()
    assert "image" not in obs2 and obs2["text"] == obs["text"] and no_image.observation_space.contains(obs2)


def test_image_size_is_configurable():
    obs, _ = make_env("FrozenLake8x8", seed=0, image_size=336).reset()
    assert obs["image"].shape == (336, 336, 3)
    obs, _ = make_env("Fetch", seed=0, image_size=100).reset()  # 5x5 grid: 20 px tiles
    assert obs["image"].shape == (100, 100, 3)


# --------------------------------------------------------------------------------------------- FrozenLake
def test_frozenlake8x8_is_the_idefics_agent_setting():
    env = make_env("FrozenLake8x8", seed=3)
    u = env.unwrapped
    assert u.desc.shape == (8, 8)
    assert all(len(u.P[s][a]) == 1 for s in u.P for a in u.P[s])  # one outcome per move: not slippery
    assert env.get_wrapper_attr("action_names") == ["move west", "move south", "move east", "move north"]
    first_map = u.desc.copy()
    for seed in range(5):  # the map is fixed for the instance, whatever the reset seed
        env.reset(seed=seed)
        assert np.array_equal(u.desc, first_map)
    assert not np.array_equal(make_env("FrozenLake8x8", seed=4).unwrapped.desc, first_map)
    assert np.array_equal(make_env("FrozenLake8x8", seed=3).unwrapped.desc, first_map)
    # moves are deterministic: east from the start goes to column 2 unless it is a hole
    obs, _ = env.reset()
    obs, *_ = env.step(2)
    assert obs["state"][0, 1, 2] == 1
    # 100-step limit: bump into the north edge forever
    env.reset()
    steps = 0
    while True:
        _, _, terminated, truncated, _ = env.step(3)
        steps += 1
        if terminated or truncated:
            break
    assert truncated and not terminated and steps == 100


def test_frozenlake_v1_keeps_gymnasium_semantics():
    env = make_env("FrozenLake8x8-v1", seed=0)
    u = env.unwrapped
    assert all(len(u.P[s][a]) == 3 for s in u.P for a in u.P[s] if u.desc.flat[s] in b"SF")  # slippery
    assert env.get_wrapper_attr("_max_episode_steps") == 200
    assert ["".join(r) for r in env.unwrapped.desc.astype(str)] == MAPS["8x8"]


def test_frozenlake_goal_and_hole():
    env = make_env("FrozenLake8x8", seed=1)
    steps = run_episode(env, expert_action, seed=0)
    _, reward, terminated, _, info = steps[-1]
    assert terminated and reward == 1.0 and info["success"]
    # step east into a hole from the cell west of it
    grid = env.get_wrapper_attr("grid")
    r, c = next((r, c) for r, c in np.argwhere(grid == "H") if c > 0 and grid[r, c - 1] != "H")
    env.reset()
    env.unwrapped.s = int(r * 8 + c - 1)
    _, reward, terminated, _, info = env.step(2)
    assert terminated and reward == 0.0 and not info["success"]


def exact_table(env: gym.Env) -> dict:
    """Gymnasium's transition table P with the probabilities as exact fractions (1/3, not 0.333...)."""
    return {
        s: {a: [(Fraction(p).limit_denominator(1000), s2, r) for p, s2, r, _ in moves] for a, moves in acts.items()}
        for s, acts in env.unwrapped.P.items()
    }


def success_probability(env: gym.Env, policy=None) -> Fraction:
    """Exact chance of reaching the goal from the start before the time limit (finite-horizon dynamic
    programming on P): the optimum, or that of `policy(steps_left, s)` when given."""
    table, horizon = exact_table(env), env.get_wrapper_attr("_max_episode_steps")
    value = dict.fromkeys(table, Fraction(0))  # value[s]: success chance with k steps left
    for k in range(1, horizon + 1):
        q = {
            s: {a: sum(p * (r + value[s2]) for p, s2, r in moves) for a, moves in acts.items()}
            for s, acts in table.items()
        }
        value = {s: max(q[s].values()) if policy is None else q[s][policy(k, s)] for s in table}
    return value[0]


def expert_as_policy(env: gym.Env):
    """The expert's move in state s with k steps left, asked through the env's public interface."""
    env.reset(seed=0)
    horizon = env.get_wrapper_attr("_max_episode_steps")

    def policy(k: int, s: int) -> int:
        env.unwrapped.s = s
        env.set_wrapper_attr("_elapsed_steps", horizon - k)
        return expert_action(env)

    return policy


def test_frozenlake_v1_expert_is_optimal_on_the_slippery_map():
    env = make_env("FrozenLake8x8-v1", seed=0, with_image=False)
    optimum = success_probability(env)
    assert 0.90 < optimum < 0.92  # ~0.91 within the 200-step limit
    assert success_probability(env, expert_as_policy(env)) == optimum


def test_frozenlake_v1_expert_succeeds_as_often_as_the_optimum():
    env = make_env("FrozenLake8x8-v1", seed=0, with_image=False)
    optimum = float(success_probability(env))
    episodes = 400
    wins = sum(run_episode(env, expert_action, seed=seed, max_steps=300)[-1][4]["success"] for seed in range(episodes))
    assert abs(wins / episodes - optimum) < 0.06, wins  # 4 standard deviations of a 400-episode mean


def shortest_path_moves(grid: np.ndarray, start: tuple[int, int]) -> set[int]:
    """Every first move of a shortest hole-free path from start to the goal (BFS from the goal)."""
    rows, cols = grid.shape
    goal = tuple(np.argwhere(grid == "G")[0])
    dist, queue = {goal: 0}, [goal]
    for r, c in queue:
        for dr, dc in text_envs.FROZENLAKE_MOVES:
            nxt = (r + dr, c + dc)
            if 0 <= nxt[0] < rows and 0 <= nxt[1] < cols and grid[nxt] != "H" and nxt not in dist:
                dist[nxt] = dist[(r, c)] + 1
                queue.append(nxt)
    moves = set()
    for a, (dr, dc) in enumerate(text_envs.FROZENLAKE_MOVES):
        nxt = (start[0] + dr, start[1] + dc)
        if dist.get(nxt, -1) == dist.get(start, 0) - 1:
            moves.add(a)
    return moves


def test_frozenlake8x8_expert_takes_a_shortest_path():
    for seed in range(10):
        env = make_env("FrozenLake8x8", seed=seed, with_image=False)
        env.reset()
        grid = env.get_wrapper_attr("grid")
        for r, c in np.argwhere(grid == "F"):
            moves = shortest_path_moves(grid, (r, c))
            if moves:
                env.unwrapped.s = int(r * 8 + c)
                assert expert_action(env) in moves, (seed, r, c)


def parse_frozenlake(text: str):
    m = re.search(r"row (\d+), column (\d+)", text)
    pos = int(m.group(1)) - 1, int(m.group(2)) - 1
    holes = set(re.findall(r"(?:hole to the|and to the) (west|south|east|north)", text.split("The edge")[0]))
    goal = {"south": 0, "east": 0}
    if m := re.search(r"The goal is (.*) from you", text):
        for n, word in re.findall(r"(\d+) steps? (south|north|east|west)", m.group(1)):
            key = "south" if word in ("south", "north") else "east"
            goal[key] = int(n) * (1 if word in ("south", "east") else -1)
    return pos, holes, goal


def test_frozenlake_descriptions_agree_with_state():
    rng = np.random.default_rng(0)
    for seed in range(20):
        env = make_env("FrozenLake8x8", seed=seed, with_image=False)
        obs, _ = env.reset()
        for _ in range(30):
            (r, c), holes, goal = parse_frozenlake(obs["text"])
            state = obs["state"]
            assert state[r, c, 2] == 1 and state[..., 2].sum() == 1
            expected = {
                name
                for name, (dr, dc) in zip(["west", "south", "east", "north"], text_envs.FROZENLAKE_MOVES)
                if 0 <= r + dr < 8 and 0 <= c + dc < 8 and state[r + dr, c + dc, 0]
            }
            assert holes == expected
            gr, gc = np.argwhere(state[..., 1])[0]
            if (gr, gc) != (r, c):
                assert (goal["south"], goal["east"]) == (gr - r, gc - c)
            obs, _, terminated, truncated, _ = env.step(int(rng.integers(4)))
            if terminated or truncated:
                obs, _ = env.reset()


def test_frozenlake_image_shows_the_agent():
    env = make_env("FrozenLake8x8", seed=0)
    obs, _ = env.reset()
    red = (obs["image"][..., 0] > 200) & (obs["image"][..., 1] < 60)
    ys, xs = np.nonzero(red)
    assert ys.max() < 32 and xs.max() < 32  # agent drawn in the top-left tile
    obs, *_ = env.step(1)  # south
    ys, xs = np.nonzero((obs["image"][..., 0] > 200) & (obs["image"][..., 1] < 60))
    assert obs["state"][1, 0, 2] and 32 <= ys.min() and ys.max() < 64 and xs.max() < 32


# --------------------------------------------------------------------------------------------- MiniGrid
def parse_view_description(text: str) -> tuple[set, set, str | None]:
    """Objects as (name, ahead, right), adjacent walls / lava as (kind, where), and the carried object."""
    objects = set()
    for name, where in re.findall(
        r"You see (an? [a-z ]+?) ((?:\d+ steps? [a-z ]+?)(?: and \d+ steps? [a-z ]+?)?)\.", text
    ):
        ahead = right = 0
        for n, word in re.findall(r"(\d+) steps? (ahead|to the right|to the left)", where):
            if word == "ahead":
                ahead = int(n)
            else:
                right = int(n) * (1 if word == "to the right" else -1)
        objects.add((name, ahead, right))
    adjacent = set(re.findall(r"There is (a wall|lava) (in front of you|on your left|on your right)\.", text))
    carried = re.search(r"You carry (an? [a-z ]+)\.", text)
    return objects, adjacent, carried.group(1) if carried else None


def cell_name(obj) -> str:
    if obj.type == "door":
        state = "locked" if obj.is_locked else "open" if obj.is_open else "closed"
        words = f"{state} {obj.color} door"
    else:
        words = f"{obj.color} {obj.type}"
    return ("an " if words[0] in "aeiou" else "a ") + words


@pytest.mark.parametrize("env_id", GRID_IDS)
def test_minigrid_descriptions_agree_with_state_and_world(env_id):
    rng = np.random.default_rng(0)
    env = make_env(env_id, seed=0, with_image=False)
    obs, _ = env.reset()
    checked_objects = 0
    for step in range(300):
        u = env.unwrapped
        objects, adjacent, carried = parse_view_description(obs["text"])
        view = obs["state"]
        # every object in the view encoding is described, and nothing else
        from_state = set()
        for i in range(7):
            for j in range(7):
                kind = IDX_TO_OBJECT[int(view[i, j, 0])]
                if (i, j) != (3, 6) and kind in ("key", "ball", "box", "door", "goal"):
                    color, st = IDX_TO_COLOR[int(view[i, j, 1])], int(view[i, j, 2])
                    words = f"{['open', 'closed', 'locked'][st]} {color} door" if kind == "door" else f"{color} {kind}"
                    from_state.add((("an " if words[0] in "aeiou" else "a ") + words, 6 - j, i - 3))
        assert objects == from_state
        # each described object is really in the world at that offset (independent of the view encoding)
        fwd, right = np.array(u.dir_vec), np.array(u.right_vec)
        for name, ahead, rt in objects:
            x, y = np.array(u.agent_pos) + ahead * fwd + rt * right
            assert cell_name(u.grid.get(x, y)) == name
            checked_objects += 1
        for kind, where in [("a wall", "wall"), ("lava", "lava")]:
            for place, pos in [
                ("in front of you", u.agent_pos + fwd),
                ("on your left", u.agent_pos - right),
                ("on your right", u.agent_pos + right),
            ]:
                cell = u.grid.get(*pos)
                assert ((kind, place) in adjacent) == (cell is not None and cell.type == where)
        assert carried == (cell_name(u.carrying) if u.carrying else None)
        assert f"You are facing {text_envs.DIR_NAMES[u.agent_dir]}." in obs["text"]
        assert obs["text"].endswith(f"Your mission: {u.mission}.") and obs["mission"] == u.mission
        action = expert_action(env) if rng.random() < 0.5 else int(rng.integers(env.action_space.n))
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    assert checked_objects > 50


def test_minigrid_image_is_the_full_grid_render():
    env = make_env("DoorKey", seed=0)
    obs, _ = env.reset()
    u, tile = env.unwrapped, env.get_wrapper_attr("tile")
    assert tile == 256 // 6
    assert np.array_equal(obs["image"], u.grid.render(tile, u.agent_pos, u.agent_dir))


@pytest.mark.parametrize(
    "env_id", ["MiniGrid-DoorKey-8x8-v0", "UnlockPickup", "DynamicObstacles", "GoToRedBallGrey", "Fetch"]
)
def test_minigrid_frames_redrawn_cell_by_cell_equal_full_renders(env_id):
    # only changed cells are drawn again after an episode's first frame: doors opened, keys picked up and
    # dropped, boxes toggled, obstacles moving and new episodes must all give MiniGrid's own full render
    env = make_env(env_id, seed=0, image_size=64)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    u, tile = env.unwrapped, env.get_wrapper_attr("tile")
    episodes = 0
    for _ in range(600):
        assert np.array_equal(obs["image"], u.grid.render(tile, u.agent_pos, u.agent_dir))
        action = expert_action(env) if rng.random() < 0.6 else int(rng.integers(env.action_space.n))
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
            episodes += 1
    assert episodes >= 3


def test_macro_actions_turn_then_step():
    env = make_env("GoToRedBallGrey", seed=0, action_set="macro")
    env.reset()
    assert env.get_wrapper_attr("action_names") == ["move forward", "move left", "move right", "move back", "pick up"]
    u = env.unwrapped
    for action, turn in [(1, -1), (2, 1), (3, 2), (0, 0)]:
        pos, d = tuple(u.agent_pos), u.agent_dir
        new_dir = (d + turn) % 4
        front = tuple(np.array(pos) + text_envs.DIR_TO_VEC[new_dir])
        cell = u.grid.get(*front)
        _, _, terminated, _, _ = env.step(action)
        if terminated:
            break
        assert u.agent_dir == new_dir
        assert tuple(u.agent_pos) == (front if cell is None or cell.can_overlap() else pos)


def test_success_is_the_env_saying_done():
    env = make_env("LavaGap", seed=0, with_image=False)
    _, reward, terminated, _, info = run_episode(env, expert_action, seed=0)[-1]
    assert terminated and reward > 0 and info["success"]
    # walking into lava ends the episode without success
    env.reset(seed=0)
    u = env.unwrapped
    lava = next(
        (x, y)
        for x in range(u.width)
        for y in range(u.height)
        if u.grid.get(x, y) is not None and u.grid.get(x, y).type == "lava"
    )
    u.agent_pos, u.agent_dir = (lava[0] - 1, lava[1]), 0
    assert u.grid.get(*u.agent_pos) is None
    _, reward, terminated, _, info = env.step(2)
    assert terminated and reward == 0 and not info["success"]


EXPERT_IDS = [
    ("FrozenLake8x8", "primitive"),
    ("LavaGap", "primitive"),
    ("Fetch", "primitive"),
    ("Fetch", "macro"),
    ("GoToRedBallGrey", "primitive"),
    ("GoToRedBallGrey", "macro"),
    ("GoToDoor", "primitive"),
    ("DoorKey", "primitive"),
    ("Unlock", "primitive"),
    ("UnlockPickup", "primitive"),
    ("NumberLine", "primitive"),
    ("EZPoints", "primitive"),
]


@pytest.mark.parametrize("env_id,action_set", EXPERT_IDS)
def test_expert_solves_seeded_episodes(env_id, action_set):
    wins = 0
    for seed in range(100):
        env = make_env(env_id, seed=seed, action_set=action_set, with_image=False)
        wins += run_episode(env, expert_action, seed=seed)[-1][4]["success"]
    assert wins >= 99


def test_expert_is_optimal_on_an_empty_room():
    # Empty-5x5: agent at (1, 1) facing east, goal at (3, 3): 4 moves and 1 turn is the shortest path
    env = make_env("MiniGrid-Empty-5x5-v0", seed=0, with_image=False)
    steps = run_episode(env, expert_action, seed=0)
    assert steps[-1][4]["success"] and len(steps) - 1 == 5


def test_same_seed_same_episode():
    for env_id in ["FrozenLake8x8", "DoorKey", "GoToRedBallGrey", "DynamicObstacles", "EZPoints", "Blackjack"]:
        runs = []
        for _ in range(2):
            env, rng = make_env(env_id, seed=7), np.random.default_rng(1)
            runs.append(run_episode(env, lambda e, rng=rng: int(rng.integers(e.action_space.n)), seed=11, max_steps=40))
        for a, b in zip(*runs):
            assert a[0]["text"] == b[0]["text"] and np.array_equal(a[0]["image"], b[0]["image"]) and a[1:4] == b[1:4]


def test_make_env_seed_drives_the_first_reset():
    a, _ = make_env("DoorKey", seed=5).reset()
    b, _ = make_env("DoorKey", seed=5).reset()
    assert a["text"] == b["text"] and np.array_equal(a["image"], b["image"])


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_vector_envs_carry_text(vector):
    thunks = [lambda i=i: make_env("FrozenLake8x8", seed=i) for i in range(2)]
    if vector == "sync":
        envs = gym.vector.SyncVectorEnv(thunks)
    else:
        envs = gym.vector.AsyncVectorEnv(thunks, shared_memory=False)
    singles = [t() for t in thunks]
    obs, _ = envs.reset(seed=[3, 4])
    for i, env in enumerate(singles):
        single, _ = env.reset(seed=3 + i)
        assert obs["text"][i] == single["text"] and np.array_equal(obs["image"][i], single["image"])
    obs, _, _, _, infos = envs.step(np.array([1, 2]))
    for i, (env, a) in enumerate(zip(singles, [1, 2])):
        single, *_ = env.step(a)
        assert obs["text"][i] == single["text"]
    assert "success" in infos and envs.get_attr("action_names")[0][0] == "move west"
    assert len(envs.call("expert_action")) == 2
    envs.close()


def test_shared_memory_text_fails_clearly():
    with pytest.raises(Exception, match="shared_memory=False"):
        gym.vector.AsyncVectorEnv([lambda: make_env("FrozenLake8x8", seed=0)] * 2)


def test_tiles_are_reused():
    env = make_env("Fetch", seed=0)
    env.reset()
    before = len(Grid.tile_cache)
    for _ in range(20):
        env.step(env.action_space.sample())
    assert len(Grid.tile_cache) - before < 10  # a handful of new agent directions / objects, not a tile per frame


@pytest.mark.parametrize("env_id", ["GoToDoor", "Fetch", "GoToRedBallGrey", "UnlockPickup"])
def test_minigrid_state_names_the_mission_target(env_id):
    # planes 3 and 4 hold the mission's object and colour (MiniGrid indices, colour + 1), constant over the view
    env = make_env(env_id, seed=0, with_image=False)
    seen = set()
    for episode in range(20):
        obs, _ = env.reset(seed=episode)
        words = obs["mission"].split()
        kind = next(w for w in words if w in OBJECT_TO_IDX)
        color = next(w for w in words if w in COLOR_TO_IDX)
        assert obs["state"].shape == (7, 7, 5) and env.observation_space["state"].contains(obs["state"])
        assert (obs["state"][..., 3] == OBJECT_TO_IDX[kind]).all()
        assert (obs["state"][..., 4] == COLOR_TO_IDX[color] + 1).all()
        obs, *_ = env.step(0)
        assert (obs["state"][..., 3:] == [OBJECT_TO_IDX[kind], COLOR_TO_IDX[color] + 1]).all()
        seen.add(obs["mission"])
    assert len(seen) > 1 or env_id == "GoToRedBallGrey"
    assert text_envs.mission_target("go to the grey door") == (OBJECT_TO_IDX["door"], COLOR_TO_IDX["grey"] + 1)
    assert text_envs.mission_target("get to the goal") == (OBJECT_TO_IDX["goal"], 0)
