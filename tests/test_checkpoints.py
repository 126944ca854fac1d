"""Checkpoints are data, never code: a --resume file loads without unpickling objects, envs come back by replaying
their current episode, and a damaged or foreign checkpoint is one sentence."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from script_helpers import exit_message

import text_envs

REPO_ROOT = Path(__file__).resolve().parents[1]
CNN_SCRIPT = str(REPO_ROOT / "ppo_cnn_baseline.py")
CNN_RUN = ["--env-id", "FrozenLake8x8", "--obs", "state", "--num-envs", "2", "--num-steps", "32"]


class Payload:
    """Pickled, it runs `touch PATH` when unpickled with pickle's full powers."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize(
    "env_id", ["FrozenLake8x8", "FrozenLake8x8-v1", "DoorKey", "MiniGrid-LavaGapS5-v0", "NumberLine", "Blackjack"]
)
def test_replaying_an_episode_record_rebuilds_the_env(env_id: str) -> None:
    """After random play across several episodes, a fresh env replaying the record continues exactly alike."""
    rng = np.random.default_rng(0)
    env = text_envs.make_env(env_id, seed=3, image_size=32)
    env.reset()
    for _ in range(150):  # several episodes: later ones start from unseeded resets
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        if terminated or truncated:
            env.reset()
    record = pickle.loads(pickle.dumps(env.get_wrapper_attr("episode_record")))  # plain data survives a copy
    copy = text_envs.make_env(env_id, seed=3, image_size=32)
    text_envs.replay_episode(copy, record)
    for _ in range(60):
        action = int(rng.integers(env.action_space.n))
        (obs, reward, terminated, truncated, _), (obs2, reward2, terminated2, truncated2, _) = (
            env.step(action),
            copy.step(action),
        )
        assert obs["text"] == obs2["text"] and np.array_equal(obs["image"], obs2["image"])
        assert (reward, terminated, truncated) == (reward2, terminated2, truncated2)
        if terminated or truncated:
            assert env.reset()[0]["text"] == copy.reset()[0]["text"]


def test_a_checkpoint_with_pickled_code_is_refused_before_it_runs(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    torch.save({"algorithm": "ppo_cnn_baseline", "payload": Payload(marker)}, tmp_path / "evil.pt")
    message = exit_message(CNN_SCRIPT, monkeypatch, tmp_path, *CNN_RUN, "--resume", str(tmp_path / "evil.pt"))
    assert message.startswith(f"Cannot read the checkpoint --resume {tmp_path / 'evil.pt'} (UnpicklingError: ")
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "damage, missing",
    [
        (lambda c: c.pop("args"), "args"),
        (lambda c: c.pop("run_name"), "run_name"),
        (lambda c: c.update(global_step="1024"), "global_step"),
        (lambda c: c["args"].pop("env_id"), "args.env_id"),
    ],
)
def test_a_checkpoint_with_the_wrong_layout_is_one_sentence(
    cnn_checkpoint_path: Path, tmp_path: Path, monkeypatch, damage, missing
) -> None:
    checkpoint = torch.load(cnn_checkpoint_path, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, tmp_path / "damaged.pt")
    message = exit_message(CNN_SCRIPT, monkeypatch, tmp_path, *CNN_RUN, "--resume", str(tmp_path / "damaged.pt"))
    assert message == (
        f"--resume {tmp_path / 'damaged.pt'} is damaged (missing or malformed: {missing}): resume from another."
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: c["envs"][0].update(actions="left"),
        lambda c: c["envs"].pop(),
        lambda c: c["rng"].update(numpy=[1, 2]),
        lambda c: c["agent"].popitem(),
    ],
)
def test_a_checkpoint_whose_state_cannot_be_restored_is_one_sentence(
    cnn_checkpoint_path: Path, tmp_path: Path, monkeypatch, damage
) -> None:
    checkpoint = torch.load(cnn_checkpoint_path, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, tmp_path / "damaged.pt")
    message = exit_message(CNN_SCRIPT, monkeypatch, tmp_path, *CNN_RUN, "--resume", str(tmp_path / "damaged.pt"))
    assert message.startswith(f"--resume {tmp_path / 'damaged.pt'} is damaged (")
    assert message.endswith(" while restoring it): resume from another.")


@pytest.fixture(scope="module")
def cnn_checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of one short ppo_cnn_baseline run."""
    from script_helpers import run_as_main

    workdir = tmp_path_factory.mktemp("cnn")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_as_main(CNN_SCRIPT, monkeypatch, workdir, *CNN_RUN, "--total-timesteps", "64", "--checkpoint-freq", "1")
    (path,) = workdir.glob("runs/*/checkpoint.pt")
    return path


# --- the VLM scripts: a checkpoint is a folder (LoRA adapter + trainer_state.pt) -------------------------------------
LIKELIHOOD_SCRIPT = str(REPO_ROOT / "ppo_vlm_likelihood.py")
COT_SCRIPT = str(REPO_ROOT / "ppo_vlm_cot.py")


@pytest.fixture(scope="module")
def vlm_run(tiny_smolvlm_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The run folder of two short ppo_vlm_likelihood iterations with a checkpoint after each, and its flags."""
    from script_helpers import run_as_main

    flags = ["--model-id", tiny_smolvlm_path, "--num-envs", "2", "--num-steps", "4", "--num-minibatches", "2"]
    flags += ["--lora-r", "8", "--image-size", "32", "--checkpoint-freq", "1"]
    workdir = tmp_path_factory.mktemp("vlm")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_as_main(LIKELIHOOD_SCRIPT, monkeypatch, workdir, *flags, "--total-timesteps", "16")
    (run_dir,) = (workdir / "runs").iterdir()
    return run_dir, flags


def killed_while_saving(run_dir: Path, tmp_path: Path, leave: str) -> Path:
    """A copy of the run's checkpoint as a run killed between the two renames of a save leaves it: only
    checkpoint.tmp (the new one, complete) and checkpoint.old (the previous one), or only one of them."""
    import shutil

    target = tmp_path / "runs" / run_dir.name
    target.mkdir(parents=True)
    if leave.startswith("tmp"):
        shutil.copytree(run_dir / "checkpoint", target / "checkpoint.tmp")
    if "old" in leave:
        shutil.copytree(run_dir / "checkpoint", target / "checkpoint.old")
        state = torch.load(target / "checkpoint.old" / "trainer_state.pt", weights_only=True)
        torch.save({**state, "iteration": 1, "global_step": 8}, target / "checkpoint.old" / "trainer_state.pt")
    return target / "checkpoint"


@pytest.mark.parametrize("leave, iteration", [("tmp and old", 2), ("old", 1), ("old and a partial tmp", 1)])
def test_a_run_killed_while_saving_resumes_from_the_newest_complete_checkpoint(
    vlm_run, tmp_path: Path, monkeypatch, capsys, leave: str, iteration: int
) -> None:
    from script_helpers import run_as_main

    run_dir, flags = vlm_run
    checkpoint = killed_while_saving(run_dir, tmp_path, leave)
    if "partial" in leave:  # killed while writing the new one: its adapter is there, its trainer_state.pt is not
        (checkpoint.with_name("checkpoint.tmp") / "adapter").mkdir(parents=True)
    run_as_main(
        LIKELIHOOD_SCRIPT, monkeypatch, tmp_path, *flags, "--total-timesteps", "24", "--resume", str(checkpoint)
    )
    assert f"resumed {run_dir.name} at iteration {iteration}," in capsys.readouterr().out
    # the resumed run's own saves leave one complete checkpoint behind
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=True)["iteration"] == 3
    assert not checkpoint.with_name("checkpoint.tmp").exists() and not checkpoint.with_name("checkpoint.old").exists()


def test_a_vlm_checkpoint_with_pickled_code_is_refused_before_it_runs(vlm_run, tmp_path: Path, monkeypatch) -> None:
    import shutil

    run_dir, flags = vlm_run
    shutil.copytree(run_dir / "checkpoint", tmp_path / "evil")
    marker = tmp_path / "pwned"
    torch.save({"algorithm": "ppo_vlm_likelihood", "payload": Payload(marker)}, tmp_path / "evil" / "trainer_state.pt")
    message = exit_message(LIKELIHOOD_SCRIPT, monkeypatch, tmp_path, *flags, "--resume", str(tmp_path / "evil"))
    assert message.startswith(f"Cannot read the checkpoint --resume {tmp_path / 'evil'} (UnpicklingError: ")
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "damage, missing",
    [
        (lambda c, folder: c.pop("value_head"), "value_head"),
        (lambda c, folder: c.pop("run_name"), "run_name"),
        (
            lambda c, folder: (folder / "adapter" / "adapter_model.safetensors").unlink(),
            "adapter/adapter_model.safetensors",
        ),
    ],
)
def test_a_vlm_checkpoint_with_the_wrong_layout_is_one_sentence(
    vlm_run, tmp_path: Path, monkeypatch, damage, missing
) -> None:
    import shutil

    run_dir, flags = vlm_run
    folder = tmp_path / "damaged"
    shutil.copytree(run_dir / "checkpoint", folder)
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    damage(state, folder)
    torch.save(state, folder / "trainer_state.pt")
    message = exit_message(LIKELIHOOD_SCRIPT, monkeypatch, tmp_path, *flags, "--resume", str(folder))
    assert message == f"--resume {folder} is damaged (missing or malformed: {missing}): resume from another."


def test_the_cot_script_refuses_a_likelihood_checkpoint_in_one_sentence(vlm_run, tmp_path: Path, monkeypatch) -> None:
    run_dir, flags = vlm_run
    cot_flags = [*flags[:2], "--num-envs", "2", "--num-steps", "4", "--lora-r", "8"]
    message = exit_message(COT_SCRIPT, monkeypatch, tmp_path, *cot_flags, "--resume", str(run_dir / "checkpoint"))
    assert message == (
        f"--resume {run_dir / 'checkpoint'} is not a ppo_vlm_cot checkpoint (it comes from ppo_vlm_likelihood): "
        "resume it with the script that wrote it."
    )
