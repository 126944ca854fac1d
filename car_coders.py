"""The coders of vlm_car_reward.py: the VLM that lists the sub-tasks and writes the reward programs, either a local
Hugging Face model (`hf:<id or directory>`, greedy) or any OpenAI-compatible chat-completions server
(`openai:<model>`). Here are stage 1 (`list_subtasks`: `SUBTASK_PROMPT`, its numbered list read by `parse_subtasks`)
and the prompts of stage 2 (`program_prompt`, `FEEDBACK_PROMPT` for a rewrite after a failed verification), with the
program read from the reply (`extract_code`) and checked at load (`read_program`); model loading that finds out in
seconds whether the Hub can be reached and falls back to the committed tiny random model for the default id; and the
--coder flags checked and the coder built from them (`check_coder_args`, `build_coder`). Used by vlm_car_reward.py
only."""

import ast
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
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import huggingface_hub
import numpy as np
import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache
from minigrid.core.constants import COLOR_TO_IDX, COLORS, OBJECT_TO_IDX
from PIL import Image

from car_sandbox import NEVER_DONE, UnsafeCodeError, load_checker

if TYPE_CHECKING:  # only for the type of `args`: at run time the script imports this module, not the reverse
    from vlm_car_reward import Args

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"
FALLBACK_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-smolvlm"
CODER_IMAGE_SIDE = 256  # frames are shown to the coder upscaled to at least this many pixels
MAX_SUBTASKS = 8


class NoPrograms(Exception):
    """No reward programs passed verification; the message says why (one sentence, without its full stop)."""


# ---------------------------------------------------------------------------------------------------------------------
# The prompts of stage 1 (sub-tasks) and stage 2 (one program per sub-task, rewritten with stage 3's report)
# ---------------------------------------------------------------------------------------------------------------------
SUBTASK_PROMPT = (
    "The two images show a grid world from above: the first at the start of an episode, the second at its end, after "
    "an expert completed the task. The agent is the red triangle. The task: {mission}.\n"
    "Break the task into the sub-tasks the agent completes, in order, each one visible in a single image of the grid. "
    "Answer with a numbered list, one short sub-task per line (at most {max_subtasks}), and nothing else."
)
FRAME_INPUT = (
    "`frame` is a numpy uint8 array of shape ({height}, {width}, 3), RGB: the whole grid seen from above (the image "
    "shows the start of an episode), {cols} x {rows} cells of {tile} x {tile} pixels; cell (x, y) covers "
    "frame[y*{tile}:(y+1)*{tile}, x*{tile}:(x+1)*{tile}]. Walls are grey {grey}, the goal is a green square, the agent "
    "is a red triangle, and keys, doors, balls and boxes are drawn in their colour; a locked door is a filled square, "
    "an open door a thin bar at the side of its cell, and an object the agent carries is not drawn. Colours (RGB): "
    "{colours}."
)
STATE_INPUT = (
    "`frame` is a numpy uint8 array of shape (7, 7, 5): the agent's 7 x 7 view, frame[x, y], the agent at frame[3, 6] "
    "looking towards y = 0 (its own cell holds what it carries). Channel 0 is the object ({objects}), channel 1 the "
    "colour ({colours}), channel 2 the state (doors: 0 open, 1 closed, 2 locked), channels 3 and 4 the mission's "
    "target object and colour + 1 (0: none)."
)
PROGRAM_PROMPT = (
    "A grid world. The task: {mission}. Its sub-tasks, in order:\n{subtasks}\n"
    "Write a Python function `def check(frame) -> bool` that returns True exactly when sub-task {k} ({subtask}) has "
    "been completed in the observation `frame`, and False before. {input}\n"
    "numpy is available as `np` and the math module as `math`; nothing else can be imported, names starting with an "
    "underscore are not allowed, and the function must not read or write files. Answer with the code in one "
    "```python block."
)
FEEDBACK_PROMPT = (
    "\n\nYour previous program for this sub-task was:\n```python\n{code}\n```\nIt failed verification on expert and "
    "random trajectories: {report}. Write a corrected program."
)


def program_prompt(mission: str, subtasks: Sequence[str], k: int, checker_input: str, frame_shape: tuple[int, ...],
                   grid: tuple[int, int], tile: int) -> str:
    """The stage-2 prompt for sub-task k: the task, all sub-tasks, and what `frame` holds."""
    if checker_input == "frame":
        colours = ", ".join(f"{name} {tuple(int(v) for v in rgb)}" for name, rgb in COLORS.items())
        described = FRAME_INPUT.format(height=frame_shape[0], width=frame_shape[1], cols=grid[0], rows=grid[1],
                                       tile=tile, grey=tuple(int(v) for v in COLORS["grey"]), colours=colours)
    else:
        described = STATE_INPUT.format(objects=", ".join(f"{i} {name}" for name, i in OBJECT_TO_IDX.items()),
                                       colours=", ".join(f"{i} {name}" for name, i in COLOR_TO_IDX.items()))
    listed = "\n".join(f"{i + 1}. {subtask}" for i, subtask in enumerate(subtasks))
    return PROGRAM_PROMPT.format(mission=mission, subtasks=listed, k=k + 1, subtask=subtasks[k], input=described)


def coder_kind(coder: str) -> Literal["hf", "openai"] | None:
    """Which backend a --coder value names, or None."""
    prefix, _, name = coder.partition(":")
    return prefix if prefix in ("hf", "openai") and name else None


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

    def __init__(self, model: str, base_url: str, api_key: str | None, max_new_tokens: int, timeout: float,
                 retries: int, backoff: float):
        self.model, self.url, self.api_key = model, base_url.rstrip("/") + "/chat/completions", api_key
        self.max_new_tokens, self.timeout, self.retries, self.backoff = max_new_tokens, timeout, retries, backoff

    def __call__(self, text: str, images: Sequence[np.ndarray]) -> str:
        """The reply to one user turn: the images, then the text."""
        content = [{"type": "image_url", "image_url": {"url": png_data_url(coder_image(image))}} for image in images]
        body = json.dumps({"model": self.model, "max_tokens": self.max_new_tokens, "temperature": 0,
                           "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]})
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
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                    tokenize=False)
        enc = self.processor(text=[prompt], images=[[coder_image(image) for image in images]], return_tensors="pt")
        out = self.model.generate(**enc.to(self.model.device), do_sample=False, max_new_tokens=self.max_new_tokens)
        return self.processor.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def hub_status(model_id: str, timeout: float = 3.0) -> Literal["found", "missing", "unreachable"]:
    """Ask the Hugging Face Hub about `model_id`, giving up after `timeout` seconds (at once when HF_HUB_OFFLINE is set)."""
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
        bar = "!" * 100
        print(f"{bar}\nWARNING: {DEFAULT_MODEL_ID} is not in the local Hugging Face cache and {reason}.\n"
              f"Falling back to {FALLBACK_MODEL_DIR}, a tiny model with RANDOM weights: this run checks the pipeline,\n"
              f"its programs will not pass verification.\n{bar}", file=sys.stderr)
        return str(FALLBACK_MODEL_DIR), True
    raise SystemExit(f"model {model_id!r} is not in the local Hugging Face cache and {reason}; "
                     "check the id, download the model first, or pass a local directory.")


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
        raise SystemExit(f"coder model {model_id!r} ({config.model_type}) is not a vision-language model with a chat "
                         "template: use e.g. SmolVLM, Idefics3, LLaVA or Qwen2-VL.")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map={"": device},
                                                        local_files_only=offline).eval()
    processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
    ids = {k: getattr(model.generation_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**ids)
    return model, processor


def list_subtasks(coder: Callable[[str, Sequence[np.ndarray]], str], mission: str, first: np.ndarray,
                  last: np.ndarray, attempts: int, log: Callable[[str], None]) -> list[str]:
    """Stage 1: the sub-tasks that the coder lists from the first and the last frame of an expert episode, asked up
    to `attempts` times for a numbered list."""
    reply = ""
    for attempt in range(attempts):
        reply = coder(SUBTASK_PROMPT.format(mission=mission, max_subtasks=MAX_SUBTASKS), [first, last])
        subtasks = parse_subtasks(reply)[:MAX_SUBTASKS]
        log(f"stage 1, attempt {attempt + 1}: sub-tasks {subtasks}")
        if subtasks:
            return subtasks
    raise NoPrograms(f"The coder listed no sub-tasks (a numbered list) in {attempts} attempt(s), so there are no "
                     f"reward programs (its last reply began {reply[:80]!r})")


def check_coder_args(args: "Args") -> None:
    """Turn the mistakes a user can make in the --coder flags into one sentence and a non-zero exit."""
    kind = coder_kind(args.coder)
    if kind is None:
        raise SystemExit(f"--coder {args.coder!r} is not a coder: use hf:<hub id or directory> or openai:<model>.")
    if kind == "openai" and not args.coder_base_url:
        raise SystemExit(f"--coder {args.coder} needs --coder-base-url, the server's OpenAI-compatible address "
                         "(e.g. http://localhost:8000/v1).")


def build_coder(args: "Args", device: torch.device) -> Callable[[str, Sequence[np.ndarray]], str]:
    """The coder that --coder names."""
    kind, name = coder_kind(args.coder), args.coder.partition(":")[2]
    if kind == "openai":
        return OpenAICoder(name, args.coder_base_url, os.environ.get(args.coder_api_key_env), args.max_new_tokens,
                           args.coder_timeout, args.coder_retries, args.coder_backoff)
    model, processor = load_coder_model(name, device)
    return HFCoder(model, processor, args.max_new_tokens)


NUMBERED = re.compile(r"^\s*(?:step\s*)?\d{1,2}\s*[.):]\s*(.*\S)\s*$", re.IGNORECASE | re.MULTILINE)
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
CODE_START = re.compile(r"^(?:import |from |def |[A-Za-z_][A-Za-z0-9_]* = )")


def parse_subtasks(text: str) -> list[str]:
    """The numbered list of a stage-1 reply, in order (markdown emphasis removed); [] when there is none."""
    items = [re.sub(r"[*_`]+", "", match.group(1)).strip() for match in NUMBERED.finditer(text)]
    return [item for item in items if item]


def _parses(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body)


def extract_code(text: str) -> str | None:
    """The program in a reply: the fenced block that defines `check` (a block cut off at the end of the reply counts),
    else the longest run of lines around `def check` that parses; None when there is no parsable `check`."""
    blocks = [match.group(2) for match in FENCE.finditer(text)]
    for block in blocks:
        if "def check" in block and _parses(block):
            return block.strip() + "\n"
    lines = text.splitlines()[:500]
    defs = [i for i, line in enumerate(lines) if line.startswith("def check")]
    if not defs:
        return None
    starts = [i for i in range(defs[0] + 1) if CODE_START.match(lines[i])]
    for start in starts:  # earliest code line first (imports and constants), then the longest piece that parses
        for end in range(len(lines), defs[0], -1):
            code = "\n".join(lines[start:end])
            if _parses(code):
                return code.strip() + "\n"
    return None


def read_program(reply: str) -> tuple[str, str, str | None]:
    """The code in a reply ("" when there is none), the program the worker runs for it (validated by load_checker,
    else NEVER_DONE) and why the code has no program of its own (None when it has)."""
    code = extract_code(reply) or ""
    if not code:
        return "", NEVER_DONE, "the reply has no `def check(frame)` in a ```python block"
    try:
        return code, load_checker(code), None
    except UnsafeCodeError as error:
        return code, NEVER_DONE, f"UnsafeCodeError: {error}"
