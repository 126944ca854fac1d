"""Training steps per second of ppo_cnn_baseline next to the same vector env stepped with random actions.

    python benchmarks/bench_cnn_baseline.py [--total-timesteps 20480] [--env-ids FrozenLake8x8 ...] [--num-envs 4 16]
    python benchmarks/bench_cnn_baseline.py --breakdown    # where one iteration's time goes, --obs state

The ratio is what learning costs on top of the simulator (goal: at least 0.5 with --obs state). Both use
the script's own envs and one CPU thread: 4 envs with CleanRL's defaults otherwise, 16 envs with 8 minibatches
(the README's MiniGrid settings: the same 4 update epochs, minibatches of 256). The training SPS is the one the
script reports at its last iteration (startup excluded, as in CleanRL).

--breakdown times the parts of an iteration separately. Env steps cost more inside the rollout, between the
agent's forward passes, than in a loop of their own. The rollout and the update are timed for the script's
agent and for a linear agent (one layer per head), the cheapest there is: its ratio says what no network
could beat.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.distributions import Categorical

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


def seconds_per_call(fn, calls: int) -> float:
    """Mean wall time of fn() over `calls` calls, after 10 warm-up calls."""
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


class LinearAgent(torch.nn.Module):
    """The cheapest agent there is: one linear layer from the flattened observation to each head."""

    def __init__(self, envs):
        super().__init__()
        size = int(np.prod(envs.single_observation_space.shape))
        self.actor = torch.nn.Linear(size, envs.single_action_space.n)
        self.critic = torch.nn.Linear(size, 1)

    def get_action_and_value(self, x, action=None):
        x = x.flatten(1)
        probs = Categorical(logits=self.actor(x))
        action = probs.sample() if action is None else action
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


def update_seconds(agent, args, envs, minibatch_size: int) -> float:
    """Wall time of one minibatch update: the script's PPO loss, backward, clipping and Adam step on random
    data (only the sizes matter for the time)."""
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    mb_obs = torch.rand(minibatch_size, *envs.single_observation_space.shape)
    mb_actions = torch.randint(envs.single_action_space.n, (minibatch_size,))
    mb_advantages, mb_returns, mb_logprobs = torch.randn(3, minibatch_size)

    def minibatch_update():
        _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb_obs, mb_actions)
        ratio = (newlogprob - mb_logprobs).exp()
        pg_loss = torch.max(-mb_advantages * ratio, -mb_advantages * torch.clamp(ratio, 0.8, 1.2)).mean()
        v_loss = 0.5 * ((newvalue.view(-1) - mb_returns) ** 2).mean()
        loss = pg_loss - args.ent_coef * entropy.mean() + v_loss * args.vf_coef
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        optimizer.step()

    return seconds_per_call(minibatch_update, 50)


def rollout_seconds(agent, envs, steps: int = 300) -> tuple[float, float]:
    """Mean seconds per rollout step in the env and in the agent's forward pass, in the rollout's order (a
    forward pass, then the env step), from the same reset for every agent, after 10 warm-up steps."""
    obs, _ = envs.reset(seed=0)
    forward = env_in_loop = 0.0
    for step in range(-10, steps):
        start = time.perf_counter()
        with torch.no_grad():
            action = agent.get_action_and_value(torch.as_tensor(obs, dtype=torch.float32))[0]
        middle = time.perf_counter()
        obs = envs.step(action.numpy())[0]
        if step >= 0:
            forward, env_in_loop = forward + middle - start, env_in_loop + time.perf_counter() - middle
    return env_in_loop / steps, forward / steps


def iteration_breakdown(env_id: str, num_envs: int, num_minibatches: int) -> dict[str, float]:
    """Milliseconds per iteration (num_envs x 128 steps, --obs state): env steps with random actions alone,
    env steps and forward passes as the rollout alternates them, and the update epochs, for the script's
    agent and for a linear one."""
    args = ppo.Args(env_id=env_id, obs="state", num_envs=num_envs, num_minibatches=num_minibatches)
    envs = ppo.make_envs(args, run_name="")
    envs.reset(seed=0)
    envs.action_space.seed(0)
    env_alone = seconds_per_call(lambda: envs.step(envs.action_space.sample()), 300)
    minibatch_size = num_envs * args.num_steps // num_minibatches
    updates = args.update_epochs * num_minibatches
    ms = {"env": env_alone * 1000 * args.num_steps}
    for prefix, agent in (("", ppo.Agent(envs, "state")), ("linear ", LinearAgent(envs))):
        env_in_loop, forward = rollout_seconds(agent, envs)
        ms[prefix + "env in loop"] = env_in_loop * 1000 * args.num_steps
        ms[prefix + "forward"] = forward * 1000 * args.num_steps
        ms[prefix + "update"] = update_seconds(agent, args, envs, minibatch_size) * updates * 1000
    envs.close()
    return ms


def training_sps(env_id: str, obs: str, num_envs: int, total_timesteps: int) -> float:
    """The SPS that a training run of the script reports at its last iteration."""
    with tempfile.TemporaryDirectory() as cwd:  # the run's tensorboard files go nowhere
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "ppo_cnn_baseline.py"),
                "--env-id",
                env_id,
                "--obs",
                obs,
                "--num-envs",
                str(num_envs),
                "--num-minibatches",
                "4" if num_envs <= 4 else "8",
                "--total-timesteps",
                str(total_timesteps),
                "--checkpoint-freq",
                "0",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
    return float(re.findall(r"SPS=(\d+)", done.stdout)[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--total-timesteps", type=int, default=20480, help="env steps of each measurement")
    parser.add_argument("--env-ids", nargs="+", default=["FrozenLake8x8", "MiniGrid-DoorKey-5x5-v0"])
    parser.add_argument("--obs", nargs="+", default=["state", "image"], choices=["state", "image"])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--breakdown", action="store_true", help="time the parts of one iteration instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)  # as the script runs
    if args.breakdown:  # bound: the ratio if the forward passes cost nothing; linear: a linear agent's ratio
        columns = ["env", "env in loop", "forward", "update", "linear env in loop", "linear forward", "linear update"]
        print(
            f"{'env':<26}{'envs':>6}"
            + "".join(f"{c + ' ms':>{len(c) + 6}}" for c in columns)
            + f"{'bound':>7}{'linear':>8}"
        )
        for env_id in args.env_ids:
            for num_envs in args.num_envs:
                ms = iteration_breakdown(env_id, num_envs, 4 if num_envs <= 4 else 8)
                bound = ms["env"] / (ms["env in loop"] + ms["update"])
                linear = ms["env"] / (ms["linear env in loop"] + ms["linear forward"] + ms["linear update"])
                print(
                    f"{env_id:<26}{num_envs:>6}"
                    + "".join(f"{ms[c]:>{len(c) + 6}.0f}" for c in columns)
                    + f"{bound:>7.2f}{linear:>8.2f}",
                    flush=True,
                )
        sys.exit()
    print(f"{'env':<26}{'obs':>7}{'envs':>6}{'random-action SPS':>19}{'training SPS':>14}{'ratio':>7}")
    for env_id in args.env_ids:
        for obs in args.obs:
            for num_envs in args.num_envs:
                raw = random_action_sps(env_id, obs, num_envs, args.total_timesteps)
                train = training_sps(env_id, obs, num_envs, args.total_timesteps)
                print(f"{env_id:<26}{obs:>7}{num_envs:>6}{raw:>19.0f}{train:>14.0f}{train / raw:>7.2f}", flush=True)
