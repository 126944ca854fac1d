"""The plumbing of ppo_lvlm2p_distill.py's teachers: a local VLM (`hf:`), any OpenAI-compatible server (`openai:`),
and the scripted expert (`expert`).

Each teacher is a callable from a batch of `Frame`s to one action distribution per frame (None where a reply
does not parse, and for a server `NoReply` where it did not answer). The method is the script's:
it passes in the prompts, the parser of the replies and the rule that turns likelihoods into a distribution, and
does the rest (the cache, the KL term of eq. 1). This file loads models, formats chats and talks HTTP; it never
imports the script. Only ppo_lvlm2p_distill.py uses it.
"""

import asyncio
import base64
import email.utils
import io
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import httpx2
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


# The HTTP client is httpx2 (the client of huggingface_hub and of the openai SDK, so transformers installs it): its
# replies stream, so a reply is read up to a size cap, and its async requests can be cancelled at a deadline, which
# a per-read timeout cannot do against a server that sends a byte a second. The openai SDK would read any reply
# whole, parse `content` as a string only, and retry 408 and 409 too.
MAX_REPLY_BYTES = 2**20  # a chat completion of a few thousand tokens is tens of kB; a larger reply is not read


class FailedAttempt(Exception):
    """One request that got no reply; `retry_after` the seconds to wait before trying again, None if trying again
    cannot help (a 4xx other than 429, a reply that is not a chat completion, the deadline spent)."""

    def __init__(self, reason: str, retry_after: float | None):
        super().__init__(reason)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float:
    """The wait a Retry-After header asks for (seconds or an HTTP date); 0 when there is none or it does not parse."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0


def reply_text(raw: bytes) -> str:
    """The assistant's text in a chat-completions reply; ValueError when the reply is not one."""
    try:
        reply = json.loads(raw)
    except RecursionError:  # the json module refuses nesting deeper than the recursion limit
        raise ValueError("JSON nested too deeply") from None
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):  # content parts, as in requests
        return "".join(part["text"] for part in content if isinstance(part.get("text"), str))
    raise ValueError(f"the content is a {type(content).__name__}")


async def post_chat(client: httpx2.AsyncClient, url: str, payload: dict, max_bytes: int) -> str:
    """One try at a chat completion: the reply's text, else FailedAttempt; at most `max_bytes` of the reply are read.
    The caller bounds the time (asyncio.timeout)."""
    body = bytearray()
    try:
        async with client.stream("POST", url, json=payload) as response:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > max_bytes:
                    raise FailedAttempt(f"a reply larger than {max_bytes} bytes", None)
    except httpx2.TransportError as error:  # refused, reset, closed half-way: a server restarting may be back soon
        raise FailedAttempt(f"{type(error).__name__}: {error}", 0.0) from None
    if not response.is_success:
        retry = response.status_code == 429 or response.status_code >= 500  # other 4xx: the request itself is wrong
        wait = retry_after_seconds(response.headers.get("Retry-After")) if retry else None
        said = " ".join(bytes(body[:200]).decode(errors="replace").split())  # one line, for a one-sentence exit
        raise FailedAttempt(f"HTTP {response.status_code} {said}", wait)
    try:
        return reply_text(bytes(body))
    except ValueError as error:
        raise FailedAttempt(f"not a chat completion ({error})", None) from None


class CircuitBreaker:
    """Stops asking a server after `failures` failed requests in a row, for `cooldown` seconds; then lets one request
    through: a reply closes the breaker, a failure opens it for another cooldown."""

    def __init__(self, failures: int, cooldown: float):
        self.failures, self.cooldown = failures, cooldown
        self.in_a_row, self.open_until, self.probing = 0, 0.0, False

    def is_open(self) -> bool:
        """Whether requests are being refused now."""
        return self.in_a_row >= self.failures and (self.probing or time.monotonic() < self.open_until)

    def allows(self) -> bool:
        """Whether a request may be sent now (after a cooldown, the one request that tries again)."""
        if self.in_a_row < self.failures:
            return True
        if self.is_open():
            return False
        self.probing = True
        return True

    def record(self, ok: bool) -> None:
        """The outcome of a request it allowed."""
        self.probing = False
        self.in_a_row = 0 if ok else self.in_a_row + 1
        if self.in_a_row >= self.failures:
            self.open_until = time.monotonic() + self.cooldown


class NoReply(NamedTuple):
    """A frame the server did not answer, and why; `skipped` when it was not asked, the circuit breaker being open."""

    reason: str
    skipped: bool


class BreakerOpen(Exception):
    """The circuit breaker stopped a request before it was sent."""


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions server (vLLM, Ollama, `transformers serve`, hosted APIs): the two
    questions of `prompts(mission)` as a two-turn chat with the frame as an image, `parse(reply)` the distribution in
    the second reply. Each reply within `timeout` seconds, retries included (5xx, 429 after its Retry-After, a lost
    connection, with exponential backoff); a circuit breaker stops asking a failing server for `cooldown` seconds."""

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
        cooldown: float,
        breaker_failures: int = 5,
    ):
        self.model, self.url, self.max_new_tokens = model, base_url.rstrip("/") + "/chat/completions", max_new_tokens
        self.headers = {"Accept-Encoding": "identity"}  # the size cap counts the bytes as they arrive
        self.ssl_context = httpx2.create_ssl_context()  # made once: 40 ms, each call has a client of its own
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.prompts, self.parse = prompts, parse
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.breaker = CircuitBreaker(breaker_failures, cooldown)

    async def complete(self, client: httpx2.AsyncClient, messages: list[dict]) -> str:
        """The assistant's reply to `messages`; FailedAttempt (the last one) or BreakerOpen when there is none."""
        payload = {"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens, "temperature": 0}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        failure = None
        for attempt in range(self.retries + 1):
            if not self.breaker.allows():
                raise failure or BreakerOpen()
            try:
                async with asyncio.timeout_at(deadline):
                    text = await post_chat(client, self.url, payload, MAX_REPLY_BYTES)
                self.breaker.record(ok=True)
                return text
            except TimeoutError:
                failure = FailedAttempt(f"no reply within {self.timeout:g} s", None)
            except FailedAttempt as error:
                failure = error
            self.breaker.record(ok=False)
            if failure.retry_after is None:
                break
            wait = max(failure.retry_after, self.backoff * 2**attempt)
            if attempt == self.retries or loop.time() + wait >= deadline:
                break
            await asyncio.sleep(wait)
        raise failure

    async def query(self, client: httpx2.AsyncClient, frame: Frame) -> np.ndarray | None | NoReply:
        """One frame through the two stages."""
        if self.breaker.is_open():  # before the PNG is made: a dead server costs next to nothing
            return self.skipped()
        scene, question = self.prompts(frame.mission)
        first = {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(frame.image)}},
                {"type": "text", "text": scene},
            ],
        }
        try:
            described = await self.complete(client, [first])
            reply = await self.complete(
                client, [first, {"role": "assistant", "content": described}, {"role": "user", "content": question}]
            )
        except FailedAttempt as error:
            return NoReply(f"{self.url}: {error}", skipped=False)
        except BreakerOpen:
            return self.skipped()
        return self.parse(reply)

    def skipped(self) -> NoReply:
        """A frame not asked, the circuit breaker being open."""
        return NoReply(f"{self.url} failed {self.breaker.failures} times in a row, not asked for a while", True)

    async def ask(self, frames: Sequence[Frame]) -> list[np.ndarray | None | NoReply]:
        """The frames' requests in flight together."""
        # httpx's timeouts bound each read, not a reply: asyncio.timeout_at ends a request at its deadline
        async with httpx2.AsyncClient(headers=self.headers, verify=self.ssl_context, timeout=None) as client:
            return list(await asyncio.gather(*(self.query(client, frame) for frame in frames)))

    def __call__(self, frames: Sequence[Frame]) -> list[np.ndarray | None | NoReply]:
        """One distribution per frame (None where a reply holds none, NoReply where there is no reply)."""
        return asyncio.run(self.ask(frames))
