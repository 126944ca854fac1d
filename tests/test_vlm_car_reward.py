"""vlm_car_reward: verification, extract_code, runs with --reward-programs, the coder paths, kill and resume, and
the script's side of the sandbox (tests/test_car_sandbox.py tests the sandbox itself)."""

import fcntl
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from openai_server import OpenAIServer
from script_helpers import SUBPROCESS_ENV, exit_message, run_as_main, scalar_tags
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import car_sandbox
import text_envs
import vlm_car_reward as car
from car_sandbox import load_checker, load_programs, save_programs

SCRIPT = str(Path(car.__file__).resolve())
REFERENCE = Path(car.__file__).resolve().parent / "reference_programs"
DOORKEY8 = "MiniGrid-DoorKey-8x8-v0"
TINY = ["--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2"]
KEY_PROGRAM = (REFERENCE / "DoorKey-8x8" / "subtask_1.py").read_text()


def test_allowed_code_loads_without_its_imports():
    source = load_checker(KEY_PROGRAM)
    assert "import" not in source and "def check(frame)" in source
    assert load_checker(
        "import math\nLIMIT = (1, 2)\ndef helper(x, y=2):\n    return math.sqrt(x) > y\n"
        "def check(frame):\n    return helper(float(frame.mean()))"
    )


def test_a_vector_step_of_frames_fits_in_the_pipe_and_comes_back_right():
    """16 UnlockPickup frames at 8-pixel tiles (about 200 KiB pickled) fit in the pipe to the worker, so `submit`
    need not wait for the worker to read them; the answers to such a batch are each frame's own."""
    env = text_envs.make_env("MiniGrid-UnlockPickup-v0", seed=0, image_size=88, with_image=True)
    frame = env.reset(seed=0)[0]["image"]
    batch = [(frame if i % 2 else 255 - frame)[None] for i in range(16)]
    with car.Sandbox([load_checker("def check(frame):\n    return bool(frame[0, 0, 0] > 127)")]) as sandbox:
        assert fcntl.fcntl(sandbox.process.stdin.fileno(), fcntl.F_GETPIPE_SZ) >= len(pickle.dumps(batch)) > 1 << 16
        sandbox.submit([0] * 16, batch)
        expected = [[0] if frames[0, 0, 0, 0] > 127 else [] for frames in batch]
        assert sandbox.collect() == expected and [] in expected and [0] in expected


def reference_trajectories(env_id: str, tile: int, num_expert: int, num_random: int):
    width, height = car.grid_size(env_id)
    env = text_envs.make_env(env_id, image_size=tile * max(width, height))
    expert = [car.collect_trajectory(env, car.VERIFY_SEED + i, True, "image") for i in range(num_expert)]
    length = car.RANDOM_LENGTH * max(len(frames) - 1 for frames in expert)
    random_play = [
        car.collect_trajectory(env, car.VERIFY_SEED + 100 + i, False, "image", length) for i in range(num_random)
    ]
    return expert, random_play


@pytest.fixture(scope="module")
def doorkey8_trajectories():
    return reference_trajectories(DOORKEY8, 8, 4, 20)


def verify(programs: list[str], trajectories) -> car.Verification:
    with car.Sandbox([load_checker(p) for p in programs]) as sandbox:
        return car.verify(sandbox, ["a", "b", "c"][: len(programs)], *trajectories, sandbox.load_errors)


def test_verification_accepts_the_reference_programs(doorkey8_trajectories):
    subtasks, programs = load_programs(str(REFERENCE / "DoorKey-8x8"), DOORKEY8, "frame", 8)
    assert subtasks == ["pick up the key", "open the door", "reach the goal"]
    result = verify(programs, doorkey8_trajectories)
    assert result.accepted, result.failing
    assert result.expert_completed == [4, 4, 4]
    assert result.random_two_or_more <= 2 and result.random_completed[0] > 0  # random play picks the key up


def test_verification_accepts_the_unlockpickup_reference_programs():
    env_id = "MiniGrid-UnlockPickup-v0"
    _, programs = load_programs(str(REFERENCE / "UnlockPickup"), env_id, "frame", 8)
    result = verify(programs, reference_trajectories(env_id, 8, 4, 10))
    assert result.accepted and result.expert_completed == [4, 4, 4], result.failing


@pytest.mark.parametrize(
    "programs, failing, reason",
    [
        (["def check(frame):\n    return True"] * 3, 0, "already True in the first frame"),
        ([KEY_PROGRAM, "def check(frame):\n    return False", KEY_PROGRAM], 1, "in only 0 of 4 trajectories"),
        (
            [KEY_PROGRAM, KEY_PROGRAM, (REFERENCE / "DoorKey-8x8" / "subtask_3.py").read_text()],
            1,
            "random play completed",
        ),
        ([KEY_PROGRAM, "def check(frame):\n    return 1 / 0 > 0", KEY_PROGRAM], 1, "in only 0 of 4 trajectories"),
    ],
    ids=["always true", "always false", "fires on random play", "raises"],
)
def test_verification_refuses_bad_programs(doorkey8_trajectories, programs, failing, reason):
    result = verify(programs, doorkey8_trajectories)
    assert not result.accepted
    assert failing in result.failing and reason in result.failing[failing], result.failing


@pytest.mark.parametrize(
    "reply, expected",
    [
        (
            "Here it is:\n```python\nimport numpy as np\ndef check(frame):\n    return True\n```\nDone.",
            "import numpy as np\ndef check(frame):\n    return True\n",
        ),
        ("```\ndef check(frame):\n    return False\n```", "def check(frame):\n    return False\n"),
        (
            "```python\nX = 1\n```\nand\n```python\ndef check(frame):\n    return X > 0\n```",
            "def check(frame):\n    return X > 0\n",
        ),
        (
            "Sure. The program:\nimport math\ndef check(frame):\n    return math.pi > 3\nIt checks pi.",
            "import math\ndef check(frame):\n    return math.pi > 3\n",
        ),
        (
            "```python\ndef check(frame):\n    return frame.sum() > 0\n",
            "def check(frame):\n    return frame.sum() > 0\n",
        ),
        ("```python\ndef check(frame):\n    return (frame\n```", None),
        ("I cannot write that program.", None),
        ("```python\ndef helper(frame):\n    return True\n```", None),
    ],
    ids=[
        "fenced",
        "fence without language",
        "two blocks",
        "unfenced with prose",
        "fence cut off",
        "broken",
        "no code",
        "no check",
    ],
)
def test_extract_code(reply, expected):
    assert car.extract_code(reply) == expected


def test_reply_readers_take_bounded_time_on_long_replies():
    # once 30 s: a `def check` that never parses below 250 constants, every pair of start and end lines tried
    unparsable = [f"x{i} = {i}" for i in range(250)] + ["def check(frame):", "    return (frame"] + ["    + 1"] * 248
    # once 26 s: a line-start \s* that ran over every following blank line
    blank = "\n" * 2**15
    start = time.monotonic()
    assert car.extract_code("\n".join(unparsable)) is None and car.parse_subtasks(blank) == []
    assert time.monotonic() - start < 2


def test_parse_subtasks():
    reply = "Sub-tasks:\n1. **Pick up the key**\n2) open the door\n3: go to the goal\nThat is all."
    assert car.parse_subtasks(reply) == ["Pick up the key", "open the door", "go to the goal"]
    assert car.parse_subtasks("no list here") == []


def test_end_to_end_with_reference_programs(tmp_path, monkeypatch, capsys):
    run_as_main(
        SCRIPT,
        monkeypatch,
        tmp_path,
        "--env-id",
        DOORKEY8,
        "--reward-programs",
        str(REFERENCE / "DoorKey-8x8"),
        "--num-expert",
        "2",
        "--num-random",
        "4",
        *TINY,
        "--total-timesteps",
        "128",
    )
    out = capsys.readouterr().out
    assert "expert completed [2, 2, 2] of 2" in out and "iteration 2/2 global_step=128" in out
    (run,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in (run / "reward_programs").iterdir()) == [
        "programs.json",
        "subtask_1.py",
        "subtask_2.py",
        "subtask_3.py",
    ]
    assert {"reward/checker_errors", "reward/bonus_per_step", "losses/value_loss", "charts/SPS"} <= scalar_tags(run)


def test_bonus_per_subtask_once_per_episode_in_the_rewards(tmp_path, monkeypatch):
    """Two always-true programs: each env completes both sub-tasks in the first step of its episode (2 x 0.5 reward)
    and nothing after, as no DoorKey-8x8 episode ends within 128 steps."""
    folder = tmp_path / "programs"
    save_programs(
        folder, DOORKEY8, "frame", 8, ["always", "always again"], ["def check(frame):\n    return True\n"] * 2
    )
    run_as_main(
        SCRIPT,
        monkeypatch,
        tmp_path,
        "--env-id",
        DOORKEY8,
        "--reward-programs",
        str(folder),
        "--num-expert",
        "0",
        "--num-random",
        "0",
        "--subtask-bonus",
        "0.5",
        *TINY,
        "--total-timesteps",
        "128",
    )
    (run,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    # iteration 1: 2 envs x 2 sub-tasks x 0.5 over 2 x 32 steps; iteration 2: no bonus
    assert [e.value for e in events.Scalars("reward/bonus_per_step")] == [2 * 2 * 0.5 / 64, 0.0]


def test_training_goes_on_with_misbehaving_programs(tmp_path, monkeypatch, capsys):
    """A program that raises at every call: each failure counted, the program disabled after 10 in a row (logged),
    the run completes."""
    folder = tmp_path / "programs"
    save_programs(
        folder,
        DOORKEY8,
        "frame",
        8,
        ["raises", "never reached"],
        [
            "def check(frame):\n    return deeper(frame)\ndef deeper(frame):\n    return deeper(frame)\n",
            "def check(frame):\n    return True\n",
        ],
    )
    run_as_main(
        SCRIPT,
        monkeypatch,
        tmp_path,
        "--env-id",
        DOORKEY8,
        "--reward-programs",
        str(folder),
        "--num-expert",
        "0",
        "--num-random",
        "0",
        "--checker-timeout",
        "0.05",
        *TINY,
        "--total-timesteps",
        "128",
    )
    out = capsys.readouterr().out
    assert "iteration 2/2 global_step=128" in out
    assert "checker errors so far: 10, last: sub-task 1's program disabled after 10 failed calls in a row" in out
    (run,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    assert events.Scalars("reward/checker_errors")[-1].value == 10
    assert [e.value for e in events.Scalars("reward/programs_disabled")] == [1, 1]


def test_without_the_os_layer_the_script_stops_unless_the_risk_is_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(car_sandbox, "confinement_problem", lambda: "ImportError: No module named 'pyseccomp'")
    argv = [
        "--env-id",
        DOORKEY8,
        "--reward-programs",
        str(REFERENCE / "DoorKey-8x8"),
        "--num-expert",
        "0",
        "--num-random",
        "0",
        "--total-timesteps",
        "0",
    ]
    message = exit_message(SCRIPT, monkeypatch, tmp_path, *argv)
    assert message.startswith(
        "The reward programs cannot be confined on this machine (ImportError: No module named "
        "'pyseccomp'): on Linux, pip install -r requirements.txt"
    ) and message.endswith(
        "or pass --accept-unconfined-programs to run them behind the load check and the OS limits alone."
    )
    assert not (tmp_path / "runs").exists()
    run_as_main(SCRIPT, monkeypatch, tmp_path, *argv, "--accept-unconfined-programs")
    assert "saved to runs/" in capsys.readouterr().out


def test_tiny_coder_ends_in_one_clear_sentence(tiny_smolvlm_path, tmp_path, monkeypatch, capsys):
    argv = [
        "--env-id",
        "DoorKey",
        "--coder",
        f"hf:{tiny_smolvlm_path}",
        "--max-rounds",
        "1",
        "--num-expert",
        "1",
        "--num-random",
        "1",
        "--max-new-tokens",
        "8",
    ]
    message = exit_message(SCRIPT, monkeypatch, tmp_path, *argv, "--total-timesteps", "0")
    assert message.startswith("The coder listed no sub-tasks (a numbered list) in 1 attempt(s)")
    assert message.endswith(
        "; pass --if-unverified sparse to train on the env's sparse reward alone, or try a stronger "
        "--coder or more --max-rounds."
    )
    assert not (tmp_path / "runs").exists()
    run_as_main(SCRIPT, monkeypatch, tmp_path, *argv, "--if-unverified", "sparse", *TINY, "--total-timesteps", "128")
    captured = capsys.readouterr()
    assert "; training on the env's sparse reward alone (--if-unverified sparse)." in captured.err
    assert "iteration 2/2 global_step=128" in captured.out
    (run,) = (tmp_path / "runs").iterdir()
    assert not (run / "reward_programs").exists() and "reward/checker_errors" not in scalar_tags(run)


def scripted_coder(body: dict) -> str:
    """Stage 1 lists DoorKey's sub-tasks; stage 2 answers the reference programs, except that the first program for
    sub-task 2 fires with sub-task 1 (the key program again) until the failure report comes back."""
    text = body["messages"][0]["content"][-1]["text"]
    if "numbered list" in text:
        return "1. pick up the key\n2. open the door\n3. reach the goal"
    k = int(re.search(r"True exactly when sub-task (\d)", text).group(1))
    if k == 2 and "failed verification" not in text:
        return f"Here you go:\n```python\n{KEY_PROGRAM}```"
    return f"```python\n{(REFERENCE / 'DoorKey-8x8' / f'subtask_{k}.py').read_text()}```"


def test_openai_coder_writes_verifies_and_rewrites(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLM_CAR_TEST_KEY", "sk-secret-test-key")
    with OpenAIServer(scripted_coder, failures=1, failure="status") as server:
        run_as_main(
            SCRIPT,
            monkeypatch,
            tmp_path,
            "--env-id",
            DOORKEY8,
            "--coder",
            "openai:test-vlm",
            "--coder-base-url",
            server.base_url,
            "--coder-api-key-env",
            "VLM_CAR_TEST_KEY",
            "--coder-backoff",
            "0",
            "--num-expert",
            "2",
            "--num-random",
            "10",
            "--total-timesteps",
            "0",
        )
    out = capsys.readouterr().out
    assert "stage 3, round 1" in out and "sub-task 2 (open the door) fails: random play completed" in out
    assert "stage 3, round 2" in out and "saved to runs/" in out
    # 1 failed + 1 stage-1 + 3 programs + 1 rewrite; images go as data URLs; the key only in the header
    assert len(server.requests) == 6 and set(server.auth) == {"Bearer sk-secret-test-key"}
    assert server.requests[1]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "failed verification" in server.requests[-1]["messages"][0]["content"][-1]["text"]
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "reward_programs" / "subtask_2.py").read_text().count("dark_yellow") == 2
    assert not any("sk-secret" in p.read_bytes().decode(errors="ignore") for p in run.rglob("*") if p.is_file())


def test_programs_that_never_pass_end_in_one_sentence(tmp_path, monkeypatch):
    def always_false(body: dict) -> str:
        text = body["messages"][0]["content"][-1]["text"]
        return (
            "1. pick up the key" if "numbered list" in text else "```python\ndef check(frame):\n    return False\n```"
        )

    with OpenAIServer(always_false) as server:
        message = exit_message(
            SCRIPT,
            monkeypatch,
            tmp_path,
            "--env-id",
            DOORKEY8,
            "--coder",
            "openai:test-vlm",
            "--coder-base-url",
            server.base_url,
            "--max-rounds",
            "2",
            "--num-expert",
            "2",
            "--num-random",
            "2",
            "--total-timesteps",
            "0",
        )
    assert message.startswith(
        "The coder's reward programs did not pass verification in 2 round(s) (sub-task 1, "
        "'pick up the key': the expert completed sub-task 1 in only 0 of 2 trajectories"
    )
    assert len(server.requests) == 3  # the sub-tasks, the program, its rewrite
    assert "in only 0 of 2 trajectories" in server.requests[2]["messages"][0]["content"][-1]["text"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--env-id", "NoSuchEnv"], r"^--env-id 'NoSuchEnv' is not a grid env: use one of Fetch, "),
        (["--env-id", "FrozenLake8x8"], r"^--env-id 'FrozenLake8x8' is not a grid env"),
        (["--coder", "gpt-4o"], r"^--coder 'gpt-4o' is not a coder: use hf:"),
        (["--coder", "openai:gpt-4o"], r"^--coder openai:gpt-4o needs --coder-base-url"),
        (
            ["--reward-programs", str(REFERENCE / "DoorKey-8x8")],
            r"was written for --env-id MiniGrid-DoorKey-8x8-v0, not MiniGrid-DoorKey-6x6-v0: pass --env-id",
        ),
        (["--reward-programs", "/nonexistent"], r"^--reward-programs /nonexistent is not a folder of reward programs"),
    ],
)
def test_bad_input_is_one_sentence(argv, expected, tmp_path, monkeypatch):
    message = exit_message(SCRIPT, monkeypatch, tmp_path, *argv, "--num-expert", "1", "--num-random", "1")
    assert re.search(expected, message), message
    assert not (tmp_path / "runs").exists()


def test_state_programs_read_the_symbolic_view():
    """--checker-input state: the agent's own cell of the 7x7x5 view holds what it carries."""
    env = text_envs.make_env("DoorKey", with_image=False)
    expert = [car.collect_trajectory(env, car.VERIFY_SEED + i, True, "state") for i in range(3)]
    random_play = [car.collect_trajectory(env, car.VERIFY_SEED + 10 + i, False, "state", 60) for i in range(5)]
    assert expert[0].shape[1:] == (7, 7, 5)
    carrying_key = "def check(frame):\n    return bool(frame[3, 6, 0] == 5)"
    with car.Sandbox([load_checker(carrying_key)]) as sandbox:
        result = car.verify(sandbox, ["pick up the key"], expert, random_play, sandbox.load_errors)
    assert result.accepted and result.expert_completed == [3], result.failing


def test_subtask_progress_counts_each_subtask_once_in_order():
    """Two sub-tasks on 1x1 "frames": value >= 1, then value >= 2. Both may complete in one frame; an ended episode's
    last frame still counts, then its progress starts again; an env done with every sub-task is not checked."""
    programs = [load_checker(f"def check(frame):\n    return bool(frame[0, 0, 0] >= {k})") for k in (1, 2)]

    def frames(*values: int) -> np.ndarray:
        return np.array(values, dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(3, axis=3)

    with car.Sandbox(programs) as sandbox:
        dense = car.SubtaskProgress(sandbox, num_envs=3)
        dense.submit(frames(2, 1, 0), np.array([False, True, False]))
        new, completed = dense.collect()
        assert new.tolist() == [2, 1, 0] and completed == [1]
        assert dense.progress.tolist() == [2, 0, 0]
        dense.submit(frames(0, 2, 1), np.array([False, False, False]))
        new, completed = dense.collect()
        assert new.tolist() == [0, 2, 1] and completed == []  # env 0 is not asked again
        assert dense.progress.tolist() == [2, 2, 1]
        dense.submit(frames(2, 2, 1), np.array([True, False, False]))
        new, completed = dense.collect()
        assert new.tolist() == [0, 0, 0] and completed == [2]
        assert dense.progress.tolist() == [0, 2, 1]


def test_subtask_progress_does_not_send_a_frame_its_program_found_not_done():
    """Frames that the env's next program found not done among its last RECENT_FRAMES are not sent again (an agent
    turning in place); new frames are."""
    program = load_checker("def check(frame):\n    return bool(frame[0, 0, 0] == 9)")
    sent = []
    with car.Sandbox([program, program]) as sandbox:
        submit = sandbox.submit
        sandbox.submit = lambda starts, sequences: (sent.append(len(sequences)), submit(starts, sequences))
        dense = car.SubtaskProgress(sandbox, num_envs=2)
        for values in [(0, 0), (1, 0), (0, 0), (1, 0), (2, 0), (0, 9), (9, 9)]:
            dense.submit(np.array(values, dtype=np.uint8).reshape(2, 1, 1, 1).repeat(3, axis=3), np.zeros(2, bool))
            dense.collect()
        assert dense.progress.tolist() == [2, 2]
    # both, env 0's new frame, nothing, nothing, env 0's new frame, env 1 (both sub-tasks done), env 0 (both done)
    assert sent == [2, 1, 0, 0, 1, 1, 1]


# DoorKey-8x8 with the reference programs, unverified: 8 iterations of 128 steps, a checkpoint every 2
RESUMABLE = [
    "--env-id",
    DOORKEY8,
    "--reward-programs",
    str(REFERENCE / "DoorKey-8x8"),
    "--num-expert",
    "0",
    "--num-random",
    "0",
    "--num-envs",
    "2",
    "--num-steps",
    "64",
    "--num-minibatches",
    "2",
    "--total-timesteps",
    "1024",
    "--checkpoint-freq",
    "2",
    "--save-model",
    "--eval-episodes",
    "2",
    "--seed",
    "5",
]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The run folder of an uninterrupted RESUMABLE run."""
    cwd = tmp_path_factory.mktemp("full")
    done = subprocess.run(
        [sys.executable, SCRIPT, *RESUMABLE],
        cwd=cwd,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "eval greedy:" in done.stdout and "eval sampled:" in done.stdout
    (run,) = (cwd / "runs").iterdir()
    return run


def test_killed_run_resumes_where_it_stopped(full_run, tmp_path, monkeypatch, capsys):
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *RESUMABLE],
        cwd=tmp_path,
        env=SUBPROCESS_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/checkpoint.pt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    (checkpoint,) = tmp_path.glob("runs/*/checkpoint.pt")
    saved = torch.load(checkpoint, weights_only=True)
    stopped_at = saved["global_step"]
    assert 0 < stopped_at < 1024 and len(saved["programs"]) == 3 and saved["subtask_progress"].shape == (2,)

    # the programs come from the checkpoint: no folder, no coder, no verification; a new worker runs them
    argv = [flag for flag in RESUMABLE if flag not in ("--reward-programs", str(REFERENCE / "DoorKey-8x8"))]
    run_as_main(SCRIPT, monkeypatch, tmp_path, *argv, "--resume", str(checkpoint))
    out = capsys.readouterr().out
    assert f"global_step={stopped_at}" in out.splitlines()[1] and "the checkpoint's programs" in out.splitlines()[0]
    assert "iteration 8/8 global_step=1024" in out and "eval greedy:" in out
    resumed, full = (
        torch.load(checkpoint, weights_only=True),
        torch.load(full_run / "checkpoint.pt", weights_only=True),
    )
    assert resumed["global_step"] == 1024
    # envs, sub-task progress and RNGs come back from the checkpoint: the resumed run ends where the full one does
    assert resumed["subtask_progress"].tolist() == full["subtask_progress"].tolist()
    (run,) = (tmp_path / "runs").iterdir()
    (model_path,) = run.glob("*.cleanrl_model")
    agent, args = car.load_agent(str(model_path), torch.device("cpu"))
    assert args.env_id == DOORKEY8 and args.num_envs == 2
    reference, _ = car.load_agent(str(next(full_run.glob("*.cleanrl_model"))), torch.device("cpu"))
    for (name, value), expected in zip(agent.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name


@pytest.mark.parametrize(
    "content, argv, expected",
    [
        (
            {"algorithm": "ppo_cnn_baseline", "args": {}},
            [],
            r"^--resume .*other\.pt is not a vlm_car_reward checkpoint \(it comes from ppo_cnn_baseline\): "
            r"resume it with",
        ),
        (
            "full run",
            ["--env-id", "DoorKey"],
            (
                r"^--resume .*checkpoint\.pt was trained with --env-id "
                r"MiniGrid-DoorKey-8x8-v0, not DoorKey: pass --env-id MiniGrid-DoorKey-8x8-v0 to resume it\.$"
            ),
        ),
    ],
)
def test_resume_of_another_checkpoint_is_one_sentence(content, argv, expected, full_run, tmp_path, monkeypatch):
    path = full_run / "checkpoint.pt"
    if content != "full run":
        path = tmp_path / "other.pt"
        torch.save(content, path)
    message = exit_message(SCRIPT, monkeypatch, tmp_path, *argv, "--resume", str(path), "--num-envs", "2")
    assert re.search(expected, message), message
    assert not (tmp_path / "runs").exists()


def test_resume_checks_the_checkpoints_programs_again(full_run, tmp_path, monkeypatch):
    saved = torch.load(full_run / "checkpoint.pt", weights_only=True)
    saved["programs"][1] = "import os\ndef check(frame):\n    return os.system('touch pwned') == 0\n"
    torch.save(saved, tmp_path / "tampered.pt")
    message = exit_message(SCRIPT, monkeypatch, tmp_path, *RESUMABLE, "--resume", str(tmp_path / "tampered.pt"))
    assert message.startswith(
        f"--resume {tmp_path / 'tampered.pt'} holds a reward program that is refused (line 1 imports: only"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "pwned").exists()
