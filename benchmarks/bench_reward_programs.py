"""Training steps per second of vlm_car_reward with dense reward programs next to the sparse reward, same env and agent.

    python benchmarks/bench_reward_programs.py [--total-timesteps 20480] [--num-envs 4 16] [--repeats 2]
    python benchmarks/bench_reward_programs.py --submit     # the worker's pipe: Linux's default size vs ours
    python benchmarks/bench_reward_programs.py --os-layer   # a program call with the worker's OS layer on and off

Dense: vlm_car_reward.py with the committed reference programs (the frame rendered at 8-pixel tiles in every step,
the next sub-task's program of every env run in the sandbox worker, one worker call per vector step). Sparse:
ppo_cnn_baseline.py --obs state, the same agent, PPO and flags without frames or programs. The dense runs have the
worker's OS layer on (seccomp, Landlock, no-new-privs), as every run of the script does. The two run one after
the other, alternating, `--repeats` times each on one CPU thread; the SPS is the one each script reports at its
last iteration (startup and verification excluded, as in CleanRL). Goal: dense / sparse >= 0.7.

--submit times `Sandbox.submit` for a vector step of 16 UnlockPickup frames (random play, 8-pixel tiles) with the
pipe to the worker at Linux's default 64 KiB and at car_sandbox.PIPE_BYTES, the agent's work stood in for by a 10 ms
sleep, and the worker's time per frame.

--os-layer times worker calls of a program that returns at once (batches of 16 one-frame sequences: the cost of a call
itself, round trip included) with the OS layer on (`os_layer="require"`) and off, alternating, and prints the
difference per call: what the seccomp filter and Landlock add to each of the worker's system calls.
"""

import argparse
import fcntl
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import car_sandbox  # noqa: E402
import text_envs  # noqa: E402

ENVS = {"MiniGrid-DoorKey-8x8-v0": "DoorKey-8x8", "MiniGrid-UnlockPickup-v0": "UnlockPickup"}


def training_sps(script: str, flags: list[str]) -> float:
    """The SPS that a training run of `script` reports at its last iteration."""
    with tempfile.TemporaryDirectory() as cwd:  # the run's tensorboard files go nowhere
        done = subprocess.run(
            [sys.executable, str(ROOT / script), *flags],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    return float(re.findall(r"SPS=(\d+)", done.stdout)[-1])


def submit_times(steps: int = 300, num_envs: int = 16) -> None:
    """Median `submit` time per vector step with the default and the enlarged pipe, and the worker's time per frame."""
    programs = [(ROOT / "reference_programs" / "UnlockPickup" / f"subtask_{k}.py").read_text() for k in (1, 2, 3)]
    env = text_envs.make_env("MiniGrid-UnlockPickup-v0", seed=0, image_size=88, with_image=True)  # 8-pixel tiles
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    frames = [env.step(int(rng.integers(env.action_space.n)))[0]["image"][None] for _ in range(400)]
    print(f"{'pipe':>10}{'submit ms (median)':>20}{'submit ms (mean)':>18}")
    for pipe_bytes in (1 << 16, car_sandbox.PIPE_BYTES):
        with car_sandbox.Sandbox(programs) as sandbox:
            fcntl.fcntl(sandbox.process.stdin.fileno(), fcntl.F_SETPIPE_SZ, pipe_bytes)
            times = []
            for i in range(steps):
                batch = [frames[(i * num_envs + j) % len(frames)] for j in range(num_envs)]
                start = time.perf_counter()
                sandbox.submit([0] * num_envs, batch)
                times.append(time.perf_counter() - start)
                time.sleep(0.01)  # the agent acts and the envs step
                sandbox.collect()
        print(f"{pipe_bytes >> 10:>7} KiB{np.median(times) * 1e3:>20.2f}{np.mean(times) * 1e3:>18.2f}")
    with car_sandbox.Sandbox(programs) as sandbox:
        start = time.perf_counter()
        for i in range(20):
            sandbox.advance([0] * num_envs, [frames[(i * num_envs + j) % len(frames)] for j in range(num_envs)])
    print(
        f"worker: {(time.perf_counter() - start) / (20 * num_envs) * 1e3:.2f} ms per frame (sub-task 1's program, "
        "round trip included)"
    )


def os_layer_cost(batches: int = 2000, repeats: int = 3, num_envs: int = 16) -> None:
    """Microseconds per program call with the worker's OS layer on and off, and the difference."""
    program = car_sandbox.load_checker("def check(frame):\n    return False")
    frames = [np.zeros((1, 64, 64, 3), dtype=np.uint8)] * num_envs
    times: dict[str, list[float]] = {"require": [], "off": []}
    for _ in range(repeats):
        for layer in times:
            with car_sandbox.Sandbox([program], os_layer=layer) as sandbox:
                start = time.perf_counter()
                for _ in range(batches):
                    sandbox.advance([0] * num_envs, frames)
                times[layer].append((time.perf_counter() - start) / (batches * num_envs) * 1e6)
                confinement = sandbox.confinement
            print(f"{layer:>8}: {times[layer][-1]:6.2f} us per call ({confinement})", flush=True)
    on, off = np.median(times["require"]), np.median(times["off"])
    print(f"median: on {on:.2f} us, off {off:.2f} us per call; the OS layer adds {on - off:+.2f} us per call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-timesteps", type=int, default=20480, help="env steps of each measurement")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--env-ids", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each script, alternating")
    parser.add_argument("--submit", action="store_true", help="time the worker's pipe instead of training runs")
    parser.add_argument("--os-layer", action="store_true", help="time a program call with the OS layer on and off")
    args = parser.parse_args()
    if args.submit:
        submit_times()
        sys.exit()
    if args.os_layer:
        os_layer_cost()
        sys.exit()
    print(f"{'env':<26}{'envs':>5}{'sparse SPS':>12}{'dense SPS':>11}{'ratio':>7}")
    for env_id in args.env_ids:
        for num_envs in args.num_envs:
            common = [
                "--env-id",
                env_id,
                "--num-envs",
                str(num_envs),
                "--num-minibatches",
                "8" if num_envs > 4 else "4",
                "--total-timesteps",
                str(args.total_timesteps),
            ]
            sparse, dense = [], []
            for _ in range(args.repeats):
                sparse.append(
                    training_sps("ppo_cnn_baseline.py", [*common, "--obs", "state", "--checkpoint-freq", "0"])
                )
                dense.append(
                    training_sps(
                        "vlm_car_reward.py",
                        [
                            *common,
                            "--reward-programs",
                            str(ROOT / "reference_programs" / ENVS[env_id]),
                            "--num-expert",
                            "0",
                            "--num-random",
                            "0",
                        ],
                    )
                )
            ratio = np.mean(dense) / np.mean(sparse)
            print(f"{env_id:<26}{num_envs:>5}{np.mean(sparse):>12.0f}{np.mean(dense):>11.0f}{ratio:>7.2f}", flush=True)
