"""Ctrl-C: a run stops at a safe point, saves a checkpoint, says so in one line, and goes on from it with --resume."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import REPO_ROOT

SUBPROCESS_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
CNN = ["--env-id", "FrozenLake8x8", "--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2", "--eval-episodes"]
CNN += ["0", "--checkpoint-freq", "0", "--total-timesteps", "1024", "--save-model", "--seed", "3"]


def interrupt_after(argv: list[str], line_start: str, cwd: Path, delay: float = 0.0) -> tuple[int, str, str]:
    """Run a script, press Ctrl-C `delay` seconds after a stdout line starts with `line_start`; its exit status,
    stdout and stderr."""
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=cwd, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(line_start):
            time.sleep(delay)
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    return process.returncode, "".join(seen) + out, err


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *argv], cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ctrl_c_saves_the_iteration_and_resuming_ends_at_the_uninterrupted_weights(tmp_path: Path) -> None:
    """ppo_cnn_baseline (the small-agent scripts share the code): Ctrl-C finishes the iteration, saves its checkpoint
    and exits with status 130 and one line; the resumed run ends with exactly the weights of a run never stopped."""
    script = str(REPO_ROOT / "ppo_cnn_baseline.py")
    status, out, err = interrupt_after([script, *CNN], "iteration 3/16", tmp_path)
    assert status == 130 and "Traceback" not in err, err[-3000:]
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"stopped by Ctrl-C at global_step=(\d+): --resume (runs/\S+/checkpoint\.pt) goes on", last)
    assert match, out
    checkpoint = torch.load(tmp_path / match[2], weights_only=True)
    assert checkpoint["global_step"] == int(match[1]) == checkpoint["iteration"] * 64 and checkpoint["iteration"] >= 3
    assert not list(tmp_path.glob("runs/*/*.cleanrl_model"))  # stopped before the end: no final model

    resumed = run([script, *CNN, "--resume", match[2]], tmp_path)
    assert f"resumed {match[2].split('/')[1]} at iteration {checkpoint['iteration']}" in resumed.stdout
    run([script, *CNN, "--exp-name", "never_stopped"], tmp_path)
    (stopped,) = tmp_path.glob("runs/*__ppo_cnn_baseline__*/ppo_cnn_baseline.cleanrl_model")
    (never_stopped,) = tmp_path.glob("runs/*__never_stopped__*/never_stopped.cleanrl_model")
    a, b = torch.load(stopped, weights_only=True)["model"], torch.load(never_stopped, weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_ctrl_c_in_a_vlm_iteration_saves_the_last_one_and_resumes(tmp_path: Path) -> None:
    """ppo_vlm_likelihood (ppo_vlm_cot shares the code): Ctrl-C stops at the next rollout step or minibatch; the
    checkpoint holds the last completed iteration, and --resume goes on from it."""
    script = str(REPO_ROOT / "ppo_vlm_likelihood.py")
    argv = [script, "--model-id", str(REPO_ROOT / "assets" / "tiny-smolvlm"), "--env-id", "FrozenLake8x8"]
    argv += ["--num-envs", "2", "--num-steps", "8", "--num-minibatches", "2", "--total-timesteps", "64"]
    status, out, err = interrupt_after(argv, "iteration 1/4", tmp_path)
    assert status == 130 and "Traceback" not in err, err[-3000:]
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"stopped by Ctrl-C at global_step=(\d+): --resume (runs/\S+/checkpoint) goes on", last)
    assert match, out
    step = int(match[1])
    assert step in (16, 32), out  # the interrupted iteration's rollout is dropped
    resumed = run([*argv, "--resume", match[2]], tmp_path)
    assert f"at iteration {step // 16}, global_step={step}" in resumed.stdout
    assert re.search(r"^iteration 4/4 global_step=64 ", resumed.stdout, re.M), resumed.stdout
    assert re.search(r"tiny-smolvlm: 100%\|.*\| 64/64 \[", resumed.stderr)  # the bar names the model


def test_ctrl_c_in_sft_keeps_the_model_so_far(tmp_path: Path) -> None:
    """sft_vlm has no checkpoints: Ctrl-C stops after the current step and, with --save-model, saves the model so far
    (a folder that --model-id loads)."""
    argv = [str(REPO_ROOT / "sft_vlm.py"), "--model-id", str(REPO_ROOT / "assets" / "tiny-smolvlm"), "--format"]
    argv += ["likelihood", "--env-id", "FrozenLake8x8", "--num-demos", "4", "--num-epochs", "50", "--eval-episodes"]
    status, out, err = interrupt_after([*argv, "0", "--save-model"], "55 demonstration steps", tmp_path, delay=5.0)
    assert status == 130 and "Traceback" not in err, err[-3000:]
    match = re.fullmatch(
        r"stopped by Ctrl-C after (\d+) of \d+ SFT steps: the model so far is saved to (\S+)", out.split("\n")[-2]
    )
    assert match and 0 < int(match[1]) < 200, out  # stopped mid-run
    assert (tmp_path / match[2] / "config.json").is_file()
