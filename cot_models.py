"""The plumbing of ppo_vlm_cot.py's VLM: where the model comes from (a local folder, the Hugging Face cache, the
Hub, or the offline fallback in assets/), loading it (optionally 4-bit) with neutral sampling settings, one image
tile per frame, and the LoRA adapters that train. The method (prompts, the output parser, eq. 1's log-probability,
PPO) is the script's; this file never imports it. Only ppo_vlm_cot.py uses it.
"""

import os
import sys
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Literal

import huggingface_hub
import torch
import torch.nn as nn
from huggingface_hub import try_to_load_from_cache

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"
# taught offline by assets/teach_tiny_vlm.py (sft_vlm.py on NumberLine): a stand-in when the Hub is out of reach
FALLBACK_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-smolvlm-cot"
# printed when the fallback is used
FALLBACK_MODEL_NOTE = (
    "a small VLM taught offline on NumberLine,\n"
    "NOT the paper's model: its numbers show the mechanism, never a claim about a real VLM."
)


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


def load_base_model(model_id: str, load_in_4bit: bool, device: torch.device) -> tuple[nn.Module, object]:
    """The frozen base model and its processor."""
    # imported here, not at the top: --help and flag errors answer without loading transformers
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoProcessor,
        BitsAndBytesConfig,
        GenerationConfig,
    )
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    source, offline = resolve_model_source(model_id)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"cannot load model {model_id!r} ({reason}).") from None
    if config.model_type == "idefics":
        raise SystemExit(
            f"{model_id!r} is Idefics (v1), whose gated cross-attention to images this script does not "
            "implement: use its successors Idefics2 / Idefics3 / SmolVLM, or LLaVA or Qwen2-VL."
        )
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise SystemExit(
            f"model {model_id!r} ({config.model_type}) is not a vision-language model: RL4VLM needs the image."
        )
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        if load_in_4bit
        else None
    )
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=compute_dtype, quantization_config=quantization, device_map={"": device}, local_files_only=offline
    )
    for layer in (m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")):  # bitsandbytes' 4-bit:
        layer.support_avx512bf16_for_cpu = False  # its CPU repacking re-rounds the frozen scales at every checkpoint
    processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    # The checkpoint's own sampling defaults (top-k, repetition penalty, ...) would change the distribution
    # that is sampled from but not the one that is scored: keep only its special tokens.
    ids = {k: getattr(model.generation_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**ids)
    return model, processor


def configure_image_processor(model: nn.Module, processor: object, image_splitting: bool) -> None:
    """One tile per frame unless `image_splitting`: env frames are small, and SmolVLM's own settings (longest edge
    2048, 512-px tiles) turn a 256-px frame into 17 tiles and 1088 image tokens. LLaVA-NeXT keeps the fewest tiles
    it takes (its base image and one crop); Qwen2-VL already scales its tokens to the frame's pixels."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or image_splitting:
        return
    if getattr(image_processor, "do_image_splitting", False):  # Idefics2 / Idefics3 / SmolVLM
        image_processor.do_image_splitting = False
    if isinstance(getattr(image_processor, "max_image_size", None), dict):  # Idefics3: resize straight to one tile
        image_processor.size = {"longest_edge": image_processor.max_image_size["longest_edge"]}
    if getattr(image_processor, "image_grid_pinpoints", None):  # LLaVA-NeXT: processor and model must agree
        crop = image_processor.crop_size
        image_processor.image_grid_pinpoints = model.config.image_grid_pinpoints = [[crop["height"], crop["width"]]]


def add_lora(model: nn.Module, r: int, alpha: int, target_modules: str) -> nn.Module:
    """Freeze the base model and add LoRA adapters to the matching modules (the only VLM weights that train)."""
    from peft import LoraConfig, get_peft_model  # with the model, not at the top: see load_base_model

    for param in model.parameters():
        param.requires_grad_(False)
    try:
        with warnings.catch_warnings():  # peft 0.21 still asks transformers 5 the deprecated question
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            return get_peft_model(
                model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules)
            )
    except ValueError as err:
        raise SystemExit(f"--lora-target-modules matches no module of this model ({err}).".replace("\n", " ")) from None
