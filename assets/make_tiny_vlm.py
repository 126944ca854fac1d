"""Build tiny random-weight vision-language checkpoints for offline pipeline checks.

Usage: python assets/make_tiny_vlm.py [OUT_DIR]   (default: assets/tiny-smolvlm)

The models use the real transformers architectures (Idefics3 = SmolVLM, LLaVA, and Idefics v1 with
its gated cross-attention to the image) with a byte-level BPE tokenizer trained locally, so they
load through AutoProcessor and AutoModelForImageTextToText exactly like the released checkpoints.
The weights are random: use them to exercise code paths, never to measure anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    IdeficsConfig,
    IdeficsForVisionText2Text,
    IdeficsImageProcessorPil,
    IdeficsProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SEED = 0
VOCAB_SIZE = 384
BPE_VOCAB_SIZE = 336
HIDDEN = 64
INTERMEDIATE = 128
NUM_LAYERS = 2
NUM_HEADS = 4

SMOLVLM_IMAGE_SIZE = 64
SMOLVLM_PATCH_SIZE = 8
SMOLVLM_SCALE_FACTOR = 2
SMOLVLM_IMAGE_SEQ_LEN = (SMOLVLM_IMAGE_SIZE // SMOLVLM_PATCH_SIZE) ** 2 // SMOLVLM_SCALE_FACTOR**2

LLAVA_IMAGE_SIZE = 32
LLAVA_PATCH_SIZE = 8
LLAVA_IMAGE_SEQ_LEN = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2

IDEFICS_IMAGE_SIZE = 32
IDEFICS_PATCH_SIZE = 8
IDEFICS_PERCEIVER_LATENTS = 8

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

BPE_CORPUS = [
    "User: What is in the image? Assistant: The image shows a small red square on a white background.",
    "USER: What is the next action? ASSISTANT: The next action is to move left.",
    'You are playing a game. Reply with a JSON object such as {"action": "+"} or {"action": "-"}.',
    "The agent reads the observation and then chooses the next action to get the highest reward.",
    "The reward is given when the answer is correct, and the episode ends after the final step.",
    "state action reward policy value model image text token number left right up down move stop",
]

SMOLVLM_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
] + [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# idefics-9b-instruct's: the LLaMA tokens (padding with <unk>), the image tokens and the end of a dialogue turn
IDEFICS_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<end_of_utterance>", "<fake_token_around_image>", "<image>"]


def build_byte_level_tokenizer(
    special_tokens: list[str], chat_template: str, **token_roles: str | bool
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE on a fixed corpus and wrap it with the given special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(BPE_CORPUS, trainer=trainer)
    backend.add_special_tokens(special_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        chat_template=chat_template,
        **token_roles,
    )
    if len(tokenizer) > VOCAB_SIZE:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model vocabulary {VOCAB_SIZE}")
    return tokenizer


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Return a two-layer Llama text config whose Linear sizes are all multiples of 64."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str) -> None:
    """Set the generation token ids and write the model weights and configs to path."""
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)


def build_tiny_smolvlm(path: str) -> str:
    """Build a tiny SmolVLM (Idefics3) checkpoint with its processor in path and return path."""
    torch.manual_seed(SEED)
    tokenizer = build_byte_level_tokenizer(
        SMOLVLM_SPECIAL_TOKENS,
        SMOLVLM_CHAT_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": SMOLVLM_IMAGE_SIZE},
        max_image_size={"longest_edge": SMOLVLM_IMAGE_SIZE},
        do_image_splitting=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=SMOLVLM_IMAGE_SEQ_LEN,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    vision_config = Idefics3VisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=SMOLVLM_IMAGE_SIZE,
        patch_size=SMOLVLM_PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision_config,
        text_config=tiny_llama_config(tokenizer),
        image_token_id=processor.image_token_id,
        scale_factor=SMOLVLM_SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_model(Idefics3ForConditionalGeneration(config), tokenizer, path)
    processor.save_pretrained(path)
    return path


def build_tiny_llava(path: str) -> str:
    """Build a tiny LLaVA-1.5 style checkpoint (CLIP vision + Llama) with its processor in path and return path."""
    torch.manual_seed(SEED)
    tokenizer = build_byte_level_tokenizer(
        LLAVA_SPECIAL_TOKENS,
        LLAVA_CHAT_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        image_size=LLAVA_IMAGE_SIZE,
        patch_size=LLAVA_PATCH_SIZE,
        projection_dim=HIDDEN,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=tiny_llama_config(tokenizer),
        image_token_index=processor.image_token_id,
        image_seq_length=LLAVA_IMAGE_SEQ_LEN,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    save_model(LlavaForConditionalGeneration(config), tokenizer, path)
    processor.save_pretrained(path)
    return path


def build_tiny_idefics(path: str) -> str:
    """Build a tiny Idefics (v1) checkpoint with its processor in path and return path.

    Like idefics-9b-instruct: a CLIP-style vision encoder, a perceiver resampler, and Llama decoder layers
    that read the image through gated cross-attention layers (here one before every decoder layer, with
    the gates open: tanh(1) instead of the untrained zero). The processor has no chat template (the
    script writes Idefics' dialogue format itself); the base weights are left trainable for gradient tests.
    """
    torch.manual_seed(SEED)
    tokenizer = build_byte_level_tokenizer(
        IDEFICS_SPECIAL_TOKENS, None, bos_token="<s>", eos_token="</s>", pad_token="<unk>", unk_token="<unk>"
    )
    processor = IdeficsProcessor(
        image_processor=IdeficsImageProcessorPil(image_size=IDEFICS_IMAGE_SIZE), tokenizer=tokenizer
    )
    config = IdeficsConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        cross_layer_interval=1,
        alpha_initializer="ones",
        use_resampler=True,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vision_config={
            "embed_dim": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "image_size": IDEFICS_IMAGE_SIZE,
            "patch_size": IDEFICS_PATCH_SIZE,
        },
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": IDEFICS_PERCEIVER_LATENTS,
            "resampler_depth": 1,
            "resampler_n_heads": NUM_HEADS,
            "resampler_head_dim": HIDDEN // NUM_HEADS,
        },
    )
    save_model(IdeficsForVisionText2Text(config), tokenizer, path)
    processor.save_pretrained(path)
    return path


def build_smolvlm_256m_shaped(
    corpus: list[str], full_vision: bool = True
) -> tuple[Idefics3ForConditionalGeneration, Idefics3Processor]:
    """In memory, for benchmarks: random-weight Idefics3 with SmolVLM-256M-Instruct's sizes (64 image tokens per
    512-px tile; `full_vision=False` shrinks the vision tower to 64 px and 16 tokens) and a byte-level BPE
    tokenizer trained on `corpus`, about one token per word like SmolVLM's own. The processor has SmolVLM's own
    image settings (splitting on, longest edge 4 tiles), as the scripts find them before configuring them."""
    torch.manual_seed(SEED)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_special_tokens(SMOLVLM_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    side, patch, scale, seq_len = (512, 16, 4, 64) if full_vision else (64, 8, 2, 16)
    width, layers, heads = (768, 12, 12) if full_vision else (192, 2, 3)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 4 * side},
        max_image_size={"longest_edge": side},
        do_image_splitting=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            image_size=side,
            patch_size=patch,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
        ),
        text_config=LlamaConfig(
            vocab_size=49280,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        scale_factor=scale,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor


def build_teachable_smolvlm(
    path: str, corpus: list[str], image_size: int, patch_size: int, image_mean: float = 0.5
) -> str:
    """Build a random-weight SmolVLM (Idefics3) sized to be taught on a CPU in path and return path: text model 128
    wide with 2 layers, vision tower 64 wide with 1 layer, 16 image tokens per frame, and a byte-level BPE tokenizer
    trained on `corpus` (the scripts' own prompts), so every word of them, action words included, is one token.
    Pixels are normalised to (x - image_mean) / 0.5: SigLIP's 0.5 by default; 1.0 maps a white page to 0, so that
    its ink is all the vision tower sees."""
    torch.manual_seed(SEED)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=960, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_special_tokens(SMOLVLM_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    scale = 2
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
        image_mean=[image_mean] * 3,
        image_std=[0.5] * 3,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale**2,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    text_config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = Idefics3Config(
        vision_config=vision_config,
        text_config=text_config,
        scale_factor=scale,
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_model(Idefics3ForConditionalGeneration(config), tokenizer, path)
    processor.save_pretrained(path)
    return path


if __name__ == "__main__":
    out_dir = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent / "tiny-smolvlm")
    build_tiny_smolvlm(out_dir)
