"""PPO on a vision-language model's own chain of thought, ending in a JSON action (RL4VLM).

Paper: Zhai et al. 2024, "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via
Reinforcement Learning" (NeurIPS 2024, https://openreview.net/forum?id=nBjmMF2IZU). The VLM reads the image and a
task prompt v_in and writes {"thoughts": ..., "action": "..."}. The value of the last "action" key
is the action, a uniformly random legal action when it names none (eq. 1, the page's f(v_out)). PPO
trains the VLM with log pi(a | o, v_in) = lambda * log p(thought tokens) + log p(action tokens)
(eq. 2, the page's regularised log-probability), taken at the sampling temperature. A value head on
the last prompt token gives V(s). Only LoRA adapters of the language model and the value head train,
optionally on a 4-bit base model.

Unlike the authors' code, the thought / action split comes from the decoded text's character offsets,
not from hard-coded token ids (theirs did not match their own tokenizer); every env's prompt shows that
env's own formula; and generation is batched over --num-envs envs with the KV cache (theirs: one env per GPU).
Under bf16 the old log-probs are recomputed by the update's own forward pass, so PPO's first ratio is exactly 1.

Needs: text_envs.py, cot_models.py (and assets/tiny-smolvlm-cot, the offline fallback model)

    python ppo_vlm_cot.py --env-id NumberLine
    accelerate launch --num_processes 2 ppo_vlm_cot.py --env-id EZPoints --load-in-4bit
    python ppo_vlm_cot.py --env-id Blackjack --total-timesteps 0 --eval-episodes 100  # untuned model
"""

import bisect
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import text_envs
from cot_models import (
    DEFAULT_MODEL_ID,
    add_lora,
    configure_image_processor,
    load_base_model,
    resolve_model_source,
)

ALGORITHM = "ppo_vlm_cot"
# Every linear layer of the language model (attention and MLP), not the vision tower, connector or lm_head:
# SmolVLM / Idefics3 `text_model`, LLaVA / LLaVA-NeXT / Qwen2-VL `language_model`, others `model`.
LANGUAGE_MODEL_LINEAR = (
    r"(?:.*\.)?(?:text_model|language_model|model)\.layers\.\d+\."
    r"(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj"
)
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
END_LEARNING_RATE = 1e-9  # the authors' --end-lr of the cosine schedule
# The key of eq. 1, quotes and case tolerated ("action", 'Action', action); "transaction" is no key.
ACTION_KEY = re.compile(r"""["']?\baction\b["']?\s*:""", re.IGNORECASE)
# Its value: a closed quoted string, or bare text, followed by nothing but `,` `}` `]`, a newline or the end.
ACTION_VALUE = re.compile(r"""\s*(?:"([^"\n]*)"|'([^'\n]*)'|([^,}\]\n"']*))\s*(?:[,}\]\n]|$)""")
JSON_FORMAT = "Your response should be a valid json file in the following format: \n{\n "


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

    sample_every: int = 1
    """every N iterations, log the last rollout step's prompts, outputs, actions, rewards (samples.jsonl); 0: never"""

    # Model
    model_id: str = DEFAULT_MODEL_ID
    """a Hugging Face Hub id or a local directory of a vision-language model"""
    load_in_4bit: bool = False
    """load the frozen base model in 4-bit NF4 with double quantisation"""
    lora_r: int = 128
    """the LoRA rank"""
    lora_alpha: int = 256
    """the LoRA scaling alpha"""
    lora_target_modules: str = LANGUAGE_MODEL_LINEAR
    """regular expression (fully matched) of the module names that get LoRA adapters"""
    temperature: float = 0.2
    """the sampling temperature; log-probs are computed from the logits divided by it"""
    max_new_tokens: int = 256
    """the most tokens the VLM writes per step"""
    thought_coef: float = 0.5
    """lambda: the weight of the thought tokens' log-prob in log pi (eq. 2; 0.5 for GymCards in the paper)"""
    image_splitting: bool = False
    """let the processor cut a frame into several tiles (SmolVLM / Idefics3, LLaVA-NeXT); default: one tile per frame"""
    cot: bool = True
    """whether the prompt asks for thoughts before the action (--no-cot: the paper's action-only ablation)"""

    # Algorithm specific arguments
    env_id: str = "NumberLine"
    """the id of the environment: NumberLine, EZPoints, Points24, Blackjack (paper prompts) or any other text_envs id"""
    total_timesteps: int = 15_000
    """total timesteps of the experiments (all processes together)"""
    learning_rate: float = 1e-5
    """the learning rate of the optimizer"""
    num_envs: int = 4
    """the number of parallel game environments per process, generated for in one batch"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """cosine-decay the learning rate to 1e-9 over the run (the paper's schedule)"""
    gamma: float = 0.9
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    minibatch_size: int = 1
    """samples per forward / backward pass"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization (over the whole batch: a minibatch may hold a single sample)"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.01
    """the maximum norm for the gradient clipping"""
    gradient_accumulation_steps: int = 128
    """mini-batches whose gradients are summed before each optimizer step"""

    # computed from the flags above at start-up (hidden from --help)
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size per process (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""


def make_env(env_id: str, seed: int) -> Callable[[], gym.Env]:
    """A thunk building one text_envs env (GymCards draw 300 x 300 images, as in the paper)."""
    return lambda: text_envs.make_env(env_id, seed)


def make_envs(env_id: str, seeds: Sequence[int]) -> gym.vector.SyncVectorEnv:
    """Vector env that resets an env in the step that ends its episode, handing the final observation in `info`."""
    try:
        return gym.vector.SyncVectorEnv(
            [make_env(env_id, s) for s in seeds], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )
    except ValueError as err:
        raise SystemExit(str(err)) from None


def task_prompt(
    env_id: str, action_names: Sequence[str], mission: str, description: str, formula: str, cot: bool = True
) -> str:
    """The prompt v_in: the paper's for a GymCards env, else one from the mission, description and action words."""
    thoughts = '"thoughts": "{first describe what you see, then think carefully about which action to choose}", \n'
    action = '"action": "{one of the actions}" \n}'
    if env_id == "NumberLine":  # the authors' prompts, their stray backslashes and typos removed
        text = (
            "You are playing a game called number line. You will see a target number and a current number in the "
            "image. And your goal is to move the current number closer to the target by choosing either adding or "
            "subtracting one to the current number. "
        )
        thoughts = (
            '"current number": "x", \n"target number": "x", \n"thoughts": "{first read out the current and '
            'target number, then think carefully about which action to choose}", \n'
        )
        action = '"action": "-" or "+" \n}'
    elif env_id == "Blackjack":
        text = (
            "You are a blackjack player. You are observing the current game state, you can choose between "
            f"{list(action_names)}. "
        )
        thoughts = (
            '"thoughts": "{first describe your total points and the dealer\'s total points then think about '
            'which action to choose}", \n'
        )
        action = '"action": "stand" or "hit" \n}'
    elif env_id in ("EZPoints", "Points24"):
        ez = env_id == "EZPoints"
        target, check = (12, "the current formula 'z' is complete") if ez else (24, "the current formula equals 24")
        text = (
            f"You are an expert {'card' if ez else '24 points card'} game player. You are observing "
            f"{'two' if ez else 'the four'} cards in the image. You are observing the current formula: {formula}. You "
            f"can choose between {list(action_names)}. The number or operator you choose will be appended to the "
            "current formula. Note that 'J', 'Q', and 'K' count as '10'. Your goal is to output a formula that "
            f"evaluates to {target}, and each number can only be used once. "
        )
        thoughts = (
            f'"cards": [{"x, y" if ez else "x, y, z, w"}], \n"current formula": {formula}, \n"thoughts": {{First '
            f"check whether {check}. If {check}, output '='. Otherwise consider which number or operator should be "
            f"appended to the current formula to make it equal {target}.}} \n"
        )
        action = '"action": "{number}" or "{operator}" \n}'
    else:
        text = (
            f"You are playing a game. Your goal: {mission}. {description} You can choose between {list(action_names)}. "
        )
    return text + JSON_FORMAT + (thoughts if cot else "") + action


def chat_prompt(processor: object, text: str) -> str:
    """The prompt in the model's chat format: the image, then the text."""
    content = [{"type": "image"}, {"type": "text", "text": text}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def last_action_key(text: str) -> re.Match | None:
    """The last "action" key of a model output, or None."""
    keys = list(ACTION_KEY.finditer(text))
    return keys[-1] if keys else None


def parse_action(text: str, legal_actions: list[str]) -> int | None:
    """Index of the legal action the last "action" key names (quotes and case tolerated), else None (eq. 1)."""
    key = last_action_key(text)
    value = ACTION_VALUE.match(text, key.end()) if key else None
    if value is None:
        return None
    word = next(group for group in value.groups() if group is not None).strip().lower()
    matches = [i for i, action in enumerate(legal_actions) if action.lower() == word]
    return matches[0] if len(matches) == 1 else None


def env_actions(texts: Sequence[str], action_names: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Env actions parsed from the outputs, a uniformly random legal one where none parses (eq. 1); and which parsed."""
    parsed = [parse_action(text, action_names) for text in texts]
    random_actions = torch.randint(len(action_names), (len(parsed),))
    return torch.tensor([int(r) if a is None else a for a, r in zip(parsed, random_actions)]), np.array(
        [a is not None for a in parsed]
    )


def split_output(tokenizer: object, token_ids: Sequence[int]) -> tuple[str, int]:
    """The output's text (special tokens left out), and the index of the token holding the first character of its
    last "action" key: len(token_ids) without a key. Character offsets, since a token may hold more than the key
    (byte-level BPE merges such as `{"`) and sampled ids need not be the tokenizer's own split of the text."""

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    text = decode(token_ids)
    key = last_action_key(text)
    if key is None:
        return text, len(token_ids)

    def chars_covered(n: int) -> int:  # characters of `text` that the first n tokens decode to
        return len(os.path.commonprefix([decode(token_ids[:n]), text]))

    return text, bisect.bisect_right(range(len(token_ids) + 1), key.start(), key=chars_covered) - 1


def encode_prompts(processor: object, prompts: Sequence[str], images: np.ndarray, device: torch.device) -> dict:
    """Left-padded token ids and pixels of a batch of chat prompts, so every prompt ends in the last column."""
    images = [[image] for image in images]
    return processor(text=list(prompts), images=images, padding=True, padding_side="left", return_tensors="pt").to(
        device
    )


def unscorable_token_ids(model: nn.Module) -> list[int]:
    """Image placeholder ids: never sampled, since fed back in they would stand for image features."""
    return [
        v
        for k in ("image_token_id", "image_token_index", "video_token_id")
        if isinstance(v := getattr(model.config, k, None), int)
    ]


class Output(NamedTuple):
    ids: torch.Tensor  # [B, T] generated token ids, padded after the end-of-sequence token
    mask: torch.Tensor  # [B, T] True up to and including the end-of-sequence token
    action_start: torch.Tensor  # [B] index of the first action token (T when no "action" key)


def generate(
    model: nn.Module,
    processor: object,
    prompts: Sequence[str],
    images: np.ndarray,
    temperature: float,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one output per prompt (temperature 0: greedy), the whole batch at once with the KV cache:
    [B, max_new_tokens] ids and their mask, the raw next-token logits of each sampled position [B, T, V], and the
    last layer's state at the last prompt token."""
    from transformers import GenerationConfig  # loaded with the model already (see load_base_model)

    tokenizer = processor.tokenizer
    ends = (
        model.generation_config.eos_token_id
    )  # the model's end tokens (SmolVLM: <end_of_utterance>) and the tokenizer's
    ends = sorted(set([ends] if isinstance(ends, int) else ends or []) | {tokenizer.eos_token_id} - {None})
    enc = encode_prompts(processor, prompts, images, model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}
    config = GenerationConfig(
        **sampling,
        max_new_tokens=max_new_tokens,
        eos_token_id=ends,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=unscorable_token_ids(model) or None,
        return_dict_in_generate=True,
        output_logits=True,
        output_hidden_states=True,
    )
    out = model.generate(**enc, generation_config=config)
    new = out.sequences[:, enc["input_ids"].shape[1] :]
    ids = torch.full((len(prompts), max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=new.device)
    ids[:, : new.shape[1]] = new
    return ids, output_mask(ids, ends), torch.stack(out.logits, dim=1), out.hidden_states[0][-1][:, -1]


def output_mask(ids: torch.Tensor, end_ids: Sequence[int]) -> torch.Tensor:
    """True for the generated tokens up to and including the first end-of-sequence token."""
    is_end = torch.isin(ids, torch.tensor(end_ids, device=ids.device)).long()
    return (is_end.cumsum(-1) - is_end) == 0


class CoTLogProb(NamedTuple):
    log_prob: torch.Tensor  # [B] lambda * thought + action: log pi(a | o, v_in) of eq. 2
    thought: torch.Tensor  # [B] summed log-probs of the thought tokens
    action: torch.Tensor  # [B] summed log-probs of the action tokens (from the last "action" key, EOS included)
    entropy: torch.Tensor  # [B] mean entropy of the next-token distributions along the output
    hidden: torch.Tensor  # [B, H] last layer's hidden state at the last prompt token


def cot_log_prob(
    model: nn.Module,
    processor: object,
    prompts: Sequence[str],
    images: np.ndarray,
    output: Output,
    thought_coef: float,
    temperature: float,
) -> CoTLogProb:
    """Log-probs of sampled outputs given prompt and image at the sampling temperature, split into thought and
    action."""
    n_out = max(int(output.mask.sum(-1).max()), 1)  # the columns that are padding in every row carry nothing
    enc = encode_prompts(processor, prompts, images, model.device)
    n_prompt = enc["input_ids"].shape[1]
    pixel_inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    out = model(
        input_ids=torch.cat([enc["input_ids"], output.ids[:, :n_out]], dim=1),
        attention_mask=torch.cat([enc["attention_mask"], output.mask[:, :n_out]], dim=1),
        output_hidden_states=True,
        logits_to_keep=n_out + 1,
        **pixel_inputs,
    )
    return split_log_prob(
        out.logits[:, :-1],
        out.hidden_states[-1][:, n_prompt - 1],
        output,
        thought_coef,
        temperature,
        unscorable_token_ids(model),
    )


def split_log_prob(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    output: Output,
    thought_coef: float,
    temperature: float,
    unscorable: Sequence[int],
) -> CoTLogProb:
    """eq. 2 from the raw next-token logits [B, n, V] of the first n output positions, split into thought and action."""
    n_out = logits.shape[1]
    ids, mask = output.ids[:, :n_out], output.mask[:, :n_out]
    logits = logits.float() / temperature  # the distribution the tokens were sampled from
    logits[..., unscorable] = -torch.inf
    logprobs = logits.log_softmax(-1)
    token_logprob = logprobs.gather(-1, ids[..., None]).squeeze(-1)
    is_action = torch.arange(n_out, device=ids.device) >= output.action_start[:, None]
    thought = torch.where(mask & ~is_action, token_logprob, 0.0).sum(-1)
    action = torch.where(mask & is_action, token_logprob, 0.0).sum(-1)
    with torch.no_grad():  # logged only
        entropy = torch.where(mask, torch.special.entr(logprobs.exp()).sum(-1), 0.0).sum(-1) / mask.sum(-1)
    # eq. 2: log pi(a | o, v_in) = lambda * log p(thought) + log p(action)
    return CoTLogProb(thought_coef * thought + action, thought, action, entropy, hidden)


def rescore(
    agent: "Agent", prompts: Sequence[str], images: torch.Tensor, output: Output, minibatch_size: int
) -> torch.Tensor:
    """log pi of stored samples from the update's own forward pass, minibatch_size samples at a time. Under bf16 the
    generation's cached hidden states differ from one full forward pass by a bf16 step, which moves a log-prob by
    ~0.005 nats even with an fp32 log-softmax; recomputed this way, PPO's first ratio is exactly 1."""
    log_prob = torch.zeros(len(prompts), device=output.ids.device)
    with torch.no_grad():
        for start in range(0, len(prompts), minibatch_size):
            inds = list(range(start, min(start + minibatch_size, len(prompts))))
            _, _, scored, _ = agent.get_action_and_value(
                [prompts[i] for i in inds], images[inds].numpy(), Output(*(x[inds] for x in output))
            )
            log_prob[inds] = scored.log_prob
    return log_prob


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights and constant bias, as in CleanRL."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """The VLM policy (its generated thought and action) and the value head on the last prompt token."""

    def __init__(
        self, model: nn.Module, processor: object, temperature: float, max_new_tokens: int, thought_coef: float
    ):
        super().__init__()
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.temperature, self.max_new_tokens, self.thought_coef = temperature, max_new_tokens, thought_coef
        hidden = model.config.get_text_config().hidden_size
        self.value_head = nn.Sequential(
            layer_init(nn.Linear(hidden, 1024)),
            nn.ReLU(),
            layer_init(nn.Linear(1024, 512)),
            nn.ReLU(),
            layer_init(nn.Linear(512, 1), std=1.0),
        ).to(model.device, torch.float32)

    def get_value(self, prompts: Sequence[str], images: np.ndarray) -> torch.Tensor:
        enc = encode_prompts(self.processor, prompts, images, self.model.device)
        out = self.model(**enc, output_hidden_states=True, logits_to_keep=1)
        return self.value_head(out.hidden_states[-1][:, -1].float()).squeeze(-1)

    def get_action_and_value(self, prompts: Sequence[str], images: np.ndarray, output: Output | None = None):
        """Sample and score outputs, or score the given ones: (output, their texts or None, CoTLogProb, value). A
        sample is scored from the logits and prompt state its own generation computed (no second forward pass);
        given outputs are scored by cot_log_prob, with gradients."""
        texts = None
        if output is None:
            with torch.no_grad():
                ids, mask, logits, hidden = generate(
                    self.model, self.processor, prompts, images, self.temperature, self.max_new_tokens
                )
            texts, starts = zip(*[split_output(self.tokenizer, row[m].tolist()) for row, m in zip(ids, mask)])
            output = Output(ids, mask, torch.tensor(starts, device=ids.device))
            scored = split_log_prob(
                logits, hidden, output, self.thought_coef, self.temperature, unscorable_token_ids(self.model)
            )
        else:
            scored = cot_log_prob(
                self.model, self.processor, prompts, images, output, self.thought_coef, self.temperature
            )
        return output, texts, scored, self.value_head(scored.hidden.float()).squeeze(-1)


def observation_prompts(
    obs: dict, infos: dict, env_id: str, processor: object, action_names: Sequence[str], cot: bool
) -> tuple[list[str], list[str], np.ndarray]:
    """Task prompts, chat prompts and images of a vector env's observations; each env's own formula from its info."""
    formulas = infos.get("formula", [""] * len(obs["text"]))
    texts = [
        task_prompt(env_id, action_names, obs["mission"][i], obs["text"][i], formulas[i], cot)
        for i in range(len(obs["text"]))
    ]
    return texts, [chat_prompt(processor, t) for t in texts], obs["image"]


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
        "--sample-every": (args.sample_every, 0),
        "--lora-r": (args.lora_r, 1),
        "--lora-alpha": (args.lora_alpha, 1),
        "--max-new-tokens": (args.max_new_tokens, 1),
        "--total-timesteps": (args.total_timesteps, 0),
        "--num-envs": (args.num_envs, 1),
        "--num-steps": (args.num_steps, 1),
        "--minibatch-size": (args.minibatch_size, 1),
        "--update-epochs": (args.update_epochs, 1),
        "--gradient-accumulation-steps": (args.gradient_accumulation_steps, 1),
        "--vf-coef": (args.vf_coef, 0),
        "--eval-episodes": (args.eval_episodes, 0),
        "--checkpoint-freq": (args.checkpoint_freq, 0),
    }
    positive = {
        "--temperature": args.temperature,  # the policy's log-probs are taken at the sampling temperature
        "--clip-coef": args.clip_coef,
        "--max-grad-norm": args.max_grad_norm,
    }
    fractions = {"--thought-coef": args.thought_coef, "--gamma": args.gamma, "--gae-lambda": args.gae_lambda}
    for flag, (value, least) in at_least.items():
        if value < least:
            raise SystemExit(f"{flag} must be at least {least}, not {value}.")
    for flag, value in positive.items():
        if not value > 0:
            raise SystemExit(f"{flag} must be > 0, not {value}.")
    for flag, value in fractions.items():
        if not 0 <= value <= 1:
            raise SystemExit(f"{flag} must lie in [0, 1], not {value}.")
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--track needs Weights and Biases, which is not installed: pip install wandb.")
    if args.total_timesteps == 0 and args.eval_episodes == 0:
        raise SystemExit("--total-timesteps 0 trains nothing: add --eval-episodes N to evaluate the model.")
    if args.total_timesteps > 0 and args.num_iterations < 1:
        raise SystemExit(
            f"--total-timesteps {args.total_timesteps} is less than one rollout (--num-envs x --num-steps "
            f"x processes = {args.batch_size * world}): raise it."
        )
    if args.minibatch_size > args.batch_size:
        raise SystemExit(
            f"--minibatch-size {args.minibatch_size} exceeds the batch of {args.batch_size} samples per "
            "process: lower it."
        )


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


def log_samples(writer: SummaryWriter, path: Path, records: list[dict], global_step: int) -> None:
    """Prompts, outputs, parsed actions and rewards: appended to samples.jsonl and shown in tensorboard's text tab."""
    with path.open("a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    writer.add_text(
        "cot/samples",
        "\n\n".join(
            f"**env {r['env']}**, action `{r['action']}`{'' if r['valid'] else ' (invalid: random)'}, "
            f"reward {r['reward']}\n\n"
            f"```\n{r['prompt']}\n```\n\n```\n{r['output']}\n```"
            for r in records
        ),
        global_step,
    )


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    interrupt = Interrupt()
    accelerator = Accelerator(cpu=not (args.cuda and torch.cuda.is_available()))
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    args.batch_size = int(args.num_envs * args.num_steps)
    args.num_iterations = args.total_timesteps // max(args.batch_size * world, 1)  # check_args refuses 0 envs
    check_args(args, world)
    model_source, _ = resolve_model_source(args.model_id)
    if model_source != args.model_id:  # the offline fallback: the run is named after the model it loads
        args.model_id, args.exp_name = model_source, f"{args.exp_name}-{Path(model_source).name}"
    checkpoint = load_checkpoint(args.resume, args) if args.resume else None
    import peft  # the flags are checked: now the heavy libraries (load_base_model imports transformers)

    run_name = (
        checkpoint["run_name"] if checkpoint else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    )

    # TRY NOT TO MODIFY: seeding (the same seed for the initial weights on every process, then one per process)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # env and agent setup: everything that can fail on a bad flag happens before a run directory exists
    env_seeds = [args.seed + rank * args.num_envs + i for i in range(args.num_envs)]
    envs = make_envs(args.env_id, env_seeds)
    action_names = list(envs.get_attr("action_names")[0])
    model, processor = load_base_model(args.model_id, args.load_in_4bit, device)
    configure_image_processor(model, processor, args.image_splitting)
    model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules)
    model.eval()  # no dropout: the rollout and the update score the same policy
    agent = Agent(model, processor, args.temperature, args.max_new_tokens, args.thought_coef)

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
            f"chain of thought: {args.cot}, processes: {world}"
        )

    def prompts_of(obs: dict, infos: dict) -> tuple[list[str], list[str], np.ndarray]:
        return observation_prompts(obs, infos, args.env_id, processor, action_names, args.cot)

    image_shape = envs.single_observation_space["image"].shape

    # ALGO Logic: Storage setup
    obs_prompts = [[""] * args.num_envs for _ in range(args.num_steps)]
    obs_images = torch.zeros((args.num_steps, args.num_envs) + image_shape, dtype=torch.uint8)
    output_ids = torch.zeros((args.num_steps, args.num_envs, args.max_new_tokens), dtype=torch.long).to(device)
    output_masks = torch.zeros((args.num_steps, args.num_envs, args.max_new_tokens), dtype=torch.bool).to(device)
    action_starts = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
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
    next_obs, next_infos = envs.reset()
    next_texts, next_prompts, next_images = prompts_of(next_obs, next_infos)
    next_done = torch.zeros(args.num_envs).to(device)
    episode_return, episode_length = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=int)

    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            if args.anneal_lr:  # cosine from --learning-rate down to END_LEARNING_RATE
                frac = 0.5 * (1.0 + math.cos(math.pi * (iteration - 1.0) / args.num_iterations))
                optimizer.param_groups[0]["lr"] = END_LEARNING_RATE + frac * (args.learning_rate - END_LEARNING_RATE)
            finished = []  # (return, length, success) of this process's episodes in this rollout
            iteration_start_step = global_step
            progress.set_postfix_str("rollout")
            n_invalid, thought_sum, action_sum = 0, 0.0, 0.0
            rollout_start = time.time()

            for step in range(0, args.num_steps):
                global_step += args.num_envs * world
                obs_prompts[step] = next_prompts
                obs_images[step] = torch.from_numpy(next_images)
                dones[step] = next_done

                # ALGO LOGIC: action logic
                with torch.no_grad():
                    output, output_texts, scored, value = agent.get_action_and_value(next_prompts, next_images)
                    values[step] = value.flatten()
                action, valid = env_actions(output_texts, action_names)
                output_ids[step], output_masks[step], action_starts[step] = output
                logprobs[step] = scored.log_prob
                n_invalid += int((~valid).sum())
                thought_sum, action_sum = (
                    thought_sum + scored.thought.sum().item(),
                    action_sum + scored.action.sum().item(),
                )

                # TRY NOT TO MODIFY: execute the game and log data.
                next_obs, reward, terminations, truncations, infos = envs.step(action.numpy())
                if (
                    writer is not None
                    and args.sample_every > 0
                    and iteration % args.sample_every == 0
                    and step == args.num_steps - 1
                ):
                    log_samples(
                        writer,
                        Path(f"runs/{run_name}/samples.jsonl"),
                        [
                            {
                                "iteration": iteration,
                                "global_step": global_step,
                                "env": i,
                                "prompt": next_texts[i],
                                "output": output_texts[i],
                                "action": action_names[action[i]],
                                "valid": bool(valid[i]),
                                "reward": float(reward[i]),
                            }
                            for i in range(args.num_envs)
                        ],
                        global_step,
                    )
                episode_return, episode_length = episode_return + reward, episode_length + 1
                next_done_np = np.logical_or(terminations, truncations)
                rewards[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
                next_texts, next_prompts, next_images = prompts_of(next_obs, infos)
                next_done = torch.as_tensor(next_done_np, dtype=torch.float32, device=device)

                final_values[step] = 0.0
                truncated = np.flatnonzero(
                    truncations & ~terminations
                )  # out of time, not done: the episode's value goes on
                if len(truncated) > 0:
                    final_obs = {
                        k: np.stack([infos["final_obs"][i][k] for i in truncated]) for k in ("text", "mission", "image")
                    }
                    final_infos = {k: v[truncated] for k, v in infos["final_info"].items() if k == "formula"}
                    with torch.no_grad():
                        final_values[step, truncated] = agent.get_value(
                            *prompts_of(final_obs, final_infos)[1:]
                        ).flatten()
                for i in np.flatnonzero(next_done_np):
                    success = bool(infos["final_info"]["success"][i])
                    finished.append((float(episode_return[i]), int(episode_length[i]), success))
                    if writer is not None:
                        writer.add_scalar("charts/episodic_return", episode_return[i], global_step)
                        writer.add_scalar("charts/episodic_length", episode_length[i], global_step)
                    episode_return[i], episode_length[i] = 0.0, 0
                progress.update(args.num_envs * world)
                interrupt.check()
            rollout_time, rollout_tokens = time.time() - rollout_start, int(output_masks.sum())

            # bootstrap value if not done
            with torch.no_grad():
                next_value = agent.get_value(next_prompts, next_images).reshape(1, -1)
                advantages, returns = compute_gae(
                    rewards, values, dones, final_values, next_value, next_done, args.gamma, args.gae_lambda
                )

            # flatten the batch
            b_prompts = [prompt for step_prompts in obs_prompts for prompt in step_prompts]
            b_images = obs_images.reshape((-1,) + image_shape)
            b_output = Output(
                output_ids.reshape(-1, args.max_new_tokens),
                output_masks.reshape(-1, args.max_new_tokens),
                action_starts.reshape(-1),
            )
            b_logprobs = logprobs.reshape(-1)
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)
            if (
                model.dtype != torch.float32
            ):  # bf16: old log-probs from the update's forward pass, so the first ratio is 1
                b_logprobs = rescore(agent, b_prompts, b_images, b_output, args.minibatch_size)
            if args.norm_adv:  # over the whole batch, as the authors do: a minibatch of one sample has no spread
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
                    mb_output = Output(
                        *(x[mb_inds] for x in b_output)
                    )  # the tokens sampled in the rollout, scored anew
                    _, _, newscored, newvalue = agent.get_action_and_value(
                        [b_prompts[i] for i in mb_inds], b_images[mb_inds].numpy(), mb_output
                    )
                    logratio = newscored.log_prob - b_logprobs[mb_inds]
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

                    # Value loss, clipped as in the authors' code
                    newvalue = newvalue.view(-1)
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()

                    entropy_loss = newscored.entropy.mean()  # logged only: the paper adds no entropy bonus
                    loss = pg_loss + v_loss * args.vf_coef

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

            y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

            # all processes: finished episodes, their summed return, length and successes, invalid actions, log-probs,
            # tokens
            sums = [
                len(finished),
                *(map(sum, zip(*finished)) if finished else [0, 0, 0]),
                n_invalid,
                thought_sum,
                action_sum,
                rollout_tokens,
            ]
            totals = accelerator.reduce(torch.tensor(sums, dtype=torch.float64, device=device), reduction="sum")
            if accelerator.is_main_process:
                n_samples = args.batch_size * world
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
                writer.add_scalar("cot/invalid_action_rate", totals[4] / n_samples, global_step)
                writer.add_scalar("cot/thought_log_prob", totals[5] / n_samples, global_step)
                writer.add_scalar("cot/action_log_prob", totals[6] / n_samples, global_step)
                writer.add_scalar("cot/output_tokens", totals[7] / n_samples, global_step)
                if totals[0] > 0:
                    writer.add_scalar("charts/success_rate", totals[3] / totals[0], global_step)
                    report = f"episodic_return={totals[1] / totals[0]:.3f} success_rate={totals[3] / totals[0]:.2f}"
                else:
                    report = "no episode ended"
                with progress.external_write_mode():  # the bar steps aside for the line
                    print(
                        f"iteration {iteration}/{args.num_iterations} global_step={global_step} SPS={sps} "
                        f"ETA={eta / 60:.0f}min {report} "
                        f"invalid={totals[4] / n_samples:.2f} tokens/s={totals[7] / rollout_time:.0f}",
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
    if args.eval_episodes > 0 and accelerator.is_main_process:
        for mode in ("greedy", "sampled"):
            eval_valid = []

            def policy(obs: dict, infos: dict) -> np.ndarray:
                _, prompts, images = prompts_of(obs, infos)
                with torch.no_grad():
                    ids, mask, _, _ = generate(
                        model,
                        processor,
                        prompts,
                        images,
                        0.0 if mode == "greedy" else args.temperature,
                        args.max_new_tokens,
                    )
                texts = [split_output(processor.tokenizer, row[m].tolist())[0] for row, m in zip(ids, mask)]
                eval_action, valid = env_actions(texts, action_names)
                eval_valid.extend(valid)
                return eval_action.numpy()

            evaluations[mode] = evaluate(policy, make_envs(args.env_id, env_seeds), args.eval_episodes)
            save_episodes(Path(f"runs/{run_name}/eval_{mode}.csv"), evaluations[mode], env_seeds)
            eval_returns = np.array([e[0] for e in evaluations[mode]])
            success, invalid = np.mean([e[2] for e in evaluations[mode]]), 1 - np.mean(eval_valid)
            writer.add_scalar(f"eval/{mode}_episodic_return", eval_returns.mean(), global_step)
            writer.add_scalar(f"eval/{mode}_success_rate", success, global_step)
            writer.add_scalar(f"eval/{mode}_invalid_action_rate", invalid, global_step)
            print(
                f"eval {mode}: episodic_return={eval_returns.mean():.3f} success_rate={success:.2f} "
                f"invalid={invalid:.2f} over {len(evaluations[mode])} episodes"
            )
    accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
