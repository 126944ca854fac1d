"""Supervised warm start of a vision-language model on expert demonstrations (RL4VLM's first stage).

Paper: Zhai et al. 2024, "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via
Reinforcement Learning" (https://rl4vlm.github.io). RL4VLM fine-tunes LLaVA on task data before RL
(the "LLaVA-sft" row) and starts PPO from that checkpoint; their SFT code was not released. This script
is that stage for both PPO scripts of this repo, in their exact prompt formats:
  --format likelihood: the state prompt P and the action prompts Q_i of ppo_vlm_likelihood.py; the loss is
      -log pi(a | s) = -log softmax_i(score_i)[a] for the demonstrated action a, the policy PPO samples from
      (--loss policy), or -score_a = -(1/|Q_a|) sum_t log p(Q_a,t | P, Q_a,<t), language-model SFT on Q_a's tokens
      (--loss tokens). Under eq. 1's mean the one differing word is averaged over the whole action prompt, so
      --loss tokens makes the right word likely while the sampled policy stays near uniform.
  --format cot: the task prompt v_in of ppo_vlm_cot.py and a JSON answer in the paper's form whose thoughts are
      written from the true state; the loss is the mean negative log-likelihood of the answer's tokens.
Prompts, images and token scoring come from the PPO scripts themselves, so SFT trains the very strings that PPO
scores. Demonstrations come from the text_envs experts, taking a uniformly random action (labelled as taken) on a
--expert-noise fraction of steps: an imperfect demonstrator, like RL4VLM's GPT-4V data. Their env seeds start at
--demo-seed and the held-out evaluation uses seeds 0 .. --eval-episodes - 1 (FrozenLake8x8: one map per seed).

    python sft_vlm.py --format likelihood --env-id FrozenLake8x8
    python sft_vlm.py --format cot --env-id NumberLine
    python ppo_vlm_likelihood.py --model-id runs/<run_name>/model   # PPO from the taught model

Needs: text_envs.py, ppo_vlm_likelihood.py, likelihood_models.py, ppo_vlm_cot.py, cot_models.py
"""

import importlib.util
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import ppo_vlm_cot as cot
import ppo_vlm_likelihood as likelihood
import text_envs


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
    save_model: bool = True
    """save the taught model (LoRA merged) with its processor to --output-dir, for the PPO scripts' --model-id"""
    output_dir: str | None = None
    """where to save the taught model (unset: runs/{run_name}/model)"""

    # Model
    model_id: str = likelihood.DEFAULT_MODEL_ID
    """a Hub id or a local directory of a vision-language model (or, with --format likelihood, a causal LM)"""
    load_in_4bit: bool = False
    """load the frozen base model in 4-bit NF4 with double quantisation (LoRA only)"""
    lora_r: int = 64
    """the LoRA rank; 0 trains every weight of the model (for small models taught from scratch)"""
    lora_alpha: int = 16
    """the LoRA scaling alpha"""
    lora_target_modules: str = cot.LANGUAGE_MODEL_LINEAR
    """regular expression (fully matched) of the module names that get LoRA adapters"""
    image_splitting: bool = False
    """let the processor cut a frame into several tiles (default: one tile per frame, as in the PPO scripts)"""

    # Demonstrations and training
    format: Literal["likelihood", "cot"] = "likelihood"
    """the prompt format to teach: ppo_vlm_likelihood.py's state + action prompts, or ppo_vlm_cot.py's JSON answer"""
    env_id: str = "FrozenLake8x8"
    """the id of the environment (a text_envs short id, or a full MiniGrid-*/BabyAI-*/FrozenLake* id)"""
    # policy clones the policy PPO samples from; tokens is language-model SFT
    loss: Literal["policy", "tokens"] = "policy"
    """--format likelihood: policy, -log pi(a|s) over eq. 1 scores; tokens, the action prompt's mean NLL (LM SFT)"""
    reduction: Literal["mean", "sum", "word"] = "mean"
    """with --format likelihood: how action-prompt log-probs become scores (ppo_vlm_likelihood.py's --reduction)"""
    cot: bool = True
    """with --format cot: thoughts before the action (--no-cot: the action-only answer of ppo_vlm_cot.py --no-cot)"""
    expert_noise: float = 0.2
    """fraction of demonstration steps on which a uniformly random action is taken and labelled as taken"""
    num_demos: int = 400
    """demonstration episodes, one env seed each from --demo-seed on"""
    demo_seed: int = 1000
    """the first env seed of the demonstrations (evaluation uses seeds 0 .. --eval-episodes - 1)"""
    learning_rate: float = 2e-4
    """the learning rate of the optimizer (Adam), cosine-decayed to 0"""
    num_epochs: int = 3
    """passes over the demonstrations"""
    batch_size: int = 16
    """demonstration steps per optimizer step"""
    max_grad_norm: float = 1.0
    """the maximum norm for the gradient clipping"""
    eval_episodes: int = 100
    """held-out episodes (env seeds 0 .. N-1) evaluated greedily and sampled after training"""
    eval_freq: int = 0
    """also evaluate after every N epochs (0: after training only)"""
    temperature: float = 0.2
    """with --format cot: the sampling temperature of the sampled evaluation (ppo_vlm_cot.py's default)"""
    max_new_tokens: int = 256
    """with --format cot: the most tokens the VLM writes per step"""


def check_args(args: Args) -> None:
    """Turn flags that do not fit together into one sentence and a non-zero exit (SystemExit: no traceback)."""
    at_least = {
        "--learning-rate": (args.learning_rate, 0),  # 0: a frozen policy, for measurements
        "--seed": (args.seed, 0),
        "--lora-r": (args.lora_r, 0),  # 0: full fine-tuning
        "--lora-alpha": (args.lora_alpha, 1),
        "--num-demos": (args.num_demos, 1),
        "--demo-seed": (args.demo_seed, 0),
        "--num-epochs": (args.num_epochs, 1),
        "--batch-size": (args.batch_size, 1),
        "--eval-episodes": (args.eval_episodes, 0),
        "--eval-freq": (args.eval_freq, 0),
        "--max-new-tokens": (args.max_new_tokens, 1),
    }
    positive = {
        "--max-grad-norm": args.max_grad_norm,
        "--temperature": args.temperature,
    }
    fractions = {"--expert-noise": args.expert_noise}  # a fraction of steps
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
    if args.demo_seed < args.eval_episodes:
        raise SystemExit(
            f"--demo-seed {args.demo_seed} overlaps the evaluation seeds 0..{args.eval_episodes - 1}: "
            "raise it, so the evaluation is held out."
        )
    if args.load_in_4bit and args.lora_r == 0:
        raise SystemExit("--load-in-4bit freezes the base model, so it needs LoRA: pass --lora-r > 0.")


def make_env(args: Args, seed: int) -> Callable[[], gym.Env]:
    """The env exactly as the PPO script of --format builds it."""
    if args.format == "likelihood":
        return likelihood.make_env(args.env_id, seed, None, with_image=True)
    return cot.make_env(args.env_id, seed)


def cot_answer(
    env_id: str, action_names: Sequence[str], obs: dict, info: dict, expert: int, action: int, with_thoughts: bool
) -> str:
    """The JSON answer of ppo_vlm_cot.py's prompt, its thoughts written from the true state (which way the expert
    goes), its action the one taken (a noisy step's random action)."""
    fields: dict[str, str] = {}
    if env_id == "NumberLine":
        current, target = info["current"], info["target"]
        fields = {"current number": f'"{current}"', "target number": f'"{target}"'}
        way = "add one" if target > current else "subtract one"
        side = "below" if target > current else "above"
        thought = f"The current number {current} is {side} the target {target}, so I {way}."
    elif env_id in ("EZPoints", "Points24"):
        fields = {"cards": "[" + ", ".join(info["cards"]) + "]", "current formula": info["formula"] or "empty"}
        thought = f"{obs['text']} I append '{action_names[expert]}'."
    elif env_id == "Blackjack":  # the totals the prompt asks for first, added up from the cards
        total, dealer, soft = (int(x) for x in obs["state"])
        thought = (
            f"{obs['text']} My total is {total}{' (soft)' if soft else ''} and the dealer's card counts {dealer}. "
            f"The best action is {action_names[expert]}."
        )
    else:  # the description of the true state (FrozenLake: where the goal is)
        thought = f"{obs['text']} The best action is {action_names[expert]}."
    if with_thoughts:
        fields["thoughts"] = f'"{thought}"'
    fields["action"] = f'"{action_names[action]}"'
    return "{" + ", ".join(f'"{key}": {value}' for key, value in fields.items()) + "}"


class Demo(NamedTuple):
    text: str  # the prompt's text: a likelihood state prompt's description, or a CoT task prompt
    image: np.ndarray
    action: int
    answer: str  # --format cot: the JSON answer; else ""


def collect_demos(args: Args, action_names: Sequence[str], rng: np.random.Generator) -> tuple[list[Demo], float]:
    """--num-demos episodes of the noisy expert, one env seed each; and the demonstrator's success rate."""
    demos, successes = [], []
    for i in tqdm(range(args.num_demos), desc="demonstrations", leave=False):
        env = make_env(args, args.demo_seed + i)()
        obs, info = env.reset()
        done = False
        while not done:
            expert = text_envs.expert_action(env)
            action = int(rng.integers(len(action_names))) if rng.random() < args.expert_noise else expert
            if args.format == "likelihood":
                demos.append(Demo(obs["text"], obs["image"], action, ""))
            else:
                text = cot.task_prompt(
                    args.env_id, action_names, obs["mission"], obs["text"], info.get("formula", ""), args.cot
                )
                answer = cot_answer(args.env_id, action_names, obs, info, expert, action, args.cot)
                demos.append(Demo(text, obs["image"], action, answer))
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        successes.append(bool(info["success"]))
        env.close()
    return demos, float(np.mean(successes))


def answer_output(tokenizer: object, answers: Sequence[str], end_id: int, device: torch.device) -> cot.Output:
    """The answers as ppo_vlm_cot.py stores a sampled output: token ids ending in the end token, mask, action start."""
    rows = [tokenizer(a, add_special_tokens=False)["input_ids"] + [end_id] for a in answers]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], device=device)
    starts = torch.tensor([cot.split_output(tokenizer, r)[1] for r in rows], device=device)
    return cot.Output(ids, mask, starts)


def sft_loss(
    args: Args, model: nn.Module, processor: object, agent: likelihood.Agent | None, batch: Sequence[Demo]
) -> torch.Tensor:
    """Mean negative log-likelihood of the demonstrated action prompt (likelihood) or answer (cot) tokens."""
    images = np.stack([d.image for d in batch])
    if args.format == "likelihood":
        prompts, images = agent.observe({"text": [d.text for d in batch], "image": images})
        # eq. 1: score_i = mean token log-likelihood of action prompt i; pi(a | s) = softmax_i(score_i)
        scores = likelihood.score_actions(model, processor, prompts, images, agent.action_prompts, agent.reduction)
        if args.loss == "policy":
            scores = scores.log_softmax(-1)
        return -scores[torch.arange(len(batch)), torch.tensor([d.action for d in batch])].mean()
    output = answer_output(processor.tokenizer, [d.answer for d in batch], end_token_id(model, processor), model.device)
    prompts = [cot.chat_prompt(processor, d.text) for d in batch]
    scored = cot.cot_log_prob(model, processor, prompts, images, output, thought_coef=1.0, temperature=1.0)
    return -(scored.log_prob / output.mask.sum(-1)).mean()


def end_token_id(model: nn.Module, processor: object) -> int:
    """The token that ends an answer: the model's own end token (SmolVLM: <end_of_utterance>), else the tokenizer's."""
    ends = model.generation_config.eos_token_id
    return ends if isinstance(ends, int) else (ends or [processor.tokenizer.eos_token_id])[0]


def evaluate_policy(
    args: Args,
    model: nn.Module,
    processor: object,
    agent: likelihood.Agent | None,
    action_names: list[str],
    greedy: bool,
) -> tuple[float, float]:
    """Held-out success rate (env seeds 0 .. N-1, one episode each) and, for cot, the rate of unparsed outputs."""
    envs = gym.vector.SyncVectorEnv(
        [make_env(args, seed) for seed in range(args.eval_episodes)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    invalid: list[bool] = []

    def likelihood_policy(obs: dict, infos: dict) -> np.ndarray:
        with torch.no_grad():
            scores, _ = agent.scores_and_value(*agent.observe(obs))
        return (scores.argmax(-1) if greedy else torch.distributions.Categorical(logits=scores).sample()).numpy()

    def cot_policy(obs: dict, infos: dict) -> np.ndarray:
        _, prompts, images = cot.observation_prompts(obs, infos, args.env_id, processor, action_names, args.cot)
        with torch.no_grad():
            ids, mask, _, _ = cot.generate(
                model, processor, prompts, images, 0.0 if greedy else args.temperature, args.max_new_tokens
            )
        actions, valid = cot.env_actions(
            [cot.split_output(processor.tokenizer, row[m].tolist())[0] for row, m in zip(ids, mask)], action_names
        )
        invalid.extend(~valid)
        return actions.numpy()

    if args.format == "likelihood":
        episodes = likelihood.evaluate(likelihood_policy, envs, args.eval_episodes)
    else:
        episodes = cot.evaluate(cot_policy, envs, args.eval_episodes)
    envs.close()
    return float(np.mean([e[2] for e in episodes])), float(np.mean(invalid)) if invalid else 0.0


def save_taught_model(args: Args, model: nn.Module, processor: object, source: str, path: Path) -> None:
    """The taught weights as a plain model folder (LoRA merged into the base) that --model-id loads."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict  # loaded with the model already

    if args.lora_r > 0 and args.load_in_4bit:  # merge into a full-precision copy of the base, not into 4-bit weights
        lora = get_peft_model_state_dict(model)
        base, _, _ = likelihood.load_base_model(source, False, torch.device("cpu"))
        model = likelihood.add_lora(base, args.lora_r, args.lora_alpha, args.lora_target_modules)
        set_peft_model_state_dict(model, lora)
    if args.lora_r > 0:
        model = model.merge_and_unload()
    model.save_pretrained(path)
    processor.save_pretrained(path)


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    interrupt = likelihood.Interrupt()
    check_args(args)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    source, _ = (likelihood if args.format == "likelihood" else cot).resolve_model_source(args.model_id)
    if source != args.model_id:  # the offline fallback: the run is named after the model it loads
        args.model_id, args.exp_name = source, f"{args.exp_name}-{Path(source).name}"
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)

    # env and model setup: everything that can fail on a bad flag happens before a run directory exists
    action_names = (
        likelihood.env_action_names(args.env_id)
        if args.format == "likelihood"
        else list(cot.make_envs(args.env_id, [0]).get_attr("action_names")[0])
    )
    if args.format == "likelihood":
        model, processor, reads_images = likelihood.load_base_model(source, args.load_in_4bit, device)
    else:
        (model, processor), reads_images = cot.load_base_model(source, args.load_in_4bit, device), True
    likelihood.configure_image_processor(model, processor, args.image_splitting)
    if args.lora_r > 0:
        model = (likelihood if args.format == "likelihood" else cot).add_lora(
            model, args.lora_r, args.lora_alpha, args.lora_target_modules
        )
    model.eval()  # no dropout: the model is trained as the PPO scripts will score it
    agent = None
    if args.format == "likelihood":
        agent = likelihood.Agent(
            model,
            processor,
            action_names,
            likelihood.state_template(args.env_id),
            likelihood.ACTION_TEMPLATE,
            args.reduction,
            with_image=reads_images,
        )

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    )

    demos, demo_success = collect_demos(args, action_names, rng)
    writer.add_scalar("sft/demonstrator_success_rate", demo_success, 0)
    writer.add_scalar("sft/demonstration_steps", len(demos), 0)
    print(
        f"{len(demos)} demonstration steps from {args.num_demos} episodes of the expert with noise "
        f"{args.expert_noise} (success {demo_success:.2f}); source: {source}"
    )

    params = [p for p in model.parameters() if p.requires_grad]  # LoRA, or every weight with --lora-r 0
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    steps_per_epoch = -(-len(demos) // args.batch_size)
    total_steps = args.num_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)

    def run_evaluation(step: int) -> None:
        for mode in ("greedy", "sampled"):
            success, invalid = evaluate_policy(args, model, processor, agent, action_names, mode == "greedy")
            writer.add_scalar(f"eval/{mode}_success_rate", success, step)
            if args.format == "cot":
                writer.add_scalar(f"eval/{mode}_invalid_action_rate", invalid, step)
            print(
                f"eval {mode} ({source}, {args.eval_episodes} held-out episodes): success_rate={success:.2f}"
                + (f" invalid={invalid:.2f}" if args.format == "cot" else ""),
                flush=True,
            )

    start_time, global_step = time.time(), 0
    progress = tqdm(total=total_steps, desc=f"SFT of {Path(source).name}", unit="step")
    interrupt.training = True
    for epoch in range(1, args.num_epochs + 1):
        order = rng.permutation(len(demos))
        for start in range(0, len(demos), args.batch_size):
            batch = [demos[i] for i in order[start : start + args.batch_size]]
            loss = sft_loss(args, model, processor, agent, batch)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            global_step += 1
            progress.update()
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
            writer.add_scalar("losses/sft_loss", loss.item(), global_step)
            writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], global_step)
            sps = int(global_step * args.batch_size / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            if interrupt.requested:
                break
        if interrupt.requested:  # Ctrl-C: stop after this step, keep the model so far (--save-model)
            break
        if args.eval_freq > 0 and epoch % args.eval_freq == 0 and epoch < args.num_epochs and args.eval_episodes > 0:
            run_evaluation(global_step)
    progress.close()
    interrupt.training = False
    if interrupt.requested:
        path = Path(args.output_dir or f"runs/{run_name}/model")
        if args.save_model:
            save_taught_model(args, model, processor, source, path)
        saved = f"the model so far is saved to {path}" if args.save_model else "nothing saved (--save-model saves it)"
        print(f"stopped by Ctrl-C after {global_step} of {total_steps} SFT steps: {saved}")
        sys.exit(130)

    if args.eval_episodes > 0:
        run_evaluation(global_step)
    if args.save_model:
        path = Path(args.output_dir or f"runs/{run_name}/model")
        save_taught_model(args, model, processor, source, path)
        print(f"taught model saved to {path}: pass --model-id {path} to ppo_vlm_{args.format}.py")
    writer.close()
