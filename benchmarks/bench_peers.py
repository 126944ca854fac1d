"""The baselines next to the PPO (and A2C) a user would otherwise run: Stable-Baselines3 and torch-ac.

    pip install -r benchmarks/requirements-peers.txt      # the peers; the scripts do not need them
    python benchmarks/bench_peers.py                      # every pair, seeds 1 2 3, the budgets below
    python benchmarks/bench_peers.py --quick              # a smoke run: one seed, 8192 steps per run
    python benchmarks/bench_peers.py --tasks doorkey --seeds 1 --budget 100000 --out results.json

Pairs (the task's settings are the README's for that script; every contender gets the same ones):
- doorkey, frozenlake: `ppo_cnn_baseline.py --obs state` against Stable-Baselines3's PPO and torch-ac's PPO.
- lavagap-ppo, lavagap-a2c: `ppo_lvlm2p_distill.py --distill-coef 0` (the LVLM2P student without its teacher)
  against torch-ac's PPO and A2C (rl-starter-files' library, which the LVLM2P authors' code forks).

Every contender trains the same network, rl-starter-files' encoder with 64-unit tanh actor and critic heads
(the peers build it from `ppo_cnn_baseline.Agent`: torch-ac gets the Agent itself, Stable-Baselines3 the same
layers as a custom policy), with the same number of envs and the same hyperparameters, on one CPU thread. The
runs alternate (ours seed 1, each peer seed 1, ours seed 2, ...), each in a fresh process.

SPS is env steps per second of training: ours as the script reports it at its last iteration (startup
excluded), a peer's over its training loop. Steps to 0.9: the first env step at which the episodes that ended in
the trailing 4096 steps (at least 10 of them) have a success rate (share with a positive return) of 0.9 or more.
The settings that still differ between the contenders, and why, are in docs/baselines_vs_peers.md.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import torch
from torch.distributions import Categorical

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo_cnn_baseline  # noqa: E402

WINDOW, MIN_EPISODES, TARGET = 4096, 10, 0.9
# The pairs. `flags`: the script's command line (its defaults otherwise); `settings`: the same values for the peers.
TASKS = {
    "doorkey": {  # the README's DoorKey-5x5 target: rl-starter-files' sizes (16 envs, minibatches of 256, lr 1e-3)
        "script": "ppo_cnn_baseline.py",
        "env_id": "MiniGrid-DoorKey-5x5-v0",
        "flags": ["--obs", "state", "--num-envs", "16", "--num-minibatches", "8", "--learning-rate", "1e-3"],
        "settings": dict(
            num_envs=16,
            num_steps=128,
            num_minibatches=8,
            update_epochs=4,
            learning_rate=1e-3,
            anneal_lr=True,
            norm_adv=True,
            ent_coef=0.01,
        ),
        "peers": ["sb3-ppo", "torch-ac-ppo"],
        "budget": 150_000,
    },
    "frozenlake": {  # the README's FrozenLake8x8 target: CleanRL's defaults but lr 1e-3 and entropy 0.05
        "script": "ppo_cnn_baseline.py",
        "env_id": "FrozenLake8x8",
        "flags": ["--obs", "state", "--learning-rate", "1e-3", "--ent-coef", "0.05"],
        "settings": dict(
            num_envs=4,
            num_steps=128,
            num_minibatches=4,
            update_epochs=4,
            learning_rate=1e-3,
            anneal_lr=True,
            norm_adv=True,
            ent_coef=0.05,
        ),
        "peers": ["sb3-ppo", "torch-ac-ppo"],
        "budget": 100_000,
    },
    "lavagap-ppo": {  # the student's defaults: rl-starter-files' (4 envs, minibatches of 256, no normalisation)
        "script": "ppo_lvlm2p_distill.py",
        "env_id": "LavaGap",
        "flags": ["--distill-coef", "0"],
        "settings": dict(
            num_envs=4,
            num_steps=128,
            num_minibatches=2,
            update_epochs=4,
            learning_rate=1e-3,
            anneal_lr=False,
            norm_adv=False,
            ent_coef=0.01,
        ),
        "peers": ["torch-ac-ppo"],
        "budget": 300_000,
    },
    "lavagap-a2c": {  # the student's A2C: 5 steps per env, one update per rollout, RMSprop
        "script": "ppo_lvlm2p_distill.py",
        "env_id": "LavaGap",
        "flags": ["--distill-coef", "0", "--algo", "a2c"],
        "settings": dict(
            num_envs=4,
            num_steps=5,
            num_minibatches=1,
            update_epochs=1,
            learning_rate=1e-3,
            anneal_lr=False,
            norm_adv=False,
            ent_coef=0.01,
        ),
        "peers": ["torch-ac-a2c"],
        "budget": 300_000,
    },
}
COMMON = dict(gamma=0.99, gae_lambda=0.95, clip_coef=0.2, vf_coef=0.5, max_grad_norm=0.5, adam_eps=1e-5)


def steps_to_target(episodes: list[tuple[int, float]], budget: int) -> int | None:
    """The first env step (an episode's end) at which the episodes that ended in the trailing WINDOW steps, at
    least MIN_EPISODES of them, succeed (return > 0) at least TARGET of the time; None if never within budget."""
    ends = np.array([step for step, _ in episodes])
    wins = np.array([ret > 0 for _, ret in episodes], dtype=float)
    for i, step in enumerate(ends):
        if step > budget:
            break
        first = np.searchsorted(ends, step - WINDOW, side="right")
        if i + 1 - first >= MIN_EPISODES and wins[first : i + 1].mean() >= TARGET:
            return int(step)
    return None


def final_success(episodes: list[tuple[int, float]]) -> float:
    """The success rate of the episodes that ended in the last WINDOW steps."""
    if not episodes:
        return float("nan")
    last = episodes[-1][0]
    return float(np.mean([ret > 0 for step, ret in episodes if step > last - WINDOW]))


# --- ours: the script itself, in a fresh process -----------------------------------------------------------------


def tensorboard_episodes(run_dir: pathlib.Path) -> list[tuple[int, float]]:
    """(global_step, return) of every episode a run logged to TensorBoard (charts/episodic_return)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    episodes = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "charts/episodic_return":  # torch's SummaryWriter writes a scalar tensor
                    scalar = value.tensor.float_val[0] if value.HasField("tensor") else value.simple_value
                    episodes.append((int(event.step), float(scalar)))
    return sorted(episodes, key=lambda e: e[0])


def run_ours(task: str, seed: int, budget: int) -> dict:
    """Train with the script; its last reported SPS and the episodes it logged."""
    spec = TASKS[task]
    command = [sys.executable, str(ROOT / spec["script"]), "--env-id", spec["env_id"], *spec["flags"]]
    command += ["--seed", str(seed), "--total-timesteps", str(budget), "--checkpoint-freq", "0"]
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=one_thread_env())
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        (run_dir,) = pathlib.Path(cwd, "runs").iterdir()
        episodes = tensorboard_episodes(run_dir)
    return {"sps": float(re.findall(r"SPS=(\d+)", done.stdout)[-1]), "episodes": episodes}


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --- the peers: one process each (`--child`), the same network and envs -------------------------------------------


def make_peer_env(env_id: str, seed: int, num_envs: int, log: list) -> gym.Env:
    """The script's env (obs["state"] only, no rendering), logging (global step, return) at each episode's end:
    the envs step in lockstep, so an env's own step count times num_envs is the global step, as in the script."""
    env = ppo_cnn_baseline.make_env(env_id, seed, 0, False, "", "state", 64, "primitive")()
    return EpisodeLog(env, num_envs, log)


class EpisodeLog(gym.Wrapper):
    def __init__(self, env: gym.Env, num_envs: int, log: list):
        super().__init__(env)
        self.num_envs, self.log, self.steps = num_envs, log, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if terminated or truncated:
            self.log.append((self.steps * self.num_envs, float(info["episode"]["r"])))
        return obs, reward, terminated, truncated, info


def build_agent(observation_space: gym.Space, action_space: gym.Space) -> ppo_cnn_baseline.Agent:
    """The scripts' network (`ppo_lvlm2p_distill.Agent` has the same layers) for one env's spaces."""
    stub = SimpleNamespace(single_observation_space=observation_space, single_action_space=action_space)
    return ppo_cnn_baseline.Agent(stub, "state")


def sb3_policy_kwargs(observation_space: gym.Space) -> dict:
    """Stable-Baselines3's ActorCriticPolicy with the scripts' network: the encoder as features extractor, shared
    by a 64-unit tanh actor and critic (SB3's orthogonal init: sqrt(2), 0.01 for the actor's output, 1 for the
    critic's, as in the scripts); no /255 scaling (the scripts feed the state as it is)."""
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class RlStarterEncoder(BaseFeaturesExtractor):
        def __init__(self, space: gym.spaces.Box, state_space: gym.spaces.Box):
            network = build_agent(state_space, gym.spaces.Discrete(2)).network
            channels = state_space.shape[2]
            # SB3 moves channels first (VecTransposeImage) when it takes the state for an image (MiniGrid's 0-255)
            self.channels_last = space.shape[0] != channels
            with torch.no_grad():
                features = network(torch.zeros(1, channels, *state_space.shape[:2])).shape[1]
            super().__init__(space, features)
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network(x.permute(0, 3, 1, 2) if self.channels_last else x)

    return dict(
        features_extractor_class=RlStarterEncoder,
        features_extractor_kwargs=dict(state_space=observation_space),
        net_arch=dict(pi=[64], vf=[64]),
        activation_fn=torch.nn.Tanh,
        normalize_images=False,
    )


def train_sb3_ppo(spec: dict, seed: int, budget: int) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    s = {**COMMON, **spec["settings"]}
    batch = s["num_envs"] * s["num_steps"]
    iterations = budget // batch
    log: list = []
    envs = DummyVecEnv(
        [lambda i=i: make_peer_env(spec["env_id"], seed + i, s["num_envs"], log) for i in range(s["num_envs"])]
    )
    lr = s["learning_rate"]
    # SB3 sets the rate after a rollout (1 - k / N at iteration k), the script before it (1 - (k - 1) / N)
    schedule = (lambda remaining: lr * (remaining + 1 / iterations)) if s["anneal_lr"] else lr
    model = PPO(
        "MlpPolicy",
        envs,
        learning_rate=schedule,
        n_steps=s["num_steps"],
        batch_size=batch // s["num_minibatches"],
        n_epochs=s["update_epochs"],
        gamma=s["gamma"],
        gae_lambda=s["gae_lambda"],
        clip_range=s["clip_coef"],
        clip_range_vf=s["clip_coef"],
        normalize_advantage=s["norm_adv"],
        ent_coef=s["ent_coef"],
        vf_coef=s["vf_coef"] / 2,  # SB3's value loss is the MSE, the scripts' half of it
        max_grad_norm=s["max_grad_norm"],
        policy_kwargs=sb3_policy_kwargs(envs.observation_space),  # Adam with eps 1e-5, as the scripts
        seed=seed,
        device="cpu",
    )
    start = time.perf_counter()
    model.learn(iterations * batch)
    return {"sps": iterations * batch / (time.perf_counter() - start), "episodes": log}


class SerialEnv:
    """torch-ac's ParallelEnv (one process per env but the first) in one process, as the other contenders run:
    the same calls, the same autoreset."""

    def __init__(self, envs: list[gym.Env]):
        self.envs = envs
        self.observation_space, self.action_space = envs[0].observation_space, envs[0].action_space

    def reset(self) -> list:
        return [env.reset()[0] for env in self.envs]

    def step(self, actions):
        results = []
        for env, action in zip(self.envs, actions):
            obs, reward, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                obs, _ = env.reset()
            results.append((obs, reward, terminated, truncated, info))
        return zip(*results)


class TorchAcModel(torch.nn.Module):
    """torch-ac's ACModel interface (forward: a distribution and the values) around the scripts' Agent."""

    recurrent = False

    def __init__(self, agent: ppo_cnn_baseline.Agent):
        super().__init__()
        self.agent = agent

    def forward(self, obs: torch.Tensor) -> tuple[Categorical, torch.Tensor]:
        hidden = self.agent.encode(obs)
        return Categorical(logits=self.agent.actor(hidden)), self.agent.critic(hidden).squeeze(1)


def stack_obs(obss: list, device=None) -> torch.Tensor:
    """torch-ac's preprocess_obss: a list of observations to one float tensor (rl-starter-files does the same)."""
    return torch.as_tensor(np.stack(obss), dtype=torch.float32, device=device)


def train_torch_ac(spec: dict, seed: int, budget: int, algo: str) -> dict:
    import torch_ac
    import torch_ac.algos.base

    torch_ac.algos.base.ParallelEnv = SerialEnv  # one process, like the other contenders
    s = {**COMMON, **spec["settings"]}
    log: list = []
    envs = [make_peer_env(spec["env_id"], seed + i, s["num_envs"], log) for i in range(s["num_envs"])]
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = TorchAcModel(build_agent(envs[0].observation_space, envs[0].action_space))
    shared = dict(
        num_frames_per_proc=s["num_steps"],
        discount=s["gamma"],
        lr=s["learning_rate"],
        gae_lambda=s["gae_lambda"],
        entropy_coef=s["ent_coef"],
        value_loss_coef=s["vf_coef"] / 2,  # torch-ac's value loss is the squared error, the scripts' half of it
        max_grad_norm=s["max_grad_norm"],
        recurrence=1,
        preprocess_obss=stack_obs,
    )
    if algo == "ppo":
        batch_size = s["num_envs"] * s["num_steps"] // s["num_minibatches"]
        trainer = torch_ac.PPOAlgo(
            envs, model, "cpu", **shared, adam_eps=s["adam_eps"], clip_eps=s["clip_coef"],
            epochs=s["update_epochs"], batch_size=batch_size,
        )  # fmt: skip
    else:
        trainer = torch_ac.A2CAlgo(envs, model, "cpu", **shared, rmsprop_alpha=0.99, rmsprop_eps=1e-8)
    iterations = budget // (s["num_envs"] * s["num_steps"])
    start = time.perf_counter()
    for iteration in range(1, iterations + 1):
        if s["anneal_lr"]:
            trainer.optimizer.param_groups[0]["lr"] = (1 - (iteration - 1) / iterations) * s["learning_rate"]
        experiences, _ = trainer.collect_experiences()
        trainer.update_parameters(experiences)
    return {"sps": iterations * s["num_envs"] * s["num_steps"] / (time.perf_counter() - start), "episodes": log}


def run_peer(peer: str, task: str, seed: int, budget: int) -> dict:
    """A peer's run in a fresh process (`--child`), so that no run inherits another's state."""
    command = [sys.executable, __file__, "--child", peer, task, str(seed), str(budget)]
    done = subprocess.run(command, capture_output=True, text=True, env=one_thread_env())
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(peer: str, task: str, seed: int, budget: int) -> None:
    torch.set_num_threads(1)
    spec = TASKS[task]
    if peer == "sb3-ppo":
        result = train_sb3_ppo(spec, seed, budget)
    else:
        result = train_torch_ac(spec, seed, budget, peer.removeprefix("torch-ac-"))
    print(json.dumps(result))


# --- the side-by-side run and its table ---------------------------------------------------------------------------


def fmt_steps(step: int | None, budget: int) -> str:
    return f"not within {budget // 1000}k" if step is None else f"{step / 1000:.0f}k"


def successes(runs: list[dict]) -> str:
    return ", ".join(f"{run['final_success']:.2f}" for run in runs)


def print_table(results: list[dict], budgets: dict[str, int]) -> None:
    print(
        "\n| task | peer | SPS ours | SPS peer | ratio (ours / peer) | steps to 0.9, ours | steps to 0.9, peer "
        "| final success, ours | final success, peer |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for task in dict.fromkeys(r["task"] for r in results):
        ours = [r for r in results if r["task"] == task and r["contender"] == "ours"]
        for peer in TASKS[task]["peers"]:
            theirs = [r for r in results if r["task"] == task and r["contender"] == peer]
            if not theirs:
                continue
            sps_ours, sps_peer = np.mean([r["sps"] for r in ours]), np.mean([r["sps"] for r in theirs])
            budget = budgets[task]
            print(
                f"| {task} | {peer} | {sps_ours:.0f} | {sps_peer:.0f} | {sps_ours / sps_peer:.2f} "
                f"| {', '.join(fmt_steps(r['steps_to_0.9'], budget) for r in ours)} "
                f"| {', '.join(fmt_steps(r['steps_to_0.9'], budget) for r in theirs)} "
                f"| {successes(ours)} | {successes(theirs)} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--budget", type=int, help="env steps of every run (default: each task's own, see TASKS)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: seed 1, 8192 steps per run")
    parser.add_argument("--out", help="write every run's SPS, steps to 0.9 and episodes to this JSON file")
    parser.add_argument("--child", nargs=4, metavar=("PEER", "TASK", "SEED", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peer, task, seed, budget = args.child
        child(peer, task, int(seed), int(budget))
        return
    if args.quick:
        args.seeds, args.budget = [1], 8192
    budgets = {task: args.budget or TASKS[task]["budget"] for task in args.tasks}
    results = []
    for seed in args.seeds:
        for task in args.tasks:
            for contender in ["ours", *TASKS[task]["peers"]]:
                start = time.time()
                if contender == "ours":
                    result = run_ours(task, seed, budgets[task])
                else:
                    result = run_peer(contender, task, seed, budgets[task])
                result.update(
                    task=task,
                    contender=contender,
                    seed=seed,
                    budget=budgets[task],
                    **{"steps_to_0.9": steps_to_target(result["episodes"], budgets[task])},
                    final_success=final_success(result["episodes"]),
                    wall_s=time.time() - start,
                )
                results.append(result)
                print(
                    f"{task:<12} {contender:<13} seed {seed}: SPS {result['sps']:6.0f}  steps to 0.9 "
                    f"{fmt_steps(result['steps_to_0.9'], budgets[task]):<15} final success "
                    f"{result['final_success']:.2f}  ({result['wall_s']:.0f} s)",
                    flush=True,
                )
                if args.out:
                    pathlib.Path(args.out).write_text(json.dumps(results))
    print_table(results, budgets)


if __name__ == "__main__":
    main()
