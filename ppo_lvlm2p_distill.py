"""LVLM2P: a small student trained with PPO or A2C plus lambda * KL(p_teacher || pi_student), the teacher a VLM.

Lee et al. 2025, "Sample Efficient Reinforcement Learning via Large Vision Language Model Distillation"
(https://arxiv.org/abs/2505.11221, code: https://github.com/i22024/LVLM2P). The teacher is a vision-language model that
looks at the rendered frame (eq. 1, Algorithm 1). This is ppo_cnn_baseline.py with: the student on the "state"
observation while the frame and the mission go to the teacher; the teacher's distributions for a rollout's frames
labelled in batches before the update epochs, each distinct frame queried once (a cache across epochs and rollouts: the
reference code queried every sample of every minibatch in every epoch); the KL term in the loss; and --algo a2c. The
teacher is a local VLM (`hf:`), any OpenAI- compatible server (`openai:`), or the scripted expert of text_envs
(`expert`), which is for offline experiments and ablations: its results are a scripted teacher's, not a VLM's. The
method is here: the two-stage prompt and the parser of its replies (Fig. 2), the labelling (Algorithm 1) and the KL term
(eq. 1); lvlm2p_teachers.py is plumbing (model loading, chat formats, HTTP), handed the prompts and the parser.
Needs: text_envs.py, lvlm2p_teachers.py
"""

import functools
import hashlib
import importlib.util
import os
import random
import re
import signal
import sys
import time
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
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import text_envs
from lvlm2p_teachers import (
    DEFAULT_MODEL_ID,
    ExpertTeacher,
    Frame,
    HFLikelihoodTeacher,
    HFTeacher,
    NoReply,
    OpenAITeacher,
    load_teacher_model,
    resolve_model_source,
)

ALGORITHM = "ppo_lvlm2p_distill"
# flags that fix the envs, the network and the optimizer: a checkpoint resumes only with the same values
ENV_FLAGS = ("env_id", "teacher_image_size", "action_set", "num_envs", "algo", "distill_coef")
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
    "next_frames": list,
    "next_keys": list,
    "teacher_cache": dict,
    "teacher_queries": int,
    "rng": dict,
}


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
    """path of a checkpoint to continue from (the env flags must be the same as the checkpoint's)"""

    # Teacher (the LVLM of eq. 1)
    teacher: str = f"hf:{DEFAULT_MODEL_ID}"
    """hf:<hub id or directory> (a local VLM), openai:<model> (a server, see --teacher-base-url) or expert (scripted)"""
    teacher_mode: Literal["generate", "likelihood"] = "generate"
    """generate: the paper's two-stage prompt, reply parsed; likelihood: softmax over action prompt scores (hf:)"""
    teacher_fewshot: str | None = None
    """a text file of few-shot examples put before the second stage's question (e.g. teacher_prompts/lavagap.txt)"""
    teacher_image_size: int = 192
    """pixels of the longer side of the frame the teacher sees (the reference code's 192)"""
    teacher_max_new_tokens: int = 96
    """the most tokens the teacher generates in each stage"""
    teacher_batch_size: int = 8
    """frames per teacher call (one forward or generate batch, or concurrent requests to a server)"""
    teacher_base_url: str | None = None
    """the OpenAI-compatible server of an openai: teacher, e.g. http://localhost:8000/v1"""
    teacher_api_key_env: str = "OPENAI_API_KEY"
    """the environment variable holding the server's API key (sent as a bearer token, never logged)"""
    teacher_timeout: float = 60.0
    """seconds one reply of an openai: teacher may take, its retries included"""
    teacher_retries: int = 3
    """retries of a failed request (5xx, 429, a lost connection) before its frame trains on the RL loss alone"""
    teacher_backoff: float = 1.0
    """seconds before the first retry, doubled for each next one (longer where a 429 or 503 says so)"""
    # while the teacher rests, its frames train on the RL loss alone
    teacher_cooldown: float = 60.0
    """seconds an openai: teacher rests after 5 failed requests in a row; then one request tries again"""
    teacher_temperature: float = 0.3
    """expert teacher: its distribution is softmax(one_hot(expert action) / temperature)"""
    teacher_noise: float = 0.0
    """expert teacher: the probability that its action is replaced by a uniformly random one"""
    # minibatch is the reference code's way, for comparison
    teacher_query_mode: Literal["rollout", "minibatch"] = "rollout"
    """rollout: each distinct frame once, before the update; minibatch: every sample of every epoch, uncached"""

    # Algorithm specific arguments
    algo: Literal["ppo", "a2c"] = "ppo"
    """the RL algorithm of the student: PPO (clipped, several epochs) or A2C (one update per rollout)"""
    distill_coef: float = 0.01
    """lambda of eq. 1, the weight of KL(p_teacher || pi_student); 0 trains on the RL loss alone"""
    anneal_distill_coef: bool = False
    """decay lambda linearly to 0 over the run"""
    hard_targets: bool = False
    """distil the one-hot of the teacher's most likely action (cross-entropy) instead of its distribution"""
    env_id: str = "LavaGap"
    """the id of the environment: a text_envs short id or a full MiniGrid-*/BabyAI-* id"""
    action_set: Literal["primitive", "macro"] = "primitive"
    """MiniGrid / BabyAI actions: primitive, or the Idefics-Agent macro moves"""
    total_timesteps: int = 100000
    """total timesteps of the experiments"""
    learning_rate: float = 1e-3
    """the learning rate of the optimizer (rl-starter-files' and the reference code's 1e-3)"""
    num_envs: int = 4
    """the number of parallel game environments"""
    num_steps: int | None = None
    """the number of steps to run in each environment per policy rollout (unset: 128 for ppo, 5 for a2c)"""
    anneal_lr: bool = False
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 2
    """the number of mini-batches (ppo)"""
    update_epochs: int = 4
    """the K epochs to update the policy (ppo)"""
    # normalised advantages are of order 1 even before any reward, which would drown a lambda of 0.01
    norm_adv: bool = False
    """Toggles advantages normalization (ppo; off, as in rl-starter-files and the reference code)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient (ppo)"""
    clip_vloss: bool = True
    """Toggles whether or not to use a clipped loss for the value function, as per the paper (ppo)"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold (ppo)"""

    # computed from the flags above at start-up (hidden from --help)
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size (computed in runtime)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""


def make_env(
    env_id: str, seed: int, teacher_image_size: int, action_set: str, with_image: bool
) -> Callable[[], gym.Env]:
    """A thunk building one text_envs env: obs["state"] for the student, obs["image"] and obs["mission"] for the
    teacher (no image when there is no teacher: lambda = 0 renders nothing)."""

    def thunk() -> gym.Env:
        env = text_envs.make_env(
            env_id, seed=seed, image_size=teacher_image_size, action_set=action_set, with_image=with_image
        )
        return gym.wrappers.RecordEpisodeStatistics(env)

    return thunk


def make_envs(args: Args) -> gym.vector.SyncVectorEnv:
    """The training vector env; SAME_STEP autoreset puts each episode's last observation in infos["final_obs"]."""
    return gym.vector.SyncVectorEnv(
        [
            make_env(args.env_id, args.seed + i, args.teacher_image_size, args.action_set, args.distill_coef > 0)
            for i in range(args.num_envs)
        ],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights and constant biases, as in CleanRL."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The student: actor and critic heads (64 tanh units each) on an encoder of the symbolic state."""

    def __init__(self, envs: gym.vector.VectorEnv):
        super().__init__()
        space = envs.single_observation_space["state"]
        if len(space.shape) == 3:  # a symbolic grid (MiniGrid view, FrozenLake map): rl-starter-files' convs,
            channels = space.shape[2]  # pooling with ceil_mode so that an 8x8 map keeps its last row and column
            self.network = nn.Sequential(
                layer_init(nn.Conv2d(channels, 16, 2)),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
                layer_init(nn.Conv2d(16, 32, 2)),
                nn.ReLU(),
                layer_init(nn.Conv2d(32, 64, 2)),
                nn.ReLU(),
                nn.Flatten(),
            )
            scale = np.ones(1)
        else:  # a flat vector (card games): CleanRL's MLP, scaled to [0, 1] by the space's bounds
            self.network = nn.Sequential(layer_init(nn.Linear(space.shape[0], 64)), nn.Tanh())
            scale = np.where(np.isfinite(space.high) & (space.high > 0), space.high, 1.0)
        self.register_buffer("obs_scale", torch.as_tensor(scale, dtype=torch.float32))
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
        """Scaled observations (channels first for grids) through the encoder."""
        x = x / self.obs_scale
        if x.dim() == 4:
            x = x.permute(0, 3, 1, 2)
        return self.network(x)

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        """V(x)."""
        return self.critic(self.encode(x))

    def get_action_and_value(
        self, x: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sampled (or the given) action, its log-probability, the policy's entropy, V(x) and the policy's logits."""
        hidden = self.encode(x)
        logits = self.actor(hidden)
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden), logits


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


# Fig. 2's two stages: first the scene (agent position and orientation, the target), then one probability per action
SCENE_PROMPT = (
    "This is a game seen from above. Your mission: {mission}. Describe the scene: the row and "
    "column of the agent (counting from the top left), the direction it faces, and where the target of "
    "the mission is."
)
ACTION_PROMPT = (
    "{examples}The possible actions, in this order, are: {actions}. Give the probability of each action "
    "being the best next action for the mission. On the last line, reply with a single list of "
    "{n} numbers that sum to 1, like {example}."
)


def action_list_example(n_actions: int) -> str:
    """A list of n probabilities summing to 1, shown to the teacher as the answer's format."""
    return "[" + ", ".join(["0.7"] + ["0.3"] + ["0"] * (n_actions - 2)) + "]" if n_actions > 1 else "[1]"


def stage_prompts(mission: str, action_names: Sequence[str], examples: str) -> tuple[str, str]:
    """The texts of the two stages (Fig. 2): describe the scene, then give one probability per action."""
    actions = ", ".join(f"'{name}'" for name in action_names)
    return SCENE_PROMPT.format(mission=mission), ACTION_PROMPT.format(
        examples=examples, actions=actions, n=len(action_names), example=action_list_example(len(action_names))
    )


def read_examples(path: str | None) -> str:
    """The few-shot examples for the second stage, ending in a blank line ("" without a file)."""
    if path is None:
        return ""
    try:
        return Path(path).read_text().strip() + "\n\n"
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(
            f"Cannot read --teacher-fewshot {path} ({type(error).__name__}): pass a readable text file."
        ) from None


NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
LIST_OF_NUMBERS = re.compile(rf"\[\s*({NUMBER}(?:\s*,\s*{NUMBER})*)\s*,?\s*\]")


def parse_teacher_probs(text: str, n_actions: int) -> np.ndarray | None:
    """The last list of exactly `n_actions` non-negative numbers in `text`, normalised to sum 1; None if there is
    none."""
    # p_teacher of eq. 1: the teacher's own numbers, only normalised
    for match in reversed(list(LIST_OF_NUMBERS.finditer(text))):
        numbers = np.array([float(x) for x in match.group(1).split(",")])
        if len(numbers) == n_actions and np.isfinite(numbers).all() and (numbers >= 0).all() and numbers.sum() > 0:
            return numbers / numbers.sum()
    return None


# --teacher-mode likelihood (not in the paper): the state prompt, then each action prompt scored by its mean token
# log-likelihood (Idefics-Agent's way of scoring actions)
LIKELIHOOD_PROMPT = "This is a game seen from above. Your mission: {mission}. What is the best next action?"
ACTION_TEMPLATE = " The best next action is to {action}."


def likelihood_prompts(mission: str, action_names: Sequence[str]) -> tuple[str, list[str]]:
    """The state prompt and one action prompt per action."""
    return LIKELIHOOD_PROMPT.format(mission=mission), [ACTION_TEMPLATE.format(action=a) for a in action_names]


def likelihood_probs(log_likelihoods: torch.Tensor) -> np.ndarray:
    """p_teacher: the softmax over the action prompts' mean token log-likelihoods."""
    return log_likelihoods.softmax(-1).cpu().numpy()


def teacher_kind(teacher: str) -> Literal["hf", "openai", "expert"] | None:
    """Which backend a --teacher value names, or None."""
    if teacher == "expert":
        return "expert"
    prefix, _, name = teacher.partition(":")
    return prefix if prefix in ("hf", "openai") and name else None


def build_teacher(args: Args, action_names: Sequence[str], device: torch.device) -> Callable:
    """The teacher that --teacher names, given this method's prompts and parser."""
    kind, name = teacher_kind(args.teacher), args.teacher.partition(":")[2]
    if kind == "expert":
        return ExpertTeacher(len(action_names), args.teacher_temperature, args.teacher_noise, args.seed)
    examples = read_examples(args.teacher_fewshot)
    prompts = functools.partial(stage_prompts, action_names=action_names, examples=examples)
    parse = functools.partial(parse_teacher_probs, n_actions=len(action_names))
    if kind == "openai":
        return OpenAITeacher(
            name,
            args.teacher_base_url,
            os.environ.get(args.teacher_api_key_env),
            prompts,
            parse,
            args.teacher_max_new_tokens,
            args.teacher_timeout,
            args.teacher_retries,
            args.teacher_backoff,
            args.teacher_cooldown,
        )
    model, processor = load_teacher_model(name, device)
    if args.teacher_mode == "likelihood":
        scoring = functools.partial(likelihood_prompts, action_names=action_names)
        return HFLikelihoodTeacher(model, processor, scoring, likelihood_probs)
    return HFTeacher(model, processor, prompts, parse, args.teacher_max_new_tokens)


def frame_key(image: np.ndarray, mission: str) -> bytes:
    """The teacher cache's key: a hash of the frame and the mission."""
    return hashlib.blake2b(str(image.shape).encode() + image.tobytes() + mission.encode(), digest_size=16).digest()


class TeacherStats(NamedTuple):
    queries: int  # frames sent to the teacher
    cache_hits: int  # samples labelled from the cache
    parse_failures: int  # queried frames whose reply held no valid distribution
    server_failures: int  # queried frames whose request failed after every retry
    skipped: int  # queried frames not sent, the teacher's circuit breaker being open
    seconds: float  # wall time spent in the teacher


def label_frames(
    teacher: Callable[[Sequence[Frame]], list[np.ndarray | None | NoReply]],
    frames: Sequence[Frame],
    keys: Sequence[bytes] | None,
    cache: dict[bytes, np.ndarray | None] | None,
    n_actions: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, TeacherStats]:
    """The teacher's distribution for every frame ([N, A], zeros where none) and which frames have one.

    With a cache, each distinct frame (its key) reaches the teacher at most once; replies that do not parse are cached
    too (the teacher is asked once per frame), frames the server did not answer are not (they are asked again in a
    later rollout, and train on the RL loss alone until then).
    """
    start = time.time()
    if cache is None:  # no cache (minibatch mode): every sample is asked, repeats included, and nothing is kept
        keys, cache = range(len(frames)), {}
    first: dict[bytes | int, int] = {}  # the first sample of each frame the cache does not know
    for i, key in enumerate(keys):
        if key not in cache:
            first.setdefault(key, i)
    todo = list(first.values())
    parse_failures = server_failures = skipped = 0
    no_reply = None
    for b in range(0, len(todo), batch_size):
        batch = todo[b : b + batch_size]
        for i, reply in zip(batch, teacher([frames[i] for i in batch])):
            if isinstance(reply, NoReply):
                no_reply = reply
                server_failures += not reply.skipped
                skipped += reply.skipped
                continue
            parse_failures += reply is None
            cache[keys[i]] = reply
    if no_reply is not None:
        unanswered = server_failures + skipped
        print(
            f"teacher: no reply for {unanswered} frames, they train on the RL loss alone ({no_reply.reason})",
            flush=True,
        )
    probs, valid = torch.zeros(len(frames), n_actions), torch.zeros(len(frames), dtype=torch.bool)
    for i, key in enumerate(keys):
        if cache.get(key) is not None:
            probs[i], valid[i] = torch.as_tensor(cache[key], dtype=torch.float32), True
    cache_hits = len(frames) - len(todo)
    seconds = time.time() - start
    return probs, valid, TeacherStats(len(todo), cache_hits, parse_failures, server_failures, skipped, seconds)


def distill_loss(
    logits: torch.Tensor, teacher_probs: torch.Tensor, valid: torch.Tensor, hard_targets: bool = False
) -> torch.Tensor:
    """Mean KL(p_teacher || pi_student) over the samples that have a teacher distribution (eq. 1); 0 if none has.

    sum_a p_T(a) (log p_T(a) - log pi_S(a)), with 0 log 0 = 0: actions the teacher rules out add nothing. With
    `hard_targets` p_T is the one-hot of the teacher's most likely action, and the KL is the cross-entropy.
    """
    log_student = logits.log_softmax(-1)
    if hard_targets:
        teacher_probs = nn.functional.one_hot(teacher_probs.argmax(-1), logits.shape[-1]).to(log_student.dtype)
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(-1)
    valid = valid.to(kl.dtype)
    return (kl * valid).sum() / valid.sum().clamp(min=1.0)


def check_args(args: Args) -> list[str]:
    """Turn the mistakes a user can make on the command line into one sentence and a non-zero exit; the action words."""
    at_least = {
        "--learning-rate": (args.learning_rate, 0),  # 0: a frozen policy, for measurements
        "--seed": (args.seed, 0),
        "--teacher-image-size": (args.teacher_image_size, 1),
        "--teacher-max-new-tokens": (args.teacher_max_new_tokens, 1),
        "--teacher-batch-size": (args.teacher_batch_size, 1),
        "--teacher-retries": (args.teacher_retries, 0),
        "--teacher-backoff": (args.teacher_backoff, 0),
        "--teacher-cooldown": (args.teacher_cooldown, 0),
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
        "--teacher-timeout": args.teacher_timeout,
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
    if args.num_iterations < 1:
        raise SystemExit(
            f"--total-timesteps {args.total_timesteps} is less than one rollout "
            f"(--num-envs x --num-steps = {args.batch_size}): raise it."
        )
    try:
        env = text_envs.make_env(args.env_id, image_size=args.teacher_image_size, action_set=args.action_set)
    except ValueError as error:
        if args.env_id in text_envs.SHORT_IDS or args.env_id in gym.registry:
            raise SystemExit(str(error)) from None  # a known id with a flag it does not take (e.g. macro actions)
        raise SystemExit(
            f"Unknown --env-id {args.env_id!r}: use one of {', '.join(text_envs.SHORT_IDS)}, "
            "or a full MiniGrid-* / BabyAI-* id such as MiniGrid-DoorKey-5x5-v0."
        ) from None
    action_names = list(env.get_wrapper_attr("action_names"))
    env.close()
    kind = teacher_kind(args.teacher)
    if kind is None:
        raise SystemExit(
            f"--teacher {args.teacher!r} is not a teacher: use hf:<hub id or directory>, openai:<model> or expert."
        )
    if kind == "openai" and not args.teacher_base_url:
        raise SystemExit(
            f"--teacher {args.teacher} needs --teacher-base-url, the server's OpenAI-compatible address "
            "(e.g. http://localhost:8000/v1)."
        )
    if kind == "openai" and args.teacher_mode == "likelihood":
        raise SystemExit(
            "--teacher-mode likelihood needs the model's log-likelihoods, which a chat server does not "
            "return: use an hf: teacher, or --teacher-mode generate."
        )
    if not 0.0 <= args.teacher_noise <= 1.0 or args.teacher_temperature <= 0:
        raise SystemExit(
            f"--teacher-noise {args.teacher_noise} and --teacher-temperature {args.teacher_temperature}: "
            "the noise is a probability (0 to 1) and the temperature must be positive."
        )
    if args.distill_coef < 0:
        raise SystemExit(
            f"--distill-coef {args.distill_coef} is negative: lambda weighs the KL term, use 0 (the RL "
            "loss alone) or more."
        )
    read_examples(args.teacher_fewshot)  # unreadable examples are bad input even where lambda = 0 builds no teacher
    return action_names


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
    envs = make_envs(saved_args)
    agent = Agent(envs).to(device)
    envs.close()
    agent.load_state_dict(saved["model"])
    return agent, saved_args


def evaluate(model_path: str, eval_episodes: int, greedy: bool, device: torch.device) -> tuple[list[float], list[bool]]:
    """Episodic returns and successes of the saved student (no teacher), split evenly over its training envs.

    FrozenLake keeps the training maps (they come from each env's seed); MiniGrid layouts are drawn from
    reset seeds that the training run did not use.
    """
    agent, args = load_agent(model_path, device)
    agent.eval()
    envs = make_envs(args)
    quota = [eval_episodes // args.num_envs + (i < eval_episodes % args.num_envs) for i in range(args.num_envs)]
    returns: list[list[float]] = [[] for _ in range(args.num_envs)]
    successes: list[list[bool]] = [[] for _ in range(args.num_envs)]
    obs, _ = envs.reset(seed=args.seed + args.num_envs)
    while any(len(r) < q for r, q in zip(returns, quota)):
        with torch.no_grad():
            logits = agent.actor(agent.encode(torch.as_tensor(obs["state"], dtype=torch.float32, device=device)))
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
    if args.num_steps is None:  # rl-starter-files' (and the reference code's) defaults
        args.num_steps = 128 if args.algo == "ppo" else 5
    if args.algo == "a2c":  # one update on the whole rollout
        args.num_minibatches, args.update_epochs = 1, 1
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // max(args.num_minibatches, 1))  # check_args refuses 0 in a sentence
    args.num_iterations = args.total_timesteps // max(args.batch_size, 1)
    action_names = check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = load_checkpoint(args.resume, args, device) if args.resume else None
    if teacher_kind(args.teacher) == "hf" and args.distill_coef > 0:
        source, _ = resolve_model_source(args.teacher.partition(":")[2])
        if source != args.teacher.partition(":")[2]:  # the offline fallback: the run is named after the model it loads
            args.teacher, args.exp_name = f"hf:{source}", f"{args.exp_name}-{Path(source).name}"
    # built before runs/ exists: a model that cannot load is bad input; lambda = 0 (RL alone) needs no teacher
    teacher = build_teacher(args, action_names, device) if args.distill_coef > 0 else None
    run_name = (
        checkpoint["run_name"] if checkpoint else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    )
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
    if args.teacher == "expert":
        writer.add_text("teacher", "scripted teacher (text_envs.expert_action), not a VLM")

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    # the networks are tiny: on a CPU, more threads only wait for each other (and spin on a shared machine)
    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)  # argument checks cost more than a forward pass

    # env setup: a resumed run replays each env's current episode, so it continues mid-episode
    envs = make_envs(args)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"
    n_actions = envs.single_action_space.n
    use_expert = args.teacher == "expert" and args.distill_coef > 0  # without lambda, no expert calls
    cache: dict[bytes, np.ndarray | None] = {}  # the teacher's answer for each distinct frame, across rollouts

    agent = Agent(envs).to(device)
    if args.algo == "ppo":
        optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    else:  # rl-starter-files' A2C optimizer, as in the reference code
        optimizer = optim.RMSprop(agent.parameters(), lr=args.learning_rate, alpha=0.99, eps=1e-8)

    # ALGO Logic: Storage setup
    state_shape = envs.single_observation_space["state"].shape
    obs = torch.zeros((args.num_steps, args.num_envs) + state_shape).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    final_values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    frames: list[list[Frame]] = [[] for _ in range(args.num_steps)]  # what the teacher sees of obs[step]
    frame_keys: list[list[bytes]] = [[] for _ in range(args.num_steps)]
    total_queries = 0

    def teacher_frames(observation: dict) -> tuple[list[Frame], list[bytes]]:
        """The frames of the envs' current observations, with the expert's action where the expert will be asked
        (it reads the env's current state, so it is asked now, and only for frames it has not answered yet)."""
        if "image" not in observation:  # lambda = 0: no teacher, no frames
            return [], []
        images, missions = observation["image"], observation["mission"]
        keys = [frame_key(images[i], missions[i]) for i in range(args.num_envs)]
        ask = [use_expert and (key not in cache or args.teacher_query_mode == "minibatch") for key in keys]
        return (
            [
                Frame(images[i], missions[i], text_envs.expert_action(envs.envs[i]) if ask[i] else -1)
                for i in range(args.num_envs)
            ],
            keys,
        )

    # TRY NOT TO MODIFY: start the game
    if checkpoint:
        try:
            agent.load_state_dict(checkpoint["agent"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            for env, record in zip(envs.envs, checkpoint["envs"], strict=True):
                text_envs.replay_episode(env, record)
            next_frames = [
                Frame(image.numpy(), mission, int(action)) for image, mission, action in checkpoint["next_frames"]
            ]
            next_keys, total_queries = checkpoint["next_keys"], checkpoint["teacher_queries"]
            cache = {
                key: None if probs is None else probs.numpy() for key, probs in checkpoint["teacher_cache"].items()
            }
            if use_expert:
                teacher.rng.bit_generator.state = checkpoint["rng"]["teacher"]
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
        next_obs_dict, _ = envs.reset(seed=args.seed)
        next_frames, next_keys = teacher_frames(next_obs_dict)
        next_obs = torch.as_tensor(next_obs_dict["state"], dtype=torch.float32, device=device)
        next_done = torch.zeros(args.num_envs).to(device)
    start_time, start_step = time.time(), global_step
    progress = tqdm(total=args.num_iterations * args.batch_size, initial=global_step, unit="step", mininterval=1)
    interrupt.training = True

    for iteration in range(start_iteration, args.num_iterations + 1):
        # Annealing the rate if instructed to do so.
        frac = 1.0 - (iteration - 1.0) / args.num_iterations
        if args.anneal_lr:
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow
        distill_coef = frac * args.distill_coef if args.anneal_distill_coef else args.distill_coef

        episode_returns, episode_successes = [], []
        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done
            frames[step], frame_keys[step] = next_frames, next_keys

            # ALGO LOGIC: action logic
            with torch.no_grad():
                action, logprob, _, value, _ = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs_dict, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_frames, next_keys = teacher_frames(next_obs_dict)
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(next_obs_dict["state"], dtype=torch.float32, device=device)
            next_done = torch.as_tensor(next_done, dtype=torch.float32, device=device)

            final_values[step] = 0.0
            truncated = truncations & ~terminations  # out of time, not done: the episode's value goes on
            if truncated.any():
                final_obs = np.stack([o["state"] for o in infos["final_obs"][truncated]])
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
        b_frames = [frame for step_frames in frames for frame in step_frames]
        b_keys = [key for step_keys in frame_keys for key in step_keys]

        # Label the rollout's frames with the teacher (Algorithm 1, line 13), each distinct frame once
        stats = []
        if distill_coef > 0 and args.teacher_query_mode == "rollout":
            b_teacher, b_valid, rollout_stats = label_frames(
                teacher, b_frames, b_keys, cache, n_actions, args.teacher_batch_size
            )
            stats.append(rollout_stats)

        # Optimizing the policy and value network
        b_inds = np.arange(args.batch_size)
        clipfracs, distill_losses = [], []
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]

                _, newlogprob, entropy, newvalue, logits = agent.get_action_and_value(
                    b_obs[mb_inds], b_actions.long()[mb_inds]
                )
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv and args.algo == "ppo":
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                # Policy loss
                if args.algo == "ppo":
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
                else:  # A2C: the rollout's one update, so the ratio is 1 and its gradient is that of the log-prob
                    pg_loss = -(mb_advantages * newlogprob).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss and args.algo == "ppo":
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

                # eq. 1: L_RL + lambda * KL(pi_T(.|o) || pi_theta(.|s)), on the samples the teacher labelled
                if distill_coef > 0:
                    if args.teacher_query_mode == "minibatch":  # the reference code's way: no cache, every epoch
                        mb_teacher, mb_valid, minibatch_stats = label_frames(
                            teacher, [b_frames[i] for i in mb_inds], None, None, n_actions, args.teacher_batch_size
                        )
                        stats.append(minibatch_stats)
                    else:
                        mb_teacher, mb_valid = b_teacher[mb_inds], b_valid[mb_inds]
                    kl_loss = distill_loss(logits, mb_teacher.to(device), mb_valid.to(device), args.hard_targets)
                    loss = loss + distill_coef * kl_loss
                    distill_losses.append(kl_loss.item())

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
        writer.add_scalar("teacher/distill_coef", distill_coef, global_step)
        teacher_report = ""
        if stats:
            totals = TeacherStats(*map(sum, zip(*stats)))  # over the rollout's labelling or every minibatch's
            total_queries += totals.queries
            labelled = args.batch_size * (1 if args.teacher_query_mode == "rollout" else args.update_epochs)
            writer.add_scalar("teacher/kl", np.mean(distill_losses), global_step)
            writer.add_scalar("teacher/queries", total_queries, global_step)
            writer.add_scalar("teacher/queries_per_step", total_queries / global_step, global_step)
            writer.add_scalar("teacher/cache_hit_rate", totals.cache_hits / labelled, global_step)
            for name in ("parse_failures", "server_failures", "skipped", "seconds"):
                writer.add_scalar(f"teacher/{name}", getattr(totals, name), global_step)
            teacher_report = f" teacher_queries={total_queries}"
        if episode_returns:
            success_rate = float(np.mean(episode_successes))
            writer.add_scalar("charts/success_rate", success_rate, global_step)
            report = f"episodic_return={np.mean(episode_returns):.3f} success_rate={success_rate:.2f}"
        else:
            report = "no episode ended"
        with progress.external_write_mode():  # the bar steps aside for the line
            print(
                f"iteration {iteration}/{args.num_iterations} global_step={global_step} SPS={sps} "
                f"ETA={eta / 60:.0f}min {report}{teacher_report}",
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
                    "next_frames": [
                        (torch.from_numpy(image), mission, action) for image, mission, action in next_frames
                    ],
                    "next_keys": next_keys,
                    "teacher_cache": {
                        key: None if probs is None else torch.as_tensor(probs) for key, probs in cache.items()
                    },
                    "teacher_queries": total_queries,
                    "rng": {**rng_states(), "teacher": teacher.rng.bit_generator.state if use_expert else None},
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

    envs.close()
    writer.close()
