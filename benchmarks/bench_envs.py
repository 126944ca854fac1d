"""Env steps per second with and without images, for each env family.

    python benchmarks/bench_envs.py [--seconds 2]

Random actions, one env, tiles warmed up first; the ratio is the cost of drawing the image.
"""

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from text_envs import make_env

ENV_IDS = ["FrozenLake8x8", "DoorKey", "GoToRedBallGrey", "Fetch", "NumberLine", "EZPoints", "Points24", "Blackjack"]


def steps_per_second(env_id: str, with_image: bool, seconds: float) -> float:
    """Random-action env steps per second, after a warm-up that fills the tile caches."""
    env = make_env(env_id, seed=0, with_image=with_image)
    rng = np.random.default_rng(0)
    env.reset()
    steps, start = -200, None
    while start is None or time.perf_counter() - start < seconds:
        if steps == 0:
            start = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        steps += 1
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    args = parser.parse_args()
    print(f"{'env':<18}{'image px':>10}{'steps/s image':>16}{'steps/s no image':>18}{'ratio':>8}")
    for env_id in ENV_IDS:
        shape = make_env(env_id, seed=0).reset()[0]["image"].shape
        with_image = steps_per_second(env_id, True, args.seconds)
        without = steps_per_second(env_id, False, args.seconds)
        print(
            f"{env_id:<18}{f'{shape[1]}x{shape[0]}':>10}{with_image:>16.0f}{without:>18.0f}{with_image / without:>8.2f}"
        )
