"""docs/plot_runs.py on fake runs: 2 settings x 2 seeds, legend from the hyperparameters, the threshold table."""

import pathlib
import subprocess
import sys

from PIL import Image
from torch.utils.tensorboard import SummaryWriter

ROOT = pathlib.Path(__file__).resolve().parent.parent

# setting (learning rate) -> seed -> the first step whose value is 0.9 or more (None: never)
CROSSINGS = {"0.001": {1: 500, 2: None}, "0.01": {1: 300, 2: 800}}


def write_run(runs: pathlib.Path, learning_rate: str, seed: int, crossing: int | None, **extra: object) -> None:
    # the scripts' folder names: {env_id}__{exp_name}__{seed}__{time}, the time telling the settings apart
    time = len(list(runs.glob("*"))) if runs.is_dir() else 0
    writer = SummaryWriter(str(runs / f"FrozenLake8x8__ppo_cnn_baseline__{seed}__{1000 + time}"))
    hyperparameters = {"exp_name": "ppo_cnn_baseline", "env_id": "FrozenLake8x8", "seed": seed}
    hyperparameters |= {"learning_rate": learning_rate, "num_envs": 4} | extra
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hyperparameters.items())
    )
    for step in range(100, 1100, 100):
        value = 1.0 if crossing is not None and step >= crossing else 0.1 + step / 2000
        writer.add_scalar("charts/success_rate", value, step)
    writer.close()


def test_plot_and_threshold_table(tmp_path):
    runs = tmp_path / "runs"
    for learning_rate, seeds in CROSSINGS.items():
        for seed, crossing in seeds.items():
            write_run(runs, learning_rate, seed, crossing)
    out = tmp_path / "curve.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "plot_runs.py"), str(runs), "--out", str(out), "--window", "1"]
        + ["--threshold", "0.9"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    with Image.open(out) as image:
        assert image.width <= 1000
    rows = [line for line in result.stdout.splitlines() if line.startswith("| learning_rate=")]
    assert sorted(rows) == [
        "| learning_rate=0.001 | 1, 2 | 500, - | 0.80 ± 0.20 |",  # final values 1.0 and 0.1 + 1000 / 2000
        "| learning_rate=0.01 | 1, 2 | 300, 800 | 1.00 ± 0.00 |",
    ]


def test_flags_that_vary_with_the_seed_can_be_ignored(tmp_path):
    """Runs whose env seeds follow their seed are one setting with --ignore env_seeds, one setting per seed without."""
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, "0.001", seed, 500, env_seeds=[200 + 2 * seed, 201 + 2 * seed])
    tables = []
    for ignore in ([], ["--ignore", "env_seeds"]):
        result = subprocess.run(
            [sys.executable, str(ROOT / "docs" / "plot_runs.py"), str(runs), "--out", str(tmp_path / "curve.png")]
            + ["--window", "1", "--threshold", "0.9", *ignore],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        tables.append([line.split(" | ")[1] for line in result.stdout.splitlines() if line.startswith("| ")][2:])
    assert tables == [["1", "2"], ["1, 2"]]  # the seeds column: two settings of one seed, then one of two seeds
