"""GymCards: NumberLine, EZPoints, Points24 and Blackjack rules, experts, seeding and observations."""

import re
from fractions import Fraction

import numpy as np
import pytest
from gymnasium.envs.toy_text import blackjack as gym_blackjack
from gymnasium.utils.env_checker import check_env

import text_envs
from text_envs import BlackjackEnv, EZPointsEnv, NumberLineEnv, Points24Env, blackjack_total, evaluate_formula

CARD_ENV_CLASSES = [NumberLineEnv, EZPointsEnv, Points24Env, BlackjackEnv]
RANK_VALUES = {"A": 1, **{str(n): n for n in range(2, 11)}, "J": 10, "Q": 10, "K": 10}


def act(env, token: str):
    """Step with the action named `token`."""
    return env.step(env.action_names.index(token))


def play(env, tokens: list[str]):
    """Step through `tokens`; returns the list of step results."""
    return [act(env, t) for t in tokens]


def solvable(values: list[int], target: int, operators: str) -> bool:
    """Independent brute force: combine any two numbers with any operator until one is left."""

    def reach(nums: list[Fraction]) -> bool:
        if len(nums) == 1:
            return nums[0] == target
        for i in range(len(nums)):
            for j in range(len(nums)):
                if i != j:
                    rest = [n for k, n in enumerate(nums) if k not in (i, j)]
                    a, b = nums[i], nums[j]
                    results = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}
                    if any(reach(rest + [results[op]]) for op in operators if results[op] is not None):
                        return True
        return False

    return reach([Fraction(v) for v in values])


def formula_of(env, state: np.ndarray) -> list[str]:
    """The formula tokens encoded in a state array (action index + 1, 0 = padding)."""
    return [env.action_names[t - 1] for t in state[env.n_cards :] if t]


def run_expert(env, seed: int, limit: int = 60):
    env.reset(seed=seed)
    total = 0.0
    for _ in range(limit):
        _, reward, terminated, truncated, info = env.step(env.expert_action())
        total += reward
        if terminated or truncated:
            return total, info
    raise AssertionError("the episode did not end")


# --------------------------------------------------------------------------------------------
# NumberLine
# --------------------------------------------------------------------------------------------
def test_numberline_rewards():
    env = NumberLineEnv()
    assert env.action_names == ["-", "+"]
    obs, info = env.reset(seed=0, options={"target": 3, "current": 1})
    assert info["success"] is False and list(obs["state"]) == [3, 1]
    obs, r, term, trunc, info = act(env, "+")  # approach
    assert (r, term, trunc, info["success"]) == (0, False, False, False) and list(obs["state"]) == [3, 2]
    obs, r, term, trunc, info = act(env, "-")  # retreat
    assert (r, term, trunc) == (-1, False, False) and list(obs["state"]) == [3, 1]
    obs, r, term, trunc, info = play(env, ["+", "+"])[-1]  # reach
    assert (r, term, trunc, info["success"]) == (1, True, False, True) and list(obs["state"]) == [3, 3]
    assert "You reached the target" in obs["text"]

    env.reset(options={"target": 3, "current": 0})
    obs, r, term, trunc, _ = act(env, "-")  # push against 0
    assert (r, term, trunc) == (-1, False, False) and list(obs["state"]) == [3, 0]
    env.reset(options={"target": 1, "current": 5})
    obs, r, *_ = act(env, "+")  # push against 5
    assert r == -1 and list(obs["state"]) == [1, 5]


def test_numberline_truncates_after_10_steps():
    env = NumberLineEnv(with_image=False)
    env.reset(seed=1, options={"target": 5, "current": 0})
    for step in range(1, 11):
        _, r, term, trunc, info = act(env, "-")
        assert r == -1 and not term and trunc == (step == 10) and not info["success"]


def test_numberline_start_differs_from_target_and_covers_all_pairs():
    env = NumberLineEnv(with_image=False)
    pairs = set()
    for seed in range(400):
        obs, _ = env.reset(seed=seed)
        target, current = obs["state"]
        assert target != current and 0 <= min(target, current) and max(target, current) <= 5
        pairs.add((int(target), int(current)))
    assert len(pairs) == 30


def test_numberline_expert_walks_straight_to_the_target():
    env = NumberLineEnv(with_image=False)
    for seed in range(30):
        obs, _ = env.reset(seed=seed)
        distance = abs(int(obs["state"][0]) - int(obs["state"][1]))
        rewards = []
        while True:
            obs, r, term, trunc, info = env.step(env.expert_action())
            rewards.append(r)
            if term or trunc:
                break
        assert rewards == [0] * (distance - 1) + [1] and info["success"]


# --------------------------------------------------------------------------------------------
# EZPoints
# --------------------------------------------------------------------------------------------
def test_ezpoints_actions_and_spaces():
    env = EZPointsEnv()
    assert env.action_names == [str(n) for n in range(1, 11)] + ["+", "*", "="] and env.action_space.n == 13
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (7,) and obs["state"].dtype == np.int64
    assert "12" in obs["mission"]


def test_ezpoints_illegal_numbers_are_refused():
    env = EZPointsEnv(with_image=False)
    obs0, _ = env.reset(seed=0, options={"ranks": [3, 13]})
    obs, r, term, trunc, info = act(env, "4")  # not held
    assert (r, term, trunc, info["success"]) == (-1, False, False, False)
    assert np.array_equal(obs["state"], obs0["state"]) and "formula is empty" in obs["text"]
    assert act(env, "3")[1] == 0
    obs, r, term, trunc, _ = act(env, "3")  # held once, already used
    assert (r, term, trunc) == (-1, False, False) and formula_of(env, obs["state"]) == ["3"]
    obs, r, *_ = play(env, ["+", "10"])[-1]  # K counts as 10
    assert r == 0 and formula_of(env, obs["state"]) == ["3", "+", "10"] and "'3+10'" in obs["text"]
    obs, r, term, trunc, info = act(env, "=")  # 13
    assert (r, term, trunc, info["success"]) == (-1, True, False, False)


def test_ezpoints_pairs_may_be_used_twice():
    env = EZPointsEnv(with_image=False)
    env.reset(seed=0, options={"ranks": [6, 6]})
    assert [s[1] for s in play(env, ["6", "+", "6"])] == [0, 0, 0]
    assert act(env, "6")[1] == -1  # a third 6
    _, r, term, _, info = act(env, "=")
    assert r == 10 and term and info["success"]


@pytest.mark.parametrize(
    "ranks, tokens, reward",
    [
        ([2, 10], ["2", "+", "10", "="], 10),
        ([13, 2], ["10", "+", "2", "="], 10),  # K counts as 10
        ([3, 4], ["4", "*", "3", "="], 10),
        ([3, 4], ["3", "+", "4", "="], -1),  # 7
        ([10, 2], ["10", "="], -1),  # one card only
        ([10, 2], ["10", "+", "="], -1),  # unparseable
        ([10, 2], ["="], -1),  # empty
        ([2, 6], ["2", "*", "*", "6", "="], -1),  # no '**' power
    ],
)
def test_ezpoints_equals(ranks, tokens, reward):
    env = EZPointsEnv(with_image=False)
    env.reset(seed=0, options={"ranks": ranks})
    results = play(env, tokens)
    assert all(res[1] == 0 and not res[2] and not res[3] for res in results[:-1])
    _, r, term, trunc, info = results[-1]
    assert (r, term, trunc, info["success"]) == (reward, True, False, reward > 0)


def test_ezpoints_formula_longer_than_5_truncates():
    env = EZPointsEnv(with_image=False)
    env.reset(seed=0, options={"ranks": [3, 4]})
    for _ in range(5):
        assert act(env, "+")[1:4] == (0, False, False)
    obs, r, term, trunc, _ = act(env, "*")
    assert (r, term, trunc) == (-1, False, True) and formula_of(env, obs["state"]) == ["+"] * 5


def test_ezpoints_step_limit_ends_repeated_illegal_numbers():
    env = EZPointsEnv(with_image=False)
    env.reset(seed=0, options={"ranks": [3, 4]})
    for step in range(1, 21):
        _, r, term, trunc, _ = act(env, "9")
        assert r == -1 and not term and trunc == (step == 20)


def test_ezpoints_every_hand_is_solvable():
    env = EZPointsEnv(with_image=False)
    faces = set()
    for seed in range(500):
        obs, info = env.reset(seed=seed)
        a, b = (int(v) for v in obs["state"][:2])
        assert a + b == 12 or a * b == 12, (seed, a, b)
        assert [RANK_VALUES[c] for c in info["cards"]] == [a, b] == info["numbers"]
        faces |= set(info["cards"]) & {"J", "Q", "K"}
    assert faces == {"J", "Q", "K"}


def test_ezpoints_expert_solves_100_seeded_episodes():
    env = EZPointsEnv(with_image=False)
    for seed in range(100):
        total, info = run_expert(env, seed)
        assert total == 10 and info["success"], seed


def test_ezpoints_expert_follows_the_current_formula():
    env = EZPointsEnv(with_image=False)
    env.reset(seed=0, options={"ranks": [3, 4]})
    act(env, "3")
    assert env.action_names[env.expert_action()] == "*"
    env.reset(seed=0, options={"ranks": [3, 4]})
    play(env, ["3", "+"])  # 3 + 4 = 7: no longer a prefix of a solution
    assert env.action_names[env.expert_action()] == "="


# --------------------------------------------------------------------------------------------
# Points24
# --------------------------------------------------------------------------------------------
def test_points24_actions_and_spaces():
    env = Points24Env()
    assert env.action_names == [str(n) for n in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (24,) and "24" in obs["mission"]


def test_formula_parser():
    def f(text):
        return evaluate_formula(re.findall(r"10|\d|[-+*/()]", text))

    assert f("2+3*4") == 14 and f("(2+3)*4") == 20 and f("8-4-2") == 2 and f("8/4/2") == 1
    assert f("8/(3-8/3)") == 24 and isinstance(f("1/3"), Fraction) and f("10-2*(3+1)") == 2
    for bad in ["", "2+", "+3", "(2+3", "2+3)", "3/(2-2)", "2(3)", ")2(", "-3+1"]:
        assert f(bad) is None, bad
    assert evaluate_formula(["1", "2"]) is None  # no digit concatenation


def test_points24_illegal_numbers_and_card_reuse():
    env = Points24Env(with_image=False)
    obs0, _ = env.reset(seed=0, options={"ranks": [1, 5, 5, 12]})
    assert "A counts as 1" in obs0["text"] and "Q counts as 10" in obs0["text"]
    obs, r, term, trunc, _ = act(env, "7")
    assert (r, term, trunc) == (-1, False, False) and np.array_equal(obs["state"], obs0["state"])
    assert [res[1] for res in play(env, ["5", "*", "5", "*", "5"])] == [0, 0, 0, 0, -1]  # two fives only
    assert [res[1] for res in play(env, ["1", "+", "1", "10", "10"])] == [0, 0, -1, 0, -1]  # one A, one Q
    assert formula_of(env, env._state()) == ["5", "*", "5", "*", "1", "+", "10"]


def test_points24_formula_limit_is_20_tokens():
    env = Points24Env(with_image=False)
    env.reset(seed=0, options={"ranks": [1, 2, 3, 4]})
    for _ in range(20):
        assert act(env, "(")[1:4] == (0, False, False)
    obs, r, term, trunc, _ = act(env, "1")
    assert (r, term, trunc) == (-1, False, True) and formula_of(env, obs["state"]) == ["("] * 20


def test_points24_step_limit():
    env = Points24Env(with_image=False)
    env.reset(seed=0, options={"ranks": [1, 2, 3, 4]})
    truncs = [act(env, "9")[3] for _ in range(40)]
    assert truncs == [False] * 39 + [True]


@pytest.mark.parametrize(
    "ranks, formula, reward",
    [
        ([3, 3, 8, 8], "8/(3-8/3)", 10),  # exact fractions: floats give 23.999999999999996
        ([6, 4, 1, 1], "6*4*1*1", 10),
        ([6, 4, 1, 1], "6*4", -1),  # not every card
        ([6, 4, 1, 1], "(6*4*1*1", -1),  # unparseable
        ([12, 2, 1, 2], "(10+2)*2*1", 10),  # Q counts as 10
        ([1, 1, 2, 3], "3/(1-1)+2", -1),  # division by zero
        ([2, 4, 1, 1], "2 4*1*1", -1),  # '2' '4' is not 24
        ([5, 5, 5, 1], "(5-1/5)*5", 10),
        ([10, 10, 4, 4], "(10*10-4)/4", 10),
        ([10, 10, 4, 4], "10+10+4-4", -1),
    ],
)
def test_points24_equals(ranks, formula, reward):
    env = Points24Env(with_image=False)
    env.reset(seed=0, options={"ranks": ranks})
    tokens = re.findall(r"10|\d|[-+*/()]", formula) + ["="]
    results = play(env, tokens)
    assert all(res[1:4] == (0, False, False) for res in results[:-1])
    _, r, term, trunc, info = results[-1]
    assert (r, term, trunc, info["success"]) == (reward, True, False, reward > 0)


def test_points24_expert_solves_every_solvable_seeded_hand():
    env = Points24Env(with_image=False)
    n_solvable = 0
    for seed in range(80):
        obs, info = env.reset(seed=seed)
        values = [int(v) for v in obs["state"][:4]]
        assert all(1 <= r <= 13 for r in env.ranks) and values == [min(r, 10) for r in env.ranks]
        can = solvable(values, 24, "+-*/")
        assert env.solvable() == can
        if not can:
            assert env.action_names[env.expert_action()] == "="
            continue
        n_solvable += 1
        total, info = run_expert(env, seed)
        assert total == 10 and info["success"], (seed, values)
    assert 30 < n_solvable < 80  # some hands are unsolvable


@pytest.mark.parametrize(
    "prefix, solvable_from_here",
    [
        ("", True),
        ("(", True),
        ("((", True),
        ("8/(", True),
        ("8/(3-8/3", True),
        ("8/(3-8/3)", True),
        ("3+3", False),
        ("+", False),
        ("8*", False),
        ("8/(3-8/3))", False),
    ],
)
def test_points24_expert_completes_any_prefix(prefix, solvable_from_here):
    env = Points24Env(with_image=False)
    env.reset(seed=0, options={"ranks": [3, 8, 3, 8]})  # only solution: 8/(3-8/3)
    results = play(env, re.findall(r"10|\d|[-+*/()]", prefix))
    assert all(res[1] == 0 for res in results)
    if not solvable_from_here:
        assert env.action_names[env.expert_action()] == "="
        return
    for _ in range(25):
        _, r, term, trunc, info = env.step(env.expert_action())
        if term or trunc:
            break
    assert r == 10 and info["success"]


# --------------------------------------------------------------------------------------------
# Blackjack
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "player, dealer, next_cards, reward, dealer_final",
    [
        ([10, 8], [10, 2], [2, 2, 3], -1, [10, 2, 2, 2, 3]),  # draws below 17: 14, 16, 19
        ([10, 8], [1, 6], [5], 1, [1, 6]),  # soft 17 stands
        ([10, 7], [13, 7], [5], 0, [13, 7]),  # hard 17 stands; a push
        ([10, 2], [10, 6], [12], 1, [10, 6, 12]),  # dealer bust
        ([1, 10], [10, 9], [], 1, [10, 9]),  # 21 (natural pays 1, natural=False)
        ([9, 9], [1, 1], [4, 3], -1, [1, 1, 4, 3]),  # A A (12 soft) 4 -> 16 soft, 3 -> 19 soft
    ],
)
def test_blackjack_stand(player, dealer, next_cards, reward, dealer_final):
    env = BlackjackEnv()
    assert env.action_names == ["stand", "hit"]
    obs, info = env.reset(seed=0, options={"player": player, "dealer": dealer, "next_cards": next_cards})
    first = obs["image"]
    obs, r, term, trunc, info = act(env, "stand")
    assert (r, term, trunc, info["success"]) == (reward, True, False, reward > 0)
    assert [RANK_VALUES[c] for c in info["dealer"]] == [min(v, 10) for v in dealer_final]
    assert not np.array_equal(first, obs["image"])  # the hole card is shown at the end
    assert {1: "You win.", 0: "It is a draw.", -1: "You lose."}[reward] in obs["text"]


def test_blackjack_hit_bust_and_usable_ace():
    env = BlackjackEnv(with_image=False)
    obs, _ = env.reset(seed=0, options={"player": [1, 6], "dealer": [10, 9], "next_cards": [10, 5]})
    assert list(obs["state"]) == [17, 10, 1] and obs["text"] == "Your cards are A and 6. The dealer shows 10."
    obs, r, term, *_ = act(env, "hit")
    assert (r, term) == (0, False) and list(obs["state"]) == [17, 10, 0]
    assert obs["text"] == "Your cards are A, 6 and 10. The dealer shows 10."  # the cards, as in RL4VLM: no totals
    obs, r, term, trunc, info = act(env, "hit")
    assert (r, term, trunc, info["success"]) == (-1, True, False, False) and obs["state"][0] == 22
    assert obs["text"] == "Your cards are A, 6, 10 and 5. You went bust. The dealer's cards are 10 and 9. You lose."
    obs, _ = env.reset(seed=0, options={"player": [1, 1], "dealer": [1, 9]})
    assert list(obs["state"]) == [12, 1, 1]


def test_blackjack_hole_card_hidden_during_play():
    images, texts = [], []
    for hole in (2, 9):
        env = BlackjackEnv()
        obs, _ = env.reset(seed=3, options={"player": [10, 2], "dealer": [7, hole], "next_cards": [3]})
        obs, *_ = act(env, "hit")
        images.append(obs["image"])
        texts.append(obs["text"])
    assert np.array_equal(*images) and texts[0] == texts[1] and "The dealer shows 7." in texts[0]


def blackjack_table(dealer: list[tuple[int, int]], player: list[tuple[int, int]], result: str = "") -> np.ndarray:
    """A 300x300 Blackjack table drawn from the cards alone: the 'Dealer' and 'Player' labels, each hand's card
    sprites in a row (rank 0: a card's back), and the result line once the game is over."""
    s, w = 300, 60
    h, size = round(w * 1.4), round(0.06 * s)
    img = text_envs._felt(s)
    for label, cards, top in [("Dealer", dealer, 0.02), ("Player", player, 0.48)]:
        text_envs._blit_text(img, text_envs._text_mask(label, size), int(0.03 * s), int(top * s), (255, 255, 255))
        x_step = min(w + 0.02 * s, (0.94 * s - w) / max(1, len(cards) - 1))
        for i, (rank, suit) in enumerate(cards):
            text_envs._place(
                img, text_envs.card_sprite(rank, suit, w, h), int(0.03 * s + i * x_step), int((top + 0.08) * s)
            )
    if result:
        text_envs._blit_text(img, text_envs._text_mask(result, size), int(0.03 * s), int(0.9 * s), (255, 255, 255))
    return img


def test_blackjack_image_shows_the_cards_and_no_totals():
    """RL4VLM's image holds the cards only: reading them and adding them up is the task."""
    env = BlackjackEnv()
    obs, _ = env.reset(seed=0, options={"player": [1, 6], "dealer": [13, 9], "next_cards": [3]})
    assert np.array_equal(obs["image"], blackjack_table([env.dealer[0], (0, 0)], env.player))  # the hole card's back
    obs, *_ = act(env, "hit")
    assert [r for r, _ in env.player] == [1, 6, 3] and blackjack_total([1, 6, 3]) == (20, True)
    assert np.array_equal(obs["image"], blackjack_table([env.dealer[0], (0, 0)], env.player))
    obs, r, *_ = act(env, "stand")
    assert r == 1 and np.array_equal(obs["image"], blackjack_table(env.dealer, env.player, "You win"))


def test_blackjack_matches_gymnasium_rules():
    """Random play, checked against gymnasium's own Blackjack-v1 helper functions."""
    env = BlackjackEnv(with_image=False)
    rng = np.random.default_rng(0)
    for seed in range(300):
        obs, _ = env.reset(seed=seed)
        while True:
            obs, r, term, _, _ = env.step(int(rng.integers(2)))
            player = [min(rank, 10) for rank, _ in env.player]
            dealer = [min(rank, 10) for rank, _ in env.dealer]
            assert tuple(obs["state"]) == (gym_blackjack.sum_hand(player), dealer[0], gym_blackjack.usable_ace(player))
            if term:
                if gym_blackjack.is_bust(player):
                    assert r == -1
                else:
                    assert gym_blackjack.sum_hand(dealer) >= 17
                    assert len(dealer) == 2 or gym_blackjack.sum_hand(dealer[:-1]) < 17
                    assert r == gym_blackjack.cmp(gym_blackjack.score(player), gym_blackjack.score(dealer))
                break


def test_blackjack_expert_basic_strategy():
    env = BlackjackEnv(with_image=False)
    cases = [
        ([10, 2], 4, "stand"),
        ([10, 2], 9, "hit"),
        ([10, 6], 1, "hit"),
        ([1, 6], 5, "hit"),
        ([1, 7], 10, "stand"),
        ([10, 7], 10, "stand"),
        ([5, 4], 6, "hit"),
        ([10, 3], 6, "stand"),
    ]
    for player, up, action in cases:
        env.reset(seed=0, options={"player": player, "dealer": [up, 5]})
        assert env.action_names[env.expert_action()] == action, (player, up)
    wins = sum(run_expert(env, seed)[1]["success"] for seed in range(300))
    assert wins > 100


# --------------------------------------------------------------------------------------------
# Every game
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CARD_ENV_CLASSES)
def test_same_seed_same_episodes(cls):
    def rollout():
        env = cls()
        rng = np.random.default_rng(7)
        obs, info = env.reset(seed=123)
        trace = [(obs, info)]
        for _ in range(40):
            obs, r, term, trunc, info = env.step(int(rng.integers(env.action_space.n)))
            trace.append((obs, r, term, trunc, info))
            if term or trunc:
                trace.append(env.reset())
        return trace

    a, b = rollout(), rollout()
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[0]["text"] == y[0]["text"] and np.array_equal(x[0]["state"], y[0]["state"])
        assert np.array_equal(x[0]["image"], y[0]["image"])
        assert x[1:] == y[1:]
    texts = {step[0]["text"] for step in a}
    assert len(texts) > 3  # the episodes differ from one another


@pytest.mark.parametrize("cls", [EZPointsEnv, Points24Env])
def test_new_episode_shows_its_own_empty_formula(cls):
    env, fresh = cls(), cls()
    env.reset(seed=5)
    env.step(env.expert_action())
    env.step(env.expert_action())  # mid-episode, a formula on the table
    obs, _ = env.reset(seed=9)
    ref, _ = fresh.reset(seed=9)
    assert "The current formula is empty." in obs["text"] and not obs["state"][env.n_cards :].any()
    assert obs["text"] == ref["text"] and np.array_equal(obs["image"], ref["image"])
    while True:  # and after a finished episode
        *_, term, trunc, _ = env.step(env.expert_action())
        if term or trunc:
            break
    obs, _ = env.reset(seed=9)
    assert np.array_equal(obs["image"], ref["image"]) and obs["text"] == ref["text"]


@pytest.mark.parametrize("cls", CARD_ENV_CLASSES)
def test_description_agrees_with_state(cls):
    env = cls(with_image=False)
    rng = np.random.default_rng(1)
    obs, info = env.reset(seed=0)
    for _ in range(150):
        text, state = obs["text"], obs["state"]
        assert env.observation_space.contains(obs), text
        if cls is NumberLineEnv:
            m = re.match(r"The target number is (\d) and the current number is (\d)\.", text)
            assert [int(m[1]), int(m[2])] == list(state)
        elif cls is BlackjackEnv:
            m = re.match(r"Your cards are ([\w, ]+)\.( The dealer shows (\w+)\.$)?", text)
            names = re.split(r", | and ", m[1])
            assert names == info["player"] and "total" not in text
            assert blackjack_total([RANK_VALUES[n] for n in names]) == (state[0], bool(state[2]))
            assert m[2] is None or (m[3] == info["dealer"][0] and RANK_VALUES[m[3]] == state[1])
        else:
            m = re.match(r"Your cards are ([\w, ]+?)( \(.*\))?\. The current formula is (empty|'(.*)')\.", text)
            assert [RANK_VALUES[c] for c in re.split(r", | and ", m[1])] == list(state[: env.n_cards])
            tokens = formula_of(env, state)
            assert (m[4] or "") == "".join(
                t if not (i and t.isdigit() and tokens[i - 1].isdigit()) else " " + t for i, t in enumerate(tokens)
            )
        action = env.expert_action() if rng.random() < 0.6 else int(rng.integers(env.action_space.n))
        obs, _, term, trunc, info = env.step(action)
        assert isinstance(info["success"], bool)
        if term or trunc:
            obs, info = env.reset()


@pytest.mark.parametrize("cls", CARD_ENV_CLASSES)
def test_observation_spaces_and_images(cls):
    env = cls()
    assert env.metadata["render_modes"] == ["rgb_array"] and env.render_mode == "rgb_array"
    assert len(env.action_names) == env.action_space.n
    obs, info = env.reset(seed=0)
    assert set(obs) == {"image", "text", "mission", "state"} and info["success"] is False
    assert obs["image"].shape == (300, 300, 3) and obs["image"].dtype == np.uint8
    assert env.observation_space.contains(obs) and np.array_equal(env.render(), obs["image"])
    assert obs["image"].std() > 10  # something is drawn
    with pytest.raises(ValueError):
        env.step(env.action_space.n)
    for size in (64, 128):
        small = cls(image_size=size)
        obs, _ = small.reset(seed=0)
        obs, *_ = small.step(0)
        assert obs["image"].shape == (size, size, 3) and small.observation_space.contains(obs)
    blind = cls(with_image=False)
    obs, _ = blind.reset(seed=0)
    assert set(obs) == {"text", "mission", "state"} and "image" not in blind.observation_space.spaces
    obs, *_ = blind.step(0)
    assert "image" not in obs and blind.observation_space.contains(obs)
    assert blind.render().shape == (300, 300, 3)


@pytest.mark.parametrize("cls", CARD_ENV_CLASSES)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gymnasium_env_checker(cls):
    check_env(cls())
    check_env(cls(with_image=False))
