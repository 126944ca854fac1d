"""Helpers the script tests share: run a script in-process, read its one-line error, read its TensorBoard tags."""

import os
import runpy
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_as_main(script: str, monkeypatch: pytest.MonkeyPatch, workdir: Path, *argv: str) -> dict:
    """Run SCRIPT in this process as `python SCRIPT ARGV` from WORKDIR; its globals at the end."""
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    return runpy.run_path(script, run_name="__main__")


def exit_message(script: str, monkeypatch: pytest.MonkeyPatch, workdir: Path, *argv: str) -> str:
    """The message SCRIPT exits with for ARGV: one line in a SystemExit, which Python prints to stderr without a
    traceback before exiting with status 1."""
    with pytest.raises(SystemExit) as exit_info:
        run_as_main(script, monkeypatch, workdir, *argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message and "\n" not in message, message
    return message


def scalar_tags(run_dir: Path) -> set[str]:
    """TensorBoard scalar tags written to a run directory."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])
