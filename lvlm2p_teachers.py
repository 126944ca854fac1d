"""The teachers of ppo_lvlm2p_distill.py: the paper's two-stage VLM prompt or action likelihoods (`hf:`), any
OpenAI-compatible server (`openai:`), and the scripted expert (`expert`).

Each teacher is a callable from a batch of `Frame`s to one action distribution per frame (None where a reply
does not parse), raising `TeacherUnavailable` when a server fails after every retry. What the script does with
the distributions (the cache, the KL term of eq. 1) stays in the script; this file is how they are obtained:
the --teacher flags checked and the teacher built from them, prompts and few-shot examples, model loading
and HTTP. Only ppo_lvlm2p_distill.py uses it.
"""
import base64
import io
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import huggingface_hub
import numpy as np
import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache
from PIL import Image

if TYPE_CHECKING:  # only for the type of `args`: at run time the script imports this module, not the reverse
    from ppo_lvlm2p_distill import Args

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"
FALLBACK_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-smolvlm"
# Fig. 2's two stages: first the scene (agent position and orientation, the target), then one probability per action
SCENE_PROMPT = ("This is a game seen from above. Your mission: {mission}. Describe the scene: the row and "
                "column of the agent (counting from the top left), the direction it faces, and where the target of "
                "the mission is.")
ACTION_PROMPT = ("{examples}The possible actions, in this order, are: {actions}. Give the probability of each action "
                 "being the best next action for the mission. On the last line, reply with a single list of "
                 "{n} numbers that sum to 1, like {example}.")
# --teacher-mode likelihood: the state prompt, then each action prompt scored by its mean token log-likelihood
LIKELIHOOD_PROMPT = "This is a game seen from above. Your mission: {mission}. What is the best next action?"
ACTION_TEMPLATE = " The best next action is to {action}."


NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
LIST_OF_NUMBERS = re.compile(rf"\[\s*({NUMBER}(?:\s*,\s*{NUMBER})*)\s*,?\s*\]")


def parse_teacher_probs(text: str, n_actions: int) -> np.ndarray | None:
    """The last list of exactly `n_actions` non-negative numbers in `text`, normalised to sum 1; None if there is none."""
    for match in reversed(list(LIST_OF_NUMBERS.finditer(text))):
        numbers = np.array([float(x) for x in match.group(1).split(",")])
        if len(numbers) == n_actions and np.isfinite(numbers).all() and (numbers >= 0).all() and numbers.sum() > 0:
            return numbers / numbers.sum()
    return None


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
        raise SystemExit(f"teacher model directory {model_id} does not exist.")
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
        bar = "!" * 100
        print(f"{bar}\nWARNING: {DEFAULT_MODEL_ID} is not in the local Hugging Face cache and {reason}.\n"
              f"Falling back to {FALLBACK_MODEL_DIR}, a tiny model with RANDOM weights: this run checks the pipeline,\n"
              f"its numbers say nothing about the paper.\n{bar}", file=sys.stderr)
        return str(FALLBACK_MODEL_DIR), True
    raise SystemExit(f"model {model_id!r} is not in the local Hugging Face cache and {reason}; "
                     "check the id, download the model first, or pass a local directory.")


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
        raise SystemExit(f"teacher model {model_id!r} ({config.model_type}) is not a vision-language model with a chat "
                         "template: use e.g. SmolVLM, Idefics3, LLaVA or Qwen2-VL.")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map={"": device},
                                                        local_files_only=offline).eval()
    processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    ids = {k: getattr(model.generation_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**ids)  # greedy, like the paper's temperature-0 Gemini
    return model, processor


def action_list_example(n_actions: int) -> str:
    """A list of n probabilities summing to 1, shown to the teacher as the answer's format."""
    return "[" + ", ".join(["0.7"] + ["0.3"] + ["0"] * (n_actions - 2)) + "]" if n_actions > 1 else "[1]"


def stage_prompts(mission: str, action_names: Sequence[str], examples: str) -> tuple[str, str]:
    """The texts of the two stages (Fig. 2): describe the scene, then give one probability per action."""
    actions = ", ".join(f"'{name}'" for name in action_names)
    return SCENE_PROMPT.format(mission=mission), ACTION_PROMPT.format(
        examples=examples, actions=actions, n=len(action_names), example=action_list_example(len(action_names))
    )


class HFTeacher:
    """A local VLM: the two-stage prompt and the parsed reply (generate), or the softmax over the action prompts'
    mean token log-likelihoods (likelihood), one forward per frame."""

    def __init__(self, model: nn.Module, processor: object, action_names: Sequence[str], mode: str, examples: str,
                 max_new_tokens: int):
        self.model, self.processor, self.mode = model, processor, mode
        self.action_names, self.examples, self.max_new_tokens = list(action_names), examples, max_new_tokens

    def chat(self, turns: Sequence[str]) -> str:
        """The dialogue in the model's chat format: the image with the first user turn, turns alternating user/assistant."""
        messages = [{"role": "user" if i % 2 == 0 else "assistant",
                     "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": turn}]}
                    for i, turn in enumerate(turns)]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence[np.ndarray]) -> list[str]:
        """Greedy replies to a batch of chat prompts, each with its image."""
        enc = self.processor(text=list(prompts), images=[[image] for image in images], padding=True,
                             padding_side="left", return_tensors="pt").to(self.model.device)
        out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens)
        return self.processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def action_log_likelihoods(self, mission: str, image: np.ndarray) -> torch.Tensor:
        """[A] mean token log-likelihood of each action prompt after the state prompt and the image, in one forward."""
        tokenizer = self.processor.tokenizer
        enc = self.processor(text=[self.chat([LIKELIHOOD_PROMPT.format(mission=mission)])], images=[[image]],
                             return_tensors="pt").to(self.model.device)
        prompt_ids = enc["input_ids"][0].tolist()
        action_ids = tokenizer([ACTION_TEMPLATE.format(action=a) for a in self.action_names],
                               add_special_tokens=False)["input_ids"]
        length = len(prompt_ids) + max(len(ids) for ids in action_ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([prompt_ids + ids + [pad] * (length - len(prompt_ids) - len(ids)) for ids in action_ids],
                                 device=self.model.device)
        mask = torch.tensor([[1] * (len(prompt_ids) + len(ids)) + [0] * (length - len(prompt_ids) - len(ids))
                             for ids in action_ids], device=self.model.device)
        pixels = {k: v.repeat(len(action_ids), *[1] * (v.dim() - 1)) for k, v in enc.items()
                  if k not in ("input_ids", "attention_mask")}
        logits = self.model(input_ids=input_ids, attention_mask=mask, **pixels).logits.float()
        start = len(prompt_ids)
        logprobs = logits[:, start - 1:-1].log_softmax(-1).gather(-1, input_ids[:, start:, None]).squeeze(-1)
        action_mask = mask[:, start:].float()
        return (logprobs * action_mask).sum(-1) / action_mask.sum(-1)  # eq. 1 of Idefics-Agent: the mean

    def __call__(self, frames: Sequence[Frame]) -> list[np.ndarray | None]:
        """One distribution per frame (None where a generated reply holds none)."""
        if self.mode == "likelihood":
            return [self.action_log_likelihoods(f.mission, f.image).softmax(-1).cpu().numpy() for f in frames]
        images = [f.image for f in frames]
        stages = [stage_prompts(f.mission, self.action_names, self.examples) for f in frames]
        scenes = self.generate([self.chat([scene]) for scene, _ in stages], images)
        replies = self.generate([self.chat([scene, described, question])
                                 for (scene, question), described in zip(stages, scenes)], images)
        return [parse_teacher_probs(reply, len(self.action_names)) for reply in replies]


def png_data_url(image: np.ndarray) -> str:
    """The image as a base64 PNG data URL, the way OpenAI's chat API takes images."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions server (vLLM, Ollama, `transformers serve`, hosted APIs): the two-stage
    prompt as a two-turn chat with the frame as an image, each failed request retried with exponential backoff."""

    def __init__(self, model: str, base_url: str, api_key: str | None, action_names: Sequence[str], examples: str,
                 max_new_tokens: int, timeout: float, retries: int, backoff: float, concurrency: int):
        self.model, self.url, self.api_key = model, base_url.rstrip("/") + "/chat/completions", api_key
        self.action_names, self.examples, self.max_new_tokens = list(action_names), examples, max_new_tokens
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply to `messages`, retrying errors and timeouts; TeacherUnavailable after the last retry."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens,
                           "temperature": 0}).encode()
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
        scene, question = stage_prompts(frame.mission, self.action_names, self.examples)
        first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(frame.image)}},
                                             {"type": "text", "text": scene}]}
        described = self.complete([first])
        reply = self.complete([first, {"role": "assistant", "content": described},
                               {"role": "user", "content": question}])
        return parse_teacher_probs(reply, len(self.action_names))

    def __call__(self, frames: Sequence[Frame]) -> list[np.ndarray | None]:
        """One distribution per frame, the frames' requests in flight together; TeacherUnavailable if any failed."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.query, frames))


def teacher_kind(teacher: str) -> Literal["hf", "openai", "expert"] | None:
    """Which backend a --teacher value names, or None."""
    if teacher == "expert":
        return "expert"
    prefix, _, name = teacher.partition(":")
    return prefix if prefix in ("hf", "openai") and name else None


def check_teacher_args(args: "Args") -> None:
    """Turn the mistakes a user can make in the --teacher flags into one sentence and a non-zero exit."""
    kind = teacher_kind(args.teacher)
    if kind is None:
        raise SystemExit(f"--teacher {args.teacher!r} is not a teacher: use hf:<hub id or directory>, openai:<model> "
                         "or expert.")
    if kind == "openai" and not args.teacher_base_url:
        raise SystemExit(f"--teacher {args.teacher} needs --teacher-base-url, the server's OpenAI-compatible address "
                         "(e.g. http://localhost:8000/v1).")
    if kind == "openai" and args.teacher_mode == "likelihood":
        raise SystemExit("--teacher-mode likelihood needs the model's log-likelihoods, which a chat server does not "
                         "return: use an hf: teacher, or --teacher-mode generate.")
    if not 0.0 <= args.teacher_noise <= 1.0 or args.teacher_temperature <= 0:
        raise SystemExit(f"--teacher-noise {args.teacher_noise} and --teacher-temperature {args.teacher_temperature}: "
                         "the noise is a probability (0 to 1) and the temperature must be positive.")


def read_examples(path: str | None) -> str:
    """The few-shot examples for the second stage, ending in a blank line ("" without a file)."""
    if path is None:
        return ""
    try:
        return Path(path).read_text().strip() + "\n\n"
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"Cannot read --teacher-fewshot {path} ({type(error).__name__}): pass a readable text file.")


def build_teacher(args: "Args", action_names: Sequence[str], device: torch.device) -> Callable:
    """The teacher that --teacher names."""
    kind, name = teacher_kind(args.teacher), args.teacher.partition(":")[2]
    if kind == "expert":
        return ExpertTeacher(len(action_names), args.teacher_temperature, args.teacher_noise, args.seed)
    examples = read_examples(args.teacher_fewshot)
    if kind == "openai":
        return OpenAITeacher(name, args.teacher_base_url, os.environ.get(args.teacher_api_key_env), action_names,
                             examples, args.teacher_max_new_tokens, args.teacher_timeout, args.teacher_retries,
                             args.teacher_backoff, args.teacher_batch_size)
    model, processor = load_teacher_model(name, device)
    return HFTeacher(model, processor, action_names, args.teacher_mode, examples, args.teacher_max_new_tokens)
