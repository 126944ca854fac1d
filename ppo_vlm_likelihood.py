"""PPO where a vision-language model is the policy, each action scored by its likelihood (Idefics-Agent).

Paper: Bonetta et al. 2024, "Vision Language Models as Policy Learners in Reinforcement Learning
Environments". For a state s the VLM reads the state
prompt P (a template filled with the description, plus the image) followed by the action prompt Q_i
of each action a_i; score_i is the mean log-likelihood of Q_i's tokens (eq. 1) and
pi(a_i | s) = softmax_i(score_i). A value head on the last state-prompt token gives V(s). Only the
LoRA adapters of the language model and the value head train, optionally on a 4-bit base model.

Unlike the authors' code, scores are log-probabilities (log_softmax over the vocabulary, not raw
logits), and each state's prefix, image included, is encoded once and its KV cache reused for every
action, in rollouts and in the PPO update; advantages are normalised over the whole rollout batch (theirs per
minibatch, where 2 samples always become -1 / +1); each frame is one image tile (--image-splitting: the processor's
own tiling).

Needs: text_envs.py, likelihood_models.py (and assets/tiny-smolvlm-likelihood, the offline fallback model)

Run: `python ppo_vlm_likelihood.py --env-id FrozenLake8x8`;
`accelerate launch --num_processes 4 ppo_vlm_likelihood.py ...` for several GPUs.
"""

import importlib.util
import os
import random
import resource
import shutil
import signal
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import text_envs
from likelihood_models import (
    DEFAULT_MODEL_ID,
    add_lora,
    configure_image_processor,
    load_base_model,
    resolve_model_source,
)

ALGORITHM = "ppo_vlm_likelihood"
# q/k/v of the language model's self-attention only (not the vision tower, not cross-attention):
# SmolVLM / Idefics2 / Idefics3 `text_model`, LLaVA / Qwen2-VL `language_model`, Idefics (v1) and text-only LMs `model`.
LANGUAGE_MODEL_QKV = r"(?:.*\.)?(?:text_model|language_model|model)\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj)"
FROZENLAKE_STATE_TEMPLATE = (
    "I am the agent in this minigrid world. {description} Avoid the traps! What's the next best action?"
)
LISTING_STATE_TEMPLATE = (
    "I am the agent in this minigrid world. {description} The possible actions are: {actions}. "
    "What's the next best action?"
)
# Idefics (v1) instruct's dialogue format, written out rather than left to a chat template; the image goes at <image>.
IDEFICS_V1_PROMPT, IDEFICS_V1_IMAGE = "User:{image}{text}<end_of_utterance>\nAssistant:", "<image>"
# flags that fix the envs and the network: a checkpoint resumes only with the same values
ENV_FLAGS = ("env_id", "model_id", "lora_r", "lora_alpha", "lora_target_modules")
# what a checkpoint's trainer_state.pt holds, and of which type
CHECKPOINT_LAYOUT = {
    "args": dict,
    "run_name": str,
    "iteration": int,
    "global_step": int,
    "value_head": dict,
    "rng_states": list,
}
# The leading space separates the action prompt from the chat template's "Assistant:".
ACTION_TEMPLATE = " Based on the information provided, the next best action would be to {action}"


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
    """whether to save the model into the `runs/{run_name}/model` folder (LoRA adapter and value head)"""
    eval_episodes: int = 0
    """episodes of each evaluation after training, greedy and sampled (--total-timesteps 0: of the loaded model)"""
    checkpoint_freq: int = 1
    """save a checkpoint to `runs/{run_name}/checkpoint` every this many iterations (0: never)"""
    resume: str | None = None
    """a checkpoint to continue from, with its model flags (--total-timesteps 0: evaluate it)"""

    # Model
    model_id: str = DEFAULT_MODEL_ID
    """a Hub id or a local directory: a VLM, or a text-only causal LM (which then reads the description only)"""
    load_in_4bit: bool = False
    """load the frozen base model in 4-bit NF4 with double quantisation (the paper's setting)"""
    lora_r: int = 64
    """the LoRA rank"""
    lora_alpha: int = 16
    """the LoRA scaling alpha"""
    lora_target_modules: str = LANGUAGE_MODEL_QKV
    """regular expression (fully matched) of the module names that get LoRA adapters"""
    image: bool = True
    """the VLM sees the frame with the text (--no-image: the text description only, the LLM ablation)"""
    image_size: int | None = None
    """pixels of the longer side of the env's image (unset: the env's own size); image models only"""
    image_splitting: bool = False
    """let the processor cut a frame into several tiles (SmolVLM / Idefics3, LLaVA-NeXT); default: one tile per frame"""
    state_template: str | None = None
    """the state prompt, with {description} and optionally {actions}; unset: the paper's template for the env"""
    action_template: str = ACTION_TEMPLATE
    """the action prompt, with {action}"""
    reduction: Literal["mean", "sum", "word"] = "mean"
    """how the action prompt's token log-probs become a score: mean (paper eq. 1), sum, or word (per word, TWOSOME)"""

    # Algorithm specific arguments
    env_id: str = "FrozenLake8x8"
    """the id of the environment (a text_envs short id, or a full MiniGrid-*/BabyAI-*/FrozenLake* id)"""
    total_timesteps: int = 100_000
    """total timesteps of the experiments (all processes together)"""
    learning_rate: float = 1e-5
    """the learning rate of the optimizer"""
    num_envs: int | None = None
    """the number of parallel game environments per process (unset: 4, or 2 for Fetch and GoToRedBallGrey)"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = False
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 128
    """the number of mini-batches"""
    update_epochs: int = 1
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization (over the whole batch: a minibatch holds as few as 2 samples)"""
    clip_coef: float = 0.1
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
    gradient_accumulation_steps: int = 4
    """mini-batches whose gradients are summed before each optimizer step"""
    eval_seeds: list[int] | None = None
    """evaluate on new envs with these seeds (FrozenLake8x8: held-out maps) instead of the training envs' seeds"""
    env_seeds: list[int] | None = None
    """the training envs' seeds, --num-envs per process (FrozenLake8x8: one map each); unset: seed, seed + 1, ..."""
    random_policy: bool = False
    """evaluate a uniformly random policy instead of the VLM (needs --total-timesteps 0 and --eval-episodes N)"""

    # computed from the flags above at start-up (hidden from --help)
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size per process (computed in runtime)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""


def make_env(env_id: str, seed: int, image_size: int | None, with_image: bool) -> Callable[[], gym.Env]:
    """A thunk building one text_envs env; MiniGrid / BabyAI use the paper's macro actions."""

    def thunk() -> gym.Env:
        macro = env_id in text_envs.GRID_ENVS or env_id.startswith(("MiniGrid-", "BabyAI-"))
        size = {"image_size": image_size} if image_size else {}
        return text_envs.make_env(
            env_id, seed, with_image=with_image, action_set="macro" if macro else "primitive", **size
        )

    return thunk


def make_envs(env_id: str, seeds: Sequence[int], image_size: int | None, with_image: bool) -> gym.vector.SyncVectorEnv:
    """Vector env that resets an env in the step that ends its episode, handing the final observation in `info`."""
    return gym.vector.SyncVectorEnv(
        [make_env(env_id, s, image_size, with_image) for s in seeds], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


def format_state_prompt(
    processor: object, template: str, description: str, action_names: Sequence[str], with_image: bool
) -> str:
    """The state prompt P in the model's chat format: the image, then the filled template (Fig. 1)."""
    text = template.format(description=description, actions=", ".join(action_names))
    if type(processor).__name__ == "IdeficsProcessor":
        return IDEFICS_V1_PROMPT.format(image=IDEFICS_V1_IMAGE if with_image else " ", text=text)
    if hasattr(processor, "image_processor"):  # a VLM's processor
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    elif getattr(processor, "chat_template", None) is not None:  # a text-only LM's tokenizer
        content = text
    else:
        return text
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def encode_states(processor: object, prompts: Sequence[str], images: Sequence[np.ndarray] | None) -> dict:
    """The left-padded state prompts, each with its image (Idefics v1 takes text and images as one sequence)."""
    if not type(processor).__name__ == "IdeficsProcessor":
        image_kwargs = {"images": [[image] for image in images]} if images is not None else {}
        return processor(text=list(prompts), padding=True, padding_side="left", return_tensors="pt", **image_kwargs)
    parts = [prompt.partition(IDEFICS_V1_IMAGE) for prompt in prompts]  # given `images=`, it appends them instead
    samples = [[p[0], image, p[2]] for p, image in zip(parts, images)] if images is not None else [[p] for p in prompts]
    return processor(text=samples, padding=True, padding_side="left", return_tensors="pt")


def shared_prefix_length(token_ids: Sequence[Sequence[int]]) -> int:
    """Tokens every action prompt starts with, keeping at least one own token per action."""
    n = 0
    while n < min(len(ids) for ids in token_ids) - 1 and len({ids[n] for ids in token_ids}) == 1:
        n += 1
    return n


def prefix_positions(model: nn.Module, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids of the left-padded state prompts, and the next position of each row."""
    mask = enc["attention_mask"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rope_index = getattr(getattr(base, "model", None), "get_rope_index", None)
    if rope_index is not None and "image_grid_thw" in enc:  # Qwen2-VL's multimodal RoPE: 3 position rows
        positions, _ = rope_index(
            enc["input_ids"],
            mm_token_type_ids=enc.get("mm_token_type_ids"),
            image_grid_thw=enc["image_grid_thw"],
            attention_mask=mask,
        )
        return positions, positions.amax(dim=(0, 2)) + 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return positions, positions[:, -1] + 1


def extend_positions(positions: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids of `length` text tokens from `start`, shaped like `positions` (1 or 3 rows for mRoPE)."""
    new = start[:, None] + torch.arange(length, device=start.device)
    return new.expand(positions.shape[0], *new.shape) if positions.ndim == 3 else new


class StateScores(NamedTuple):
    scores: torch.Tensor  # [B, A] reduced log-likelihood of each action prompt
    hidden: torch.Tensor  # [B, H] last layer's hidden state at the last state-prompt token
    n_tokens: int  # tokens run through the language model


def score_actions_and_state(
    model: nn.Module,
    processor: object,
    state_prompts: Sequence[str],
    images: Sequence[np.ndarray] | None,
    action_prompts: Sequence[str],
    reduction: str = "mean",
) -> StateScores:
    """Score every action prompt after every state prompt, encoding each state (image included) once."""
    tokenizer = getattr(processor, "tokenizer", processor)
    device = model.device
    # Left padding puts the last state-prompt token of every row in the same (last) column.
    enc = encode_states(processor, state_prompts, images).to(device)
    action_ids = tokenizer(list(action_prompts), add_special_tokens=False)["input_ids"]
    n_shared = shared_prefix_length(action_ids)  # e.g. "Based on ... would be to": scored once per state
    suffixes = [ids[n_shared:] for ids in action_ids]
    batch, state_len, n_actions = enc["input_ids"].shape[0], enc["input_ids"].shape[1], len(action_ids)

    # Pass 1, once per state: state prompt + shared action tokens, keeping the KV cache.
    shared_ids = torch.tensor(action_ids[0][:n_shared], dtype=torch.long, device=device).expand(batch, n_shared)
    positions, next_position = prefix_positions(model, enc)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(shared_ids)], dim=1)
    pixel_inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    image_mask = enc.get("image_attention_mask")  # Idefics v1: the images each token cross-attends to
    if image_mask is not None:  # action tokens attend to what the last state-prompt token does
        pixel_inputs["image_attention_mask"] = torch.cat([image_mask, image_mask[:, -1:].expand(-1, n_shared, -1)], 1)
    out = model(
        input_ids=torch.cat([enc["input_ids"], shared_ids], dim=1),
        attention_mask=mask,
        position_ids=torch.cat([positions, extend_positions(positions, next_position, n_shared)], dim=-1),
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=n_shared + 1,
        **pixel_inputs,
    )
    logprobs = out.logits.float().log_softmax(-1)  # log p(token | prefix) over the whole vocabulary
    shared_logprob = logprobs[:, :-1].gather(-1, shared_ids[..., None]).squeeze(-1).sum(-1, keepdim=True)
    first_ids = torch.tensor([s[0] for s in suffixes], device=device)
    token_logprob = shared_logprob + logprobs[:, -1, first_ids]  # [B, A]
    n_tokens = int(mask.sum())

    # Pass 2, once per (state, action): the rest of each action prompt against the repeated cache.
    # The last token of an action only has to be predicted, never fed, so inputs stop one token early.
    cont_len = max(len(s) for s in suffixes) - 1
    if cont_len > 0:
        pad_id = tokenizer.pad_token_id or 0
        inputs = torch.tensor([s[:-1] + [pad_id] * (cont_len - len(s) + 1) for s in suffixes], device=device)
        targets = torch.tensor([s[1:] + [pad_id] * (cont_len - len(s) + 1) for s in suffixes], device=device)
        cont_mask = torch.tensor([[1] * (len(s) - 1) + [0] * (cont_len - len(s) + 1) for s in suffixes], device=device)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_actions)  # row b * A + i: state b, action i (differentiable copies)
        start = (next_position + n_shared).repeat_interleave(n_actions)
        image_inputs = {}
        if image_mask is not None:  # Idefics v1's cross-attention is not cached: it reads the image features again
            features = "perceiver_embeddings" if model.config.use_resampler else "image_encoder_embeddings"
            image_inputs = {
                features: out.image_hidden_states.repeat_interleave(n_actions, 0),
                "image_attention_mask": image_mask[:, -1:].expand(-1, cont_len, -1).repeat_interleave(n_actions, 0),
            }
        cont = model(
            input_ids=inputs.repeat(batch, 1),
            past_key_values=cache,
            use_cache=True,
            attention_mask=torch.cat([mask.repeat_interleave(n_actions, 0), cont_mask.repeat(batch, 1)], 1),
            position_ids=extend_positions(positions, start, cont_len),
            **image_inputs,
        )
        cont_logprob = cont.logits.float().log_softmax(-1).gather(-1, targets.repeat(batch, 1)[..., None]).squeeze(-1)
        token_logprob = token_logprob + (cont_logprob * cont_mask.repeat(batch, 1)).sum(-1).view(batch, n_actions)
        n_tokens += batch * int(cont_mask.sum())

    if reduction == "mean":  # eq. 1: mean token log-likelihood of the action prompt
        scores = token_logprob / torch.tensor([len(ids) for ids in action_ids], device=device)
    elif reduction == "sum":
        scores = token_logprob
    elif reduction == "word":  # TWOSOME's word normalisation
        scores = token_logprob / torch.tensor([len(p.split()) for p in action_prompts], device=device)
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'word', not {reduction!r}")
    return StateScores(scores, out.hidden_states[-1][:, state_len - 1], n_tokens)


def score_actions(
    model: nn.Module,
    processor: object,
    state_prompts: Sequence[str],
    images: Sequence[np.ndarray] | None,
    action_prompts: Sequence[str],
    reduction: str = "mean",
) -> torch.Tensor:
    """[B, A] log-likelihood scores of each action prompt after each state prompt (paper eq. 1 with "mean")."""
    return score_actions_and_state(model, processor, state_prompts, images, action_prompts, reduction).scores


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights and constant bias, as in CleanRL."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The VLM policy (softmax over the action prompts' scores) and the value head on the last state-prompt token."""

    def __init__(
        self,
        model: nn.Module,
        processor: object,
        action_names: Sequence[str],
        state_template: str = LISTING_STATE_TEMPLATE,
        action_template: str = ACTION_TEMPLATE,
        reduction: str = "mean",
        with_image: bool = True,
    ):
        super().__init__()
        self.model, self.processor, self.with_image = model, processor, with_image
        self.action_names, self.state_template, self.reduction = list(action_names), state_template, reduction
        self.action_prompts = [action_template.format(action=name) for name in action_names]
        hidden = model.config.get_text_config().hidden_size
        self.value_head = nn.Sequential(
            layer_init(nn.Linear(hidden, 1024)),
            nn.ReLU(),
            layer_init(nn.Linear(1024, 512)),
            nn.ReLU(),
            layer_init(nn.Linear(512, 1), std=1.0),
        ).to(model.device, torch.float32)
        self.tokens_seen = 0

    def observe(self, obs: dict) -> tuple[list[str], np.ndarray | None]:
        """State prompts, and images (None when the model reads text only), of a batch of observations."""
        prompts = [
            format_state_prompt(self.processor, self.state_template, text, self.action_names, self.with_image)
            for text in obs["text"]
        ]
        return prompts, (obs["image"] if self.with_image else None)

    def scores_and_value(self, prompts: Sequence[str], images: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Action scores [B, A] and state values [B]."""
        out = score_actions_and_state(self.model, self.processor, prompts, images, self.action_prompts, self.reduction)
        self.tokens_seen += out.n_tokens
        return out.scores, self.value_head(out.hidden.float()).squeeze(-1)

    def get_value(self, prompts: Sequence[str], images: np.ndarray | None) -> torch.Tensor:
        return self.scores_and_value(prompts, images)[1]

    def get_action_and_value(
        self, prompts: Sequence[str], images: np.ndarray | None, action: torch.Tensor | None = None
    ):
        scores, value = self.scores_and_value(prompts, images)
        probs = Categorical(logits=scores)  # pi(a_i | s) = softmax_i(score_i)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), value


def state_template(env_id: str) -> str:
    """The paper's state prompt for an env: FrozenLake warns of the traps, the others list the actions."""
    return FROZENLAKE_STATE_TEMPLATE if env_id.startswith("FrozenLake") else LISTING_STATE_TEMPLATE


def build_agent(args: Args, action_names: Sequence[str], device: torch.device) -> Agent:
    """The base model with LoRA, wrapped with the value head and the prompt templates."""
    model, processor, reads_images = load_base_model(args.model_id, args.load_in_4bit, device)
    if not reads_images and args.image_size is not None:
        raise SystemExit(f"{args.model_id} is a text-only model, so --image-size does not apply: drop it.")
    if not reads_images:
        print(f"{args.model_id} is a text-only model: it reads the text description only.")
    configure_image_processor(model, processor, args.image_splitting)
    model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules)
    model.eval()  # no dropout: rollouts and updates score the same policy
    template = args.state_template or state_template(args.env_id)
    return Agent(
        model,
        processor,
        action_names,
        template,
        args.action_template,
        args.reduction,
        with_image=reads_images and args.image,
    )


def env_action_names(env_id: str) -> list[str]:
    """The action words of an env id, or a clear error for an unknown id."""
    try:
        env = make_env(env_id, 0, None, with_image=False)()
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return list(env.get_wrapper_attr("action_names"))


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


def check_args(args: Args, world: int = 1) -> None:
    """Turn the mistakes a user can make on the command line into one sentence and a non-zero exit."""
    at_least = {
        "--learning-rate": (args.learning_rate, 0),  # 0: a frozen policy, for measurements
        "--seed": (args.seed, 0),
        "--env-seeds": (min(args.env_seeds or [0]), 0),
        "--eval-seeds": (min(args.eval_seeds or [0]), 0),
        "--lora-r": (args.lora_r, 1),
        "--lora-alpha": (args.lora_alpha, 1),
        "--image-size": (args.image_size, 1),  # None: the env's default size
        "--total-timesteps": (args.total_timesteps, 0),
        "--num-envs": (args.num_envs, 1),
        "--num-steps": (args.num_steps, 1),
        "--num-minibatches": (args.num_minibatches, 1),
        "--update-epochs": (args.update_epochs, 1),
        "--gradient-accumulation-steps": (args.gradient_accumulation_steps, 1),
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
        if value is not None and value < least:
            raise SystemExit(f"{flag} must be at least {least}, not {value}.")
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise SystemExit(f"{flag} must be > 0, not {value}.")
    for flag, value in fractions.items():
        if not 0 <= value <= 1:
            raise SystemExit(f"{flag} must lie in [0, 1], not {value}.")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--track needs Weights and Biases, which is not installed: pip install wandb.")
    if args.random_policy and (args.total_timesteps > 0 or args.eval_episodes == 0):
        raise SystemExit("--random-policy only evaluates: use it with --total-timesteps 0 and --eval-episodes N.")
    if args.total_timesteps == 0 and args.eval_episodes == 0:
        raise SystemExit("--total-timesteps 0 trains nothing: add --eval-episodes N to evaluate the model.")
    if args.total_timesteps > 0 and args.num_iterations < 1:
        raise SystemExit(
            f"--total-timesteps {args.total_timesteps} is less than one rollout (--num-envs x --num-steps "
            f"x processes = {args.batch_size * world}): raise it."
        )
    if args.minibatch_size == 0:
        raise SystemExit(
            f"--num-minibatches {args.num_minibatches} exceeds the batch of {args.batch_size} samples "
            "per process: lower it."
        )
    if args.env_seeds and len(args.env_seeds) != args.num_envs * world:
        raise SystemExit(
            f"--env-seeds gives {len(args.env_seeds)} seeds for {args.num_envs} envs x {world} processes: "
            "give one seed per env."
        )
    if not args.image and args.image_size is not None:
        raise SystemExit("--image-size sets the image the VLM sees, so it does not fit with --no-image.")
    templates = {
        "--state-template": (args.state_template or "", ["description", "actions"]),
        "--action-template": (args.action_template, ["action"]),
    }
    for flag, (template, names) in templates.items():
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError:  # a lone { or }
            raise SystemExit(f"{flag} holds an unmatched {{ or }}: write a literal brace as {{{{ or }}}}.") from None
        for field in fields:
            if field not in names:
                raise SystemExit(
                    f"{flag} holds {{{field}}}, which is not a placeholder: use "
                    f"{' and '.join('{' + name + '}' for name in names)} (a literal brace is written {{{{ or }}}})."
                )
    if args.state_template is not None and "{description}" not in args.state_template:
        raise SystemExit("--state-template must contain {description} (and may contain {actions}).")
    if "{action}" not in args.action_template:
        raise SystemExit("--action-template must contain {action}.")


def run_state(args: Args, run_name: str, iteration: int, global_step: int, rng_states: list) -> dict:
    """What a checkpoint holds besides the weights: the script, its flags, where the run stands, the RNG states."""
    return {
        "algorithm": ALGORITHM,
        "args": asdict(args),
        "run_name": run_name,
        "iteration": iteration,
        "global_step": global_step,
        "rng_states": rng_states,
    }


def save_checkpoint(path: Path, agent: Agent, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """LoRA adapter (PeftModel.from_pretrained loads it), value head, optimizer (None: a model without one, as
    --save-model writes), step and RNG. Written to path.tmp, made durable, then swapped in; `resume_folder` finds the
    newest complete one wherever a run killed while saving left it."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a run killed while writing it
    agent.model.save_pretrained(tmp / "adapter")
    optimizer_state = {} if optimizer is None else {"optimizer": optimizer.state_dict()}
    torch.save({**state, "value_head": agent.value_head.state_dict(), **optimizer_state}, tmp / "trainer_state.part")
    for file in [*(tmp / "adapter").iterdir(), tmp / "trainer_state.part"]:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp / "trainer_state.part", tmp / "trainer_state.pt")  # last: a folder with it is complete
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the renames themselves
    finally:
        os.close(directory)
    shutil.rmtree(old, ignore_errors=True)


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

    def check(self) -> None:
        """At a safe point: stop here (KeyboardInterrupt) if Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt


def resume_folder(path: Path) -> Path:
    """The newest complete checkpoint at `path`: a run killed while saving may have left it in path.tmp (newer than
    the others when complete) or path.old."""
    for folder in (path.with_name(path.name + ".tmp"), path, path.with_name(path.name + ".old")):
        if (folder / "trainer_state.pt").is_file():
            return folder
    return path


def load_checkpoint(path: str, args: Args) -> dict:
    """Read a checkpoint of this script and check that it was made for the same envs and model as `args`."""
    folder = resume_folder(Path(path))
    try:
        checkpoint = torch.load(folder / "trainer_state.pt", weights_only=True)
    except Exception as error:  # any reason the file cannot be read: missing, truncated, not torch's, pickled code
        message = str(error).split("\n")[0]  # torch's refusal of an unsafe pickle runs to a page
        raise SystemExit(f"Cannot read the checkpoint --resume {path} ({type(error).__name__}: {message}).") from None
    algorithm = checkpoint.get("algorithm") if isinstance(checkpoint, dict) else None
    if algorithm != ALGORITHM:
        raise SystemExit(
            f"--resume {path} is not a {ALGORITHM} checkpoint (it comes from "
            f"{algorithm or 'something else'}): resume it with the script that wrote it."
        )
    missing = [key for key, kind in CHECKPOINT_LAYOUT.items() if not isinstance(checkpoint.get(key), kind)]
    if isinstance(checkpoint.get("args"), dict):
        missing += [f"args.{flag}" for flag in ENV_FLAGS if flag not in checkpoint["args"]]
    if not (folder / "adapter" / "adapter_model.safetensors").is_file():
        missing.append("adapter/adapter_model.safetensors")
    if missing:
        raise SystemExit(
            f"--resume {path} is damaged (missing or malformed: {', '.join(missing)}): resume from another."
        )
    for flag in ENV_FLAGS:
        if checkpoint["args"][flag] != getattr(args, flag):
            name = "--" + flag.replace("_", "-")
            raise SystemExit(
                f"--resume {path} was trained with {name} {checkpoint['args'][flag]}, not "
                f"{getattr(args, flag)}: pass {name} {checkpoint['args'][flag]} to resume it."
            )
    return {**checkpoint, "folder": str(folder)}


def evaluate(
    policy: Callable[[dict, dict], np.ndarray], envs: gym.vector.VectorEnv, n_episodes: int
) -> list[tuple[float, int, bool, int]]:
    """(return, length, success, env index) of `n_episodes` episodes, split evenly over the envs (short ones are not
    favoured), env by env."""
    quota = [n_episodes // envs.num_envs + (i < n_episodes % envs.num_envs) for i in range(envs.num_envs)]
    episodes: list[list[tuple[float, int, bool, int]]] = [[] for _ in range(envs.num_envs)]
    returns, lengths = np.zeros(envs.num_envs), np.zeros(envs.num_envs, dtype=int)
    obs, infos = envs.reset()
    while any(len(done) < q for done, q in zip(episodes, quota)):
        obs, reward, terminations, truncations, infos = envs.step(policy(obs, infos))
        returns, lengths = returns + reward, lengths + 1
        for i in np.flatnonzero(terminations | truncations):
            if len(episodes[i]) < quota[i]:
                episodes[i].append(
                    (float(returns[i]), int(lengths[i]), bool(infos["final_info"]["success"][i]), int(i))
                )
            returns[i], lengths[i] = 0.0, 0
    return [episode for per_env in episodes for episode in per_env]


def save_episodes(path: Path, episodes: list[tuple[float, int, bool, int]], seeds: Sequence[int]) -> None:
    """One CSV row per evaluation episode: the seed of its env (on FrozenLake, its map), return, length, success."""
    rows = [f"{seeds[i]},{ret},{length},{int(success)}\n" for ret, length, success, i in episodes]
    path.write_text("env_seed,episodic_return,episodic_length,success\n" + "".join(rows))


def log_evaluation(
    writer: SummaryWriter, episodes: list[tuple[float, int, bool, int]], mode: str, global_step: int
) -> None:
    """Write the evaluation's mean return and success rate (eval/{mode}_...) to TensorBoard and print them."""
    returns, success = np.array([e[0] for e in episodes]), float(np.mean([e[2] for e in episodes]))
    writer.add_scalar(f"eval/{mode}_episodic_return", returns.mean(), global_step)
    writer.add_scalar(f"eval/{mode}_success_rate", success, global_step)
    print(f"eval {mode}: episodic_return={returns.mean():.3f} success_rate={success:.2f} over {len(episodes)} episodes")


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    interrupt = Interrupt()
    accelerator = Accelerator(cpu=not (args.cuda and torch.cuda.is_available()))
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if args.num_envs is None:  # the paper's 2 envs for Fetch and GoToRedBallGrey, named by their short or full id
        full_id = text_envs.GRID_ENVS.get(args.env_id, args.env_id)
        two_envs = full_id in (text_envs.GRID_ENVS["Fetch"], text_envs.GRID_ENVS["GoToRedBallGrey"])
        args.num_envs = len(args.env_seeds) // world if args.env_seeds else 2 if two_envs else 4
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // max(args.num_minibatches, 1))
    args.num_iterations = args.total_timesteps // max(args.batch_size * world, 1)  # check_args refuses 0 envs
    check_args(args, world)
    if not args.random_policy:
        model_source, _ = resolve_model_source(args.model_id)
        if model_source != args.model_id:  # the offline fallback: the run is named after the model it loads
            args.model_id, args.exp_name = model_source, f"{args.exp_name}-{Path(model_source).name}"
    checkpoint = load_checkpoint(args.resume, args) if args.resume else None
    import peft  # the flags are checked: now the heavy libraries (load_base_model imports transformers)

    run_name = (
        checkpoint["run_name"] if checkpoint else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    )

    # TRY NOT TO MODIFY: seeding (the same seed for the initial weights on every process, then one per process)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # env and agent setup: everything that can fail on a bad flag happens before a run directory exists
    env_seeds = (args.env_seeds or [args.seed + i for i in range(args.num_envs * world)])[
        rank * args.num_envs : (rank + 1) * args.num_envs
    ]
    action_names = env_action_names(args.env_id)
    agent = None if args.random_policy else build_agent(args, action_names, device)
    envs = make_envs(args.env_id, env_seeds, args.image_size, with_image=agent is not None and agent.with_image)

    if args.track and accelerator.is_main_process:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    # purge_step: on resume, TensorBoard drops what the killed run logged after its checkpoint (at later steps)
    purge_step = checkpoint["global_step"] + 1 if checkpoint else None
    writer = SummaryWriter(f"runs/{run_name}", purge_step=purge_step) if accelerator.is_main_process else None
    if writer is not None:
        writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
        )

    if agent is None:  # the Random-Agent baseline: no model at all
        envs.action_space.seed(args.seed + rank)
        if writer is not None:
            episodes = evaluate(lambda obs, infos: envs.action_space.sample(), envs, args.eval_episodes)
            log_evaluation(writer, episodes, "random", global_step=0)
            save_episodes(Path(f"runs/{run_name}/eval_random.csv"), episodes, env_seeds)
            writer.close()
        sys.exit()

    params = [p for p in agent.parameters() if p.requires_grad]  # LoRA and value head, in a fixed order
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    if world > 1:  # every process starts from rank 0's adapter and value head
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    global_step, start_iteration = 0, 1
    if checkpoint:
        try:
            adapter = load_file(Path(checkpoint["folder"]) / "adapter" / "adapter_model.safetensors")
            if peft.set_peft_model_state_dict(agent.model, adapter).unexpected_keys:
                raise KeyError("the adapter does not fit this model")
            agent.value_head.load_state_dict(checkpoint["value_head"])
            if "optimizer" in checkpoint:  # a model saved by --save-model has none: Adam starts afresh
                optimizer.load_state_dict(checkpoint["optimizer"])
            torch.set_rng_state(checkpoint["rng_states"][rank % len(checkpoint["rng_states"])])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, OSError) as error:
            raise SystemExit(
                f"--resume {args.resume} is damaged ({type(error).__name__} while restoring it): resume from another."
            ) from None
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
        if accelerator.is_main_process:
            print(f"resumed {run_name} at iteration {checkpoint['iteration']}, global_step={global_step}", flush=True)
    else:
        torch.manual_seed(args.seed + rank)
    if accelerator.is_main_process:
        n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in agent.parameters())
        print(
            f"trainable: {n_trainable:,} of {n_total:,} parameters ({100 * n_trainable / n_total:.2f}%), "
            f"images: {agent.with_image}, processes: {world}"
        )

    # ALGO Logic: Storage setup
    image_shape = envs.single_observation_space["image"].shape if agent.with_image else (0, 0, 3)
    obs_prompts = [[""] * args.num_envs for _ in range(args.num_steps)]
    obs_images = torch.zeros((args.num_steps, args.num_envs) + image_shape, dtype=torch.uint8)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    final_values = torch.zeros((args.num_steps, args.num_envs)).to(device)

    # TRY NOT TO MODIFY: start the game
    start_time, start_step = time.time(), global_step
    progress = tqdm(
        total=args.num_iterations * args.batch_size * world,
        initial=global_step,
        unit="step",
        desc=Path(args.model_id).name,
        mininterval=1,
        smoothing=0,  # the run's average rate, updates included: no env step is taken while one runs
        disable=not accelerator.is_main_process,
    )
    interrupt.training = world == 1  # several processes stop together only at a --checkpoint-freq checkpoint
    next_obs, _ = envs.reset()
    next_done = torch.zeros(args.num_envs).to(device)
    episode_return, episode_length = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=int)

    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate
            finished = []  # (return, length, success) of this process's episodes in this rollout
            iteration_start_step = global_step
            progress.set_postfix_str("rollout")
            rollout_start, agent.tokens_seen = time.time(), 0

            for step in range(0, args.num_steps):
                global_step += args.num_envs * world
                prompts, images = agent.observe(next_obs)
                obs_prompts[step] = prompts
                if agent.with_image:
                    obs_images[step] = torch.from_numpy(images)
                dones[step] = next_done

                # ALGO LOGIC: action logic
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(prompts, images)
                    values[step] = value.flatten()
                actions[step] = action
                logprobs[step] = logprob

                # TRY NOT TO MODIFY: execute the game and log data.
                next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
                episode_return, episode_length = episode_return + reward, episode_length + 1
                next_done_np = np.logical_or(terminations, truncations)
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
                next_done = torch.as_tensor(next_done_np, dtype=torch.float32, device=device)

                final_values[step] = 0.0
                truncated = np.flatnonzero(
                    truncations & ~terminations
                )  # out of time, not done: the episode's value goes on
                if len(truncated) > 0:
                    finals = [infos["final_obs"][i] for i in truncated]
                    final_obs = {key: [final[key] for final in finals] for key in finals[0]}
                    with torch.no_grad():
                        final_values[step, truncated] = agent.get_value(*agent.observe(final_obs)).flatten()
                for i in np.flatnonzero(next_done_np):
                    success = bool(infos["final_info"]["success"][i])
                    finished.append((float(episode_return[i]), int(episode_length[i]), success))
                    if writer is not None:
                        writer.add_scalar("charts/episodic_return", episode_return[i], global_step)
                        writer.add_scalar("charts/episodic_length", episode_length[i], global_step)
                    episode_return[i], episode_length[i] = 0.0, 0
                progress.update(args.num_envs * world)
                interrupt.check()
            rollout_time, rollout_tokens = time.time() - rollout_start, agent.tokens_seen

            # bootstrap value if not done
            with torch.no_grad():
                next_value = agent.get_value(*agent.observe(next_obs)).reshape(1, -1)
                advantages, returns = compute_gae(
                    rewards, values, dones, final_values, next_value, next_done, args.gamma, args.gae_lambda
                )

            # flatten the batch
            b_prompts = [prompt for step_prompts in obs_prompts for prompt in step_prompts]
            b_images = obs_images.flatten(0, 1)  # (0, 0, 3) frames without images: reshape(-1, ...) cannot infer -1
            b_logprobs = logprobs.reshape(-1)
            b_actions = actions.reshape(-1)
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)
            if args.norm_adv:  # over the whole batch, not the authors' per minibatch: 2 samples would become -1 / +1
                b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std(unbiased=False) + 1e-8)

            # Optimizing the policy and value network
            clipfracs = []
            n_accumulated = 0  # minibatches whose gradients are summed so far
            n_done, n_updates = 0, args.update_epochs * len(range(0, args.batch_size, args.minibatch_size))
            for epoch in range(args.update_epochs):
                b_inds = torch.randperm(args.batch_size).tolist()
                for start in range(0, args.batch_size, args.minibatch_size):
                    end = start + args.minibatch_size
                    mb_inds = b_inds[start:end]
                    mb_images = b_images[mb_inds].numpy() if agent.with_image else None
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                        [b_prompts[i] for i in mb_inds], mb_images, b_actions[mb_inds]
                    )
                    logratio = newlogprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()

                    with torch.no_grad():
                        # calculate approx_kl http://joschu.net/blog/kl-approx.html
                        old_approx_kl = (-logratio).mean()
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                    mb_advantages = b_advantages[mb_inds]

                    # Policy loss
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                    # Value loss
                    newvalue = newvalue.view(-1)
                    if args.clip_vloss:
                        v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                        v_clipped = b_values[mb_inds] + torch.clamp(
                            newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                        )
                        v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                        v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
                        v_loss = 0.5 * v_loss_max.mean()
                    else:
                        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                    entropy_loss = entropy.mean()
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                    (loss / args.gradient_accumulation_steps).backward()
                    n_accumulated += 1
                    if n_accumulated == args.gradient_accumulation_steps or end >= args.batch_size:
                        if world > 1:  # average the gradients over the processes, as DDP would
                            grads = accelerator.reduce(torch.cat([p.grad.flatten() for p in params]), reduction="mean")
                            for p, grad in zip(params, grads.split([p.numel() for p in params])):
                                p.grad.copy_(grad.view_as(p))
                        nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad()
                        n_accumulated = 0
                    n_done += 1
                    progress.set_postfix_str(f"update {n_done}/{n_updates}")
                    interrupt.check()

                if args.target_kl is not None and approx_kl > args.target_kl:
                    break

            y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

            # all processes: finished episodes, their summed return, length and successes, and VLM tokens of the rollout
            sums = [len(finished), *(map(sum, zip(*finished)) if finished else [0, 0, 0]), rollout_tokens]
            totals = accelerator.reduce(
                torch.tensor(sums, dtype=torch.float64, device=device), reduction="sum"
            ).tolist()
            if writer is not None:
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
                writer.add_scalar("vlm/rollout_tokens_per_second", totals[4] / rollout_time, global_step)
                writer.add_scalar("vlm/peak_memory_gib", peak_memory_gib(device), global_step)
                if totals[0] > 0:
                    writer.add_scalar("charts/success_rate", totals[3] / totals[0], global_step)
                    report = f"episodic_return={totals[1] / totals[0]:.3f} success_rate={totals[3] / totals[0]:.2f}"
                else:
                    report = "no episode ended"
                with progress.external_write_mode():  # the bar steps aside for the line
                    print(
                        f"iteration {iteration}/{args.num_iterations} global_step={global_step} SPS={sps} "
                        f"ETA={eta / 60:.0f}min {report} "
                        f"entropy={entropy_loss.item():.3f} tokens/s={totals[4] / rollout_time:.0f}",
                        flush=True,
                    )

            if args.checkpoint_freq and (iteration % args.checkpoint_freq == 0 or iteration == args.num_iterations):
                rng_states = gather_object([torch.get_rng_state()])
                if accelerator.is_main_process:
                    save_checkpoint(
                        Path(f"runs/{run_name}/checkpoint"),
                        agent,
                        optimizer,
                        run_state(args, run_name, iteration, global_step, rng_states),
                    )
    except KeyboardInterrupt:  # Ctrl-C, at a safe point: the rollout of this iteration is dropped, its updates kept
        progress.close()
        save_checkpoint(
            Path(f"runs/{run_name}/checkpoint"),
            agent,
            optimizer,
            run_state(args, run_name, iteration - 1, iteration_start_step, [torch.get_rng_state()]),
        )
        print(f"stopped by Ctrl-C at global_step={iteration_start_step}: --resume runs/{run_name}/checkpoint goes on")
        sys.exit(130)
    progress.close()
    interrupt.training = False
    envs.close()

    if args.save_model and accelerator.is_main_process:
        model_path = Path(f"runs/{run_name}/model")
        save_checkpoint(
            model_path,
            agent,
            None,
            run_state(args, run_name, args.num_iterations, global_step, [torch.get_rng_state()]),
        )
        print(f"model saved to {model_path} (evaluate or continue it with --resume {model_path})")
    evaluations = {}  # (return, length, success, env index) of each evaluation episode, by mode
    if args.eval_episodes > 0 and writer is not None:
        eval_seeds = args.eval_seeds or env_seeds
        for mode in ("greedy", "sampled"):
            eval_envs = make_envs(args.env_id, eval_seeds, args.image_size, agent.with_image)

            def policy(obs: dict, infos: dict) -> np.ndarray:
                with torch.no_grad():
                    scores, _ = agent.scores_and_value(*agent.observe(obs))
                return (scores.argmax(-1) if mode == "greedy" else Categorical(logits=scores).sample()).cpu().numpy()

            evaluations[mode] = evaluate(policy, eval_envs, args.eval_episodes)
            log_evaluation(writer, evaluations[mode], mode, global_step)
            save_episodes(Path(f"runs/{run_name}/eval_{mode}.csv"), evaluations[mode], eval_seeds)
            eval_envs.close()
    accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
