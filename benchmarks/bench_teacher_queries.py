"""Teacher queries per env step of ppo_lvlm2p_distill, cached against the reference code's way, and the success rate of
the scripted (expert) teacher acting on its own.

    python benchmarks/bench_teacher_queries.py [--total-timesteps 20480] [--env-ids LavaGap GoToDoor]
    python benchmarks/bench_teacher_queries.py --success --noise 0 0.1 0.2 [--episodes 500]

Queries: the script trains at the reference code's settings (3 envs, 128 steps per env, 4 epochs; its 256-sample
minibatches become 2 of 192, which asks the same number of queries: every sample once per epoch) with the scripted
teacher, once with --teacher-query-mode rollout (each distinct frame once, cached) and once with minibatch (every
sample of every minibatch of every epoch, no cache, as in the reference code); the count is the script's own
`teacher/queries`. Goal: at least 4x fewer queries.

Success: the teacher's distribution for each frame (text_envs.expert_action, replaced by a random action with
probability --noise, softened by the script's default temperature) is the policy. Three teachers are measured:
"fresh", a new noisy label at every step, its most likely action taken; and the teacher as the student sees it,
whose label of each frame is drawn once and then kept (the script's cache keys frames by frame_key and never asks
again), acting greedily ("fixed greedy") or sampling its distribution ("fixed sampled"). The fixed teachers are
averaged over --teacher-draws draws of the labels, each playing --episodes episodes. The paper's Gemini teacher
succeeds about 96% of the time.
"""

import argparse
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lvlm2p_teachers as teachers  # noqa: E402
import ppo_lvlm2p_distill as lvlm2p  # noqa: E402
import text_envs  # noqa: E402

REFERENCE_SETTINGS = ["--num-envs", "3", "--num-steps", "128", "--update-epochs", "4", "--num-minibatches", "2"]


def teacher_queries(env_id: str, query_mode: str, total_timesteps: int, seed: int = 1) -> tuple[int, int]:
    """(teacher queries, env steps) of a training run of the script with the scripted teacher."""
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "ppo_lvlm2p_distill.py"),
                "--teacher",
                "expert",
                "--env-id",
                env_id,
                "--teacher-query-mode",
                query_mode,
                "--total-timesteps",
                str(total_timesteps),
                "--seed",
                str(seed),
                "--checkpoint-freq",
                "0",
                *REFERENCE_SETTINGS,
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
        (run,) = pathlib.Path(cwd, "runs").iterdir()
        events = EventAccumulator(str(run))
        events.Reload()
        last = events.Scalars("teacher/queries")[-1]
        return int(last.value), last.step


def teacher_success(
    env_id: str,
    noise: float,
    episodes: int,
    seed: int = 0,
    temperature: float = lvlm2p.Args.teacher_temperature,
    mode: str = "fresh",
) -> tuple[float, float]:
    """(success rate, mean return) of the scripted teacher acting on its own distributions: "fresh" (a new label per
    step, greedy), "fixed greedy" or "fixed sampled" (one label per frame, kept, as the student's cache keeps it)."""
    env = text_envs.make_env(env_id, seed=seed, image_size=32)
    n_actions = env.action_space.n
    teacher = teachers.ExpertTeacher(n_actions, temperature, noise, seed)
    rng = np.random.default_rng(seed + 1)
    labels: dict[bytes, np.ndarray] = {}  # the fixed teachers' label of each frame
    successes, returns = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            key = lvlm2p.frame_key(obs["image"], obs["mission"])
            if mode == "fresh" or key not in labels:
                (labels[key],) = teacher([teachers.Frame(obs["image"], obs["mission"], text_envs.expert_action(env))])
            probs = labels[key]
            action = int(rng.choice(n_actions, p=probs)) if mode == "fixed sampled" else int(np.argmax(probs))
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            done = terminated or truncated
        successes.append(info["success"])
        returns.append(total)
    return float(np.mean(successes)), float(np.mean(returns))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--env-ids", nargs="+", default=["LavaGap", "GoToDoor"])
    parser.add_argument("--total-timesteps", type=int, default=20480, help="env steps of each training run")
    parser.add_argument("--success", action="store_true", help="measure the scripted teacher's success rate instead")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2])
    parser.add_argument("--episodes", type=int, default=500, help="episodes per success-rate measurement")
    parser.add_argument("--teacher-draws", type=int, default=5, help="draws of the fixed teachers' labels")
    args = parser.parse_args()
    if args.success:
        modes = ["fresh", "fixed greedy", "fixed sampled"]
        print(f"{'env':<10}{'noise':>7}" + "".join(f"{mode + ' success':>22}{'return':>8}" for mode in modes))
        for env_id in args.env_ids:
            for noise in args.noise:
                row = [teacher_success(env_id, noise, args.episodes)]
                for mode in modes[1:]:
                    draws = [
                        teacher_success(env_id, noise, args.episodes, s, mode=mode) for s in range(args.teacher_draws)
                    ]
                    row.append(tuple(np.mean(draws, axis=0)))
                print(f"{env_id:<10}{noise:>7.3f}" + "".join(f"{s:>22.3f}{r:>8.3f}" for s, r in row), flush=True)
    else:
        print(f"{'env':<10}{'steps':>7}{'cached':>8}{'per step':>9}{'reference':>10}{'per step':>9}{'fewer':>7}")
        for env_id in args.env_ids:
            cached, steps = teacher_queries(env_id, "rollout", args.total_timesteps)
            reference, _ = teacher_queries(env_id, "minibatch", args.total_timesteps)
            print(
                f"{env_id:<10}{steps:>7}{cached:>8}{cached / steps:>9.3f}{reference:>10}{reference / steps:>9.2f}"
                f"{reference / cached:>6.1f}x",
                flush=True,
            )
