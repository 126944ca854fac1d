"""Tests of ppo_vlm_cot.py: action parsing, the thought / action split and its log-probs against a hand
computation, sampled vs scored distributions, per-env prompts, end-to-end runs on every card env, the
no-CoT and eval-only modes, resuming, two processes, the model fallback and the error messages."""

from __future__ import annotations

import functools
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from script_helpers import SUBPROCESS_ENV, exit_message, run_as_main, scalar_tags
from transformers import AutoModelForImageTextToText, AutoProcessor

import cot_models
import ppo_vlm_cot as ppo

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO_ROOT / "ppo_vlm_cot.py")
run_script = functools.partial(run_as_main, SCRIPT)
script_error = functools.partial(exit_message, SCRIPT)
ARCHS = ["smolvlm", "llava"]
TINY_FLAGS = [
    "--num-envs",
    "2",
    "--num-steps",
    "4",
    "--max-new-tokens",
    "10",
    "--gradient-accumulation-steps",
    "4",
    "--update-epochs",
    "1",
    "--lora-r",
    "8",
    "--lora-alpha",
    "16",
]
NUMBERS = [str(n) for n in range(1, 11)]
EZPOINTS_ACTIONS = NUMBERS + ["+", "*", "="]
TEMPERATURE = 0.2


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request: pytest.FixtureRequest):
    """(fp32 model, processor) of a tiny fixture VLM."""
    path = request.getfixturevalue(f"tiny_{request.param}_path")
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


# --------------------------------------------------------------------------------------------
# parse_action
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, legal, expected",
    [
        ('{"current number": "2", "target number": "4", "thoughts": "go up", "action": "+"}', ["-", "+"], 1),
        ('{"thoughts": "I have 12", "action": "stand"}', ["stand", "hit"], 0),
        ('{"cards": [3, 4], "current formula": 3*4, "thoughts": {done} "action": "="}', EZPOINTS_ACTIONS, 12),
        ('{"action": "10"}', EZPOINTS_ACTIONS, 9),  # "10" is not "1"
        ('{"action": "-"} no, wait: {"action": "+"}', ["-", "+"], 1),  # repeated: the last key counts
        ('{"action": "+"} then {"action": "jump"}', ["-", "+"], None),  # the last key names no legal action
        ('{"action": "+"}\n{"action": ', ["-", "+"], None),  # the last key has no value
        ('{"action": "11"}', EZPOINTS_ACTIONS, None),  # illegal
        ('{"action": "+-"}', ["-", "+"], None),
        ('{"action": "-" or "+"}', ["-", "+"], None),  # the format echoed: not exactly one action
        ('{"action": "{number}" or "{operator}"}', EZPOINTS_ACTIONS, None),
        ("{'action': 'hit'}", ["stand", "hit"], 1),  # misquoted: single quotes
        ("{action: hit}", ["stand", "hit"], 1),  # misquoted: no quotes at all
        ('{"Action": "HIT"}', ["stand", "hit"], 1),  # case
        ('{"action" :  " + " }', ["-", "+"], 1),  # spacing
        ('{"thoughts": "x", "action": "move forward"}', ["move forward", "move left"], 0),
        ('{"thoughts": "x", "action": "move', ["move forward", "move left"], None),  # truncated
        ('{"thoughts": "I think the action', ["-", "+"], None),  # truncated before the key
        ('{"action": "1', EZPOINTS_ACTIONS, None),  # truncated value: could have been "10"
        ('{"action": "', ["-", "+"], None),
        ("I would press plus.", ["-", "+"], None),  # not JSON
        ("The next action is +", ["-", "+"], None),  # "action" but no key
        ('{"transaction": "+"}', ["-", "+"], None),
        ("", ["-", "+"], None),
    ],
)
def test_parse_action(text: str, legal: list[str], expected: int | None) -> None:
    """The last "action" key's value, if it is exactly one legal action; None otherwise."""
    assert ppo.parse_action(text, legal) == expected


# --------------------------------------------------------------------------------------------
# the thought / action split and cot_log_prob
# --------------------------------------------------------------------------------------------
# (output text, index of the first character of the last "action" key, or None)
OUTPUTS = [
    ('{"current number": "1", "thoughts": "move up", "action": "+"}', 47),
    ("I think I should add one to reach the target.", None),  # no key: all thought
    ('{"action": "-"} {"thoughts": "no, plus 🙂", "action": "+"}', 43),  # several keys, multi-byte characters
    ('{"action":"action"}', 1),  # `{"` is one token; the value repeats the key's word
    ('{"thoughts": "the action: hit", "action":"+"}', 32),  # an "action:" inside the thoughts comes first
]


def expected_split(tokenizer, text: str, key_start: int | None) -> tuple[list[int], int]:
    """Token ids of `text` and, from the tokenizer's own offsets, the index of the token holding `key_start`."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert key_start is None or text[key_start : key_start + 9] == '"action":'
    if key_start is None:
        return enc["input_ids"], len(enc["input_ids"]) + 1  # the end-of-sequence token too is thought
    return enc["input_ids"], next(j for j, (_, end) in enumerate(enc["offset_mapping"]) if end > key_start)


def hand_log_probs(model, processor, prompt: str, image: np.ndarray, token_ids: list[int]) -> torch.Tensor:
    """Per-token log-probs after prompt + image: one unpadded forward, logits / T, no image placeholder, log_softmax."""
    enc = processor(text=prompt, images=[image], return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.tensor([token_ids])], dim=1)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    logits = model(input_ids=ids, **extra).logits[0].float() / TEMPERATURE
    logits[:, ppo.unscorable_token_ids(model)] = -torch.inf
    logprobs = logits.log_softmax(-1)
    start = enc["input_ids"].shape[1] - 1
    return torch.stack([logprobs[start + j, t] for j, t in enumerate(token_ids)])


def card_prompts(processor, n: int) -> tuple[list[str], np.ndarray]:
    """n chat prompts of different lengths (paper prompts of different envs) and their images."""
    envs = ["NumberLine", "Blackjack", "EZPoints", "Points24", "FrozenLake8x8"]
    texts = [ppo.task_prompt(envs[i % 5], ["a", "b"], "win", "You see 3.", "3+" * i) for i in range(n)]
    rng = np.random.default_rng(0)
    return [ppo.chat_prompt(processor, t) for t in texts], rng.integers(0, 256, (n, 60, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize("arch", ARCHS)
def test_split_uses_the_generated_tokens_offsets(arch: str, request: pytest.FixtureRequest) -> None:
    """The split index is the token holding the key's first character, for canonical and non-canonical token ids."""
    tokenizer = AutoProcessor.from_pretrained(request.getfixturevalue(f"tiny_{arch}_path")).tokenizer
    for text, key_start in OUTPUTS:
        ids, index = expected_split(tokenizer, text, key_start)
        assert ppo.split_output(tokenizer, ids + [tokenizer.eos_token_id]) == (text, index)
    # `{"` merges a brace with the key's quote, so the action starts at the first token
    assert tokenizer.convert_ids_to_tokens(expected_split(tokenizer, '{"action":"+"}', 1)[0])[0] == '{"'
    assert ppo.split_output(tokenizer, tokenizer('{"action":"+"}', add_special_tokens=False)["input_ids"])[1] == 0
    # sampled ids need not be the tokenizer's own tokenization: one token per character
    text = 'ok, "action": "+"'
    ids = [tokenizer.convert_tokens_to_ids(t) for c in text for t in tokenizer.tokenize(c)]
    assert ids != tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ppo.split_output(tokenizer, ids) == (text, 4)


def test_cot_log_prob_matches_hand_computation(vlm) -> None:
    """Padded batch: lambda * thought + action, with thought and action summed by hand over unpadded forwards."""
    model, processor = vlm
    tokenizer = processor.tokenizer
    prompts, images = card_prompts(processor, len(OUTPUTS))
    rows = [expected_split(tokenizer, text, key) for text, key in OUTPUTS]
    width = max(len(ids) for ids, _ in rows) + 3  # padding after every end-of-sequence token
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (token_ids, _) in enumerate(rows):
        ids[r, : len(token_ids) + 1] = torch.tensor(token_ids + [tokenizer.eos_token_id])
        mask[r, : len(token_ids) + 1] = True
    starts = [ppo.split_output(tokenizer, row[m].tolist())[1] for row, m in zip(ids, mask)]
    assert starts == [index for _, index in rows]
    output = ppo.Output(ids, mask, torch.tensor(starts))
    with torch.no_grad():
        scored = ppo.cot_log_prob(model, processor, prompts, images, output, 0.5, TEMPERATURE)
        plain = ppo.cot_log_prob(model, processor, prompts, images, output, 1.0, TEMPERATURE)
        for r, (token_ids, index) in enumerate(rows):
            token_logprobs = hand_log_probs(
                model, processor, prompts[r], images[r], token_ids + [tokenizer.eos_token_id]
            )
            thought, action = token_logprobs[:index].sum(), token_logprobs[index:].sum()
            torch.testing.assert_close(scored.thought[r], thought, atol=1e-3, rtol=1e-5)
            torch.testing.assert_close(scored.action[r], action, atol=1e-3, rtol=1e-5)
            torch.testing.assert_close(scored.log_prob[r], 0.5 * thought + action, atol=1e-3, rtol=1e-5)
            # lambda = 1: the plain sum of the output's log-probs, end-of-sequence token included
            torch.testing.assert_close(plain.log_prob[r], token_logprobs.sum(), atol=1e-3, rtol=1e-5)
    assert scored.action[1] == 0  # no key: no action tokens
    assert (scored.entropy > 0).all() and scored.hidden.shape == (len(rows), model.config.get_text_config().hidden_size)


def test_scored_distribution_is_the_sampled_one(vlm, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched sampling with the KV cache: the update's log-probs equal generate's own (processed) scores."""
    model, processor = vlm
    prompts, images = card_prompts(processor, 3)
    agent = ppo.Agent(model, processor, TEMPERATURE, 10, 1.0)
    captured = {}
    generate = model.generate

    def generate_with_scores(**kwargs):
        out = generate(**kwargs, output_scores=True)
        captured["scores"] = torch.stack(out.scores, dim=1)
        return out

    monkeypatch.setattr(model, "generate", generate_with_scores)
    torch.manual_seed(0)
    with torch.no_grad():
        output, texts, scored, value = agent.get_action_and_value(prompts, images)
    scores = captured["scores"]
    sampled = output.ids[:, : scores.shape[1]]
    expected = scores.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)
    expected = torch.where(output.mask[:, : scores.shape[1]], expected, 0.0).sum(-1)
    torch.testing.assert_close(scored.log_prob, expected, atol=1e-3, rtol=1e-5)
    assert not output.mask[:, scores.shape[1] :].any() and value.shape == (3,) and len(texts) == 3
    image_ids = ppo.unscorable_token_ids(model)
    assert image_ids and not torch.isin(output.ids, torch.tensor(image_ids)).any()


def test_rollout_scores_equal_the_update_recomputation(vlm) -> None:
    """The rollout scores a sample from its generation's own logits and prompt state; the update recomputes them in
    one forward pass over prompt and output: both give the same log-probs, split and value (so PPO's first ratio
    is 1)."""
    model, processor = vlm
    prompts, images = card_prompts(processor, 3)
    agent = ppo.Agent(model, processor, TEMPERATURE, 12, 0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        output, _, rollout, rollout_value = agent.get_action_and_value(prompts, images)
        _, _, update, update_value = agent.get_action_and_value(prompts, images, output)
    assert output.mask.sum(-1).min() > 1
    for field in ("log_prob", "thought", "action", "entropy", "hidden"):
        torch.testing.assert_close(getattr(rollout, field), getattr(update, field), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rollout_value, update_value, atol=1e-4, rtol=1e-4)


def test_output_mask_keeps_the_end_token_and_drops_padding() -> None:
    """Valid through the first end-of-sequence token; padding (even if it equals that token) after it."""
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9]])
    assert ppo.output_mask(ids, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def test_paper_prompts_and_each_envs_own_formula(tiny_smolvlm_path: str) -> None:
    """Card prompts ask for the paper's JSON; each env's prompt shows its own formula, a new episode an empty one."""
    processor = AutoProcessor.from_pretrained(tiny_smolvlm_path)
    envs = ppo.make_envs("EZPoints", [3, 4])
    obs, infos = envs.reset()
    names = envs.envs[0].get_wrapper_attr("action_names")
    hand = [envs.envs[i].get_wrapper_attr("values")[0] for i in range(2)]
    obs, _, _, _, infos = envs.step(np.array([names.index(str(hand[0])), names.index(str(hand[1]))]))
    obs, _, _, _, infos = envs.step(np.array([names.index("="), names.index("+")]))  # env 0 ends and starts anew
    texts, prompts, images = ppo.observation_prompts(obs, infos, "EZPoints", processor, names, True)
    assert "You are observing the current formula: . " in texts[0]  # the new episode's, not the last one's
    assert f"You are observing the current formula: {hand[1]}+. " in texts[1]
    assert '"cards": [x, y]' in texts[0] and texts[0].endswith('"action": "{number}" or "{operator}" \n}')
    assert "['1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '+', '*', '=']" in texts[0]
    assert prompts[0].count("<image>") == 1 and images.shape == (2, 300, 300, 3)
    nl = ppo.task_prompt("NumberLine", ["-", "+"], "m", "The target number is 3.", "")
    assert (
        '"thoughts": "{first read out' in nl
        and nl.endswith('"action": "-" or "+" \n}')
        and "target number is 3" not in nl
    )
    p24 = ppo.task_prompt("Points24", NUMBERS, "m", "d", "(3")
    assert "observing the four cards" in p24 and '"cards": [x, y, z, w]' in p24 and "make it equal 24" in p24
    no_cot = ppo.task_prompt("Blackjack", ["stand", "hit"], "m", "d", "", cot=False)
    assert "thoughts" not in no_cot and no_cot.endswith('{\n "action": "stand" or "hit" \n}')
    generic = ppo.task_prompt("Fetch", ["move forward", "pick up"], "get a key", "You see a key.", "")
    assert "Your goal: get a key. You see a key. You can choose between ['move forward', 'pick up']" in generic


def test_lora_targets_every_linear_layer_of_the_language_model_only() -> None:
    """The default LoRA regex takes attention and MLP projections of the language model, nothing else."""
    pattern = re.compile(ppo.LANGUAGE_MODEL_LINEAR)
    targets = (
        [f"model.text_model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
        + [f"model.language_model.layers.3.mlp.{p}_proj" for p in ("gate", "up", "down")]
        + ["model.layers.1.self_attn.q_proj", "base_model.model.model.text_model.layers.1.mlp.down_proj"]
    )
    others = [
        "lm_head",
        "model.vision_model.encoder.layers.0.self_attn.q_proj",
        "model.vision_model.encoder.layers.0.mlp.fc1",
        "model.vision_tower.encoder.layers.0.self_attn.k_proj",
        "model.connector.modality_projection.proj",
        "model.multi_modal_projector.linear_1",
        "model.visual.blocks.0.attn.qkv",
    ]
    assert all(pattern.fullmatch(name) for name in targets)
    assert not any(pattern.fullmatch(name) for name in others)


# --------------------------------------------------------------------------------------------
# the script
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env_id, arch", [("NumberLine", "smolvlm"), ("EZPoints", "llava"), ("Points24", "smolvlm"), ("Blackjack", "llava")]
)
def test_end_to_end_card_env(env_id: str, arch: str, request, monkeypatch, tmp_path: Path, capsys) -> None:
    """Two iterations on a card env: progress lines, logs, samples.jsonl, and LoRA trained away from B = 0."""
    path = request.getfixturevalue(f"tiny_{arch}_path")
    g = run_script(
        monkeypatch, tmp_path, "--model-id", path, "--env-id", env_id, "--total-timesteps", "16", *TINY_FLAGS
    )
    assert g["global_step"] == 16
    assert "iteration 2/2 global_step=16 " in capsys.readouterr().out
    run_dir = tmp_path / "runs" / g["run_name"]
    assert {
        "charts/SPS",
        "charts/learning_rate",
        "losses/value_loss",
        "losses/policy_loss",
        "losses/entropy",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/explained_variance",
        "cot/invalid_action_rate",
        "cot/thought_log_prob",
        "cot/action_log_prob",
        "cot/output_tokens",
    } <= scalar_tags(run_dir)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(s["iteration"], s["env"]) for s in samples] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(s["action"] in g["action_names"] and s["prompt"].endswith("\n}") for s in samples)
    assert all(s["valid"] == (ppo.parse_action(s["output"], g["action_names"]) is not None) for s in samples)
    assert any(p.abs().sum() > 0 for n, p in g["agent"].named_parameters() if "lora_B" in n)


def test_no_cot_on_a_generic_env(tiny_smolvlm_path: str, monkeypatch, tmp_path: Path) -> None:
    """--no-cot asks for the action only; a non-card env gets the generic prompt with its description."""
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_smolvlm_path,
        "--env-id",
        "FrozenLake8x8",
        "--no-cot",
        "--total-timesteps",
        "8",
        *TINY_FLAGS,
    )
    (sample, *_) = [json.loads(line) for line in (tmp_path / "runs" / g["run_name"] / "samples.jsonl").open()]
    assert "thoughts" not in sample["prompt"] and sample["prompt"].endswith('{\n "action": "{one of the actions}" \n}')
    assert (
        "['move west', 'move south', 'move east', 'move north']" in sample["prompt"]
        and "frozen lake" in sample["prompt"]
    )


def test_untuned_model_evaluation(tiny_llava_path: str, monkeypatch, tmp_path: Path, capsys) -> None:
    """--total-timesteps 0 --eval-episodes N evaluates the untuned model, invalid actions counted."""
    g = run_script(
        monkeypatch,
        tmp_path,
        "--model-id",
        tiny_llava_path,
        "--env-id",
        "Blackjack",
        "--total-timesteps",
        "0",
        "--eval-episodes",
        "3",
        "--max-new-tokens",
        "8",
    )
    assert [len(g["evaluations"][mode]) for mode in ("greedy", "sampled")] == [3, 3] and g["global_step"] == 0
    assert re.search(r"eval greedy: episodic_return=-?\d.*invalid=\d.* over 3 episodes", capsys.readouterr().out)
    rows = (tmp_path / "runs" / g["run_name"] / "eval_sampled.csv").read_text().splitlines()
    assert rows[1:] == [  # one row per episode: the seed of its env (seeds 1-4: 3 episodes go to the first 3 envs)
        f"{seed},{ret},{length},{int(success)}"
        for (ret, length, success, _), seed in zip(g["evaluations"]["sampled"], (1, 2, 3))
    ]
    assert {
        f"eval/{mode}_{tag}"
        for mode in ("greedy", "sampled")
        for tag in ("episodic_return", "success_rate", "invalid_action_rate")
    } <= scalar_tags(tmp_path / "runs" / g["run_name"])


def test_resume_continues_the_run(tiny_smolvlm_path: str, monkeypatch, tmp_path: Path, capsys) -> None:
    """A saved checkpoint resumes at the next iteration in the same run directory, with the saved weights."""
    argv = ["--model-id", tiny_smolvlm_path, "--env-id", "NumberLine", *TINY_FLAGS]
    first = run_script(monkeypatch, tmp_path, *argv, "--total-timesteps", "8")
    checkpoint = tmp_path / "runs" / first["run_name"] / "checkpoint"
    saved_head = {k: v.clone() for k, v in first["agent"].value_head.state_dict().items()}
    capsys.readouterr()
    g = run_script(monkeypatch, tmp_path, *argv, "--total-timesteps", "24", "--resume", str(checkpoint))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iteration ")]
    assert [line.split(" SPS=")[0] for line in lines] == [
        "iteration 2/3 global_step=16",
        "iteration 3/3 global_step=24",
    ]
    assert g["run_name"] == first["run_name"] and torch.load(checkpoint / "trainer_state.pt")["iteration"] == 3
    assert not all(torch.equal(saved_head[k], v) for k, v in g["agent"].value_head.state_dict().items())
    assert "pass --lora-r 8 to resume it" in script_error(
        monkeypatch, tmp_path, "--model-id", tiny_smolvlm_path, "--env-id", "NumberLine", "--resume", str(checkpoint)
    )
    g = run_script(
        monkeypatch,
        tmp_path,
        *argv,
        "--resume",
        str(checkpoint),
        "--total-timesteps",
        "0",
        "--eval-episodes",
        "1",
        "--max-new-tokens",
        "4",
    )
    trained = torch.load(checkpoint / "trainer_state.pt")["value_head"]
    assert all(torch.equal(trained[k], v) for k, v in g["agent"].value_head.state_dict().items())


def test_two_processes_keep_identical_weights(tiny_smolvlm_path: str, tmp_path: Path) -> None:
    """Two processes on CPU (gloo, launched with torchrun): after an update, LoRA and value head are equal on both
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
        "16",
        *TINY_FLAGS,
        "--max-new-tokens",
        "6",
    ]
    result = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iteration 1/1 global_step=16 " in result.stdout  # 2 processes x 2 envs x 4 steps
    rank0, rank1 = (torch.load(tmp_path / f"weights_{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if "lora_B" in k)


# --------------------------------------------------------------------------------------------
# the fallback and the error messages
# --------------------------------------------------------------------------------------------
class NotFoundHandler(http.server.BaseHTTPRequestHandler):
    """A Hub stand-in that knows no model."""

    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


def test_default_model_run_uses_the_fallback(monkeypatch, tmp_path: Path, capsys) -> None:
    """With no --model-id and no Hub, the run goes on with the committed tiny checkpoint, loudly."""
    g = run_script(
        monkeypatch,
        tmp_path,
        "--env-id",
        "Blackjack",
        "--total-timesteps",
        "0",
        "--eval-episodes",
        "1",
        "--max-new-tokens",
        "4",
        "--num-envs",
        "1",
    )
    assert len(g["evaluations"]["sampled"]) == 1
    captured = capsys.readouterr()
    assert "taught offline" in captured.err and "eval sampled: episodic_return=" in captured.out
    # the run, its hyperparameters and its progress bar name the model actually loaded
    assert (
        g["args"].model_id == str(cot_models.FALLBACK_MODEL_DIR) and "__ppo_vlm_cot-tiny-smolvlm-cot__" in g["run_name"]
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = http.server.HTTPServer(("127.0.0.1", 0), NotFoundHandler)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        for endpoint, reason in {
            "http://127.0.0.1:9": "cannot be reached",
            f"http://127.0.0.1:{hub.server_address[1]}": "does not know it",
        }.items():
            monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
            assert ppo.resolve_model_source(ppo.DEFAULT_MODEL_ID, hub_timeout=1.0)[0] == str(
                cot_models.FALLBACK_MODEL_DIR
            )
            assert reason in capsys.readouterr().err
            with pytest.raises(SystemExit, match=reason):  # an explicit id never falls back
                ppo.resolve_model_source("someone/some-model", hub_timeout=1.0)
    finally:
        hub.shutdown()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--env-id", "NoSuchEnv"], "Unknown env id"),
        (
            ["--model-id", "nobody/no-such-model", "--total-timesteps", "0", "--eval-episodes", "1"],
            "Hub cannot be reached",
        ),
        (["--model-id", "./no/such/dir", "--total-timesteps", "0", "--eval-episodes", "1"], "does not exist"),
        (["--total-timesteps", "0"], "add --eval-episodes"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--thought-coef", "1.5"], "must lie in [0, 1]"),
        (["--max-new-tokens", "0"], "must be at least 1"),
        (["--num-envs", "1", "--num-steps", "4", "--minibatch-size", "8"], "exceeds the batch"),
        (["--total-timesteps", "100"], "is less than one rollout"),
        (["--resume", "no-such-checkpoint"], "Cannot read the checkpoint --resume no-such-checkpoint"),
    ],
)
def test_bad_input_gives_one_clear_error(argv: list[str], expected: str, monkeypatch, tmp_path: Path) -> None:
    """Each user mistake ends the run with one line that says what to do, before a run directory exists."""
    assert expected in script_error(monkeypatch, tmp_path, *argv)
    assert not (tmp_path / "runs").exists()


def test_bf16_old_log_probs_come_from_the_update_pass(tiny_smolvlm_path: str) -> None:
    """Under bf16 the generation's own scores differ from the update's forward pass; the stored old log-probs are
    recomputed by that pass, one minibatch at a time, so PPO's first ratio is exactly 1."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm_path, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(tiny_smolvlm_path)
    prompts, images = card_prompts(processor, 3)
    agent = ppo.Agent(model, processor, TEMPERATURE, 12, 0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        output, _, rollout, _ = agent.get_action_and_value(prompts, images)
    old = ppo.rescore(agent, prompts, torch.from_numpy(images), output, 1)
    for i in range(len(prompts)):
        with torch.no_grad():
            _, _, new, _ = agent.get_action_and_value(
                prompts[i : i + 1], images[i : i + 1], ppo.Output(*(x[i : i + 1] for x in output))
            )
        assert torch.equal(new.log_prob, old[i : i + 1])
    torch.testing.assert_close(old, rollout.log_prob, atol=0.05, rtol=0)  # the same policy, up to bf16 steps


def test_temperature_zero_generates_greedily(tiny_smolvlm_path: str) -> None:
    """Temperature 0 (the greedy evaluation of sft_vlm.py) takes the most likely token at every step."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm_path).eval()
    processor = AutoProcessor.from_pretrained(tiny_smolvlm_path)
    prompts, images = card_prompts(processor, 2)
    with torch.no_grad():
        ids, mask, logits, _ = ppo.generate(model, processor, prompts, images, 0.0, 6)
    n = logits.shape[1]
    assert torch.equal(ids[:, :n][mask[:, :n]], logits.argmax(-1)[mask[:, :n]])
