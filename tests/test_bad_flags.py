"""Every numeric flag out of its range, in every script: one sentence, exit status 1, before any model or run folder.

The model flags name a model that does not exist (--model-id /nonexistent, hf:/nonexistent): a check that came after
the model loads would answer with the missing model instead of the expected sentence."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import SUBPROCESS_ENV, exit_message

REPO_ROOT = Path(__file__).resolve().parents[1]
NO_MODEL = {  # what each script would load first, named so that loading it fails
    "ppo_cnn_baseline.py": [],
    "ppo_lvlm2p_distill.py": ["--teacher", "hf:/nonexistent"],
    "vlm_car_reward.py": ["--coder", "hf:/nonexistent"],
    "ppo_vlm_likelihood.py": ["--model-id", "/nonexistent"],
    "ppo_vlm_cot.py": ["--model-id", "/nonexistent"],
    "sft_vlm.py": ["--model-id", "/nonexistent"],
}
PPO_SCRIPTS = [script for script in NO_MODEL if script != "sft_vlm.py"]
TRACK = "--track needs Weights and Biases, which is not installed: pip install wandb."

# the same flag gets the same sentence in every PPO script
PPO_FLAGS = [
    (["--num-envs", "0"], "--num-envs must be at least 1, not 0."),
    (["--num-envs", "-2"], "--num-envs must be at least 1, not -2."),
    (["--num-steps", "0"], "--num-steps must be at least 1, not 0."),
    (["--update-epochs", "0"], "--update-epochs must be at least 1, not 0."),
    (["--learning-rate", "-1"], "--learning-rate must be at least 0, not -1.0."),
    (["--total-timesteps", "-5"], "--total-timesteps must be at least 0, not -5."),
    (["--total-timesteps", "100"], r"^--total-timesteps 100 is less than one rollout \(--num-envs x --num-steps"),
    (["--eval-episodes", "-3"], "--eval-episodes must be at least 0, not -3."),
    (["--checkpoint-freq", "-1"], "--checkpoint-freq must be at least 0, not -1."),
    (["--seed", "-1"], "--seed must be at least 0, not -1."),
    (["--gamma", "1.5"], "--gamma must lie in [0, 1], not 1.5."),
    (["--gae-lambda", "-0.1"], "--gae-lambda must lie in [0, 1], not -0.1."),
    (["--clip-coef", "0"], "--clip-coef must be > 0, not 0.0."),
    (["--vf-coef", "-1"], "--vf-coef must be at least 0, not -1.0."),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0, not 0.0."),
]
NOT_COT = [  # flags of the four PPO scripts with minibatch counts and a KL stop
    (["--num-minibatches", "0"], "--num-minibatches must be at least 1, not 0."),
    (["--num-minibatches", "-1"], "--num-minibatches must be at least 1, not -1."),
    (["--target-kl", "0"], "--target-kl must be > 0, not 0.0."),
]
SCRIPT_FLAGS = {
    "ppo_cnn_baseline.py": [
        (["--image-size", "0"], "--image-size must be at least 1, not 0."),
        (["--image-size", "-5"], "--image-size must be at least 1, not -5."),
        (["--env-seeds", "3", "-1"], "--env-seeds must be at least 0, not -1."),
    ],
    "ppo_lvlm2p_distill.py": [
        (["--teacher-image-size", "0"], "--teacher-image-size must be at least 1, not 0."),
        (["--teacher-max-new-tokens", "0"], "--teacher-max-new-tokens must be at least 1, not 0."),
        (["--teacher-batch-size", "0"], "--teacher-batch-size must be at least 1, not 0."),
        (["--teacher-retries", "-1"], "--teacher-retries must be at least 0, not -1."),
        (["--teacher-backoff", "-1"], "--teacher-backoff must be at least 0, not -1.0."),
        (["--teacher-cooldown", "-1"], "--teacher-cooldown must be at least 0, not -1.0."),
        (["--teacher-timeout", "0"], "--teacher-timeout must be > 0, not 0.0."),
    ],
    "vlm_car_reward.py": [
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0."),
        (["--coder-retries", "-1"], "--coder-retries must be at least 0, not -1."),
        (["--coder-backoff", "-1"], "--coder-backoff must be at least 0, not -1.0."),
        (["--coder-timeout", "0"], "--coder-timeout must be > 0, not 0.0."),
        (["--tile-size", "2"], "--tile-size must be at least 4, not 2."),
        (["--num-expert", "-1"], "--num-expert must be at least 0, not -1."),
        (["--num-random", "-1"], "--num-random must be at least 0, not -1."),
        (["--max-rounds", "0"], "--max-rounds must be at least 1, not 0."),
        (["--checker-memory-mb", "100"], "--checker-memory-mb must be at least 256, not 100."),
        (["--checker-timeout", "0"], "--checker-timeout must be > 0, not 0.0."),
        (["--subtask-bonus", "-1"], "--subtask-bonus must be at least 0, not -1.0."),
    ],
    "ppo_vlm_likelihood.py": [
        (["--image-size", "0"], "--image-size must be at least 1, not 0."),
        (["--image-size", "-5"], "--image-size must be at least 1, not -5."),
        (["--lora-r", "0"], "--lora-r must be at least 1, not 0."),
        (["--lora-alpha", "0"], "--lora-alpha must be at least 1, not 0."),
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be at least 1, not 0."),
        (["--env-seeds", "3", "-1"], "--env-seeds must be at least 0, not -1."),
        (["--eval-seeds", "-1"], "--eval-seeds must be at least 0, not -1."),
        (
            ["--state-template", "{foo} {description}"],
            "--state-template holds {foo}, which is not a placeholder: use {description} and {actions} "
            "(a literal brace is written {{ or }}).",
        ),
        (
            ["--action-template", "{action} {foo}"],
            "--action-template holds {foo}, which is not a placeholder: use {action} (a literal brace is written "
            "{{ or }}).",
        ),
        (
            ["--state-template", "{description"],
            "--state-template holds an unmatched { or }: write a literal brace as {{ or }}.",
        ),
    ],
    "ppo_vlm_cot.py": [
        (["--minibatch-size", "0"], "--minibatch-size must be at least 1, not 0."),
        (["--lora-r", "0"], "--lora-r must be at least 1, not 0."),
        (["--lora-alpha", "0"], "--lora-alpha must be at least 1, not 0."),
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be at least 1, not 0."),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0."),
        (["--sample-every", "-1"], "--sample-every must be at least 0, not -1."),
        (["--temperature", "0"], "--temperature must be > 0, not 0.0."),
        (["--thought-coef", "1.5"], "--thought-coef must lie in [0, 1], not 1.5."),
    ],
    "sft_vlm.py": [
        (["--seed", "-1"], "--seed must be at least 0, not -1."),
        (["--lora-r", "-1"], "--lora-r must be at least 0, not -1."),
        (["--lora-alpha", "0"], "--lora-alpha must be at least 1, not 0."),
        (["--num-demos", "0"], "--num-demos must be at least 1, not 0."),
        (["--num-epochs", "0"], "--num-epochs must be at least 1, not 0."),
        (["--batch-size", "0"], "--batch-size must be at least 1, not 0."),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0."),
        (["--eval-episodes", "-3"], "--eval-episodes must be at least 0, not -3."),
        (["--eval-freq", "-1"], "--eval-freq must be at least 0, not -1."),
        (["--demo-seed", "-1"], "--demo-seed must be at least 0, not -1."),
        (["--learning-rate", "-1"], "--learning-rate must be at least 0, not -1.0."),
        (["--max-grad-norm", "0"], "--max-grad-norm must be > 0, not 0.0."),
        (["--temperature", "0"], "--temperature must be > 0, not 0.0."),
        (["--expert-noise", "1.5"], "--expert-noise must lie in [0, 1], not 1.5."),
    ],
}
CASES = (
    [(script, *case) for script in PPO_SCRIPTS for case in PPO_FLAGS]
    + [(script, *case) for script in PPO_SCRIPTS if script != "ppo_vlm_cot.py" for case in NOT_COT]
    + [(script, *case) for script, cases in SCRIPT_FLAGS.items() for case in cases]
)
if importlib.util.find_spec("wandb") is None:  # with wandb installed, --track is no mistake
    CASES += [(script, ["--track"], TRACK) for script in NO_MODEL]


def expect(message: str, expected: str) -> None:
    """EXPECTED is the exact message, or a regex where it starts with ^."""
    assert re.search(expected, message) if expected.startswith("^") else message == expected, message


@pytest.mark.parametrize("script, argv, expected", CASES, ids=[f"{c[0][:-3]}:{' '.join(c[1])}" for c in CASES])
def test_bad_flag_is_one_sentence_before_anything_loads(script, argv, expected, monkeypatch, tmp_path):
    """One line in a SystemExit (Python prints it without a traceback and exits with status 1), before the model
    and the run folder."""
    expect(exit_message(str(REPO_ROOT / script), monkeypatch, tmp_path, *NO_MODEL[script], *argv), expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["ppo_cnn_baseline.py", "ppo_vlm_likelihood.py"])
def test_bad_flag_exits_with_status_1_and_no_traceback(script, tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *NO_MODEL[script], "--num-envs", "0"],
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == "--num-envs must be at least 1, not 0."  # after bitsandbytes' notice
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "env_id, num_envs",
    [("Fetch", 2), ("MiniGrid-Fetch-5x5-N2-v0", 2), ("BabyAI-GoToRedBallGrey-v0", 2), ("MiniGrid-LavaGapS7-v0", 4)],
)
def test_full_ids_of_the_two_env_tasks_get_two_envs(env_id, num_envs, monkeypatch, tmp_path):
    """The paper's 2 envs for Fetch and GoToRedBallGrey, named by their short or their full id (the default --num-envs
    shows in the batch size of a refused --num-minibatches)."""
    argv = ["--env-id", env_id, "--num-steps", "1", "--num-minibatches", "5", *NO_MODEL["ppo_vlm_likelihood.py"]]
    message = exit_message(str(REPO_ROOT / "ppo_vlm_likelihood.py"), monkeypatch, tmp_path, *argv)
    assert message == f"--num-minibatches 5 exceeds the batch of {num_envs} samples per process: lower it."
