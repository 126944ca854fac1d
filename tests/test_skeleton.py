"""One skeleton for the scripts: copies of shared code that may not drift, companions that never import a script,
and each script run from a folder that holds only the files its header says it needs."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import SUBPROCESS_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
PPO_SCRIPTS = [
    "ppo_cnn_baseline.py",
    "ppo_lvlm2p_distill.py",
    "vlm_car_reward.py",
    "ppo_vlm_likelihood.py",
    "ppo_vlm_cot.py",
]
SCRIPTS = [*PPO_SCRIPTS, "sft_vlm.py"]
COMPANIONS = ["likelihood_models.py", "cot_models.py", "lvlm2p_teachers.py", "car_coders.py", "car_sandbox.py"]
VLM_SCRIPTS = ["ppo_vlm_likelihood.py", "ppo_vlm_cot.py"]
VLM_COMPANIONS = ["likelihood_models.py", "cot_models.py"]  # their model loading
# plumbing copied on purpose into several files (each file stands alone): the copies must stay one text
SMALL_AGENT_SCRIPTS = ["ppo_cnn_baseline.py", "ppo_lvlm2p_distill.py", "vlm_car_reward.py"]
COPIES = [  # (function, the files that hold a copy of it)
    ("compute_gae", PPO_SCRIPTS),
    ("layer_init", VLM_SCRIPTS),
    ("Interrupt", SMALL_AGENT_SCRIPTS),  # Ctrl-C: the run stops at the end of the iteration
    ("Interrupt", VLM_SCRIPTS),  # Ctrl-C: the run stops at the next rollout step or minibatch
    ("save_checkpoint", SMALL_AGENT_SCRIPTS),  # one file per checkpoint
    ("rng_states", SMALL_AGENT_SCRIPTS),
    ("set_rng_states", SMALL_AGENT_SCRIPTS),
    ("load_checkpoint", ["ppo_cnn_baseline.py", "vlm_car_reward.py"]),
    ("save_checkpoint", VLM_SCRIPTS),  # one folder per checkpoint: the LoRA adapter and the trainer state
    ("run_state", VLM_SCRIPTS),
    ("load_checkpoint", VLM_SCRIPTS),
    ("resume_folder", VLM_SCRIPTS),
    ("configure_image_processor", VLM_COMPANIONS),
    ("add_lora", VLM_COMPANIONS),
    ("evaluate", VLM_SCRIPTS),
    ("save_episodes", VLM_SCRIPTS),
    ("hub_status", [*VLM_COMPANIONS, "lvlm2p_teachers.py", "car_coders.py"]),
    ("resolve_model_source", [*VLM_COMPANIONS, "lvlm2p_teachers.py", "car_coders.py"]),
    ("png_data_url", ["lvlm2p_teachers.py", "car_coders.py"]),
    ("retry_after_seconds", ["lvlm2p_teachers.py", "car_coders.py"]),
    ("reply_text", ["lvlm2p_teachers.py", "car_coders.py"]),
    ("post_chat", ["lvlm2p_teachers.py", "car_coders.py"]),
]


def top_level_source(path: Path, name: str) -> str:
    """The source text of the top-level function or class `name` in the file at `path`."""
    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(source, node)
    raise AssertionError(f"{path.name} has no top-level function or class {name}")


def needs(script: str) -> list[str]:
    """The files named on the `Needs:` line of a script's header."""
    header = "\n".join((REPO_ROOT / script).read_text().splitlines()[:40])
    match = re.search(r"Needs: ([\w.,/ -]+)", header)
    assert match, f"{script} does not say what it needs (a `Needs: ...` line in its header)"
    return [name.strip() for name in match.group(1).split(",") if name.strip()]


@pytest.mark.parametrize("name, files", COPIES)
def test_copies_are_one_text(name: str, files: list[str]) -> None:
    """Where plumbing is copied into several files, every copy is the same text as the first."""
    first, *others = files
    expected = top_level_source(REPO_ROOT / first, name)
    for other in others:
        assert top_level_source(REPO_ROOT / other, name) == expected, f"{name} in {other} differs from {first}"


@pytest.mark.parametrize("companion", COMPANIONS)
def test_companions_never_import_a_script(companion: str) -> None:
    """A companion is plumbing for its script: it imports no script, not even for type checking."""
    modules = {Path(script).stem for script in SCRIPTS}
    imported = set()
    for node in ast.walk(ast.parse((REPO_ROOT / companion).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & modules, f"{companion} imports {sorted(imported & modules)}"


def test_every_companion_and_script_is_needed_by_name() -> None:
    """The Needs: lines name only files that exist, and every companion is needed by exactly one script."""
    for script in SCRIPTS:
        assert all((REPO_ROOT / name).is_file() for name in needs(script)), script
    for companion in COMPANIONS:
        users = [script for script in PPO_SCRIPTS if companion in needs(script)]
        assert len(users) == 1, f"{companion} is needed by {users}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_help_is_one_line(script: str) -> None:
    """tyro starts a new --help line at every indented continuation of a field docstring: keep each on one line."""
    args = next(
        node
        for node in ast.parse((REPO_ROOT / script).read_text()).body
        if isinstance(node, ast.ClassDef) and node.name == "Args"
    )
    docstrings = [node.value.value for node in args.body if isinstance(node, ast.Expr)]
    assert len(docstrings) == sum(isinstance(node, ast.AnnAssign) for node in args.body)  # every field has one
    assert [text for text in docstrings if "\n" in text] == []


TINY_SMOLVLM = str(REPO_ROOT / "assets" / "tiny-smolvlm")
# fmt: off
SMOKE = {  # one short iteration of each script, offline
    "ppo_cnn_baseline.py": ["--env-id", "FrozenLake8x8", "--total-timesteps", "64", "--num-envs", "1", "--num-steps",
                            "64", "--num-minibatches", "2", "--checkpoint-freq", "0"],
    "ppo_lvlm2p_distill.py": ["--teacher", "expert", "--env-id", "FrozenLake8x8", "--total-timesteps", "32",
                              "--num-envs", "2", "--num-steps", "16", "--num-minibatches", "2", "--checkpoint-freq",
                              "0"],
    "vlm_car_reward.py": ["--env-id", "MiniGrid-DoorKey-8x8-v0", "--reward-programs",
                          str(REPO_ROOT / "reference_programs" / "DoorKey-8x8"), "--num-expert", "1", "--num-random",
                          "1", "--total-timesteps", "64", "--num-envs", "2", "--num-steps", "32", "--num-minibatches",
                          "2", "--checkpoint-freq", "0"],
    "ppo_vlm_likelihood.py": ["--model-id", TINY_SMOLVLM, "--total-timesteps", "8", "--num-envs", "2", "--num-steps",
                              "4", "--num-minibatches", "2", "--lora-r", "8", "--checkpoint-freq", "0"],
    "ppo_vlm_cot.py": ["--model-id", TINY_SMOLVLM, "--env-id", "NumberLine", "--total-timesteps", "8", "--num-envs",
                       "2", "--num-steps", "4", "--max-new-tokens", "8", "--lora-r", "8", "--checkpoint-freq", "0"],
    "sft_vlm.py": ["--model-id", TINY_SMOLVLM, "--format", "likelihood", "--num-demos", "2", "--num-epochs", "1",
                   "--eval-episodes", "1", "--lora-r", "8", "--no-save-model"],
}
# fmt: on
# what a copied script without assets/ says when its default model is neither cached nor on the Hub
NO_ASSETS = {
    "ppo_vlm_likelihood.py": ["--total-timesteps", "0", "--eval-episodes", "1"],
    "ppo_vlm_cot.py": ["--total-timesteps", "0", "--eval-episodes", "1"],
    "ppo_lvlm2p_distill.py": ["--total-timesteps", "32", "--num-envs", "2", "--num-steps", "16"],
}


def copy_with_needs(script: str, folder: Path) -> None:
    """The script and exactly the files its header names, in `folder`."""
    for name in [script, *needs(script)]:
        shutil.copy(REPO_ROOT / name, folder / name)


def run_copy(script: str, folder: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *argv],
        cwd=folder,
        env={**SUBPROCESS_ENV, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_copied_script_runs_with_only_what_it_needs(script: str, tmp_path: Path) -> None:
    """Copied with its Needs: files into an empty folder, the script runs one iteration there."""
    copy_with_needs(script, tmp_path)
    result = run_copy(script, tmp_path, *SMOKE[script])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if script in PPO_SCRIPTS:  # the same progress line in every script; after the last iteration nothing is left
        assert re.search(r"^iteration (\d+)/\1 global_step=\d+ SPS=\d+ ETA=0min ", result.stdout, re.M), result.stdout
    # and a progress bar with its ETA ([elapsed<left, rate]) on stderr
    assert re.search(r"100%\|.*\| (\d+)/\1 \[\d\d:\d\d<\d\d:\d\d, ", result.stderr), result.stderr[-3000:]


@pytest.mark.parametrize("script", sorted(NO_ASSETS))
def test_a_copied_script_without_assets_says_what_to_do(script: str, tmp_path: Path) -> None:
    """Without assets/, the offline fallback is one sentence saying what is missing and what to do."""
    copy_with_needs(script, tmp_path)
    argv = NO_ASSETS[script]
    result = run_copy(script, tmp_path, *argv)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "is missing: copy assets/ next to the script, or name a local model directory." in last
