"""Tests of sft_vlm.py: the demonstrations and answers, the prompts it trains against the PPO scripts' own, the loss
falling, the saved model loading in both PPO scripts, and the error messages."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from script_helpers import exit_message, run_as_main, scalar_tags
from transformers import AutoModelForImageTextToText, AutoProcessor

import likelihood_models
import ppo_vlm_cot as cot
import ppo_vlm_likelihood as likelihood
import sft_vlm

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO_ROOT / "sft_vlm.py")
run_script = functools.partial(run_as_main, SCRIPT)
script_error = functools.partial(exit_message, SCRIPT)
SMALL = ["--num-demos", "2", "--num-epochs", "1", "--batch-size", "8", "--eval-episodes", "2", "--max-new-tokens", "12"]


def demos(fmt: str, env_id: str, n: int = 3, noise: float = 0.0) -> tuple[sft_vlm.Args, list[str], list[sft_vlm.Demo]]:
    args = sft_vlm.Args(format=fmt, env_id=env_id, num_demos=n, expert_noise=noise)
    names = (
        likelihood.env_action_names(env_id)
        if fmt == "likelihood"
        else list(cot.make_env(env_id, 0)().get_wrapper_attr("action_names"))
    )
    return args, names, sft_vlm.collect_demos(args, names, np.random.default_rng(0))[0]


def test_noiseless_demonstrations_are_the_expert_and_noise_is_labelled_as_taken() -> None:
    """Noise 0 reproduces the expert (every FrozenLake demo reaches the goal); noise 1 takes uniform actions."""
    args = sft_vlm.Args(format="likelihood", env_id="FrozenLake8x8", num_demos=5, expert_noise=0.0)
    names = likelihood.env_action_names("FrozenLake8x8")
    clean, success = sft_vlm.collect_demos(args, names, np.random.default_rng(0))
    assert success == 1.0 and len(clean) >= 5 * 14  # the 8x8 lake's goal is at least 14 moves away
    noisy, _ = sft_vlm.collect_demos(
        sft_vlm.Args(num_demos=20, expert_noise=1.0, demo_seed=2000), names, np.random.default_rng(0)
    )
    counts = np.bincount([d.action for d in noisy], minlength=4) / len(noisy)
    assert np.all(np.abs(counts - 0.25) < 0.1)


def test_numberline_answer_reads_the_true_state_and_parses_to_the_taken_action() -> None:
    """The CoT answer names the current and target numbers, says which way to go, and parses to the taken action."""
    args, names, data = demos("cot", "NumberLine", n=4)
    env = cot.make_env("NumberLine", args.demo_seed)()
    _, info = env.reset()
    first = data[0]
    assert f'"current number": "{info["current"]}"' in first.answer
    assert f'"target number": "{info["target"]}"' in first.answer
    assert ("add one" in first.answer) == (info["target"] > info["current"])
    for d in data:
        assert cot.parse_action(d.answer, names) == d.action
    noisy = sft_vlm.cot_answer(
        "NumberLine", names, {}, {"current": 1, "target": 4}, expert=1, action=0, with_thoughts=False
    )
    assert noisy == '{"current number": "1", "target number": "4", "action": "-"}'


def test_blackjack_answer_adds_up_the_cards_the_image_shows() -> None:
    """Blackjack's image and text show cards, not totals: the demonstration's thoughts add them up, as the prompt
    asks, and name the expert's move."""
    import text_envs

    for seed in range(20):
        env = cot.make_env("Blackjack", seed)()
        obs, info = env.reset()
        total, usable = text_envs.blackjack_total([text_envs.CARD_RANK_NAMES.index(c) for c in info["player"]])
        expert = text_envs.expert_action(env)
        answer = sft_vlm.cot_answer("Blackjack", ["stand", "hit"], obs, info, expert, expert, with_thoughts=True)
        assert f"My total is {total}{' (soft)' if usable else ''} and" in answer
        assert answer.endswith(
            f'The best action is {["stand", "hit"][expert]}.", "action": "{["stand", "hit"][expert]}"}}'
        )


@pytest.fixture(scope="module")
def smolvlm(tiny_smolvlm_path: str):
    return AutoModelForImageTextToText.from_pretrained(tiny_smolvlm_path).eval(), AutoProcessor.from_pretrained(
        tiny_smolvlm_path
    )


def test_trains_the_prompts_the_ppo_scripts_score(smolvlm, monkeypatch) -> None:
    """The strings and images SFT scores are byte for byte the ones each PPO script builds from the same observation
    (one source for each template); the likelihood loss is -log pi(a | s) of the script's policy (--loss policy) or
    minus eq. 1's score of the demonstrated action (--loss tokens)."""
    model, processor = smolvlm
    args, names, data = demos("likelihood", "FrozenLake8x8", n=1)
    agent = likelihood.Agent(model, processor, names, likelihood.FROZENLAKE_STATE_TEMPLATE, likelihood.ACTION_TEMPLATE)
    seen = {}
    original = likelihood.score_actions
    monkeypatch.setattr(likelihood, "score_actions", lambda *a: seen.setdefault("call", a) and original(*a))
    with torch.no_grad():
        loss = sft_vlm.sft_loss(args, model, processor, agent, data[:2])
    env = likelihood.make_env("FrozenLake8x8", args.demo_seed, None, True)()
    obs, _ = env.reset()
    ppo_prompts, _ = agent.observe({"text": [obs["text"]], "image": obs["image"][None]})
    _, _, prompts, images, action_prompts, reduction = seen["call"]
    assert prompts[0] == ppo_prompts[0] and np.array_equal(images[0], obs["image"])
    assert action_prompts == agent.action_prompts and reduction == "mean"
    with torch.no_grad():
        scores = likelihood.score_actions(model, processor, prompts, images, action_prompts)
    taken = [data[0].action, data[1].action]
    torch.testing.assert_close(loss, -scores.log_softmax(-1)[[0, 1], taken].mean())  # -log pi(a | s)
    args.loss = "tokens"
    with torch.no_grad():
        tokens_loss = sft_vlm.sft_loss(args, model, processor, agent, data[:2])
    torch.testing.assert_close(tokens_loss, -scores[[0, 1], taken].mean())

    args, names, data = demos("cot", "NumberLine", n=1)
    monkeypatch.setattr(cot, "cot_log_prob", lambda *a, **k: seen.setdefault("cot", (a, k)) and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        sft_vlm.sft_loss(args, model, processor, None, data[:1])
    (_, _, prompts, images, output), kwargs = seen["cot"]
    env = cot.make_env("NumberLine", args.demo_seed)()
    obs, info = env.reset()
    _, ppo_prompts, ppo_images = cot.observation_prompts(
        {k: np.array([v]) for k, v in obs.items()}, {"formula": [""]}, "NumberLine", processor, names, True
    )
    assert prompts == ppo_prompts and np.array_equal(images, ppo_images)
    assert kwargs == {"thought_coef": 1.0, "temperature": 1.0}
    answer_ids = processor.tokenizer(data[0].answer, add_special_tokens=False)["input_ids"]
    assert output.ids[0, : int(output.mask[0].sum())].tolist() == answer_ids + [processor.tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "fmt, env_id, loss",
    [("likelihood", "FrozenLake8x8", "policy"), ("likelihood", "FrozenLake8x8", "tokens"), ("cot", "NumberLine", "")],
)
def test_loss_falls(fmt: str, env_id: str, loss: str, tiny_smolvlm_path: str) -> None:
    """Thirty steps on the same few demonstrations halve the loss of the tiny model (all weights train)."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm_path)
    processor = AutoProcessor.from_pretrained(tiny_smolvlm_path)
    args, names, data = demos(fmt, env_id, n=2)
    args.loss = loss or args.loss
    agent = (
        likelihood.Agent(model, processor, names, likelihood.state_template(env_id), likelihood.ACTION_TEMPLATE)
        if fmt == "likelihood"
        else None
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2 if loss == "policy" else 3e-3)
    batch = data[:8]  # -log pi falls towards the entropy of these labels, 0.56 nats for 6 / 2 of two actions
    losses = []
    for _ in range(30):
        loss = sft_vlm.sft_loss(args, model, processor, agent, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_saved_model_loads_in_both_ppo_scripts(tiny_smolvlm_path: str, monkeypatch, tmp_path: Path, capsys) -> None:
    """A LoRA run merges its adapter into the saved folder (the same scores as the trained model), logs its tags,
    and the folder is a --model-id for both PPO scripts."""
    g = run_script(
        monkeypatch, tmp_path, "--model-id", tiny_smolvlm_path, "--lora-r", "8", "--learning-rate", "1e-2", *SMALL
    )
    out = capsys.readouterr().out
    assert "eval greedy (" in out and "eval sampled (" in out and "2 held-out episodes): success_rate=" in out
    run_dir = tmp_path / "runs" / g["run_name"]
    assert {
        "losses/sft_loss",
        "eval/sampled_success_rate",
        "eval/greedy_success_rate",
        "sft/demonstrator_success_rate",
    } <= scalar_tags(run_dir)
    saved = run_dir / "model"
    model, processor = AutoModelForImageTextToText.from_pretrained(saved).eval(), AutoProcessor.from_pretrained(saved)
    prompts, images = g["agent"].observe({"text": [g["demos"][0].text], "image": g["demos"][0].image[None]})
    with torch.no_grad():
        trained = likelihood.score_actions(g["model"], g["processor"], prompts, images, g["agent"].action_prompts)
        loaded = likelihood.score_actions(model, processor, prompts, images, g["agent"].action_prompts)
        base = likelihood.score_actions(
            AutoModelForImageTextToText.from_pretrained(tiny_smolvlm_path).eval(),
            processor,
            prompts,
            images,
            g["agent"].action_prompts,
        )
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
    assert (loaded - base).abs().max() > 1e-3

    for script in ("ppo_vlm_likelihood.py", "ppo_vlm_cot.py"):
        env = ["--env-id", "NumberLine", "--max-new-tokens", "8"] if script == "ppo_vlm_cot.py" else []
        run_as_main(
            str(REPO_ROOT / script),
            monkeypatch,
            tmp_path,
            "--model-id",
            str(saved),
            "--total-timesteps",
            "0",
            "--eval-episodes",
            "1",
            "--num-envs",
            "1",
            *env,
        )
        assert "eval sampled: episodic_return=" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--expert-noise", "1.5"], "--expert-noise must lie in [0, 1]"),
        (["--num-demos", "0"], "must be at least 1"),
        (["--demo-seed", "10", "--eval-episodes", "100"], "overlaps the evaluation seeds"),
        (["--load-in-4bit", "--lora-r", "0"], "needs LoRA"),
        (["--env-id", "NoSuchEnv"], "Unknown env id"),
        (["--model-id", "./no/such/dir"], "does not exist"),
    ],
)
def test_bad_input_gives_one_clear_error(argv: list[str], expected: str, monkeypatch, tmp_path: Path) -> None:
    """Each user mistake ends the run with one line that says what to do, before a run directory exists."""
    assert expected in script_error(monkeypatch, tmp_path, *argv)
    assert not (tmp_path / "runs").exists()


def test_teaching_rebuilds_bit_for_bit(monkeypatch, tmp_path: Path) -> None:
    """assets/teach_tiny_vlm.py's two steps repeat exactly: the same seed and corpus give the same initial model, and
    sft_vlm.py from it gives the same weights byte for byte (one torch thread, as the command runs it)."""
    from make_tiny_vlm import build_teachable_smolvlm

    corpus = [likelihood.FROZENLAKE_STATE_TEMPLATE.format(description="You are on row 1.")] * 5
    weights = []
    for i in range(2):
        init = build_teachable_smolvlm(str(tmp_path / f"init{i}"), corpus, 64, 8)
        run_script(
            monkeypatch,
            tmp_path,
            "--model-id",
            init,
            "--lora-r",
            "0",
            "--output-dir",
            str(tmp_path / f"out{i}"),
            "--num-demos",
            "2",
            "--num-epochs",
            "1",
            "--eval-episodes",
            "0",
            "--batch-size",
            "8",
        )
        weights.append(
            (
                (tmp_path / f"init{i}" / "model.safetensors").read_bytes(),
                (tmp_path / f"out{i}" / "model.safetensors").read_bytes(),
            )
        )
    assert weights[0] == weights[1] and weights[0][0] != weights[0][1]


def test_teachable_model_normalises_the_chosen_pixel_value_to_zero(tmp_path: Path) -> None:
    """image_mean 1.0 (the CoT model's) maps a white frame to 0 and black to -2; the default 0.5 maps white to +1."""
    from make_tiny_vlm import build_teachable_smolvlm

    corpus = [likelihood.FROZENLAKE_STATE_TEMPLATE.format(description="You are on row 1.")] * 5
    frames = [np.full((64, 64, 3), 255, np.uint8), np.zeros((64, 64, 3), np.uint8)]
    for mean, (white, black) in {1.0: (0.0, -2.0), 0.5: (1.0, -1.0)}.items():
        path = build_teachable_smolvlm(str(tmp_path / str(mean)), corpus, 64, 8, mean)
        pixels = AutoProcessor.from_pretrained(path).image_processor(frames, return_tensors="pt")[
            "pixel_values"
        ]  # 1 x 2 frames
        assert torch.allclose(pixels[0, 0], torch.tensor(white)) and torch.allclose(pixels[0, 1], torch.tensor(black))


def test_taught_cot_model_reads_both_numbers_and_compares_six_states_wrongly() -> None:
    """assets/tiny-smolvlm-cot, as assets/README.md describes it: on all 30 NumberLine states it writes the true current
    and target number (they are only in the image), and its thought's "above" / "below" follows the target alone,
    wrong exactly where a target of 1 or 2 is above the current number or one of 3 or 4 below it."""
    import importlib.util

    from cot_models import FALLBACK_MODEL_DIR, load_base_model

    spec = importlib.util.spec_from_file_location("numberline_probe", REPO_ROOT / "docs" / "numberline_probe.py")
    numberline_probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(numberline_probe)
    model, processor = load_base_model(str(FALLBACK_MODEL_DIR), False, torch.device("cpu"))
    rates, table = numberline_probe.probe(model.eval(), processor, temperature=0.2)
    assert rates == {"current number": 1.0, "target number": 1.0, "expert's action": 0.8}
    assert np.isnan(table[np.arange(6), np.arange(6)]).all() and np.nanmin(table) >= 0 and np.nanmax(table) <= 1
    wrong = {(t, c) for t in range(6) for c in range(6) if t != c and table[t, c, 0] < 0.5}
    assert wrong == {(1, 0), (2, 0), (2, 1), (3, 4), (3, 5), (4, 5)}
    # the sampling temperature sharpens both ways: right states near 1, wrong ones near 0
    assert np.nanmax(table[[t for t, _ in wrong], [c for _, c in wrong], 1]) < 0.1


def test_a_fallback_run_is_named_after_the_model_it_teaches(monkeypatch, tmp_path: Path) -> None:
    """With no Hub, the default model falls back to the likelihood script's taught model, and the run's name and
    hyperparameters say so."""
    argv = ["--format", "likelihood", "--env-id", "FrozenLake8x8", "--num-demos", "1", "--num-epochs", "1"]
    g = run_script(monkeypatch, tmp_path, *argv, "--eval-episodes", "0")
    fallback = likelihood_models.FALLBACK_MODEL_DIR
    assert g["args"].model_id == str(fallback) and f"__sft_vlm-{fallback.name}__" in g["run_name"]
