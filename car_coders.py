"""The plumbing of vlm_car_reward.py's coder, the VLM that lists the sub-tasks and writes the reward programs: a
local Hugging Face model (`HFCoder`, greedy) or any OpenAI-compatible chat-completions server (`OpenAICoder`), each a
callable from a prompt and images to the reply; and model loading that finds out in seconds whether the Hub can be
reached and falls back to the committed tiny random model for the default id. The method is the script's: the
prompts, the readers of the replies and what is done with them. Used by vlm_car_reward.py only; it never imports
the script."""

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
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import httpx2
import huggingface_hub
import numpy as np
import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache
from PIL import Image

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"
FALLBACK_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-smolvlm"
FALLBACK_MODEL_NOTE = (
    "a tiny model with RANDOM weights: this run checks the pipeline,\nits programs will not pass verification."
)
CODER_IMAGE_SIDE = 256  # frames are shown to the coder upscaled to at least this many pixels


def coder_image(frame: np.ndarray) -> np.ndarray:
    """The frame enlarged by an integer factor (nearest neighbour) to at least CODER_IMAGE_SIDE pixels."""
    factor = max(1, -(-CODER_IMAGE_SIDE // max(frame.shape[:2])))
    return frame.repeat(factor, axis=0).repeat(factor, axis=1)


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


class CoderUnavailable(Exception):
    """The coder's server gave no reply."""


class OpenAICoder:
    """Any OpenAI-compatible chat-completions server (vLLM, Ollama, `transformers serve`, hosted APIs). Each reply
    within `timeout` seconds, retries included (5xx, 429 after its Retry-After, a lost connection, with exponential
    backoff); CoderUnavailable when there is none."""

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None,
        max_new_tokens: int,
        timeout: float,
        retries: int,
        backoff: float,
    ):
        self.model, self.url, self.max_new_tokens = model, base_url.rstrip("/") + "/chat/completions", max_new_tokens
        self.headers = {"Accept-Encoding": "identity"}  # the size cap counts the bytes as they arrive
        self.ssl_context = httpx2.create_ssl_context()  # made once: 40 ms, each call has a client of its own
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    async def complete(self, payload: dict) -> str:
        """The reply to a chat-completions request, retried where that can help."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        # httpx's timeouts bound each read, not a reply: asyncio.timeout_at ends a request at its deadline
        async with httpx2.AsyncClient(headers=self.headers, verify=self.ssl_context, timeout=None) as client:
            for attempt in range(self.retries + 1):
                try:
                    async with asyncio.timeout_at(deadline):
                        return await post_chat(client, self.url, payload, MAX_REPLY_BYTES)
                except TimeoutError:
                    failure = FailedAttempt(f"no reply within {self.timeout:g} s", None)
                except FailedAttempt as error:
                    failure = error
                if failure.retry_after is None:
                    break
                wait = max(failure.retry_after, self.backoff * 2**attempt)
                if attempt == self.retries or loop.time() + wait >= deadline:
                    break
                await asyncio.sleep(wait)
        raise CoderUnavailable(f"{self.url} gave no reply in {attempt + 1} tries, the last: {failure}")

    def __call__(self, text: str, images: Sequence[np.ndarray]) -> str:
        """The reply to one user turn: the images, then the text."""
        content = [{"type": "image_url", "image_url": {"url": png_data_url(coder_image(image))}} for image in images]
        payload = {
            "model": self.model,
            "max_tokens": self.max_new_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
        }
        return asyncio.run(self.complete(payload))


class HFCoder:
    """A local VLM: greedy replies, the images before the text in the model's chat template."""

    def __init__(self, model: nn.Module, processor: object, max_new_tokens: int):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    @torch.no_grad()
    def __call__(self, text: str, images: Sequence[np.ndarray]) -> str:
        """The reply to one user turn: the images, then the text."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        enc = self.processor(text=[prompt], images=[[coder_image(image) for image in images]], return_tensors="pt")
        out = self.model.generate(**enc.to(self.model.device), do_sample=False, max_new_tokens=self.max_new_tokens)
        return self.processor.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


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


def load_coder_model(model_id: str, device: torch.device) -> tuple[nn.Module, object]:
    """The coder VLM (frozen, greedy) and its processor."""
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
        raise SystemExit(f"cannot load coder model {model_id!r} ({reason}).") from None
    if config.model_type == "idefics" or config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise SystemExit(
            f"coder model {model_id!r} ({config.model_type}) is not a vision-language model with a chat "
            "template: use e.g. SmolVLM, Idefics3, LLaVA or Qwen2-VL."
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype, device_map={"": device}, local_files_only=offline
    ).eval()
    processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
    ids = {k: getattr(model.generation_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**ids)
    return model, processor
