"""The plumbing of vlm_car_reward.py's coder, the VLM that lists the sub-tasks and writes the reward programs: a
local Hugging Face model (`HFCoder`, greedy) or any OpenAI-compatible chat-completions server (`OpenAICoder`), each a
callable from a prompt and images to the reply; and model loading that finds out in seconds whether the Hub can be
reached and falls back to the committed tiny random model for the default id. The method is the script's: the
prompts, the readers of the replies and what is done with them. Used by vlm_car_reward.py only; it never imports
the script."""

import base64
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


class CoderUnavailable(Exception):
    """The coder's server failed every attempt."""


class OpenAICoder:
    """Any OpenAI-compatible chat-completions server (vLLM, Ollama, `transformers serve`, hosted APIs), each failed
    request retried with exponential backoff."""

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
        self.model, self.url, self.api_key = model, base_url.rstrip("/") + "/chat/completions", api_key
        self.max_new_tokens, self.timeout, self.retries, self.backoff = max_new_tokens, timeout, retries, backoff

    def __call__(self, text: str, images: Sequence[np.ndarray]) -> str:
        """The reply to one user turn: the images, then the text."""
        content = [{"type": "image_url", "image_url": {"url": png_data_url(coder_image(image))}} for image in images]
        body = json.dumps(
            {
                "model": self.model,
                "max_tokens": self.max_new_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
            }
        )
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url, data=body.encode(), headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except (OSError, ValueError, KeyError, IndexError, TypeError) as error:  # HTTP, timeout, not the API's JSON
                reason = f"{type(error).__name__}: {error}"
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        raise CoderUnavailable(f"{self.url} failed {self.retries + 1} times, last with {reason}")


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
