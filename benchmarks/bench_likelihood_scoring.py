"""Shared-prefix action scoring vs one full prompt per action, on a SmolVLM-256M-shaped model (CPU).

    python benchmarks/bench_likelihood_scoring.py            # a few minutes on one CPU core

The model is Idefics3 with SmolVLM-256M-Instruct's sizes (SigLIP-B/16 at 512 px, 64 image tokens per
tile; SmolLM2-135M text model: 30 layers, hidden 576, 9 heads, 3 KV heads; vocabulary 49,280) and
random weights built from the config, so nothing is downloaded; LoRA r=64 / alpha=16 on the text
model's q/k/v as in the paper. Each env image is one 512-px tile, as the script
configures SmolVLM's processor (--image-splitting keeps SmolVLM's own setting: 17 tiles). The tokenizer
is a byte-level BPE trained here on Fetch descriptions (about one token per word, as with SmolVLM's
tokenizer). Prompts are real Fetch observations with the paper's templates and its 5 macro actions;
the defaults are the paper's Fetch setting: 2 envs per rollout step, 2 samples per update minibatch
(2 envs x 128 steps / 128 minibatches).

Both methods compute the same scores (log_softmax over the vocabulary, mean over the action
prompt's tokens; checked below) and both keep logits only at the action tokens:
  - full prompts: the reference code's way, B*A prompts of image + state + action, each image
    encoded again for every action;
  - shared prefix: `score_actions` from ppo_vlm_likelihood.py, B prefixes (image included) encoded
    once, then the A action continuations run against the repeated KV cache.
A rollout step is a no-grad scoring of `--rollout-states` states; an update minibatch scores
`--update-states` states with gradients and backpropagates a policy-gradient-shaped loss into the
LoRA weights. Each is timed once per method, side by side, in CPU seconds of the scoring thread
(steady on a shared machine) and in wall seconds. Peak memory is the peak resident set size above
the level before the call, sampled every millisecond (glibc is told to give freed memory back at
once, so the samples see live memory), and the same peak with everything before the call counted.
"""

import argparse
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import numpy as np
import psutil
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "assets")]

from make_tiny_vlm import build_smolvlm_256m_shaped

import text_envs
from ppo_vlm_likelihood import (
    ACTION_TEMPLATE,
    LANGUAGE_MODEL_QKV,
    LISTING_STATE_TEMPLATE,
    add_lora,
    configure_image_processor,
    format_state_prompt,
    score_actions,
)


def score_actions_full_prompts(
    model: torch.nn.Module,
    processor: object,
    state_prompts: Sequence[str],
    images: Sequence[np.ndarray] | None,
    action_prompts: Sequence[str],
    reduction: str = "mean",
) -> torch.Tensor:
    """[B, A] scores from one full prompt (image + state + action) per pair: the reference code's way, with
    log_softmax."""
    tokenizer = getattr(processor, "tokenizer", processor)
    device = model.device
    action_ids = tokenizer(list(action_prompts), add_special_tokens=False)["input_ids"]
    n_actions, longest = len(action_ids), max(len(ids) for ids in action_ids)
    image_kwargs = {"images": [[image] for image in images for _ in action_ids]} if images is not None else {}
    enc = processor(
        text=[p for p in state_prompts for _ in action_ids],
        padding=True,
        padding_side="left",
        return_tensors="pt",
        **image_kwargs,
    ).to(device)
    rows = enc["input_ids"].shape[0]
    pad_id = tokenizer.pad_token_id or 0
    actions = torch.tensor([ids + [pad_id] * (longest - len(ids)) for ids in action_ids], device=device).repeat(
        rows // n_actions, 1
    )
    action_mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in action_ids], device=device)
    action_mask = action_mask.repeat(rows // n_actions, 1)
    mask = torch.cat([enc["attention_mask"], action_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    out = model(
        input_ids=torch.cat([enc["input_ids"], actions], dim=1),
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=longest + 1,
        **extra,
    )
    logprobs = out.logits[:, :-1].float().log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)
    token_logprob = (logprobs * action_mask).sum(-1).view(-1, n_actions)
    if reduction == "mean":
        return token_logprob / torch.tensor([len(ids) for ids in action_ids], device=device)
    if reduction == "sum":
        return token_logprob
    return token_logprob / torch.tensor([len(p.split()) for p in action_prompts], device=device)


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond in a thread."""

    def __enter__(self) -> Self:
        gc.collect()
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def gib(self) -> float:
        return (self.peak - self.base) / 2**30


def measure(fn: Callable[[], object]) -> tuple[float, float, float, float]:
    """Wall seconds, CPU seconds of this thread, peak GiB above the level at the call, and that level, of one call."""
    with PeakMemory() as memory:
        wall, cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return wall, cpu, memory.gib, memory.base / 2**30


def fetch_observations(n: int, image_size: int) -> tuple[list[str], list[np.ndarray], list[str], list[str]]:
    """Descriptions and images of `n` Fetch states, the 5 macro action words, and a text corpus of many more states."""
    env = text_envs.make_env("Fetch", seed=0, image_size=image_size, action_set="macro")
    texts, images, corpus = [], [], []
    for seed in range(100):
        obs, _ = env.reset(seed=seed)
        for _ in range(5):
            if seed == 0 and len(texts) < n:
                texts.append(obs["text"])
                images.append(obs["image"])
            corpus.append(obs["text"])
            obs, *_ = env.step(seed % 4)
    return texts, images, list(env.get_wrapper_attr("action_names")), corpus


def main() -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # restart so that glibc hands freed tensors back to the OS at once
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollout-states", type=int, default=2, help="states per rollout step (envs per process)")
    parser.add_argument("--update-states", type=int, default=2, help="states per update minibatch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--image-size", type=int, default=256, help="pixels of the env image")
    parser.add_argument(
        "--image-splitting",
        action="store_true",
        help="keep SmolVLM's own image splitting (the scripts' --image-splitting; default: one tile)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    build_start = time.perf_counter()
    n_states = max(args.rollout_states, args.update_states)
    texts, images, action_names, corpus = fetch_observations(n_states, args.image_size)
    corpus += [LISTING_STATE_TEMPLATE, ACTION_TEMPLATE, *action_names]
    model, processor = build_smolvlm_256m_shaped(corpus)
    configure_image_processor(model, processor, args.image_splitting)  # what the script does after loading
    model = add_lora(model, 64, 16, LANGUAGE_MODEL_QKV).eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [format_state_prompt(processor, LISTING_STATE_TEMPLATE, t, action_names, True) for t in texts]
    action_prompts = [ACTION_TEMPLATE.format(action=a) for a in action_names]
    enc = processor(text=prompts[:1], images=[images[:1]], return_tensors="pt")
    action_tokens = [len(ids) for ids in processor.tokenizer(action_prompts, add_special_tokens=False)["input_ids"]]
    print(
        f"model: {n_params / 1e6:.0f}M parameters (Idefics3, SmolVLM-256M sizes, LoRA r=64 on text q/k/v), built in "
        f"{time.perf_counter() - build_start:.0f} s; {torch.get_num_threads()} CPU thread(s)"
    )
    print(
        f"state prompt: {enc['input_ids'].shape[1]} tokens "
        f"({int((enc['input_ids'] == processor.image_token_id).sum())} image tokens); "
        f"{len(action_prompts)} action prompts of {min(action_tokens)}-{max(action_tokens)} tokens"
    )

    methods = {"full prompts": score_actions_full_prompts, "shared prefix": score_actions}
    with torch.no_grad():  # warm-up, and the check that both methods compute the same scores
        check = {name: fn(model, processor, prompts[:1], images[:1], action_prompts) for name, fn in methods.items()}
    difference = (check["shared prefix"] - check["full prompts"]).abs().max().item()
    print(f"max |shared - full| score difference: {difference:.2e}")

    def rollout(fn: Callable) -> Callable[[], torch.Tensor]:
        b = args.rollout_states

        def run() -> torch.Tensor:
            with torch.no_grad():
                return fn(model, processor, prompts[:b], images[:b], action_prompts)

        return run

    def update(fn: Callable) -> Callable[[], torch.Tensor]:
        b = args.update_states

        def run() -> torch.Tensor:
            scores = fn(model, processor, prompts[:b], images[:b], action_prompts)
            loss = -scores.log_softmax(-1)[:, 0].mean()  # stands in for the PPO loss: one backward into LoRA
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()

        return run

    print("\n| step | method | wall s | CPU s | extra GiB | total GiB |\n|---|---|---|---|---|---|")
    ratios = []
    for phase, make, b in [
        ("rollout step", rollout, args.rollout_states),
        ("update minibatch", update, args.update_states),
    ]:
        name = f"{phase}, {b} state{'s' if b > 1 else ''} x {len(action_prompts)} actions"
        results = {method: measure(make(fn)) for method, fn in methods.items()}
        for method, (wall, cpu, extra, base) in results.items():
            print(f"| {name} | {method} | {wall:.1f} | {cpu:.1f} | {extra:.3f} | {base + extra:.2f} |")
        (w_full, c_full, e_full, b_full), (w_shared, c_shared, e_shared, b_shared) = results.values()
        ratios.append(
            f"| {name} | {c_full / c_shared:.2f}x | {w_full / w_shared:.2f}x | {e_shared / e_full:.2f} | "
            f"{(b_shared + e_shared) / (b_full + e_full):.2f} |"
        )
    print(
        "\n| step | speed-up (CPU time) | speed-up (wall) | extra memory shared/full | total memory shared/full |\n"
        "|---|---|---|---|---|\n" + "\n".join(ratios)
    )
    print(
        "\nCPU s: CPU time of the scoring thread (steadier than wall time on a shared machine). extra GiB: peak\n"
        "resident memory above the level before the call, i.e. what the step needs beyond the model's fp32 weights;\n"
        "total GiB: that peak including the weights and the rest of the process."
    )


if __name__ == "__main__":
    main()
