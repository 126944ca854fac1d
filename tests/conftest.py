"""Shared pytest setup: offline Hugging Face mode, importable repo modules and tiny VLM checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "assets"
for _path in (REPO_ROOT, ASSETS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture(scope="session")
def tiny_smolvlm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a freshly built tiny SmolVLM (Idefics3) checkpoint with its processor."""
    from make_tiny_vlm import build_tiny_smolvlm

    return build_tiny_smolvlm(str(tmp_path_factory.mktemp("tiny-smolvlm")))


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a freshly built tiny LLaVA checkpoint with its processor."""
    from make_tiny_vlm import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def tiny_idefics_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a freshly built tiny Idefics (v1, gated cross-attention) checkpoint with its processor."""
    from make_tiny_vlm import build_tiny_idefics

    return build_tiny_idefics(str(tmp_path_factory.mktemp("tiny-idefics")))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread per test module: on 2 shared cores, more threads only wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_ctrl_c_handler():
    """A script run in-process installs its Ctrl-C handler; pytest gets its own back after each test."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)
