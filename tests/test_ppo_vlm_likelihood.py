"""Tests of ppo_vlm_likelihood.py: action scoring against a hand computation, the shared prefix, 4-bit + LoRA
updates, end-to-end runs, two processes, resuming, evaluation, the model fallback and the error messages."""

from __future__ import annotations

import functools
import http.server
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import huggingface_hub
import make_tiny_vlm
import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import PeftModel
from script_helpers import SUBPROCESS_ENV, exit_message, run_as_main, scalar_tags
from transformers import AutoModelForImageTextToText, AutoProcessor, IdeficsProcessor, LlamaForCausalLM

import likelihood_models
import ppo_vlm_likelihood as ppo
import text_envs
from benchmarks.bench_likelihood_scoring import score_actions_full_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO_ROOT / "ppo_vlm_likelihood.py")
run_script = functools.partial(run_as_main, SCRIPT)
script_error = functools.partial(exit_message, SCRIPT)
ARCHS = ["smolvlm", "llava", "idefics"]
DESCRIPTIONS = [
    "You are facing east.",
    "You are facing west. You see a blue key 1 step ahead and 1 step to the left. Your mission: go get a blue key.",
    "You are on row 3, column 5. There is a hole to the south.",
]
# Different token lengths, a shared template prefix, and one action that is a prefix of another.
ACTION_WORDS = ["move forward", "move left", "pick up", "move back", "move"]
# small images (the fixtures see 64 or 32 pixels anyway), tiny LoRA, short rollouts
TRAIN_FLAGS = [
    "--num-envs",
    "2",
    "--num-minibatches",
    "4",
    "--gradient-accumulation-steps",
    "2",
    "--lora-r",
    "8",
    "--image-size",
    "64",
]


@pytest.fixture(scope="module")
def tiny_text_lm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A two-layer Llama causal LM (text only) with a byte-level tokenizer and a plain chat template."""
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tokenizer = make_tiny_vlm.build_byte_level_tokenizer(
        make_tiny_vlm.LLAVA_SPECIAL_TOKENS,
        template,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny-text-lm"))
    LlamaForCausalLM(make_tiny_vlm.tiny_llama_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request: pytest.FixtureRequest):
    """(architecture, fp32 model, processor) of a tiny fixture VLM."""
    path = request.getfixturevalue(f"tiny_{request.param}_path")
    return request.param, AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def states(processor, with_image: bool = True) -> tuple[list[str], list[np.ndarray] | None]:
    """Three chat-formatted state prompts of different lengths, and their images."""
    prompts = [
        ppo.format_state_prompt(processor, ppo.LISTING_STATE_TEMPLATE, d, ACTION_WORDS, with_image)
        for d in DESCRIPTIONS
    ]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 8 * i, 64, 3), dtype=np.uint8) for i in range(len(prompts))]
    return prompts, images if with_image else None


def hand_score(model, processor, prompt: str, image: np.ndarray | None, action: str, reduction: str) -> torch.Tensor:
    """One full prompt, one forward pass, log_softmax, gather the action's tokens, reduce."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if isinstance(processor, IdeficsProcessor):  # v1 reads text and images as one interleaved sequence
        before, _, after = prompt.partition("<image>")
        enc = processor(text=[[before, image, after] if image is not None else [prompt]], return_tensors="pt")
    elif image is not None:
        enc = processor(text=prompt, images=[image], return_tensors="pt")
    else:
        enc = processor(prompt, return_tensors="pt")
    action_ids = tokenizer(action, add_special_tokens=False)["input_ids"]
    ids = torch.cat([enc["input_ids"], torch.tensor([action_ids])], dim=1)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "image_attention_mask" in extra:  # Idefics v1: the action's tokens cross-attend like the prompt's last token
        mask = extra["image_attention_mask"]
        extra["image_attention_mask"] = torch.cat([mask, mask[:, -1:].expand(-1, len(action_ids), -1)], dim=1)
    logprobs = model(input_ids=ids, **extra).logits[0].log_softmax(-1)
    start = enc["input_ids"].shape[1] - 1
    token_logprobs = torch.stack([logprobs[start + j, t] for j, t in enumerate(action_ids)])
    return {
        "mean": token_logprobs.mean(),
        "sum": token_logprobs.sum(),
        "word": token_logprobs.sum() / len(action.split()),
    }[reduction]


# --------------------------------------------------------------------------------------------
# score_actions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "word"])
def test_score_actions_matches_hand_computation(vlm, reduction: str) -> None:
    """Batched shared-prefix scores equal a full forward + log_softmax + gather + reduce, per prompt."""
    _, model, processor = vlm
    prompts, images = states(processor)
    action_prompts = [ppo.ACTION_TEMPLATE.format(action=a) for a in ACTION_WORDS]
    with torch.no_grad():
        scores = ppo.score_actions(model, processor, prompts, images, action_prompts, reduction)
        expected = torch.tensor(
            [
                [hand_score(model, processor, p, im, a, reduction) for a in action_prompts]
                for p, im in zip(prompts, images)
            ]
        )
    assert scores.shape == (len(prompts), len(action_prompts))
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


def test_score_actions_without_shared_tokens(vlm) -> None:
    """Bare action words (no common template tokens, one a prefix of another) score like the hand computation."""
    _, model, processor = vlm
    prompts, images = states(processor)
    words = [" move", " move forward", " pick up the key", "x"]
    with torch.no_grad():
        scores = ppo.score_actions(model, processor, prompts, images, words, "sum")
        expected = torch.tensor(
            [[hand_score(model, processor, p, im, a, "sum") for a in words] for p, im in zip(prompts, images)]
        )
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


def hand_scores(model, processor, prompts, images, action_prompts, reduction: str) -> torch.Tensor:
    """[B, A] hand_score of every (state, action) pair: one full prompt at a time."""
    return torch.stack(
        [
            torch.stack([hand_score(model, processor, p, im, a, reduction) for a in action_prompts])
            for p, im in zip(prompts, images)
        ]
    )


def test_shared_prefix_equals_full_prompts_with_gradients(vlm) -> None:
    """Shared-prefix scores and their gradients equal scoring one full prompt per action (1e-4, fp32)."""
    arch, model, processor = vlm
    prompts, images = states(processor)
    action_prompts = [ppo.ACTION_TEMPLATE.format(action=a) for a in ACTION_WORDS]
    weights = torch.randn(len(prompts), len(action_prompts), generator=torch.Generator().manual_seed(0))
    # Idefics v1: the decoder, its gated cross-attention and the perceiver (whose output pass 2 reuses)
    params = [
        p
        for name, p in model.named_parameters()
        if re.search(r"text_model|language_model|model\.layers|gated_cross_attn|perceiver", name)
    ]
    # the benchmark's batched full prompts hand images over with `images=`, which Idefics v1 appends to the text
    full_prompts = hand_scores if arch == "idefics" else score_actions_full_prompts
    results = []
    for scorer in (ppo.score_actions, full_prompts):
        scores = scorer(model, processor, prompts, images, action_prompts, "mean")
        grads = torch.autograd.grad((scores * weights).sum(), params)
        results.append((scores.detach(), grads))
    (shared, shared_grads), (full, full_grads) = results
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=0)
    for g_shared, g_full in zip(shared_grads, full_grads):
        torch.testing.assert_close(g_shared, g_full, atol=1e-4, rtol=1e-4)
    # gradients reach the layers below the continuation: through the cached prefix keys and values
    assert max(g.abs().max().item() for g in shared_grads) > 0


def tiny_qwen2_vl(monkeypatch: pytest.MonkeyPatch):
    """A two-layer Qwen2-VL (multimodal RoPE) and its processor, built in memory.

    Qwen2VLProcessor insists on a video processor, which needs torchvision; images never use it, so the
    class check is switched off for the construction.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )
    from transformers.processing_utils import ProcessorMixin

    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tokenizer = make_tiny_vlm.build_byte_level_tokenizer(
        specials, template, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=8, merge_size=2)
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 384,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 64,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 8,
            "spatial_merge_size": 2,
        },
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval(), processor


def test_qwen2_vl_multimodal_rope_positions(monkeypatch) -> None:
    """Qwen2-VL's 3-row RoPE positions (images of different grids) score like the model's own full-prompt forward."""
    model, processor = tiny_qwen2_vl(monkeypatch)
    prompts, _ = states(processor)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 64, 3), (64, 24, 3), (48, 48, 3)]]
    action_prompts = [ppo.ACTION_TEMPLATE.format(action=a) for a in ACTION_WORDS]

    def full_prompt(prompt: str, image: np.ndarray, action: str) -> torch.Tensor:
        enc = processor(text=[prompt], images=[[image]], return_tensors="pt")
        action_ids = processor.tokenizer(action, add_special_tokens=False)["input_ids"]
        ids = torch.cat([enc["input_ids"], torch.tensor([action_ids])], dim=1)
        token_types = torch.nn.functional.pad(enc["mm_token_type_ids"], (0, len(action_ids)))
        model.model.rope_deltas = None  # the model keeps RoPE offsets between calls
        logprobs = (
            model(
                input_ids=ids,
                mm_token_type_ids=token_types,
                pixel_values=enc["pixel_values"],
                image_grid_thw=enc["image_grid_thw"],
            )
            .logits[0]
            .log_softmax(-1)
        )
        start = enc["input_ids"].shape[1] - 1
        return torch.stack([logprobs[start + j, t] for j, t in enumerate(action_ids)]).mean()

    with torch.no_grad():
        scores = ppo.score_actions(model, processor, prompts, images, action_prompts)
        expected = torch.tensor([[full_prompt(p, im, a) for a in action_prompts] for p, im in zip(prompts, images)])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


def test_text_only_model_scores_the_description(tiny_text_lm_path: str) -> None:
    """A text-only causal LM loads as such and scores text prompts exactly like the hand computation."""
    model, tokenizer, reads_images = ppo.load_base_model(tiny_text_lm_path, False, torch.device("cpu"))
    assert not reads_images
    prompts, _ = states(tokenizer, with_image=False)
    assert prompts[0].startswith("user: I am the agent") and prompts[0].endswith("assistant:")
    action_prompts = [ppo.ACTION_TEMPLATE.format(action=a) for a in ACTION_WORDS]
    with torch.no_grad():
        scores = ppo.score_actions(model, tokenizer, prompts, None, action_prompts, "mean")
        expected = torch.tensor(
            [[hand_score(model, tokenizer, p, None, a, "mean") for a in action_prompts] for p in prompts]
        )
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


def test_lora_targets_the_language_model_attention_only() -> None:
    """The default LoRA regex takes q/k/v of the language model in every supported family, nothing else."""
    pattern = re.compile(ppo.LANGUAGE_MODEL_QKV)
    targets = [
        "model.text_model.layers.0.self_attn.q_proj",  # SmolVLM / Idefics3 / Idefics2
        "model.language_model.layers.11.self_attn.v_proj",  # LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL
        "model.layers.3.self_attn.k_proj",  # Idefics (v1), text-only LMs
        "base_model.model.model.text_model.layers.1.self_attn.k_proj",
    ]
    others = [
        "model.vision_model.encoder.layers.0.self_attn.q_proj",  # SigLIP / Idefics vision
        "model.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj",  # CLIP
        "model.connector.perceiver_resampler.layers.0.self_attn.q_proj",  # Idefics2 resampler
        "model.gated_cross_attn_layers.0.cross_attn.q_proj",  # Idefics cross-attention
        "model.perceiver_resampler.blocks.0.0.q_proj",  # Idefics resampler
        "model.visual.blocks.0.attn.qkv",  # Qwen2-VL vision
        "model.text_model.layers.0.self_attn.o_proj",
        "model.text_model.layers.0.mlp.up_proj",
    ]
    assert all(pattern.fullmatch(name) for name in targets)
    assert not any(pattern.fullmatch(name) for name in others)


def test_idefics_v1_reads_the_image_and_trains(tiny_idefics_path: str, monkeypatch, tmp_path: Path) -> None:
    """The paper's Idefics (v1) loads through the Auto classes, sees the image before the state text, gets LoRA on its
    decoder's self-attention q/k/v only (not cross-attention, resampler or vision), and trains end to end."""
    model, processor, reads_images = ppo.load_base_model(tiny_idefics_path, False, torch.device("cpu"))
    assert reads_images and type(model).__name__ == "IdeficsForVisionText2Text"
    prompts, images = states(processor)
    enc = ppo.encode_states(processor, prompts, images)
    text = processor.tokenizer.decode(enc["input_ids"][0][enc["attention_mask"][0].bool()])
    assert text.startswith("<s>User:<fake_token_around_image><image><fake_token_around_image>I am the agent")
    assert text.endswith("What's the next best action?<end_of_utterance>\nAssistant:")
    action_prompts = [ppo.ACTION_TEMPLATE.format(action=a) for a in ACTION_WORDS]
    with torch.no_grad():  # the scores depend on the image (the cross-attention gates are open)
        scores = ppo.score_actions(model, processor, prompts, images, action_prompts)
        black = ppo.score_actions(model, processor, prompts, [np.zeros_like(im) for im in images], action_prompts)
        assert (scores - black).abs().max() > 1e-3
        text_prompts, _ = states(processor, with_image=False)  # --no-image
        assert text_prompts[0].startswith("User: I am the agent")
        torch.testing.assert_close(
            ppo.score_actions(model, processor, text_prompts, None, action_prompts),
            hand_scores(model, processor, text_prompts, [None] * 3, action_prompts, "mean"),
            atol=1e-4,
            rtol=1e-5,
        )
    lora = ppo.add_lora(model, 8, 16, ppo.LANGUAGE_MODEL_QKV)
    adapted = {name.split(".lora_")[0] for name, _ in lora.named_parameters() if ".lora_" in name}
    assert adapted == {
        f"base_model.model.model.layers.{i}.self_attn.{proj}"
        for i in range(2)
        for proj in ("q_proj", "k_proj", "v_proj")
    }
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_idefics_path,
        "--total-timesteps",
        "8",
        "--num-steps",
        "4",
        *TRAIN_FLAGS,
    )
    assert g["global_step"] == 8 and g["agent"].with_image
    assert any(p.abs().sum() > 0 for name, p in g["agent"].named_parameters() if "lora_B" in name)


def test_4bit_lora_update_changes_only_lora_and_value_head(tiny_smolvlm_path: str) -> None:
    """On a 4-bit NF4 base (CPU), optimizer steps change every LoRA tensor and the value head, nothing else."""
    model, processor, _ = ppo.load_base_model(tiny_smolvlm_path, True, torch.device("cpu"))
    quantised = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert quantised and all(
        m.weight.quant_state.nested and m.weight.quant_state.quant_type == "nf4" for m in quantised
    )
    model = ppo.add_lora(model, 8, 16, ppo.LANGUAGE_MODEL_QKV)
    model.eval()
    agent = ppo.Agent(model, processor, ACTION_WORDS)
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    params = [p for p in agent.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    prompts, images = states(processor)
    for _ in range(3):
        _, logprob, entropy, value = agent.get_action_and_value(prompts, images, torch.tensor([0, 1, 2]))
        loss = -logprob.mean() - 0.01 * entropy.mean() + ((value - 1.0) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = agent.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora = {k for k in before if "lora_" in k}
    value_head = {k for k in before if k.startswith("value_head.")}
    assert len(lora) == 2 * 2 * 3  # 2 layers x q/k/v x (A, B)
    assert changed == lora | value_head


# --------------------------------------------------------------------------------------------
# the script
# --------------------------------------------------------------------------------------------
def test_end_to_end_frozenlake_with_checkpoint(tiny_smolvlm_path: str, monkeypatch, tmp_path: Path, capsys) -> None:
    """A few hundred steps on FrozenLake8x8: logs, progress lines, a checkpoint whose adapter PeftModel loads."""
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_smolvlm_path,
        "--env-id",
        "FrozenLake8x8",
        "--total-timesteps",
        "192",
        "--num-steps",
        "32",
        "--save-model",
        *TRAIN_FLAGS,
    )
    assert g["global_step"] == 192
    out = capsys.readouterr().out
    assert "iteration 3/3 global_step=192 " in out
    run_dir = tmp_path / "runs" / g["run_name"]
    tags = scalar_tags(run_dir)
    assert {
        "charts/SPS",
        "charts/learning_rate",
        "charts/success_rate",
        "charts/episodic_return",
        "charts/episodic_length",
        "losses/value_loss",
        "losses/policy_loss",
        "losses/entropy",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/explained_variance",
        "vlm/rollout_tokens_per_second",
        "vlm/peak_memory_gib",
    } <= tags

    checkpoint = run_dir / "checkpoint"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert (state["global_step"], state["iteration"]) == (192, 3)
    base = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm_path)
    loaded = PeftModel.from_pretrained(base, checkpoint / "adapter")
    trained = dict(g["agent"].model.named_parameters())
    lora = {name: p for name, p in loaded.named_parameters() if "lora_" in name}
    assert lora and all(torch.equal(p, trained[name]) for name, p in lora.items())
    assert any(p.abs().sum() > 0 for name, p in lora.items() if "lora_B" in name)  # trained away from B = 0
    # --save-model: the final adapter and value head without the optimizer; --resume evaluates or continues it
    model_state = torch.load(run_dir / "model" / "trainer_state.pt", weights_only=True)
    assert "optimizer" not in model_state and model_state["global_step"] == 192
    assert all(torch.equal(model_state["value_head"][k], v) for k, v in g["agent"].value_head.state_dict().items())
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_smolvlm_path,
        "--resume",
        str(run_dir / "model"),
        "--total-timesteps",
        "0",
        "--eval-episodes",
        "1",
        *TRAIN_FLAGS,
    )
    assert len(g["evaluations"]["greedy"]) == 1 and all(
        torch.equal(p, trained[n]) for n, p in g["agent"].model.named_parameters() if "lora_" in n
    )


def test_end_to_end_fetch(tiny_llava_path: str, monkeypatch, tmp_path: Path, capsys) -> None:
    """A few hundred steps on Fetch (macro actions) with the LLaVA fixture."""
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_llava_path,
        "--env-id",
        "Fetch",
        "--total-timesteps",
        "192",
        "--num-steps",
        "32",
        "--reduction",
        "word",
        *TRAIN_FLAGS,
    )
    assert g["global_step"] == 192 and g["action_names"] == text_envs.MACRO_ACTION_NAMES
    assert g["agent"].action_prompts[4].endswith("would be to pick up")
    assert "iteration 3/3 global_step=192 " in capsys.readouterr().out


def test_killed_run_resumes(tiny_smolvlm_path: str, monkeypatch, tmp_path: Path, capsys) -> None:
    """Kill a run after it saved a checkpoint; --resume continues from the next iteration in the same run directory."""
    argv = ["--model-id", tiny_smolvlm_path, "--total-timesteps", "100000", "--num-steps", "4", *TRAIN_FLAGS]
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *argv],
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    try:
        while not list(tmp_path.glob("runs/*/checkpoint/trainer_state.pt")) and time.time() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (state_file,) = tmp_path.glob("runs/*/checkpoint/trainer_state.pt")
    saved = torch.load(state_file, weights_only=True)
    done = saved["iteration"]
    total = (done + 2) * 8
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_smolvlm_path,
        "--total-timesteps",
        str(total),
        "--num-steps",
        "4",
        "--resume",
        str(state_file.parent),
        *TRAIN_FLAGS,
    )
    out = capsys.readouterr().out
    assert g["run_name"] == saved["run_name"] and g["global_step"] == total
    lines = [line for line in out.splitlines() if line.startswith("iteration ")]
    assert lines[0].startswith(f"iteration {done + 1}/{done + 2} global_step={(done + 1) * 8} ")
    assert len(lines) == 2
    assert torch.load(state_file, weights_only=True)["iteration"] == done + 2
    # a checkpoint fixes the LoRA shape: other LoRA flags are one sentence, not a size-mismatch traceback
    with pytest.raises(SystemExit, match="was trained with --lora-r 8, not 16: pass --lora-r 8 to resume it"):
        run_script(
            monkeypatch,
            tmp_path,
            "--model-id",
            tiny_smolvlm_path,
            "--num-steps",
            "4",
            "--resume",
            str(state_file.parent),
            *TRAIN_FLAGS,
            "--lora-r",
            "16",
        )


def test_two_processes_keep_identical_weights(tiny_smolvlm_path: str, tmp_path: Path) -> None:
    """Two processes on CPU (gloo, launched with torchrun): after updates, LoRA and value head are equal on both
    ranks."""
    wrapper = tmp_path / "run_and_dump.py"
    wrapper.write_text(
        "import os, runpy, sys, torch\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})  # as when the script itself is run\n"
        f"g = runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
        "weights = {n: p.detach() for n, p in g['agent'].named_parameters() if p.requires_grad}\n"
        "torch.save(weights, f\"weights_{os.environ['RANK']}.pt\")\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(wrapper),
        "--model-id",
        tiny_smolvlm_path,
        "--total-timesteps",
        "32",
        "--num-steps",
        "4",
        *TRAIN_FLAGS,
    ]
    result = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iteration 2/2 global_step=32 " in result.stdout  # 2 processes x 2 envs x 4 steps per iteration
    rank0, rank1 = (torch.load(tmp_path / f"weights_{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any("lora_B" in k for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if "lora_B" in k)  # updated: LoRA B starts at zero


def test_untuned_model_and_random_policy_evaluation(
    tiny_smolvlm_path: str, monkeypatch, tmp_path: Path, capsys
) -> None:
    """--total-timesteps 0 --eval-episodes N evaluates the untuned model; --random-policy evaluates random actions."""
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_smolvlm_path,
        "--env-id",
        "Fetch",
        "--total-timesteps",
        "0",
        "--eval-episodes",
        "3",
    )
    assert [len(g["evaluations"][mode]) for mode in ("greedy", "sampled")] == [3, 3] and g["global_step"] == 0
    assert re.search(r"eval greedy: episodic_return=-?\d.* over 3 episodes", capsys.readouterr().out)
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_smolvlm_path,
        "--env-id",
        "Fetch",
        "--total-timesteps",
        "0",
        "--eval-episodes",
        "2",
        "--no-image",
    )  # the LLM ablation: the VLM reads the description only
    assert len(g["evaluations"]["sampled"]) == 2 and not g["agent"].with_image
    with pytest.raises(SystemExit) as exit_info:  # the random policy loads no model and ends after its evaluation
        run_script(
            monkeypatch,
            tmp_path,
            "--random-policy",
            "--env-id",
            "FrozenLake8x8",
            "--total-timesteps",
            "0",
            "--eval-episodes",
            "5",
        )
    assert exit_info.value.code is None
    assert re.search(r"eval random: episodic_return=.* over 5 episodes", capsys.readouterr().out)
    (run_dir,) = (tmp_path / "runs").glob("FrozenLake8x8__*")
    assert {"eval/random_episodic_return", "eval/random_success_rate"} <= scalar_tags(run_dir)
    rows = (run_dir / "eval_random.csv").read_text().splitlines()  # one row per episode, the map's seed first
    assert rows[0] == "env_seed,episodic_return,episodic_length,success" and len(rows) == 6
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "1", "2", "3", "4"]  # 5 episodes over seeds 1-4


# --------------------------------------------------------------------------------------------
# the fallback and the error messages
# --------------------------------------------------------------------------------------------
class NotFoundHandler(http.server.BaseHTTPRequestHandler):
    """A Hub stand-in that knows no model."""

    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


def test_default_model_falls_back_loudly_and_fast(monkeypatch, capsys) -> None:
    """Unavailable default model: a loud warning and assets/tiny-smolvlm, found out in seconds, offline or not."""
    start = time.time()
    assert ppo.resolve_model_source(ppo.DEFAULT_MODEL_ID) == (
        str(likelihood_models.FALLBACK_MODEL_DIR),
        True,
    )  # HF_HUB_OFFLINE=1
    assert time.time() - start < 2
    warning = capsys.readouterr().err
    assert "WARNING" in warning and "taught offline" in warning

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    hub = http.server.HTTPServer(("127.0.0.1", 0), NotFoundHandler)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        endpoints = {
            "http://127.0.0.1:9": "cannot be reached",  # connection refused
            f"http://127.0.0.1:{silent.getsockname()[1]}": "cannot be reached",
            f"http://127.0.0.1:{hub.server_address[1]}": "does not know it",
        }
        for endpoint, reason in endpoints.items():
            monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
            start = time.time()
            assert ppo.resolve_model_source(ppo.DEFAULT_MODEL_ID, hub_timeout=1.0)[0] == str(
                likelihood_models.FALLBACK_MODEL_DIR
            )
            assert time.time() - start < 2.5
            assert reason in capsys.readouterr().err
            with pytest.raises(SystemExit, match=reason):  # an explicit id never falls back
                ppo.resolve_model_source("someone/some-model", hub_timeout=1.0)
    finally:
        hub.shutdown()
        silent.close()


def test_default_model_run_uses_the_fallback(monkeypatch, tmp_path: Path, capsys) -> None:
    """With no --model-id and no Hub, the run goes on with the committed tiny checkpoint."""
    g = run_script(monkeypatch, tmp_path, "--env-id", "FrozenLake8x8", "--total-timesteps", "0", "--eval-episodes", "1")
    assert len(g["evaluations"]["sampled"]) == 1
    captured = capsys.readouterr()
    assert "taught offline" in captured.err and "eval sampled: episodic_return=" in captured.out
    # the run, its hyperparameters and its progress bar name the model actually loaded
    assert (
        g["args"].model_id == str(likelihood_models.FALLBACK_MODEL_DIR)
        and "__ppo_vlm_likelihood-tiny-smolvlm-likelihood__" in g["run_name"]
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--env-id", "NoSuchEnv", "--total-timesteps", "0", "--eval-episodes", "1", "--random-policy"],
            "Unknown env id",
        ),
        (
            ["--model-id", "nobody/no-such-model", "--total-timesteps", "0", "--eval-episodes", "1"],
            "Hub cannot be reached",
        ),
        (["--model-id", "./no/such/dir", "--total-timesteps", "0", "--eval-episodes", "1"], "does not exist"),
        (["--random-policy"], "--random-policy only evaluates"),
        (["--total-timesteps", "0"], "add --eval-episodes"),
        (["--no-image", "--image-size", "64"], "does not fit with --no-image"),
        (["--state-template", "no placeholder"], "--state-template must contain {description}"),
        (["--num-steps", "4", "--num-envs", "1", "--num-minibatches", "8"], "exceeds the batch"),
        (["--resume", "no-such-checkpoint"], "Cannot read the checkpoint --resume no-such-checkpoint"),
        (["--env-seeds", "1", "2", "3", "--num-envs", "2"], "give one seed per env"),
    ],
)
def test_bad_input_gives_one_clear_error(argv: list[str], expected: str, monkeypatch, tmp_path: Path) -> None:
    """Each user mistake ends the run with one line that says what to do."""
    assert expected in script_error(monkeypatch, tmp_path, *argv)


def test_text_only_model_rejects_image_options(tiny_text_lm_path: str, monkeypatch, tmp_path: Path) -> None:
    """A text-only model with --image-size is a clear error."""
    message = script_error(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_text_lm_path,
        "--image-size",
        "64",
        "--total-timesteps",
        "0",
        "--eval-episodes",
        "1",
    )
    assert "text-only model" in message


# --------------------------------------------------------------------------------------------
# the image path, the text-only path and the advantages
# --------------------------------------------------------------------------------------------
def test_one_tile_per_frame_unless_asked(tiny_smolvlm_path: str) -> None:
    """With SmolVLM's own processor settings (splitting on, longest edge 4 tiles) a 256-px frame becomes 17 tiles;
    the script's configuration gives one tile, and --image-splitting keeps the processor's own setting."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm_path)
    frame = [np.zeros((256, 256, 3), np.uint8)]
    prompt = ppo.format_state_prompt(
        AutoProcessor.from_pretrained(tiny_smolvlm_path), ppo.LISTING_STATE_TEMPLATE, "x", ["a"], True
    )

    def image_tokens(image_splitting: bool) -> int:
        processor = AutoProcessor.from_pretrained(tiny_smolvlm_path)
        processor.image_processor.do_image_splitting = True
        processor.image_processor.size = {"longest_edge": 4 * processor.image_processor.max_image_size["longest_edge"]}
        ppo.configure_image_processor(model, processor, image_splitting)
        ids = processor(text=[prompt], images=[frame], return_tensors="pt")["input_ids"]
        return int((ids == processor.image_token_id).sum())

    seq_len = make_tiny_vlm.SMOLVLM_IMAGE_SEQ_LEN
    assert image_tokens(image_splitting=False) == seq_len
    assert image_tokens(image_splitting=True) == 17 * seq_len


def test_no_image_run_updates(tiny_smolvlm_path: str, monkeypatch, tmp_path: Path) -> None:
    """--no-image trains through the PPO update (the empty image batch once crashed its reshape)."""
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_smolvlm_path,
        "--no-image",
        "--total-timesteps",
        "16",
        "--num-steps",
        "8",
        "--num-envs",
        "2",
        "--num-minibatches",
        "4",
        "--lora-r",
        "8",
    )
    assert g["global_step"] == 16 and g["b_images"].shape[0] == 16 and not g["agent"].with_image
    assert any(p.abs().sum() > 0 for n, p in g["agent"].model.named_parameters() if "lora_B" in n)


def test_advantages_are_normalised_over_the_whole_batch(tiny_smolvlm_path: str, monkeypatch, tmp_path: Path) -> None:
    """With 2-sample minibatches, per-minibatch normalisation turns every pair into -1 / +1 (mean 0, so with a frozen
    policy the policy loss is exactly 0); over the whole batch the advantages keep their size, and the batch has
    mean 0 and standard deviation 1."""
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_smolvlm_path,
        "--total-timesteps",
        "8",
        "--num-steps",
        "4",
        "--num-envs",
        "2",
        "--num-minibatches",
        "4",
        "--lora-r",
        "8",
        "--learning-rate",
        "0",
    )
    adv = g["b_advantages"]
    assert abs(float(adv.mean())) < 1e-5 and abs(float(adv.std(unbiased=False)) - 1) < 1e-4
    raw = g["advantages"].reshape(-1)
    torch.testing.assert_close(adv, (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8))
    last = [int(i) for i in g["mb_inds"]]
    assert abs(g["pg_loss"].item() + float(adv[last].mean())) < 1e-5  # ratio 1: the loss is -mean(advantage)
    assert abs(float(adv[last].mean())) > 1e-3


def test_env_seeds_choose_the_maps_and_eval_seeds_hold_out(
    tiny_smolvlm_path: str, monkeypatch, tmp_path: Path, capsys
) -> None:
    """--env-seeds sets the training envs (one FrozenLake map each, --num-envs following them); --eval-seeds evaluates
    on other maps, one episode each here; the greedy evaluation takes the argmax action, so two of them agree."""
    lengths = []
    for _ in range(2):
        g = run_script(
            monkeypatch,
            tmp_path,
            "--model-id",
            tiny_smolvlm_path,
            "--env-seeds",
            "7",
            "11",
            "--lora-r",
            "8",
            "--total-timesteps",
            "0",
            "--eval-episodes",
            "3",
            "--eval-seeds",
            "20",
            "21",
            "22",
        )
        assert g["args"].num_envs == 2 and g["env_seeds"] == [7, 11]
        assert [e.get_wrapper_attr("grid").tolist() for e in g["eval_envs"].envs] == [
            text_envs.make_env("FrozenLake8x8", s).get_wrapper_attr("grid").tolist() for s in (20, 21, 22)
        ]
        lengths.append([e[1] for e in g["evaluations"]["greedy"]])
        for mode in ("greedy", "sampled"):  # each episode in runs/RUN/eval_{mode}.csv, under the seed of its map
            rows = [row.split(",") for row in (tmp_path / "runs" / g["run_name"] / f"eval_{mode}.csv").open()][1:]
            assert [
                (int(seed), float(ret), int(length), bool(int(success))) for seed, ret, length, success in rows
            ] == [
                (seed, ret, length, success)
                for (ret, length, success, _), seed in zip(g["evaluations"][mode], (20, 21, 22))
            ]
    assert lengths[0] == lengths[1]
