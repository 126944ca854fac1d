"""The plumbing of ppo_lvlm2p_distill.py's teachers: a local VLM (`hf:`), any OpenAI-compatible server (`openai:`),
and the scripted expert (`expert`).

Each teacher is a callable from a batch of `Frame`s to one action distribution per frame (None where a reply
does not parse), raising `TeacherUnavailable` when a server fails after every retry. The method is the script's:
it passes in the prompts, the parser of the replies and the rule that turns likelihoods into a distribution, and
does the rest (the cache, the KL term of eq. 1). This file loads models, formats chats and talks HTTP; it never
imports the script. Only ppo_lvlm2p_distill.py uses it.
"""

import base64
import io
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, NamedTuple

import huggingface_hub
import numpy as np
import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache
from PIL import Image

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"
FALLBACK_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-smolvlm"
# printed when the fallback is used
FALLBACK_MODEL_NOTE = (
    "a tiny model with RANDOM weights: this run checks the pipeline,\nits numbers say nothing about the paper."
)


class Frame(NamedTuple):
    image: np.ndarray  # what a VLM teacher sees: the full, rendered grid
    mission: str
    expert_action: int  # text_envs.expert_action in this frame's state (the expert teacher's answer), else -1


class TeacherUnavailable(Exception):
    """The teacher could not answer (a server that errors or times out after every retry)."""


class ExpertTeacher:
    """The scripted teacher: text_envs.expert_action, replaced by a random action with probability `noise`, softened
    by `temperature`. A scripted teacher, not a VLM: results with it say so."""

    def __init__(self, n_actions: int, temperature: float, noise: float, seed: int):
        self.n_actions, self.temperature, self.noise = n_actions, temperature, noise
        self.rng = np.random.default_rng(seed)

    def __call__(self, frames: Sequence[Frame]) -> list[np.ndarray | None]:
        """One distribution per frame."""
        out = []
        for frame in frames:
            action = self.rng.integers(self.n_actions) if self.rng.random() < self.noise else frame.expert_action
            logits = np.eye(self.n_actions)[action] / self.temperature
            out.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
        return out


def hub_status(model_id: str, timeout: float = 3.0) -> Literal["found", "missing", "unreachable"]:
    """Ask the Hugging Face Hub about `model_id`; give up after `timeout` seconds, or at once with HF_HUB_OFFLINE."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "unreachable"
    answer: list[str] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(f"{huggingface_hub.constants.ENDPOINT}/api/models/{model_id}", timeout=timeout)
            answer.append("found")
        except urllib.error.HTTPError as err:  # 401 / 403: gated or private, the download will ask for a token
            answer.append({401: "found", 403: "found", 404: "missing"}.get(err.code, "unreachable"))
        except (OSError, ValueError):
            answer.append("unreachable")

    thread = threading.Thread(target=probe, daemon=True)  # a thread, so a hanging DNS lookup cannot wait longer
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else "unreachable"


def resolve_model_source(model_id: str, hub_timeout: float = 3.0) -> tuple[str, bool]:
    """Where to load `model_id` from and whether to stay offline; the default model falls back to assets/."""
    if os.path.isdir(model_id):
        return model_id, True
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise SystemExit(f"model directory {model_id} does not exist.")
    try:
        cached = isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:
        raise SystemExit(f"{model_id!r} is neither a local directory nor a valid Hugging Face model id.") from None
    if cached:
        return model_id, True
    status = hub_status(model_id, hub_timeout)
    if status == "found":
        return model_id, False
    reason = "the Hub cannot be reached" if status == "unreachable" else "the Hub does not know it"
    if model_id == DEFAULT_MODEL_ID:
        if not (FALLBACK_MODEL_DIR / "config.json").is_file():
            raise SystemExit(
                f"{DEFAULT_MODEL_ID} is not in the local Hugging Face cache and {reason}, and the "
                f"offline model {FALLBACK_MODEL_DIR} is missing: copy assets/ next to the script, "
                "or name a local model directory."
            )
        bar = "!" * 100
        print(
            f"{bar}\nWARNING: {DEFAULT_MODEL_ID} is not in the local Hugging Face cache and {reason}.\n"
            f"Falling back to {FALLBACK_MODEL_DIR}, {FALLBACK_MODEL_NOTE}\n{bar}",
            file=sys.stderr,
        )
        return str(FALLBACK_MODEL_DIR), True
    raise SystemExit(
        f"model {model_id!r} is not in the local Hugging Face cache and {reason}; "
        "check the id, download the model first, or pass a local directory."
    )


def load_teacher_model(model_id: str, device: torch.device) -> tuple[nn.Module, object]:
    """The frozen teacher VLM and its processor."""
    # imported here: transformers takes seconds to import, and the expert and openai: teachers do not need it
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoProcessor,
        GenerationConfig,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    source, offline = resolve_model_source(model_id)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"cannot load teacher model {model_id!r} ({reason}).") from None
    if config.model_type == "idefics" or config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise SystemExit(
            f"teacher model {model_id!r} ({config.model_type}) is not a vision-language model with a chat "
            "template: use e.g. SmolVLM, Idefics3, LLaVA or Qwen2-VL."
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype, device_map={"": device}, local_files_only=offline
    ).eval()
    processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    ids = {k: getattr(model.generation_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**ids)  # greedy, like the paper's temperature-0 Gemini
    return model, processor


def chat_prompt(processor: object, turns: Sequence[str]) -> str:
    """The dialogue in the model's chat format: the image with the first user turn, turns alternating user/assistant."""
    messages = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": turn}],
        }
        for i, turn in enumerate(turns)
    ]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class HFTeacher:
    """A local VLM asked in two stages, a batch of frames at a time: `prompts(mission)` gives the two questions,
    `parse(reply)` the distribution in the second reply (or None)."""

    def __init__(
        self,
        model: nn.Module,
        processor: object,
        prompts: Callable[[str], tuple[str, str]],
        parse: Callable[[str], np.ndarray | None],
        max_new_tokens: int,
    ):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.prompts, self.parse = prompts, parse

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence[np.ndarray]) -> list[str]:
        """Greedy replies to a batch of chat prompts, each with its image."""
        enc = self.processor(
            text=list(prompts),
            images=[[image] for image in images],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(self.model.device)
        out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens)
        return self.processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    def __call__(self, frames: Sequence[Frame]) -> list[np.ndarray | None]:
        """One distribution per frame (None where a generated reply holds none)."""
        images = [f.image for f in frames]
        stages = [self.prompts(f.mission) for f in frames]
        scenes = self.generate([chat_prompt(self.processor, [scene]) for scene, _ in stages], images)
        replies = self.generate(
            [
                chat_prompt(self.processor, [scene, described, question])
                for (scene, question), described in zip(stages, scenes)
            ],
            images,
        )
        return [self.parse(reply) for reply in replies]


class HFLikelihoodTeacher:
    """A local VLM that scores instead of answering: `prompts(mission)` gives the state prompt and one continuation
    per action, `probs(scores)` the distribution from their mean token log-likelihoods; one forward per frame."""

    def __init__(
        self,
        model: nn.Module,
        processor: object,
        prompts: Callable[[str], tuple[str, Sequence[str]]],
        probs: Callable[[torch.Tensor], np.ndarray],
    ):
        self.model, self.processor, self.prompts, self.probs = model, processor, prompts, probs

    @torch.no_grad()
    def action_log_likelihoods(self, state_prompt: str, action_texts: Sequence[str], image: np.ndarray) -> torch.Tensor:
        """[A] mean token log-likelihood of each action text after the state prompt and the image, in one forward."""
        tokenizer = self.processor.tokenizer
        enc = self.processor(
            text=[chat_prompt(self.processor, [state_prompt])], images=[[image]], return_tensors="pt"
        ).to(self.model.device)
        prompt_ids = enc["input_ids"][0].tolist()
        action_ids = tokenizer(list(action_texts), add_special_tokens=False)["input_ids"]
        length = len(prompt_ids) + max(len(ids) for ids in action_ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor(
            [prompt_ids + ids + [pad] * (length - len(prompt_ids) - len(ids)) for ids in action_ids],
            device=self.model.device,
        )
        mask = torch.tensor(
            [[1] * (len(prompt_ids) + len(ids)) + [0] * (length - len(prompt_ids) - len(ids)) for ids in action_ids],
            device=self.model.device,
        )
        pixels = {
            k: v.repeat(len(action_ids), *[1] * (v.dim() - 1))
            for k, v in enc.items()
            if k not in ("input_ids", "attention_mask")
        }
        logits = self.model(input_ids=input_ids, attention_mask=mask, **pixels).logits.float()
        start = len(prompt_ids)
        logprobs = logits[:, start - 1 : -1].log_softmax(-1).gather(-1, input_ids[:, start:, None]).squeeze(-1)
        action_mask = mask[:, start:].float()
        return (logprobs * action_mask).sum(-1) / action_mask.sum(-1)  # eq. 1 of Idefics-Agent: the mean

    def __call__(self, frames: Sequence[Frame]) -> list[np.ndarray]:
        """One distribution per frame (always one)."""
        return [self.probs(self.action_log_likelihoods(*self.prompts(f.mission), f.image)) for f in frames]


def png_data_url(image: np.ndarray) -> str:
    """The image as a base64 PNG data URL, the way OpenAI's chat API takes images."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions server (vLLM, Ollama, `transformers serve`, hosted APIs): the two
    questions of `prompts(mission)` as a two-turn chat with the frame as an image, `parse(reply)` the distribution in
    the second reply; each failed request retried with exponential backoff."""

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None,
        prompts: Callable[[str], tuple[str, str]],
        parse: Callable[[str], np.ndarray | None],
        max_new_tokens: int,
        timeout: float,
        retries: int,
        backoff: float,
        concurrency: int,
    ):
        self.model, self.url, self.api_key = model, base_url.rstrip("/") + "/chat/completions", api_key
        self.prompts, self.parse, self.max_new_tokens = prompts, parse, max_new_tokens
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply to `messages`, retrying errors and timeouts; TeacherUnavailable after the last
        retry."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens, "temperature": 0}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except (OSError, ValueError, KeyError, IndexError, TypeError) as error:  # HTTP, timeout, not the API's JSON
                reason = f"{type(error).__name__}: {error}"
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        raise TeacherUnavailable(f"{self.url} failed {self.retries + 1} times, last with {reason}")

    def query(self, frame: Frame) -> np.ndarray | None:
        """One frame through the two stages."""
        scene, question = self.prompts(frame.mission)
        first = {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(frame.image)}},
                {"type": "text", "text": scene},
            ],
        }
        described = self.complete([first])
        reply = self.complete(
            [first, {"role": "assistant", "content": described}, {"role": "user", "content": question}]
        )
        return self.parse(reply)

    def __call__(self, frames: Sequence[Frame]) -> list[np.ndarray | None]:
        """One distribution per frame, the frames' requests in flight together; TeacherUnavailable if any failed."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.query, frames))
