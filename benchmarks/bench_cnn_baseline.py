"""Training steps per second of ppo_cnn_baseline next to the same vector env stepped with random actions.

    python benchmarks/bench_cnn_baseline.py [--total-timesteps 20480] [--env-ids FrozenLake8x8 ...] [--num-envs 4 16]

The ratio is what learning costs on top of the simulator (goal: at least 0.5 with --obs state). Both use
the script's own envs and one CPU thread: 4 envs with CleanRL's defaults otherwise, 16 envs with 8 minibatches
(the README's MiniGrid settings: the same 4 update epochs, minibatches of 256). The training SPS is the one the
script reports at its last iteration (startup excluded, as in CleanRL).
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo_cnn_baseline as ppo  # noqa: E402


def random_action_sps(env_id: str, obs: str, num_envs: int, steps: int) -> float:
    """Env steps per second of the script's vector env under uniformly random actions."""
    envs = ppo.make_envs(ppo.Args(env_id=env_id, obs=obs, num_envs=num_envs), run_name="")
    envs.reset(seed=0)
    envs.action_space.seed(0)
    for _ in range(50):  # warm-up: MiniGrid fills its tile cache
        envs.step(envs.action_space.sample())
    start = time.perf_counter()
    for _ in range(steps // envs.num_envs):
        envs.step(envs.action_space.sample())
    envs.close()
    return steps / (time.perf_counter() - start)


def training_sps(env_id: str, obs: str, num_envs: int, total_timesteps: int) -> float:
    """The SPS that a training run of the script reports at its last iteration."""
    with tempfile.TemporaryDirectory() as cwd:  # the run's tensorboard files go nowhere
        done = subprocess.run(
            [sys.executable, str(ROOT / "ppo_cnn_baseline.py"), "--env-id", env_id, "--obs", obs,
             "--num-envs", str(num_envs), "--num-minibatches", "4" if num_envs <= 4 else "8",
             "--total-timesteps", str(total_timesteps), "--checkpoint-freq", "0"],
            cwd=cwd, capture_output=True, text=True, check=True,
        )
    return float(re.findall(r"SPS=(\d+)", done.stdout)[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-timesteps", type=int, default=20480, help="env steps of each measurement")
    parser.add_argument("--env-ids", nargs="+", default=["FrozenLake8x8", "MiniGrid-DoorKey-5x5-v0"])
    parser.add_argument("--obs", nargs="+", default=["state", "image"], choices=["state", "image"])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'env':<26}{'obs':>7}{'envs':>6}{'random-action SPS':>19}{'training SPS':>14}{'ratio':>7}")
    for env_id in args.env_ids:
        for obs in args.obs:
            for num_envs in args.num_envs:
                raw = random_action_sps(env_id, obs, num_envs, args.total_timesteps)
                train = training_sps(env_id, obs, num_envs, args.total_timesteps)
                print(f"{env_id:<26}{obs:>7}{num_envs:>6}{raw:>19.0f}{train:>14.0f}{train / raw:>7.2f}", flush=True)
