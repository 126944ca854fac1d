"""Training steps per second of vlm_car_reward with dense reward programs next to the sparse reward, same env and agent.

    python benchmarks/bench_reward_programs.py [--total-timesteps 20480] [--num-envs 4 16] [--repeats 2]

Dense: vlm_car_reward.py with the committed reference programs (the frame rendered at 8-pixel tiles in every step,
the next sub-task's program of every env run in the sandbox worker, one worker call per vector step). Sparse:
ppo_cnn_baseline.py --obs state, the same agent, PPO and flags without frames or programs. The two run one after
the other, alternating, `--repeats` times each on one CPU thread; the SPS is the one each script reports at its
last iteration (startup and verification excluded, as in CleanRL). Goal: dense / sparse >= 0.7.
"""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENVS = {"MiniGrid-DoorKey-8x8-v0": "DoorKey-8x8", "MiniGrid-UnlockPickup-v0": "UnlockPickup"}


def training_sps(script: str, flags: list[str]) -> float:
    """The SPS that a training run of `script` reports at its last iteration."""
    with tempfile.TemporaryDirectory() as cwd:  # the run's tensorboard files go nowhere
        done = subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=cwd, capture_output=True, text=True,
                              check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(re.findall(r"SPS=(\d+)", done.stdout)[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-timesteps", type=int, default=20480, help="env steps of each measurement")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--env-ids", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each script, alternating")
    args = parser.parse_args()
    print(f"{'env':<26}{'envs':>5}{'sparse SPS':>12}{'dense SPS':>11}{'ratio':>7}")
    for env_id in args.env_ids:
        for num_envs in args.num_envs:
            common = ["--env-id", env_id, "--num-envs", str(num_envs), "--num-minibatches", "8" if num_envs > 4 else "4",
                      "--total-timesteps", str(args.total_timesteps)]
            sparse, dense = [], []
            for _ in range(args.repeats):
                sparse.append(training_sps("ppo_cnn_baseline.py", [*common, "--obs", "state", "--checkpoint-freq", "0"]))
                dense.append(training_sps("vlm_car_reward.py", [
                    *common, "--reward-programs", str(ROOT / "reference_programs" / ENVS[env_id]),
                    "--num-expert", "0", "--num-random", "0"]))
            ratio = np.mean(dense) / np.mean(sparse)
            print(f"{env_id:<26}{num_envs:>5}{np.mean(sparse):>12.0f}{np.mean(dense):>11.0f}{ratio:>7.2f}", flush=True)
