"""Every command in README.md's code blocks exists as written: its file is there and its flags parse."""

import functools
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import tyro

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The scripts with a tyro dataclass `Args` at module level: their flags are parsed by tyro itself.
TYRO_SCRIPTS = {
    "ppo_vlm_likelihood.py",
    "ppo_vlm_cot.py",
    "sft_vlm.py",
    "ppo_cnn_baseline.py",
    "ppo_lvlm2p_distill.py",
    "vlm_car_reward.py",
}


def code_lines() -> list[str]:
    """The lines of README.md's fenced code blocks, continuation lines joined and comments dropped."""
    lines, inside, pending = [], False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + re.sub(r"(^|\s)#.*$", "", line).strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if line:
            lines.append(line)
    return lines


def python_commands() -> list[list[str]]:
    """Each `python FILE ARGS` command as its argument list (environment assignments in front dropped)."""
    commands = []
    for line in code_lines():
        words = shlex.split(line)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words and words[0] == "python" and len(words) > 1 and words[1] != "-m":
            commands.append(words[1:])
    return commands


@functools.cache
def load_script(name: str):
    """A script imported by path, once: its module, registered under its own name (as `import name` would)."""
    module_name = name.removesuffix(".py")
    if module_name in sys.modules:
        return sys.modules[module_name]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # sft_vlm.py imports the two VLM scripts
    spec = importlib.util.spec_from_file_location(module_name, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@functools.cache
def help_text(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / name), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, f"python {name} --help failed:\n{result.stderr[-2000:]}"
    return result.stdout


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 220, f"README.md has {n} lines; the details belong in docs/."


def test_readme_has_commands():
    names = {words[0] for words in python_commands()}
    assert TYRO_SCRIPTS <= names, f"README.md has no command for {sorted(TYRO_SCRIPTS - names)}"


def test_install_commands_name_existing_files():
    installs = [shlex.split(line) for line in code_lines() if line.startswith("pip install")]
    assert installs, "README.md has no install command"
    pending = [words[i + 1] for words in installs for i, word in enumerate(words) if word == "-r"]
    assert pending, "the install commands name no requirements file"
    seen = set()
    while pending:  # requirements files name further files with -r
        path = ROOT / pending.pop()
        assert path.is_file(), f"README.md installs {path.relative_to(ROOT)}, which does not exist"
        if path in seen:
            continue
        seen.add(path)
        for line in path.read_text().splitlines():
            if line.startswith("-r "):
                pending.append(str((path.parent / line[3:].strip()).relative_to(ROOT)))


@pytest.mark.parametrize("command", python_commands(), ids=" ".join)
def test_command_exists_and_parses(command):
    name, argv = command[0], command[1:]
    assert (ROOT / name).is_file(), f"README.md runs {name}, which does not exist"
    if name in TYRO_SCRIPTS:
        module = load_script(name)
        try:
            tyro.cli(module.Args, args=argv)
        except SystemExit as error:
            pytest.fail(f"`python {' '.join(command)}` does not parse (exit status {error.code})")
    else:
        text = help_text(name)
        for flag in (word.split("=", 1)[0] for word in argv if word.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", text), f"python {name} has no flag {flag}"
