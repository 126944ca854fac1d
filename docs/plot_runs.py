"""Learning curves of any runs/ folder: one line per setting (runs with the same env and --exp-name are its seeds),
the mean over seeds and the band between the lowest and highest seed.

    pip install -r docs/requirements.txt
    python docs/plot_runs.py runs/ --tag charts/success_rate --out curve.png [--title "..."] [--labels a=A b=B]

The value at step s is the mean of the tag's points in the WINDOW env steps up to s (a per-iteration tag such as
charts/success_rate, or per-episode charts/episodic_return), so noisy iterations read as a trend.
"""

import argparse
import collections
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def points(run: pathlib.Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one tag of one run."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return np.array([]), np.array([])
    scalars = events.Scalars(tag)
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def trailing_mean(steps: np.ndarray, values: np.ndarray, grid: np.ndarray, window: int) -> np.ndarray:
    """The mean of the values logged in the `window` steps up to each grid step (nan where there are none)."""
    out = np.full(len(grid), np.nan)
    for i, s in enumerate(grid):
        inside = values[(steps > s - window) & (steps <= s)]
        if len(inside):
            out[i] = inside.mean()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=pathlib.Path, help="a folder of run folders named {env}__{exp}__{seed}__{time}")
    parser.add_argument("--tag", default="charts/success_rate")
    parser.add_argument("--window", type=int, default=4096, help="env steps averaged into each point")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("curve.png"))
    parser.add_argument("--title", default="")
    parser.add_argument("--labels", nargs="*", default=[], help="EXP_NAME=legend text")
    args = parser.parse_args()
    labels = dict(item.split("=", 1) for item in args.labels)

    settings = collections.defaultdict(list)
    for run in sorted(p for p in args.runs.iterdir() if p.is_dir() and p.name.count("__") == 3):
        env_id, exp_name, _, _ = run.name.split("__")
        steps, values = points(run, args.tag)
        if len(steps):
            settings[(env_id, exp_name)].append((steps, values))

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)  # 900 x 504 px
    for (env_id, exp_name), seeds in settings.items():
        grid = np.linspace(args.window, min(s.max() for s, _ in seeds), 60)
        curves = np.array([trailing_mean(s, v, grid, args.window) for s, v in seeds])
        label = f"{labels.get(exp_name, exp_name)} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
        (line,) = ax.plot(grid, np.nanmean(curves, 0), label=label)
        if len(seeds) > 1:
            ax.fill_between(grid, np.nanmin(curves, 0), np.nanmax(curves, 0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel(args.tag)
    ax.set_title(args.title or f"{args.tag}, mean over seeds (band: lowest to highest seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
