"""Code as Reward (VLM-CaR): a VLM writes sub-task checking code, verified on trajectories and used as dense reward.

Venuto et al. 2024, "Code as Reward: Empowering Reinforcement Learning with VLMs" (ICML 2024,
https://proceedings.mlr.press/v235/venuto24a.html). A vision-language model (the "coder") breaks the task into sub-tasks
(stage 1) and writes, for each one, a program `check(frame) -> bool` that says from one observation whether the sub-task
is done (stage 2). The programs are verified on expert and random trajectories and regenerated with the failure report
until they pass (stage 3); then PPO trains on the env reward plus a bonus for each sub-task the first time it completes,
in order, within an episode (stage 4). The VLM runs only before training: every reward afterwards costs a program call,
not a VLM query. This is ppo_cnn_baseline.py on the "state" observation, with its checkpoints and its evaluation of the
saved model, plus the four stages after compute_gae: the prompts, the readers of the coder's replies, the verification
and the reward rule. The rest is plumbing: car_coders.py loads the coder (a local VLM) or talks to it (an OpenAI-
compatible server); car_sandbox.py checks generated code at load against allowlists, runs it in a worker process
confined by a seccomp filter and OS limits (it is hostile input), and saves and reads back the accepted programs.
Needs: text_envs.py, car_coders.py, car_sandbox.py
"""

import ast
import importlib.util
import operator
import os
import random
import re
import signal
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from minigrid.core.constants import COLOR_TO_IDX, COLORS, OBJECT_TO_IDX
from minigrid.minigrid_env import MiniGridEnv
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import text_envs
from car_coders import (
    DEFAULT_MODEL_ID,
    CoderUnavailable,
    HFCoder,
    OpenAICoder,
    load_coder_model,
    resolve_model_source,
)
from car_sandbox import (
    NEVER_DONE,
    Sandbox,
    UnsafeCodeError,
    confinement_problem,
    load_checker,
    load_programs,
    save_programs,
)

ALGORITHM = "vlm_car_reward"
# flags that fix the envs, the frames the programs read and the network: a checkpoint resumes only with the same values
ENV_FLAGS = ("env_id", "checker_input", "tile_size", "num_envs")
# what a checkpoint holds, and of which type
CHECKPOINT_LAYOUT = {
    "args": dict,
    "run_name": str,
    "iteration": int,
    "global_step": int,
    "agent": dict,
    "optimizer": dict,
    "envs": list,
    "next_obs": torch.Tensor,
    "next_done": torch.Tensor,
    "subtasks": list,
    "programs": list,
    "rng": dict,
}
STATE, FRAME = 0, 1  # the training envs' observation: (the agent's input, what the programs read)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """cuDNN picks deterministic algorithms (--no-torch-deterministic: faster, not bit-reproducible)"""
    cuda: bool = True
    """train on the GPU when there is one (--no-cuda: on the CPU)"""
    track: bool = False
    """track this experiment with Weights and Biases"""
    wandb_project_name: str = "vlm-rl"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the model into the `runs/{run_name}` folder, then evaluate the saved model"""
    eval_episodes: int = 10
    """the number of episodes of each evaluation of the saved model (greedy and sampled actions)"""
    checkpoint_freq: int = 10
    """save a checkpoint to `runs/{run_name}/checkpoint.pt` every this many iterations (0: never)"""
    resume: str | None = None
    """path of a checkpoint to continue from, programs included (the env flags must be the same as the checkpoint's)"""

    # Algorithm specific arguments
    env_id: str = "DoorKey"
    """the id of the environment: a text_envs grid env's short id or a full MiniGrid-*/BabyAI-* id"""
    # stages 1 to 3: the coder writes the reward programs, verification accepts them
    coder: str = f"hf:{DEFAULT_MODEL_ID}"
    """the VLM that writes the programs: hf:<hub id or directory> or openai:<model> (see --coder-base-url)"""
    coder_base_url: str | None = None
    """the OpenAI-compatible server of an openai: coder, e.g. http://localhost:8000/v1"""
    coder_api_key_env: str = "OPENAI_API_KEY"
    """the environment variable holding the server's API key (sent as a bearer token, never logged)"""
    coder_timeout: float = 120.0
    """seconds one reply of an openai: coder may take, its retries included"""
    coder_retries: int = 3
    """retries of a failed request (5xx, 429, a lost connection) to an openai: coder"""
    coder_backoff: float = 1.0
    """seconds before the first retry, doubled for each next one (longer where a 429 or 503 says so)"""
    max_new_tokens: int = 768
    """the most tokens the coder writes in one reply"""
    checker_input: Literal["frame", "state"] = "frame"
    """what a program reads: the RGB frame of the whole grid (the paper's setting) or the symbolic state (7x7x5)"""
    tile_size: int = 8
    """pixels per grid cell of the frames the programs read"""
    num_expert: int = 10
    """expert trajectories of the verification: each must complete every sub-task, in order"""
    num_random: int = 20
    """random trajectories of the verification: at most 10% may complete two or more sub-tasks"""
    max_rounds: int = 3
    """rounds of writing and verifying programs; after a failed round the coder sees the failure report"""
    reward_programs: str | None = None
    """a folder of programs saved by an earlier run (runs/<run_name>/reward_programs): no coder is used"""
    if_unverified: Literal["exit", "sparse"] = "exit"
    """when no programs pass verification: exit with status 1, or train on the env's sparse reward alone"""
    checker_timeout: float = 0.1
    """seconds one program call may take before it counts as not done"""
    checker_memory_mb: int = 1024
    """address-space limit of the worker process that runs the programs"""
    accept_unconfined_programs: bool = False
    """run the programs even where seccomp / Landlock cannot be installed (the load check and OS limits stay)"""
    # stage 4: PPO on the env reward plus the sub-task bonus
    subtask_bonus: float = 0.1
    """reward added for each sub-task the first time it completes, in order, within an episode"""
    total_timesteps: int = 100000
    """total timesteps of the experiments (0: write and verify the programs only)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 4
    """the number of parallel game environments"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper."""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold"""

    # computed from the flags above at start-up (hidden from --help)
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size (computed in runtime)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""


def make_env(env_id: str, seed: int, image_size: int, frames: str | None) -> Callable[[], gym.Env]:
    """A thunk building one text_envs env whose observation is the tuple (obs["state"], obs[frames]): the agent's
    input and what the programs read ("image" or "state"; the state again without programs)."""

    def thunk() -> gym.Env:
        env = text_envs.make_env(env_id, seed=seed, image_size=image_size, with_image=frames == "image")
        env = gym.wrappers.RecordEpisodeStatistics(env)
        key = frames or "state"
        space = gym.spaces.Tuple((env.observation_space["state"], env.observation_space[key]))
        # operator.itemgetter, not a lambda: the envs are pickled into checkpoints
        return gym.wrappers.TransformObservation(env, operator.itemgetter("state", key), space)

    return thunk


def make_envs(args: Args, image_size: int, frames: str | None) -> gym.vector.SyncVectorEnv:
    """The training vector env; SAME_STEP autoreset puts each episode's last observation in infos["final_obs"]."""
    return gym.vector.SyncVectorEnv(
        [make_env(args.env_id, args.seed + i, image_size, frames) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights and constant biases, as in CleanRL."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """ppo_cnn_baseline's agent for a symbolic grid: rl-starter-files' convs, actor and critic heads of 64 tanh
    units."""

    def __init__(self, envs: gym.vector.VectorEnv):
        super().__init__()
        space = envs.single_observation_space[STATE]
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(space.shape[2], 16, 2)),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            layer_init(nn.Conv2d(16, 32, 2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 2)),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            num_features = self.encode(torch.zeros(1, *space.shape)).shape[1]
        num_actions = envs.single_action_space.n
        self.critic = nn.Sequential(
            layer_init(nn.Linear(num_features, 64)), nn.Tanh(), layer_init(nn.Linear(64, 1), std=1.0)
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(num_features, 64)), nn.Tanh(), layer_init(nn.Linear(64, num_actions), std=0.01)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The grid, channels first, through the encoder."""
        return self.network(x.permute(0, 3, 1, 2))

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        """V(x)."""
        return self.critic(self.encode(x))

    def get_action_and_value(
        self, x: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sampled (or the given) action, its log-probability, the policy's entropy and V(x)."""
        hidden = self.encode(x)
        probs = Categorical(logits=self.actor(hidden))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    final_values: torch.Tensor,
    next_value: torch.Tensor,
    next_done: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns for (num_steps, num_envs) tensors.

    `dones[t]` says that obs[t] starts a new episode (the step before ended one); `final_values[t]` is
    V(final obs) where step t truncated an episode and 0 elsewhere, so a time limit is not mistaken for the
    end of the task.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            nextvalues = values[t + 1]
        # after a truncation nextnonterminal is 0 and final_values[t] carries the bootstrap (CleanRL #198)
        delta = rewards[t] + gamma * (nextvalues * nextnonterminal + final_values[t]) - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


# ---------------------------------------------------------------------------------------------------------------------
# The coder: the VLM that writes the reward programs (car_coders.py loads it and talks HTTP)
# ---------------------------------------------------------------------------------------------------------------------
def coder_kind(coder: str) -> Literal["hf", "openai"] | None:
    """Which backend a --coder value names, or None."""
    prefix, _, name = coder.partition(":")
    return prefix if prefix in ("hf", "openai") and name else None


def build_coder(args: Args, device: torch.device) -> Callable[[str, Sequence[np.ndarray]], str]:
    """The coder that --coder names: a callable from a prompt and images to its reply."""
    kind, name = coder_kind(args.coder), args.coder.partition(":")[2]
    if kind == "openai":
        return OpenAICoder(
            name,
            args.coder_base_url,
            os.environ.get(args.coder_api_key_env),
            args.max_new_tokens,
            args.coder_timeout,
            args.coder_retries,
            args.coder_backoff,
        )
    model, processor = load_coder_model(name, device)
    return HFCoder(model, processor, args.max_new_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: the coder lists the sub-tasks, from the first and the last frame of an expert episode and the task
# ---------------------------------------------------------------------------------------------------------------------
MAX_SUBTASKS = 8
SUBTASK_PROMPT = (
    "The two images show a grid world from above: the first at the start of an episode, the second at its end, after "
    "an expert completed the task. The agent is the red triangle. The task: {mission}.\n"
    "Break the task into the sub-tasks the agent completes, in order, each one visible in a single image of the grid. "
    "Answer with a numbered list, one short sub-task per line (at most {max_subtasks}), and nothing else."
)
# [^\S\n]* (spaces, not newlines) before the number: \s* there made a reply of blank lines cost quadratic time
NUMBERED = re.compile(r"^[^\S\n]*(?:step\s*)?\d{1,2}\s*[.):]\s*(.*\S)\s*$", re.IGNORECASE | re.MULTILINE)


class NoPrograms(Exception):
    """No reward programs passed verification; the message says why (one sentence, without its full stop)."""


def parse_subtasks(text: str) -> list[str]:
    """The numbered list of a stage-1 reply, in order (markdown emphasis removed); [] when there is none."""
    items = [re.sub(r"[*_`]+", "", match.group(1)).strip() for match in NUMBERED.finditer(text)]
    return [item for item in items if item]


def list_subtasks(
    coder: Callable[[str, Sequence[np.ndarray]], str],
    mission: str,
    first: np.ndarray,
    last: np.ndarray,
    attempts: int,
    log: Callable[[str], None],
) -> list[str]:
    """Stage 1: the sub-tasks that the coder lists from the first and the last frame of an expert episode, asked up
    to `attempts` times for a numbered list."""
    reply = ""
    for attempt in range(attempts):
        reply = coder(SUBTASK_PROMPT.format(mission=mission, max_subtasks=MAX_SUBTASKS), [first, last])
        subtasks = parse_subtasks(reply)[:MAX_SUBTASKS]
        log(f"stage 1, attempt {attempt + 1}: sub-tasks {subtasks}")
        if subtasks:
            return subtasks
    raise NoPrograms(
        f"The coder listed no sub-tasks (a numbered list) in {attempts} attempt(s), so there are no "
        f"reward programs (its last reply began {reply[:80]!r})"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: for each sub-task the coder writes `check(frame) -> bool`, true once the sub-task is done
# ---------------------------------------------------------------------------------------------------------------------
FRAME_INPUT = (
    "`frame` is a numpy uint8 array of shape ({height}, {width}, 3), RGB: the whole grid seen from above (the image "
    "shows the start of an episode), {cols} x {rows} cells of {tile} x {tile} pixels; cell (x, y) covers "
    "frame[y*{tile}:(y+1)*{tile}, x*{tile}:(x+1)*{tile}]. Walls are grey {grey}, the goal is a green square, the agent "
    "is a red triangle, and keys, doors, balls and boxes are drawn in their colour; a locked door is a filled square, "
    "an open door a thin bar at the side of its cell, and an object the agent carries is not drawn. Colours (RGB): "
    "{colours}."
)
STATE_INPUT = (
    "`frame` is a numpy uint8 array of shape (7, 7, 5): the agent's 7 x 7 view, frame[x, y], the agent at frame[3, 6] "
    "looking towards y = 0 (its own cell holds what it carries). Channel 0 is the object ({objects}), channel 1 the "
    "colour ({colours}), channel 2 the state (doors: 0 open, 1 closed, 2 locked), channels 3 and 4 the mission's "
    "target object and colour + 1 (0: none)."
)
PROGRAM_PROMPT = (
    "A grid world. The task: {mission}. Its sub-tasks, in order:\n{subtasks}\n"
    "Write a Python function `def check(frame) -> bool` that returns True exactly when sub-task {k} ({subtask}) has "
    "been completed in the observation `frame`, and False before. {input}\n"
    "numpy is available as `np` and the math module as `math`; nothing else can be imported, names starting with an "
    "underscore are not allowed, and the function must not read or write files. Answer with the code in one "
    "```python block."
)
FEEDBACK_PROMPT = (
    "\n\nYour previous program for this sub-task was:\n```python\n{code}\n```\nIt failed verification on expert and "
    "random trajectories: {report}. Write a corrected program."
)


def program_prompt(
    mission: str,
    subtasks: Sequence[str],
    k: int,
    checker_input: str,
    frame_shape: tuple[int, ...],
    grid: tuple[int, int],
    tile: int,
) -> str:
    """The stage-2 prompt for sub-task k: the task, all sub-tasks, and what `frame` holds."""
    if checker_input == "frame":
        colours = ", ".join(f"{name} {tuple(int(v) for v in rgb)}" for name, rgb in COLORS.items())
        described = FRAME_INPUT.format(
            height=frame_shape[0],
            width=frame_shape[1],
            cols=grid[0],
            rows=grid[1],
            tile=tile,
            grey=tuple(int(v) for v in COLORS["grey"]),
            colours=colours,
        )
    else:
        described = STATE_INPUT.format(
            objects=", ".join(f"{i} {name}" for name, i in OBJECT_TO_IDX.items()),
            colours=", ".join(f"{i} {name}" for name, i in COLOR_TO_IDX.items()),
        )
    listed = "\n".join(f"{i + 1}. {subtask}" for i, subtask in enumerate(subtasks))
    return PROGRAM_PROMPT.format(mission=mission, subtasks=listed, k=k + 1, subtask=subtasks[k], input=described)


# What counts as the program in a reply is the method's: a reply read wrongly costs a round of verification
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
CODE_LINE = re.compile(r"^(?:import |from |def |class |@|#|[A-Za-z_][A-Za-z0-9_]* = |[ \t]|\s*$)")


def _parses(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body)


def extract_code(text: str) -> str | None:
    """The program in a reply: the fenced block that defines `check` (a block cut off at the end of the reply counts),
    else the code lines around the first `def check` up to the prose on either side, with or without the lines above
    it and after its body, whichever parses first; None when there is no parsable `check`."""
    blocks = [match.group(2) for match in FENCE.finditer(text)]
    for block in blocks:
        if "def check" in block and _parses(block):
            return block.strip() + "\n"
    lines = text.splitlines()[:500]
    check = next((i for i, line in enumerate(lines) if line.startswith("def check")), None)
    if check is None:
        return None
    # a handful of parses, not one per pair of lines: a 500-line reply of prose took 30 s to search that way
    start = check
    while start > 0 and CODE_LINE.match(lines[start - 1]):  # imports and constants above it
        start -= 1
    body_end = check + 1
    while body_end < len(lines) and (not lines[body_end].strip() or lines[body_end][0] in " \t"):
        body_end += 1
    end = body_end
    while end < len(lines) and CODE_LINE.match(lines[end]):  # helpers after it
        end += 1
    for first, last in ((start, end), (start, body_end), (check, end), (check, body_end)):
        code = "\n".join(lines[first:last])
        if _parses(code):
            return code.strip() + "\n"
    return None


def read_program(reply: str) -> tuple[str, str, str | None]:
    """The code in a reply ("" when there is none), the program the worker runs for it (validated by load_checker,
    else NEVER_DONE) and why the code has no program of its own (None when it has)."""
    code = extract_code(reply) or ""
    if not code:
        return "", NEVER_DONE, "the reply has no `def check(frame)` in a ```python block"
    try:
        return code, load_checker(code), None
    except UnsafeCodeError as error:
        return code, NEVER_DONE, f"UnsafeCodeError: {error}"


# ---------------------------------------------------------------------------------------------------------------------
# Stage 3: verification on expert and random trajectories, failing programs rewritten with the failure report
# ---------------------------------------------------------------------------------------------------------------------
VERIFY_SEED = 1_000_000  # verification layouts come from reset seeds far from the training seeds
MAX_RANDOM_SHARE = 0.1  # the paper's test: at most 10% of random trajectories may complete two or more sub-tasks
# Random trajectories are cut at this many times the longest expert trajectory: whole random episodes of
# DoorKey-8x8 (640 steps) open the door in ~15% of them, and the paper's 10% test would refuse exact programs.
RANDOM_LENGTH = 4


def collect_trajectory(env: gym.Env, seed: int, expert: bool, key: str, max_steps: int | None = None) -> np.ndarray:
    """The frames [T + 1, ...] the programs read in one episode of the env's expert (text_envs.expert_action) or of
    uniformly random actions, from reset(seed) to the last observation, cut after `max_steps` steps."""
    obs, _ = env.reset(seed=seed)
    frames, rng = [obs[key]], np.random.default_rng(seed)
    while max_steps is None or len(frames) <= max_steps:
        action = text_envs.expert_action(env) if expert else int(rng.integers(env.action_space.n))
        obs, _, terminated, truncated, _ = env.step(action)
        frames.append(obs[key])
        if terminated or truncated:
            break
    return np.stack(frames)


class Verification(NamedTuple):
    accepted: bool
    failing: dict[int, str]  # sub-task index -> why its program must be rewritten
    summary: str  # one line
    expert_completed: list[int]  # per sub-task: expert trajectories that completed it (in order)
    random_completed: list[int]  # per sub-task: random trajectories that completed it (in order)
    random_two_or_more: int  # random trajectories that completed two or more sub-tasks


def start_sandbox(programs: Sequence[str], args: Args) -> Sandbox:
    """A worker for the programs, with the OS layer required unless --accept-unconfined-programs."""
    return Sandbox(
        programs,
        args.checker_timeout,
        args.checker_memory_mb,
        "prefer" if args.accept_unconfined_programs else "require",
    )


def verify(
    sandbox: Sandbox,
    subtasks: Sequence[str],
    expert: Sequence[np.ndarray],
    random_play: Sequence[np.ndarray],
    load_errors: Sequence[str | None],
) -> Verification:
    """The paper's test: every expert trajectory completes every sub-task in order, and at most 10% of random
    trajectories complete two or more. Ours on top: no sub-task is complete in an episode's first frame (an
    always-true program next to good ones would otherwise pass)."""
    n = len(subtasks)
    expert_steps = [sandbox.advance([0], [frames])[0] for frames in expert]
    random_steps = [sandbox.advance([0], [frames])[0] for frames in random_play]
    expert_completed = [sum(len(steps) > k for steps in expert_steps) for k in range(n)]
    random_completed = [sum(len(steps) > k for steps in random_steps) for k in range(n)]
    random_two_or_more = random_completed[1] if n > 1 else 0
    allowed = int(MAX_RANDOM_SHARE * len(random_play))
    at_start = sum(steps[:1] == [0] for steps in expert_steps + random_steps)
    failing: dict[int, str] = {k: f"it could not run ({error})" for k, error in enumerate(load_errors) if error}
    if at_start and 0 not in failing:
        failing[0] = f"it is already True in the first frame of {at_start} episodes, before the agent did anything"
    first_missed = next((k for k in range(n) if expert_completed[k] < len(expert)), None)
    if first_missed is not None and first_missed not in failing:
        failing[first_missed] = (
            f"the expert completed sub-task {first_missed + 1} in only "
            f"{expert_completed[first_missed]} of {len(expert)} trajectories (needs all)"
        )
    if random_two_or_more > allowed:
        for k in range(1, n):
            if random_completed[k] > allowed and k not in failing:
                failing[k] = (
                    f"random play completed it (after the sub-tasks before it) in {random_completed[k]} of "
                    f"{len(random_play)} random trajectories (at most {allowed} may complete two or more)"
                )
    summary = (
        f"expert completed {expert_completed} of {len(expert)}, random completed {random_completed} of "
        f"{len(random_play)} (two or more: {random_two_or_more}, allowed {allowed}), checker errors "
        f"{sandbox.errors}"
    )
    return Verification(not failing, failing, summary, expert_completed, random_completed, random_two_or_more)


def write_reward_programs(
    coder: Callable[[str, Sequence[np.ndarray]], str],
    env: gym.Env,
    args: Args,
    expert: Sequence[np.ndarray],
    random_play: Sequence[np.ndarray],
    grid: tuple[int, int],
    log: Callable[[str], None],
) -> tuple[list[str], list[str]]:
    """Stages 1 to 3: sub-tasks from the first and last frame of an expert episode, one program per sub-task, and
    rounds of verification in which the failing programs are rewritten with the failure report."""
    shown = collect_trajectory(env, VERIFY_SEED - 1, expert=True, key="image")
    mission = env.unwrapped.mission
    subtasks = list_subtasks(coder, mission, shown[0], shown[-1], args.max_rounds, log)  # stage 1
    codes = [""] * len(subtasks)  # the code as the coder wrote it, shown back with the failure report
    programs, load_errors = [""] * len(subtasks), [None] * len(subtasks)  # what the worker runs; why not the code
    to_write = dict.fromkeys(range(len(subtasks)), "")  # sub-task -> the failure report of its last program
    for round_ in range(1, args.max_rounds + 1):
        for k, failure in to_write.items():  # stage 2, or a rewrite with the report of stage 3
            prompt = program_prompt(mission, subtasks, k, args.checker_input, expert[0].shape[1:], grid, args.tile_size)
            if failure:
                prompt += FEEDBACK_PROMPT.format(code=codes[k] or "(no code)", report=failure)
            codes[k], programs[k], load_errors[k] = read_program(coder(prompt, [shown[0]]))
        with start_sandbox(programs, args) as sandbox:
            errors = [load_errors[k] or sandbox.load_errors[k] for k in range(len(subtasks))]
            verification = verify(sandbox, subtasks, expert, random_play, errors)
        log(f"stage 3, round {round_}: {verification.summary}")
        for k, reason in verification.failing.items():
            log(f"  sub-task {k + 1} ({subtasks[k]}) fails: {reason}")
        if verification.accepted:
            return subtasks, programs
        to_write = dict(verification.failing)
    k, reason = min(verification.failing.items())
    raise NoPrograms(
        f"The coder's reward programs did not pass verification in {args.max_rounds} round(s) "
        f"(sub-task {k + 1}, {subtasks[k]!r}: {reason})"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stage 4: reward = env reward + a bonus for each sub-task the first time it completes, in order, in an episode
# ---------------------------------------------------------------------------------------------------------------------
RECENT_FRAMES = 16  # per env, the frames its next program found not done that are not sent again


class SubtaskProgress:
    """The sub-tasks that each env of a vector env has completed, in order, in its episode, checked by the worker.
    `submit` sends the frames of a vector step, each env's next not-yet-completed program first in line, in one worker
    call; `collect` (called one step later: the worker checks while the agent acts) returns the sub-tasks each env
    completed in that step, and the sub-tasks completed in the episodes that ended in that step, whose progress starts
    again from 0. An env that has completed every sub-task is not checked again in its episode, and an env whose frame
    is one of the last RECENT_FRAMES that its next program found not done is not sent: a validated program keeps no
    state (its constants are frozen, its namespaces its own), so its answer depends on the frame alone. Under random
    play about 60% of MiniGrid steps leave the frame as it was (turns into walls, pick-ups of nothing) and about 77%
    show one of the last 16 frames (turning in place)."""

    def __init__(self, sandbox: Sandbox, num_envs: int):
        self.sandbox = sandbox
        self.progress = np.zeros(num_envs, dtype=np.int64)  # sub-tasks completed, in order, in each env's episode
        # per env: the program it is at, and the frames (by CRC) that program found not done
        self.not_done: list[tuple[int, dict[int, np.ndarray]]] = [(0, {}) for _ in range(num_envs)]
        self.pending: tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]] | None = None

    def submit(self, frames: np.ndarray, ended: np.ndarray) -> None:
        candidates = np.flatnonzero(self.progress < len(self.sandbox.programs))
        sent = [
            (i, zlib.crc32(frame), frame) for i, frame in ((i, np.ascontiguousarray(frames[i])) for i in candidates)
        ]
        sent = [(i, crc, frame) for i, crc, frame in sent if not self._seen(i, crc, frame)]
        active = np.array([i for i, _, _ in sent], dtype=np.int64)
        self.sandbox.submit(self.progress[active].tolist(), [frame[None] for _, _, frame in sent])
        self.pending = (active, ended, [(crc, frame.copy()) for _, crc, frame in sent])

    def _seen(self, i: int, crc: int, frame: np.ndarray) -> bool:
        program, frames = self.not_done[i]
        if program != self.progress[i]:  # a new program: what the last one found says nothing about it
            self.not_done[i] = (int(self.progress[i]), {})
            return False
        return crc in frames and np.array_equal(frames[crc], frame)

    def collect(self) -> tuple[np.ndarray, list[int]]:
        active, ended, sent = self.pending
        self.pending = None
        restarts = self.sandbox.restarts
        answers = self.sandbox.collect()
        if self.sandbox.restarts == restarts:  # an answer of a restarted worker is no answer
            for i, steps, (crc, frame) in zip(active, answers, sent):
                frames = self.not_done[i][1]
                if not steps:
                    frames[crc] = frame
                    if len(frames) > RECENT_FRAMES:
                        del frames[next(iter(frames))]
        new = np.zeros(len(self.progress), dtype=np.int64)
        new[active] = [len(steps) for steps in answers]
        self.progress += new
        completed = [int(self.progress[i]) for i in np.flatnonzero(ended)]
        self.progress[ended] = 0
        return new, completed


def grid_size(env_id: str) -> tuple[int, int]:
    """(width, height) in cells of a text_envs grid env; one clear sentence for anything else."""
    try:
        env = text_envs.make_env(env_id, with_image=False)
    except ValueError:  # an unknown id
        env = None
    if env is None or not isinstance(env.unwrapped, MiniGridEnv):
        raise SystemExit(
            f"--env-id {env_id!r} is not a grid env: use one of {', '.join(text_envs.GRID_ENVS)}, "
            "or a full MiniGrid-* / BabyAI-* id such as MiniGrid-DoorKey-8x8-v0."
        )
    env.close()
    return env.unwrapped.width, env.unwrapped.height


def check_args(args: Args) -> tuple[int, int]:
    """Turn the mistakes a user can make on the command line into one sentence and a non-zero exit; the grid size."""
    at_least = {
        "--learning-rate": (args.learning_rate, 0),  # 0: a frozen policy, for measurements
        "--seed": (args.seed, 0),
        "--coder-retries": (args.coder_retries, 0),
        "--coder-backoff": (args.coder_backoff, 0),
        "--max-new-tokens": (args.max_new_tokens, 1),
        "--tile-size": (args.tile_size, 4),
        "--num-expert": (args.num_expert, 0),
        "--num-random": (args.num_random, 0),
        "--max-rounds": (args.max_rounds, 1),
        "--checker-memory-mb": (args.checker_memory_mb, 256),
        "--subtask-bonus": (args.subtask_bonus, 0),
        "--total-timesteps": (args.total_timesteps, 0),
        "--num-envs": (args.num_envs, 1),
        "--num-steps": (args.num_steps, 1),
        "--num-minibatches": (args.num_minibatches, 1),
        "--update-epochs": (args.update_epochs, 1),
        "--vf-coef": (args.vf_coef, 0),
        "--eval-episodes": (args.eval_episodes, 0),
        "--checkpoint-freq": (args.checkpoint_freq, 0),
    }
    positive = {
        "--coder-timeout": args.coder_timeout,
        "--checker-timeout": args.checker_timeout,
        "--clip-coef": args.clip_coef,
        "--max-grad-norm": args.max_grad_norm,
        "--target-kl": args.target_kl,  # None: no early stop
    }
    fractions = {"--gamma": args.gamma, "--gae-lambda": args.gae_lambda}
    for flag, (value, least) in at_least.items():
        if value < least:
            raise SystemExit(f"{flag} must be at least {least}, not {value}.")
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise SystemExit(f"{flag} must be > 0, not {value}.")
    for flag, value in fractions.items():
        if not 0 <= value <= 1:
            raise SystemExit(f"{flag} must lie in [0, 1], not {value}.")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--track needs Weights and Biases, which is not installed: pip install wandb.")
    if args.batch_size % args.num_minibatches:
        raise SystemExit(
            f"--num-envs {args.num_envs} x --num-steps {args.num_steps} = {args.batch_size} steps per rollout "
            f"cannot be split into --num-minibatches {args.num_minibatches}: make the product a multiple of it."
        )
    if args.total_timesteps and args.num_iterations < 1:
        raise SystemExit(
            f"--total-timesteps {args.total_timesteps} is less than one rollout "
            f"(--num-envs x --num-steps = {args.batch_size}): raise it, or pass 0 to write the programs only."
        )
    grid = grid_size(args.env_id)
    coder_writes = args.reward_programs is None and args.resume is None  # a resumed run has the checkpoint's programs
    kind = coder_kind(args.coder)
    if coder_writes and kind is None:
        raise SystemExit(f"--coder {args.coder!r} is not a coder: use hf:<hub id or directory> or openai:<model>.")
    if coder_writes and kind == "openai" and not args.coder_base_url:
        raise SystemExit(
            f"--coder {args.coder} needs --coder-base-url, the server's OpenAI-compatible address "
            "(e.g. http://localhost:8000/v1)."
        )
    if coder_writes and args.num_expert < 1:
        raise SystemExit("--num-expert must be >= 1 when the coder writes the programs: verification needs experts.")
    if not args.accept_unconfined_programs and (problem := confinement_problem()):
        raise SystemExit(
            f"The reward programs cannot be confined on this machine ({problem}): on Linux, pip "
            "install -r requirements.txt (pyseccomp, with libseccomp.so.2), or pass "
            "--accept-unconfined-programs to run them behind the load check and the OS limits alone."
        )
    return grid


def save_checkpoint(path: str, checkpoint: dict[str, Any]) -> None:
    """Write the checkpoint atomically and durably: a run killed (or a machine that fails) while saving keeps its
    previous checkpoint."""
    with open(path + ".tmp", "wb") as file:
        torch.save(checkpoint, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".tmp", path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


class Interrupt:
    """Ctrl-C during training sets `requested`, and the run stops at its next safe point with a checkpoint; a second
    Ctrl-C, or one before training starts, stops at once with nothing saved."""

    def __init__(self) -> None:
        self.requested, self.training = False, False
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        if self.requested or not self.training:
            print("\nstopped by Ctrl-C, nothing saved", file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.requested = True


def rng_states() -> dict[str, Any]:
    """The RNG states of Python, NumPy and torch, as tensors and plain numbers (so checkpoints load without pickle)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def load_checkpoint(path: str, args: Args, device: torch.device) -> dict[str, Any]:
    """Read a checkpoint of this script and check that it was made for the same envs as `args`."""
    try:
        # weights_only: tensors and plain data only, so a file cannot run code while it loads
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # any reason the file cannot be read: missing, truncated, not torch's, pickled code
        message = str(error).split("\n")[0]  # torch's refusal of an unsafe pickle runs to a page
        raise SystemExit(f"Cannot read the checkpoint --resume {path} ({type(error).__name__}: {message}).") from None
    algorithm = checkpoint.get("algorithm") if isinstance(checkpoint, dict) else None
    if algorithm != ALGORITHM:
        raise SystemExit(
            f"--resume {path} is not a {ALGORITHM} checkpoint (it comes from {algorithm or 'something else'}): "
            "resume it with the script that wrote it."
        )
    missing = [key for key, kind in CHECKPOINT_LAYOUT.items() if not isinstance(checkpoint.get(key), kind)]
    if isinstance(checkpoint.get("args"), dict):
        missing += [f"args.{flag}" for flag in ENV_FLAGS if flag not in checkpoint["args"]]
    if missing:
        raise SystemExit(
            f"--resume {path} is damaged (missing or malformed: {', '.join(missing)}): resume from another."
        )
    for flag in ENV_FLAGS:
        if checkpoint["args"][flag] != getattr(args, flag):
            name = "--" + flag.replace("_", "-")
            raise SystemExit(
                f"--resume {path} was trained with {name} {checkpoint['args'][flag]}, not {getattr(args, flag)}: "
                f"pass {name} {checkpoint['args'][flag]} to resume it."
            )
    return checkpoint


def load_agent(model_path: str, device: torch.device) -> tuple[Agent, Args]:
    """The agent saved by --save-model, and the args it was trained with."""
    saved = torch.load(model_path, map_location=device, weights_only=True)
    if not isinstance(saved, dict) or saved.get("algorithm") != ALGORITHM:
        raise SystemExit(f"{model_path} is not a model saved by {ALGORITHM} --save-model.")
    saved_args = Args(**saved["args"])
    envs = make_envs(saved_args, image_size=0, frames=None)  # the agent reads the state alone: no images
    agent = Agent(envs).to(device)
    envs.close()
    agent.load_state_dict(saved["model"])
    return agent, saved_args


def evaluate(model_path: str, eval_episodes: int, greedy: bool, device: torch.device) -> tuple[list[float], list[bool]]:
    """Episodic returns (the env's reward, no sub-task bonus) and successes of the saved agent, split evenly over its
    training envs, on layouts drawn from reset seeds that the training run did not use."""
    agent, args = load_agent(model_path, device)
    agent.eval()
    envs = make_envs(args, image_size=0, frames=None)
    quota = [eval_episodes // args.num_envs + (i < eval_episodes % args.num_envs) for i in range(args.num_envs)]
    returns: list[list[float]] = [[] for _ in range(args.num_envs)]
    successes: list[list[bool]] = [[] for _ in range(args.num_envs)]
    obs, _ = envs.reset(seed=args.seed + args.num_envs)
    while any(len(r) < q for r, q in zip(returns, quota)):
        with torch.no_grad():
            logits = agent.actor(agent.encode(torch.as_tensor(obs[STATE], dtype=torch.float32, device=device)))
        action = logits.argmax(dim=1) if greedy else Categorical(logits=logits).sample()
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        for i in np.flatnonzero(infos.get("_final_info", [])):
            if len(returns[i]) < quota[i]:
                returns[i].append(float(infos["final_info"]["episode"]["r"][i]))
                successes[i].append(bool(infos["final_info"]["success"][i]))
    envs.close()
    all_returns = [r for env_returns in returns for r in env_returns]
    return all_returns, [s for env_successes in successes for s in env_successes]


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    interrupt = Interrupt()
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // max(args.num_minibatches, 1))  # check_args refuses 0 in a sentence
    args.num_iterations = args.total_timesteps // max(args.batch_size, 1)
    grid = check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = load_checkpoint(args.resume, args, device) if args.resume else None
    if coder_kind(args.coder) == "hf" and not (checkpoint or args.reward_programs):  # the coder writes the programs
        source, _ = resolve_model_source(args.coder.partition(":")[2])
        if source != args.coder.partition(":")[2]:  # the offline fallback: the run is named after the model it loads
            args.coder, args.exp_name = f"hf:{source}", f"{args.exp_name}-{Path(source).name}"
    run_name = (
        checkpoint["run_name"] if checkpoint else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    )

    # Stages 1 to 3: the reward programs, written by the coder or read back, and verified, before the run's folder
    # and its writer exist (a run whose programs fail leaves no folder)
    image_size = args.tile_size * max(grid)  # the frames the programs read: --tile-size pixels per cell
    full_env_id = text_envs.GRID_ENVS.get(args.env_id, args.env_id)
    key = "image" if args.checker_input == "frame" else "state"
    program_log: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        program_log.append(line)

    if checkpoint:  # a resumed run goes on with the checkpoint's programs, verified and saved, and checked again
        subtasks = [str(subtask) for subtask in checkpoint["subtasks"]]
        try:
            programs = [load_checker(program) for program in checkpoint["programs"]]
        except UnsafeCodeError as error:
            raise SystemExit(
                f"--resume {args.resume} holds a reward program that is refused ({error}): resume only "
                "checkpoints of your own runs."
            ) from None
        log(f"--resume {args.resume}: the checkpoint's programs for {subtasks or 'no sub-tasks (sparse reward)'}")
    else:
        verify_env = text_envs.make_env(args.env_id, image_size=image_size)
        try:
            expert = [collect_trajectory(verify_env, VERIFY_SEED + i, True, key) for i in range(args.num_expert)]
        except (NotImplementedError, ValueError, RuntimeError) as error:
            raise SystemExit(f"--env-id {args.env_id} has no expert to verify the programs with ({error}).") from None
        random_length = RANDOM_LENGTH * max([len(frames) - 1 for frames in expert], default=100)
        random_play = [
            collect_trajectory(verify_env, VERIFY_SEED + args.num_expert + i, False, key, random_length)
            for i in range(args.num_random)
        ]
        try:
            if args.reward_programs:
                subtasks, programs = load_programs(
                    args.reward_programs, full_env_id, args.checker_input, args.tile_size
                )
                with start_sandbox(programs, args) as sandbox:
                    verification = verify(sandbox, subtasks, expert, random_play, sandbox.load_errors)
                log(f"--reward-programs {args.reward_programs}: {verification.summary}")
                if not verification.accepted:
                    k, reason = min(verification.failing.items())
                    raise NoPrograms(
                        f"The programs of --reward-programs {args.reward_programs} did not pass "
                        f"verification (sub-task {k + 1}, {subtasks[k]!r}: {reason})"
                    )
            else:
                subtasks, programs = write_reward_programs(
                    build_coder(args, device), verify_env, args, expert, random_play, grid, log
                )
        except CoderUnavailable as error:
            raise SystemExit(
                f"The coder did not answer ({error}): check --coder-base-url, the model name and the API "
                f"key in ${args.coder_api_key_env}."
            ) from None
        except NoPrograms as error:
            if args.if_unverified == "exit":
                raise SystemExit(
                    f"{error}; pass --if-unverified sparse to train on the env's sparse reward alone, or "
                    "try a stronger --coder or more --max-rounds."
                ) from None
            print(f"{error}; training on the env's sparse reward alone (--if-unverified sparse).", file=sys.stderr)
            subtasks, programs = [], []
        verify_env.close()
        if programs:
            save_programs(
                f"runs/{run_name}/reward_programs", full_env_id, args.checker_input, args.tile_size, subtasks, programs
            )
            log(f"reward programs for {subtasks} saved to runs/{run_name}/reward_programs")

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            monitor_gym=True,
            save_code=True,
        )
    # purge_step: on resume, TensorBoard drops what the killed run logged after its checkpoint (at later steps)
    writer = SummaryWriter(f"runs/{run_name}", purge_step=checkpoint["global_step"] + 1 if checkpoint else None)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )
    writer.add_text(
        "reward_programs",
        "\n\n".join(
            ["    " + line for line in program_log]
            + [
                f"sub-task {k + 1}: {subtask}\n\n" + "\n".join("    " + line for line in program.splitlines())
                for k, (subtask, program) in enumerate(zip(subtasks, programs))
            ]
        ),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    # the networks are tiny: on a CPU, more threads only wait for each other (and spin on a shared machine)
    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)  # argument checks cost more than a forward pass

    # env setup: a resumed run replays each env's current episode, so it continues mid-episode
    envs = make_envs(args, image_size, key if programs else None)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"
    # stage 4: the programs in a worker of their own (a new one on resume: a process cannot be pickled)
    sandbox = start_sandbox(programs, args) if programs else None
    dense = SubtaskProgress(sandbox, args.num_envs) if programs else None

    agent = Agent(envs).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # ALGO Logic: Storage setup
    state_shape = envs.single_observation_space[STATE].shape
    obs = torch.zeros((args.num_steps, args.num_envs) + state_shape).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    final_values = torch.zeros((args.num_steps, args.num_envs)).to(device)

    # TRY NOT TO MODIFY: start the game
    if checkpoint:
        try:
            agent.load_state_dict(checkpoint["agent"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            for env, record in zip(envs.envs, checkpoint["envs"], strict=True):
                text_envs.replay_episode(env, record)
            if dense is not None:  # each env's sub-tasks completed so far in its episode, and the worker's counters
                dense.progress[:] = checkpoint["subtask_progress"].numpy()
                sandbox.errors, sandbox.restarts = checkpoint["checker_errors"], checkpoint["checker_restarts"]
            set_rng_states(checkpoint["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as error:
            raise SystemExit(
                f"--resume {args.resume} is damaged ({type(error).__name__} while restoring it): resume from another."
            ) from None
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
        next_obs, next_done = checkpoint["next_obs"].to(device), checkpoint["next_done"].to(device)
        print(f"resumed {run_name} at iteration {checkpoint['iteration']}, global_step={global_step}", flush=True)
    else:
        global_step, start_iteration = 0, 1
        next_obs, _ = envs.reset(seed=args.seed)
        next_obs = torch.as_tensor(next_obs[STATE], dtype=torch.float32, device=device)
        next_done = torch.zeros(args.num_envs).to(device)
    start_time, start_step = time.time(), global_step
    progress = tqdm(total=args.num_iterations * args.batch_size, initial=global_step, unit="step", mininterval=1)
    interrupt.training = True

    for iteration in range(start_iteration, args.num_iterations + 1):
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow

        episode_returns, episode_successes, episode_subtasks, step_bonus = [], [], [], []
        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done

            # ALGO LOGIC: action logic
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            if dense is not None:
                if dense.pending is not None:  # the previous step's frames, checked while the agent acted
                    new, completed = dense.collect()
                    rewards[step - 1] += torch.as_tensor(args.subtask_bonus * new, dtype=torch.float32, device=device)
                    step_bonus.append(args.subtask_bonus * new.mean())
                    episode_subtasks += completed
                # stage 4: the programs read the frame this step produced (an ended episode's last one, not the reset)
                frames = next_obs[FRAME].copy()
                for i in np.flatnonzero(next_done):
                    frames[i] = infos["final_obs"][i][FRAME]
                dense.submit(frames, next_done)
            next_obs = torch.as_tensor(next_obs[STATE], dtype=torch.float32, device=device)
            next_done = torch.as_tensor(next_done, dtype=torch.float32, device=device)

            final_values[step] = 0.0
            truncated = truncations & ~terminations  # out of time, not done: the episode's value goes on
            if truncated.any():
                final_obs = np.stack([o[STATE] for o in infos["final_obs"][truncated]])
                with torch.no_grad():
                    final_values[step, truncated] = agent.get_value(
                        torch.as_tensor(final_obs, dtype=torch.float32, device=device)
                    ).flatten()
            for i in np.flatnonzero(infos.get("_final_info", [])):
                episode = infos["final_info"]["episode"]
                episode_returns.append(float(episode["r"][i]))
                episode_successes.append(bool(infos["final_info"]["success"][i]))
                writer.add_scalar("charts/episodic_return", episode["r"][i], global_step)
                writer.add_scalar("charts/episodic_length", episode["l"][i], global_step)
            progress.update(args.num_envs)

        if dense is not None:  # the rollout's last step: env reward + a bonus per sub-task completed in order
            new, completed = dense.collect()
            rewards[-1] += torch.as_tensor(args.subtask_bonus * new, dtype=torch.float32, device=device)
            step_bonus.append(args.subtask_bonus * new.mean())
            episode_subtasks += completed

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages, returns = compute_gae(
                rewards, values, dones, final_values, next_value, next_done, args.gamma, args.gae_lambda
            )

        # flatten the batch
        b_obs = obs.reshape((-1,) + state_shape)
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape((-1,) + envs.single_action_space.shape)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # Optimizing the policy and value network
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]

                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb_inds], b_actions.long()[mb_inds])
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds],
                        -args.clip_coef,
                        args.clip_coef,
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
                    v_loss = 0.5 * v_loss_max.mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        sps = int((global_step - start_step) / (time.time() - start_time))
        eta = (time.time() - start_time) / (iteration - start_iteration + 1) * (args.num_iterations - iteration)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        if episode_returns:
            success_rate = float(np.mean(episode_successes))
            writer.add_scalar("charts/success_rate", success_rate, global_step)
            report = f"episodic_return={np.mean(episode_returns):.3f} success_rate={success_rate:.2f}"
        else:
            report = "no episode ended"
        if sandbox is not None:
            writer.add_scalar("reward/bonus_per_step", float(np.mean(step_bonus)), global_step)
            writer.add_scalar("reward/checker_errors", sandbox.errors, global_step)
            writer.add_scalar("reward/checker_restarts", sandbox.restarts, global_step)
            writer.add_scalar("reward/programs_disabled", len(sandbox.disabled), global_step)
            if episode_subtasks:
                writer.add_scalar("reward/subtasks_completed", float(np.mean(episode_subtasks)), global_step)
                report += f" subtasks_completed={np.mean(episode_subtasks):.2f}/{len(programs)}"
            if sandbox.messages:
                with progress.external_write_mode():  # the bar steps aside for the line
                    print(f"checker errors so far: {sandbox.errors}, last: {sandbox.messages[-1]}", flush=True)
                sandbox.messages.clear()
        with progress.external_write_mode():  # the bar steps aside for the line
            print(
                f"iteration {iteration}/{args.num_iterations} global_step={global_step} SPS={sps} "
                f"ETA={eta / 60:.0f}min {report}",
                flush=True,
            )

        last = iteration == args.num_iterations
        if interrupt.requested or args.checkpoint_freq and (iteration % args.checkpoint_freq == 0 or last):
            save_checkpoint(
                f"runs/{run_name}/checkpoint.pt",
                {
                    "algorithm": ALGORITHM,
                    "args": asdict(args),
                    "run_name": run_name,
                    "iteration": iteration,
                    "global_step": global_step,
                    "agent": agent.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "envs": [env.get_wrapper_attr("episode_record") for env in envs.envs],
                    "next_obs": next_obs,
                    "next_done": next_done,
                    # the programs themselves, not their folder: a resumed run needs neither the coder nor the folder
                    "subtasks": subtasks,
                    "programs": programs,
                    "subtask_progress": torch.from_numpy(dense.progress.copy()) if dense is not None else None,
                    "checker_errors": sandbox.errors if sandbox is not None else 0,
                    "checker_restarts": sandbox.restarts if sandbox is not None else 0,
                    "rng": rng_states(),
                },
            )
        if interrupt.requested:  # Ctrl-C: the checkpoint of this iteration's end is saved, the run can go on from it
            progress.close()
            print(f"stopped by Ctrl-C at global_step={global_step}: --resume runs/{run_name}/checkpoint.pt goes on")
            sys.exit(130)
    progress.close()
    interrupt.training = False

    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        torch.save({"algorithm": ALGORITHM, "args": asdict(args), "model": agent.state_dict()}, model_path)
        print(f"model saved to {model_path}")
        if args.eval_episodes > 0:
            for mode in ("greedy", "sampled"):
                episodic_returns, successes = evaluate(model_path, args.eval_episodes, mode == "greedy", device)
                writer.add_scalar(f"eval/{mode}_episodic_return", np.mean(episodic_returns), global_step)
                writer.add_scalar(f"eval/{mode}_success_rate", np.mean(successes), global_step)
                print(
                    f"eval {mode}: episodic_return={np.mean(episodic_returns):.3f} "
                    f"success_rate={np.mean(successes):.2f} over {len(successes)} episodes"
                )

    if sandbox is not None:
        sandbox.close()
    envs.close()
    writer.close()
