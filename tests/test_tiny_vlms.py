"""Checks that the tiny offline VLMs behave like the released SmolVLM and LLaVA checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import make_tiny_vlm
import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

COMMITTED_SMOLVLM = Path(__file__).resolve().parents[1] / "assets" / "tiny-smolvlm"
LANGUAGE_MODEL_QKV = r".*\.(text_model|language_model)\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"
QUESTION = "Which way is the goal?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


@dataclass(frozen=True)
class Family:
    """What a tiny checkpoint of one architecture family must look like."""

    processor_class: type[ProcessorMixin]
    model_class: type[PreTrainedModel]
    image_processor_prefix: str
    prompt: str
    image_seq_len: int


FAMILIES = {
    "smolvlm": Family(
        processor_class=Idefics3Processor,
        model_class=Idefics3ForConditionalGeneration,
        image_processor_prefix="Idefics3ImageProcessor",
        prompt=f"<|im_start|>User:<image>{QUESTION}<end_of_utterance>\nAssistant:",
        image_seq_len=make_tiny_vlm.SMOLVLM_IMAGE_SEQ_LEN,
    ),
    "llava": Family(
        processor_class=LlavaProcessor,
        model_class=LlavaForConditionalGeneration,
        image_processor_prefix="CLIPImageProcessor",
        prompt=f"USER: <image>\n{QUESTION} ASSISTANT:",
        image_seq_len=make_tiny_vlm.LLAVA_IMAGE_SEQ_LEN,
    ),
}


def random_image(seed: int, height: int = 48, width: int = 80) -> np.ndarray:
    """Return a reproducible random RGB image as an H x W x 3 uint8 array."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def expected_image_tokens(model: PreTrainedModel) -> int:
    """Number of image features the model's vision tower produces per (unsplit) image."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if model.config.model_type == "idefics3":
        return patches // model.config.scale_factor**2
    return patches if model.config.vision_feature_select_strategy == "default" else patches + 1


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_name(request: pytest.FixtureRequest) -> str:
    """Name of the architecture family under test."""
    return request.param


@pytest.fixture(scope="module")
def vlm_path(family_name: str, request: pytest.FixtureRequest) -> str:
    """Directory of the freshly built tiny checkpoint of the family under test."""
    return request.getfixturevalue(f"tiny_{family_name}_path")


@pytest.fixture(scope="module")
def processor(vlm_path: str) -> ProcessorMixin:
    """Processor loaded back through AutoProcessor."""
    return AutoProcessor.from_pretrained(vlm_path)


@pytest.fixture(scope="module")
def model(vlm_path: str) -> PreTrainedModel:
    """Full-precision model loaded back through AutoModelForImageTextToText."""
    return AutoModelForImageTextToText.from_pretrained(vlm_path).eval()


def prompt_inputs(processor: ProcessorMixin, image: Image.Image | np.ndarray) -> dict[str, torch.Tensor]:
    """Processor outputs for the standard one-image question, as PyTorch tensors."""
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=text, images=image, return_tensors="pt"))


def test_loads_through_auto_classes(family_name: str, processor: ProcessorMixin, model: PreTrainedModel) -> None:
    """Processor, image processor and model come back as the real classes with consistent token ids."""
    family = FAMILIES[family_name]
    assert isinstance(processor, family.processor_class)
    assert type(processor.image_processor).__name__.startswith(family.image_processor_prefix)
    assert isinstance(model, family.model_class)
    assert model.config.text_config.vocab_size % 64 == 0
    assert len(processor.tokenizer) <= model.config.text_config.vocab_size
    assert processor.image_token_id == model.config.image_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_quantisable_linears_are_multiples_of_64(model: PreTrainedModel) -> None:
    """Every Linear bitsandbytes would quantise has in- and out-features divisible by 64."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name


def test_chat_template_matches_real_format(family_name: str, processor: ProcessorMixin) -> None:
    """Processor and tokenizer chat templates render the released model's prompt format."""
    expected = FAMILIES[family_name].prompt
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == expected
    assert processor.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == expected


def test_forward_consumes_image_features(family_name: str, processor: ProcessorMixin, model: PreTrainedModel) -> None:
    """Logits are finite, image tokens match the vision features, and the image changes later logits only."""
    inputs = prompt_inputs(processor, Image.fromarray(random_image(0)))
    other = prompt_inputs(processor, random_image(1))
    assert torch.equal(inputs["input_ids"], other["input_ids"])

    image_mask = inputs["input_ids"][0] == model.config.image_token_id
    n_image_tokens = int(image_mask.sum())
    assert n_image_tokens == FAMILIES[family_name].image_seq_len == expected_image_tokens(model)
    image_kwargs = {key: inputs[key] for key in processor.image_processor.model_input_names}
    with torch.no_grad():
        features = model.get_image_features(**image_kwargs).pooler_output
        logits = model(**inputs).logits
        other_logits = model(**other).logits
    assert features[0].shape == (n_image_tokens, model.config.text_config.hidden_size)

    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    first_image_pos = int(image_mask.nonzero()[0])
    assert torch.allclose(logits[:, :first_image_pos], other_logits[:, :first_image_pos])
    assert not torch.allclose(logits[:, -1], other_logits[:, -1])


def test_greedy_generate(processor: ProcessorMixin, model: PreTrainedModel) -> None:
    """Greedy generation appends the requested tokens deterministically."""
    inputs = prompt_inputs(processor, random_image(2))
    prompt_len = inputs["input_ids"].shape[1]
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        first = model.generate(**inputs, **kwargs)
        second = model.generate(**inputs, **kwargs)
    assert first.shape == (1, prompt_len + 4)
    assert torch.equal(first, second)
    assert torch.equal(first[:, :prompt_len], inputs["input_ids"])
    assert isinstance(processor.decode(first[0, prompt_len:]), str)


def test_nf4_lora_forward_backward(processor: ProcessorMixin, vlm_path: str) -> None:
    """NF4 double-quant loading plus LoRA on the language model trains on CPU."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForImageTextToText.from_pretrained(vlm_path, quantization_config=quantization)
    linears = {name: module for name, module in base.named_modules() if isinstance(module, Linear4bit)}
    assert linears and "lm_head" not in linears
    quant_state = next(iter(linears.values())).weight.quant_state
    assert quant_state.quant_type == "nf4" and quant_state.nested

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LANGUAGE_MODEL_QKV, init_lora_weights=False)
    model = get_peft_model(base, lora)
    inputs = prompt_inputs(processor, random_image(3))
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == base.config.image_token_id, -100)
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()

    lora_params = {name: p for name, p in model.named_parameters() if "lora_" in name}
    n_layers = base.config.text_config.num_hidden_layers
    assert len(lora_params) == n_layers * 3 * 2
    for name, param in lora_params.items():
        assert ".text_model." in name or ".language_model." in name
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert not [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]


def test_committed_smolvlm_checkpoint_runs(tiny_smolvlm_path: str) -> None:
    """The committed fallback checkpoint loads, tokenises like a fresh build and runs a forward pass."""
    processor = AutoProcessor.from_pretrained(COMMITTED_SMOLVLM)
    model = AutoModelForImageTextToText.from_pretrained(COMMITTED_SMOLVLM).eval()
    fresh = AutoProcessor.from_pretrained(tiny_smolvlm_path)
    assert isinstance(model, Idefics3ForConditionalGeneration)

    inputs = prompt_inputs(processor, random_image(4))
    assert torch.equal(inputs["input_ids"], prompt_inputs(fresh, random_image(4))["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "text",
    [
        '{"action": "+"}',
        "Move left, then pick up the yellow key.",
        "naïve café — 日本語 ✓ 🎲\n\ttabs  and  double  spaces ",
        "  leading and trailing  ",
    ],
)
def test_byte_level_tokenizer_round_trip_and_offsets(processor: ProcessorMixin, text: str) -> None:
    """Arbitrary text decodes back exactly and offsets cover every character."""
    tokenizer = processor.tokenizer
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    assert tokenizer.decode(ids) == text
    assert len(offsets) == len(ids)
    assert all(0 <= start < end <= len(text) for start, end in offsets)
    assert [start for start, _ in offsets] == sorted(start for start, _ in offsets)
    assert set().union(*(range(start, end) for start, end in offsets)) == set(range(len(text)))
    if "+" in text:
        plus_index = text.index("+")
        plus_token = encoding.char_to_token(plus_index)
        start, end = offsets[plus_token]
        assert start <= plus_index < end
        assert tokenizer.decode([ids[plus_token]]) == text[start:end]


def test_special_tokens_are_single_ids(processor: ProcessorMixin) -> None:
    """Image, eos, pad and bos tokens are never split."""
    tokenizer = processor.tokenizer
    for token in [processor.image_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token]:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
