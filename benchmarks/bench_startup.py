"""Seconds until `--help` answers, for each script: this checkout against an earlier commit, side by side.

    python benchmarks/bench_startup.py [--base 97dce8b] [--repeats 5]

Each script of both versions runs `python SCRIPT --help` in turn (alternating, so both see the same machine load),
from a folder holding that version's scripts and companions. A flag error answers just as fast: every script
checks its flags before it loads a model. The ratio is base / now (above 1: now is faster).
"""

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["ppo_cnn_baseline.py", "ppo_lvlm2p_distill.py", "vlm_car_reward.py", "ppo_vlm_likelihood.py"]
SCRIPTS += ["ppo_vlm_cot.py", "sft_vlm.py"]
FILES = [*SCRIPTS, "text_envs.py", "lvlm2p_teachers.py", "car_coders.py", "car_sandbox.py"]


def help_seconds(folder: pathlib.Path, script: str) -> float:
    """Wall seconds of `python SCRIPT --help` run in `folder`."""
    start = time.perf_counter()
    subprocess.run([sys.executable, script, "--help"], cwd=folder, capture_output=True, check=True)
    return time.perf_counter() - start


def checkout(rev: str, folder: pathlib.Path) -> None:
    """The scripts and companions of commit `rev`, written into `folder`."""
    for name in FILES:
        text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=REPO, capture_output=True, text=True, check=True)
        (folder / name).write_text(text.stdout)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="97dce8b", help="the earlier commit to compare with")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each script in each version")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base:
        checkout(args.base, pathlib.Path(base))
        print(f"| script | --help at {args.base} (s) | --help now (s) | ratio |\n| --- | --- | --- | --- |")
        for script in SCRIPTS:
            help_seconds(REPO, script)  # warm the file cache
            before, now = [], []
            for _ in range(args.repeats):
                before.append(help_seconds(pathlib.Path(base), script))
                now.append(help_seconds(REPO, script))
            b, n = statistics.median(before), statistics.median(now)
            print(f"| {script} | {b:.2f} | {n:.2f} | {b / n:.2f}x |", flush=True)
