"""PPO with a small CNN that starts from nothing: the tabula-rasa baseline of the VLM papers (their "CNN-Agent").

CleanRL's ppo.py, plus: truncated episodes are bootstrapped with V(final obs) instead of being treated as terminal
(CleanRL issue #198), Gymnasium 1.x vector envs reset in the same step (no transition crosses an episode boundary,
CleanRL issue #499), checkpoints with --resume (Ctrl-C saves one), and an evaluation of the saved model.
Needs: text_envs.py
"""

import importlib.util
import operator
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

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

ALGORITHM = "ppo_cnn_baseline"
# flags that fix the envs and the network: a checkpoint resumes only with the same values
ENV_FLAGS = ("env_id", "obs", "image_size", "action_set", "num_envs")
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
    "rng": dict,
}
MIN_IMAGE_SIDE = 15  # the CNN's three stride-2 convs need at least this many pixels


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
    capture_video: bool = False
    """whether to capture videos of the agent performances (check out `videos` folder; needs moviepy)"""
    save_model: bool = False
    """whether to save the model into the `runs/{run_name}` folder, then evaluate the saved model"""
    eval_episodes: int = 10
    """the number of episodes of each evaluation of the saved model (greedy and sampled actions)"""
    checkpoint_freq: int = 10
    """save a checkpoint to `runs/{run_name}/checkpoint.pt` every this many iterations (0: never)"""
    resume: str | None = None
    """path of a checkpoint to continue from (the env flags must be the same as the checkpoint's)"""

    # Algorithm specific arguments
    env_id: str = "FrozenLake8x8"
    """the id of the environment: a text_envs short id or a full MiniGrid-*/BabyAI-* id"""
    obs: Literal["image", "state"] = "image"
    """what the agent sees: the image, downscaled (a CNN), or the symbolic state (CNN for grids, MLP for vectors)"""
    image_size: int = 64
    """pixels of the longer side of the image observation (and of the videos)"""
    action_set: Literal["primitive", "macro"] = "primitive"
    """MiniGrid / BabyAI actions: primitive, or the Idefics-Agent macro moves"""
    total_timesteps: int = 100000
    """total timesteps of the experiments"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 4
    """the number of parallel game environments"""
    env_seeds: list[int] | None = None
    """the envs' seeds (FrozenLake8x8: one map each), setting --num-envs; unset: seed, seed + 1, ..."""
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


def make_env(
    env_id: str, seed: int, idx: int, capture_video: bool, run_name: str, obs: str, image_size: int, action_set: str
) -> Callable[[], gym.Env]:
    """A thunk building one text_envs env whose observation is only obs["image"] or obs["state"]."""

    def thunk() -> gym.Env:
        env = text_envs.make_env(
            env_id, seed=seed, image_size=image_size, with_image=obs == "image", action_set=action_set
        )
        if capture_video and idx == 0:
            env = gym.wrappers.RecordVideo(
                env, f"videos/{run_name}", gc_trigger=None
            )  # None: picklable, for checkpoints
        env = gym.wrappers.RecordEpisodeStatistics(env)
        # the descriptions and missions are for the VLM scripts; this agent sees one array
        return gym.wrappers.TransformObservation(env, operator.itemgetter(obs), env.observation_space[obs])

    return thunk


def make_envs(args: Args, run_name: str) -> gym.vector.SyncVectorEnv:
    """The training vector env; SAME_STEP autoreset puts each episode's last observation in infos["final_obs"]."""
    return gym.vector.SyncVectorEnv(
        [
            make_env(args.env_id, seed, i, args.capture_video, run_name, args.obs, args.image_size, args.action_set)
            for i, seed in enumerate(args.env_seeds or range(args.seed, args.seed + args.num_envs))
        ],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Module:
    """Orthogonal weights and constant biases, as in CleanRL."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Actor and critic heads (64 tanh units each) on an encoder that fits the observation."""

    def __init__(self, envs: gym.vector.VectorEnv, obs: str):
        super().__init__()
        space = envs.single_observation_space
        if obs == "image":  # the rendered frame, H x W x 3
            self.network = nn.Sequential(
                layer_init(nn.Conv2d(3, 16, 3, stride=2)),
                nn.ReLU(),
                layer_init(nn.Conv2d(16, 32, 3, stride=2)),
                nn.ReLU(),
                layer_init(nn.Conv2d(32, 32, 3, stride=2)),
                nn.ReLU(),
                nn.Flatten(),
            )
            scale = np.full(1, 255.0)
        elif len(space.shape) == 3:  # a symbolic grid (MiniGrid view, FrozenLake map): rl-starter-files' convs,
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
        """Scaled observations (channels first for images and grids) through the encoder."""
        x = x / self.obs_scale
        if x.dim() == 4:
            x = x.permute(0, 3, 1, 2)
        return self.network(x)

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


def check_args(args: Args) -> None:
    """Turn the mistakes a user can make on the command line into one sentence and a non-zero exit."""
    at_least = {
        "--learning-rate": (args.learning_rate, 0),  # 0: a frozen policy, for measurements
        "--seed": (args.seed, 0),
        "--env-seeds": (min(args.env_seeds or [0]), 0),
        "--image-size": (args.image_size, 1),
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
        env = text_envs.make_env(
            args.env_id, image_size=args.image_size, with_image=args.obs == "image", action_set=args.action_set
        )
    except ValueError as error:
        if args.env_id in text_envs.SHORT_IDS or args.env_id in gym.registry:
            raise SystemExit(str(error)) from None  # a known id with a flag it does not take (e.g. macro actions)
        raise SystemExit(
            f"Unknown --env-id {args.env_id!r}: use one of {', '.join(text_envs.SHORT_IDS)}, "
            "or a full MiniGrid-* / BabyAI-* id such as MiniGrid-DoorKey-5x5-v0."
        ) from None
    shape = env.observation_space[args.obs].shape
    env.close()
    if args.obs == "image" and min(shape[:2]) < MIN_IMAGE_SIDE:
        raise SystemExit(
            f"--image-size {args.image_size} gives {shape[0]}x{shape[1]} images for {args.env_id}, "
            f"too small for the CNN: raise --image-size so that both sides are at least {MIN_IMAGE_SIDE} pixels."
        )
    if args.capture_video and importlib.util.find_spec("moviepy") is None:  # RecordVideo writes MP4 with it
        raise SystemExit("--capture-video needs moviepy, which is not installed: pip install moviepy.")


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
    saved_args = Args(**{**saved["args"], "capture_video": False})
    envs = make_envs(saved_args, run_name="")
    agent = Agent(envs, saved_args.obs).to(device)
    envs.close()
    agent.load_state_dict(saved["model"])
    return agent, saved_args


def evaluate(model_path: str, eval_episodes: int, greedy: bool, device: torch.device) -> tuple[list[float], list[bool]]:
    """Episodic returns and successes of the saved agent, split evenly over its training envs.

    FrozenLake keeps the training maps (they come from each env's seed); MiniGrid layouts are drawn from
    reset seeds that the training run did not use.
    """
    agent, args = load_agent(model_path, device)
    agent.eval()
    envs = make_envs(args, run_name="")
    quota = [eval_episodes // args.num_envs + (i < eval_episodes % args.num_envs) for i in range(args.num_envs)]
    returns: list[list[float]] = [[] for _ in range(args.num_envs)]
    successes: list[list[bool]] = [[] for _ in range(args.num_envs)]
    obs, _ = envs.reset(seed=args.seed + args.num_envs)
    while any(len(r) < q for r, q in zip(returns, quota)):
        with torch.no_grad():
            logits = agent.actor(agent.encode(torch.as_tensor(obs, dtype=torch.float32, device=device)))
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
    args.num_envs = len(args.env_seeds) if args.env_seeds else args.num_envs
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // max(args.num_minibatches, 1))  # check_args refuses 0 in a sentence
    args.num_iterations = args.total_timesteps // max(args.batch_size, 1)
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = load_checkpoint(args.resume, args, device) if args.resume else None
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

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    # the networks are tiny: on a CPU, more threads only wait for each other (and spin on a shared machine)
    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)  # argument checks cost more than a forward pass

    # env setup: a resumed run replays each env's current episode, so it continues mid-episode
    envs = make_envs(args, run_name)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"

    agent = Agent(envs, args.obs).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape).to(device)
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
            set_rng_states(checkpoint["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
            raise SystemExit(
                f"--resume {args.resume} is damaged ({type(error).__name__} while restoring it): resume from another."
            ) from None
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
        next_obs, next_done = checkpoint["next_obs"].to(device), checkpoint["next_done"].to(device)
        print(f"resumed {run_name} at iteration {checkpoint['iteration']}, global_step={global_step}", flush=True)
    else:
        global_step, start_iteration = 0, 1
        next_obs, _ = envs.reset(seed=args.seed)
        next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
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

        episode_returns, episode_successes = [], []
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
            next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
            next_done = torch.as_tensor(next_done, dtype=torch.float32, device=device)

            final_values[step] = 0.0
            truncated = truncations & ~terminations  # out of time, not done: the episode's value goes on
            if truncated.any():
                final_obs = np.stack(infos["final_obs"][truncated])
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
        b_obs = obs.reshape((-1,) + envs.single_observation_space.shape)
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

    envs.close()
    writer.close()
