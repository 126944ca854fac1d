"""ppo_cnn_baseline: GAE with truncation, a smoke run per env family, kill and resume, seeding, bad input."""

import importlib.util
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_cnn_baseline as ppo

SCRIPT = Path(ppo.__file__).resolve()
CLEANRL_TAGS = [
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "charts/learning_rate",
    "charts/success_rate",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
]
TINY = ["--num-envs", "2", "--num-steps", "64"]
# FrozenLake with the state grid: 8 iterations of 128 steps, a checkpoint every 2
RESUMABLE = [
    "--env-id",
    "FrozenLake8x8",
    "--obs",
    "state",
    *TINY,
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


def run_script(cwd: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the script in `cwd` (where it writes runs/) and return the finished process."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_dir(cwd: Path) -> Path:
    """The one run folder the script made under `cwd`."""
    (path,) = (cwd / "runs").iterdir()
    return path


def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the run's event files, as (step, value) pairs."""
    events = EventAccumulator(str(path))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_gae_bootstraps_truncation_by_hand():
    gamma, lam = 0.9, 0.8
    # two envs, same rewards and values; at t=1 env 0 runs out of time (V(final obs) = 0.5), env 1 terminates
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    values = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]])
    dones = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # obs[2] starts a new episode
    final_values = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    next_value, next_done = torch.tensor([[0.6, 0.6]]), torch.tensor([0.0, 0.0])
    advantages, returns = ppo.compute_gae(rewards, values, dones, final_values, next_value, next_done, gamma, lam)

    a3 = 4 + gamma * 0.6 - 0.4  # the rollout ends mid-episode: bootstrap from next_value
    a2 = 3 + gamma * 0.4 - 0.3 + gamma * lam * a3
    a1_truncated = 2 + gamma * 0.5 - 0.2  # bootstrap from V(final obs), not from the next episode's first obs
    a1_terminated = 2 - 0.2
    expected = torch.tensor(
        [
            [1 + gamma * 0.2 - 0.1 + gamma * lam * a1_truncated, 1 + gamma * 0.2 - 0.1 + gamma * lam * a1_terminated],
            [a1_truncated, a1_terminated],
            [a2, a2],
            [a3, a3],
        ]
    )
    assert torch.allclose(advantages, expected)
    assert torch.allclose(returns, expected + values)


@pytest.mark.parametrize("env_id, obs", [("Fetch", "image"), ("NumberLine", "state")])  # FrozenLake: full_run
def test_smoke_run_writes_the_tags(tmp_path, env_id, obs):
    done = run_script(
        tmp_path, "--env-id", env_id, "--obs", obs, *TINY, "--total-timesteps", "256", "--checkpoint-freq", "0"
    )
    assert done.returncode == 0, done.stderr
    assert "iteration 2/2 global_step=256 SPS=" in done.stdout
    logged = scalars(run_dir(tmp_path))
    assert set(CLEANRL_TAGS) <= set(logged)
    assert all(0.0 <= value <= 1.0 for _, value in logged["charts/success_rate"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The run folder of an uninterrupted RESUMABLE run."""
    cwd = tmp_path_factory.mktemp("full")
    done = run_script(cwd, *RESUMABLE)
    assert done.returncode == 0, done.stderr
    assert "eval greedy:" in done.stdout and "eval sampled:" in done.stdout
    return run_dir(cwd)


def test_state_run_writes_tags_and_evaluation(full_run):
    logged = scalars(full_run)
    assert set(CLEANRL_TAGS) <= set(logged)
    assert {"eval/greedy_success_rate", "eval/sampled_episodic_return"} <= set(logged)
    assert logged["charts/SPS"][-1][0] == 1024


def test_same_seed_gives_identical_returns(full_run, tmp_path):
    done = run_script(tmp_path, *RESUMABLE)
    assert done.returncode == 0, done.stderr
    first, second = scalars(full_run), scalars(run_dir(tmp_path))
    assert len(first["charts/episodic_return"]) > 10
    assert first["charts/episodic_return"] == second["charts/episodic_return"]
    assert first["losses/value_loss"] == second["losses/value_loss"]


def test_killed_run_resumes_where_it_stopped(full_run, tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *RESUMABLE], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/checkpoint.pt")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    (checkpoint,) = tmp_path.glob("runs/*/checkpoint.pt")
    stopped_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < stopped_at < 1024

    done = run_script(tmp_path, *RESUMABLE, "--resume", str(checkpoint))
    assert done.returncode == 0, done.stderr
    assert f"global_step={stopped_at}" in done.stdout.splitlines()[0]
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1024
    assert scalars(run_dir(tmp_path))["charts/SPS"][-1][0] == 1024

    (model_path,) = run_dir(tmp_path).glob("*.cleanrl_model")
    agent, args = ppo.load_agent(str(model_path), torch.device("cpu"))
    assert args.env_id == "FrozenLake8x8" and args.obs == "state"
    # envs and RNGs come back from the checkpoint, so the resumed run ends exactly where the full one does
    (full_model,) = full_run.glob("*.cleanrl_model")
    reference, _ = ppo.load_agent(str(full_model), torch.device("cpu"))
    for (name, value), expected in zip(agent.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name


def make_args(**flags) -> ppo.Args:
    """Args as the script has them after parsing, runtime sizes filled in."""
    args = ppo.Args(**flags)
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // args.batch_size
    return args


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"num_envs": 3, "num_steps": 5}, r"= 15 steps per rollout cannot be split into --num-minibatches 4: make"),
        ({"total_timesteps": 100}, r"--total-timesteps 100 is less than one rollout"),
        (
            {"env_id": "FrozenLake8x8", "action_set": "macro"},
            r"macro action set exists for MiniGrid / BabyAI envs only",
        ),
        ({"env_id": "NumberLine", "image_size": 8}, r"--image-size 8 gives .* too small for the CNN"),
        pytest.param(
            {"capture_video": True},
            r"--capture-video needs moviepy, which is not installed: pip install",
            marks=pytest.mark.skipif(importlib.util.find_spec("moviepy") is not None, reason="moviepy installed"),
        ),
    ],
)
def test_bad_flags_are_one_sentence(flags, message):
    with pytest.raises(SystemExit) as error:
        ppo.check_args(make_args(**flags))
    assert isinstance(error.value.code, str) and re.search(message, error.value.code)  # a str code exits with 1


@pytest.mark.parametrize(
    "content, message",
    [
        (
            {"algorithm": "ppo_vlm_likelihood", "args": {}},
            r"is not a ppo_cnn_baseline checkpoint \(it comes from ppo_vlm_likelihood\)",
        ),
        ("not a checkpoint", r"Cannot read the checkpoint --resume .*bad\.pt \(UnpicklingError"),
        (None, r"Cannot read the checkpoint --resume .*bad\.pt \(FileNotFoundError"),
    ],
)
def test_bad_checkpoints_are_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(SystemExit) as error:
        ppo.load_checkpoint(str(path), make_args(), torch.device("cpu"))
    assert isinstance(error.value.code, str) and re.search(message, error.value.code)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "NoSuchEnv"], r"Unknown --env-id 'NoSuchEnv': use one of FrozenLake8x8, .*NumberLine"),
        (
            ["--resume", "{checkpoint}", "--env-id", "NumberLine", "--obs", "state"],
            r"was trained with --env-id FrozenLake8x8, not NumberLine: pass --env-id FrozenLake8x8 to resume it",
        ),
    ],
)
def test_bad_input_exits_non_zero_without_traceback(tmp_path, full_run, flags, message):
    flags = [flag.format(checkpoint=full_run / "checkpoint.pt") for flag in flags]
    done = run_script(tmp_path, *flags, "--total-timesteps", "512")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("."), done.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists()


def test_env_seeds_pick_the_maps_and_the_number_of_envs():
    """--env-seeds builds one env per seed (FrozenLake8x8: that seed's map), whatever --num-envs says."""
    args = ppo.Args(env_id="FrozenLake8x8", obs="state", env_seeds=[7, 11, 13])
    envs = ppo.make_envs(args, run_name="")
    grids = [e.get_wrapper_attr("grid").tolist() for e in envs.envs]
    assert grids == [ppo.text_envs.make_env("FrozenLake8x8", s).get_wrapper_attr("grid").tolist() for s in (7, 11, 13)]
