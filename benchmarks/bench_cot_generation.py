"""Rollout steps of ppo_vlm_cot.py: generation batched over the envs vs one env at a time, and an update step's memory.

    python benchmarks/bench_cot_generation.py              # ~10 minutes on one shared CPU core

Two random-weight models, nothing downloaded, each with the paper's LoRA (r=128, alpha=256 on every linear
layer of the language model) and the same model in both modes:
  - tiny: the committed offline fallback, assets/tiny-smolvlm (2 layers, hidden 64). Each decoding step
    costs a fixed overhead whatever the batch, as decoding does on a GPU, where it is latency-bound;
  - smolvlm-256m: Idefics3 with SmolVLM-256M-Instruct's text model (SmolLM2-135M: 30 layers, hidden 576,
    vocabulary 49,280). Its vision tower is shrunk (2 layers at 64 px, 16 image tokens; --full-vision gives
    SmolVLM's SigLIP-B/16 at 512 px): on this CPU the real tower costs seconds per image in both modes. The
    tokenizer is a byte-level BPE trained on the env's prompts (about one token per word, like SmolVLM's).
    On a CPU the prompt prefill of this model is compute-bound, so batching cannot
    speed it up: its ratio is the CPU's, a lower bound for a GPU.
Random weights end outputs at random, so the end-of-sequence token is held back until --max-new-tokens
tokens: both modes generate the same number of tokens (a trained model's batch waits for its longest output).

A rollout step is what ppo_vlm_cot.py does per env step: the NumberLine prompt and image of every env,
sampling with the KV cache (which also yields the old log-probs and the value's prompt state), the thought /
action split, parsing, and env.step. "batched" runs it once for all --num-envs envs (ppo_vlm_cot.py); "one at a
time" runs it once per env, as the authors' code does with one env per GPU. The update step is one minibatch of
--update-minibatch samples with their full outputs: log-probs and values with gradients, backward into LoRA
and value head (the first one, so it includes allocating the gradients). Peak memory is the peak resident
set size above the level before the call on CPU (torch.cuda.max_memory_allocated above it on GPU).
"""

import argparse
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # large tensors via mmap, handed back to the OS when freed
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np
import psutil
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "assets")]

from make_tiny_vlm import build_smolvlm_256m_shaped

import cot_models
import ppo_vlm_cot as cot
import text_envs


class PeakMemory:
    """Peak resident memory (CPU) or allocated accelerator memory (GPU) above the level at entry."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Self:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.peak = torch.cuda.memory_allocated(self.device)
            return self
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def gib(self) -> float:
        return (self.peak - self.base) / 2**30


def rollout_step(
    agent: cot.Agent, processor: object, envs: list, obs: list[dict], action_names: list[str], batched: bool
) -> tuple[list[dict], int]:
    """One env step of every env, as in ppo_vlm_cot.py; returns the next observations and the tokens generated."""
    batch = {key: np.stack([o[key] for o in obs]) for key in ("text", "mission", "image")}
    _, prompts, images = cot.observation_prompts(batch, {}, "NumberLine", processor, action_names, True)
    groups = [list(range(len(envs)))] if batched else [[i] for i in range(len(envs))]
    actions, tokens = [0] * len(envs), 0
    for group in groups:
        with torch.no_grad():
            output, texts, _, _ = agent.get_action_and_value([prompts[i] for i in group], images[group])
        env_actions, _ = cot.env_actions(texts, action_names)
        tokens += int(output.mask.sum())
        for i, a in zip(group, env_actions.tolist()):
            actions[i] = a
    next_obs = []
    for env, a in zip(envs, actions):
        o, _, terminated, truncated, _ = env.step(a)
        next_obs.append(env.reset()[0] if terminated or truncated else o)
    return next_obs, tokens


def update_step(
    agent: cot.Agent, processor: object, obs: list[dict], action_names: list[str], n: int
) -> Callable[[], None]:
    """Sample n outputs (no grad); returns one PPO-shaped loss on them with gradients and its backward pass."""
    batch = {key: np.stack([o[key] for o in obs[:n]]) for key in ("text", "mission", "image")}
    _, prompts, images = cot.observation_prompts(batch, {}, "NumberLine", processor, action_names, True)
    with torch.no_grad():
        output, _, old, _ = agent.get_action_and_value(prompts, images)

    def step() -> None:
        _, _, scored, value = agent.get_action_and_value(prompts, images, output)
        ratio = (scored.log_prob - old.log_prob).exp()
        loss = -(ratio * torch.clamp(ratio, 0.9, 1.1)).mean() + 0.5 * (value**2).mean()
        loss.backward()

    return step


def measure_model(
    name: str, model: torch.nn.Module, processor: object, args: argparse.Namespace, steps: int, device: torch.device
) -> tuple[list[tuple], float, PeakMemory]:
    """Rollout rows (mode, env steps / s, tokens / s, tokens per output) and the update step's seconds and memory."""
    model = cot.add_lora(model.to(device), 128, 256, cot.LANGUAGE_MODEL_LINEAR)
    model.eval()
    agent = cot.Agent(model, processor, temperature=0.2, max_new_tokens=args.max_new_tokens, thought_coef=0.5)
    generate = model.generate  # every output exactly max_new_tokens long, so both modes do the same work
    model.generate = lambda **kwargs: generate(**kwargs, min_new_tokens=agent.max_new_tokens)
    n_trainable = sum(p.numel() for p in agent.parameters() if p.requires_grad)
    n_params = sum(p.numel() for p in agent.parameters())
    print(f"{name}: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.1f}M trainable", flush=True)
    envs = {
        batched: [text_envs.make_env("NumberLine", seed=i) for i in range(args.num_envs)] for batched in (True, False)
    }
    action_names = list(envs[True][0].get_wrapper_attr("action_names"))
    obs, seconds, tokens = {}, {True: 0.0, False: 0.0}, {True: 0, False: 0}
    for batched in (True, False):
        torch.manual_seed(0)
        obs[batched] = [env.reset(seed=i)[0] for i, env in enumerate(envs[batched])]
        agent.max_new_tokens = 2  # warm-up: a short step
        rollout_step(agent, processor, envs[batched], obs[batched], action_names, batched)
    agent.max_new_tokens = args.max_new_tokens
    for _ in range(steps):  # the two modes alternate, so a change in the machine's load hits both alike
        for batched in (True, False):
            start = time.perf_counter()
            obs[batched], n = rollout_step(agent, processor, envs[batched], obs[batched], action_names, batched)
            seconds[batched] += time.perf_counter() - start
            tokens[batched] += n
    rows = [
        (
            "batched" if batched else "one at a time",
            steps * args.num_envs / seconds[batched],
            tokens[batched] / seconds[batched],
            tokens[batched] / (steps * args.num_envs),
        )
        for batched in (True, False)
    ]
    step = update_step(agent, processor, obs[True], action_names, args.update_minibatch)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        step()
        update_seconds = time.perf_counter() - start
    return rows, update_seconds, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=2, help="timed rollout steps per mode for smolvlm-256m (tiny: 4x as many)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="the paper caps outputs at 256 (twice the runtime)"
    )
    parser.add_argument("--update-minibatch", type=int, default=1, help="samples in the update step (the paper: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (this machine's 2 cores are shared)")
    parser.add_argument(
        "--full-vision", action="store_true", help="SmolVLM's SigLIP-B/16 at 512 px instead of a shrunk tower"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device {device}, threads {args.threads}, {args.num_envs} envs, {args.max_new_tokens} new tokens, "
        f"{'full' if args.full_vision else 'shrunk'} vision tower for smolvlm-256m",
        flush=True,
    )

    action_names = list(text_envs.make_env("NumberLine").get_wrapper_attr("action_names"))
    corpus = [cot.task_prompt("NumberLine", action_names, "", "", "")] * 20 + [
        f'{{"current number": "{c}", "target number": "{t}", "thoughts": "The current number is {c} and the target is '
        f'{t}, so I should {"add" if t > c else "subtract"} one.", "action": "{"+" if t > c else "-"}"}}'
        for c in range(6)
        for t in range(6)
    ]
    tiny = cot_models.FALLBACK_MODEL_DIR
    results = {
        "tiny": measure_model(
            "tiny",
            AutoModelForImageTextToText.from_pretrained(tiny).eval(),
            AutoProcessor.from_pretrained(tiny),
            args,
            4 * args.steps,
            device,
        )
    }
    model, processor = build_smolvlm_256m_shaped(corpus, args.full_vision)
    cot.configure_image_processor(model, processor, False)  # one tile per frame, as the script configures it
    results["smolvlm-256m"] = measure_model("smolvlm-256m", model, processor, args, args.steps, device)

    print(f"\n| model | rollout ({args.num_envs} envs) | env steps / s | generated tokens / s | tokens per output |")
    print("| --- | --- | --- | --- | --- |")
    for name, (rows, _, _) in results.items():
        for mode, sps, tps, per_output in rows:
            print(f"| {name} | {mode} | {sps:.3f} | {tps:.1f} | {per_output:.0f} |")
    print()
    for name, (rows, update_seconds, memory) in results.items():
        print(
            f"{name}: batched / one at a time {rows[0][1] / rows[1][1]:.2f}x env steps per second; update step "
            f"(minibatch {args.update_minibatch}, full outputs, backward) {update_seconds:.2f} s, "
            f"peak memory +{memory.gib:.3f} GiB above {memory.base / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
