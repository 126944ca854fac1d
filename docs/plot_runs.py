"""Learning curves of a runs/ folder: one line per setting, the mean over its seeds and the band from the lowest to
the highest seed, and optionally a table of the step at which each seed first reaches a threshold.

    pip install -r docs/requirements.txt
    python docs/plot_runs.py runs --tag charts/success_rate --out curve.png [--threshold 0.9] [--labels a=A b=B]

A run folder is `{env_id}__{exp_name}__{seed}__{time}` as the scripts write it. Runs whose hyperparameters (the
TensorBoard text `hyperparameters` every script writes) are equal but for the seed are the seeds of one setting; each
setting is labelled by the hyperparameters in which the plotted settings differ (by its exp_name when they differ in
none, or when a run has no hyperparameters text). `--labels EXP_NAME=TEXT` overrides a label.

The value at step s is the mean of the tag's points logged in the WINDOW env steps up to s (a per-iteration tag such
as charts/success_rate, or per-episode charts/episodic_return), so noisy iterations read as a trend. With
`--threshold X`, a seed reaches X at the first logged step where that trailing mean, over at least MIN_POINTS points,
is X or more.
"""

import argparse
import collections
import pathlib
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# Flags that differ between the seeds of one setting, or that do not change the learning curve.
NOT_A_SETTING = {
    "seed",
    "resume",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "capture_video",
    "checkpoint_freq",
    "save_model",
    "eval_episodes",
}
# Fields the scripts compute from other flags: the flags they come from already tell the settings apart.
COMPUTED = {"batch_size", "minibatch_size", "num_iterations"}


def read_run(run: pathlib.Path, tag: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(steps, values) of one tag of one run, and the run's hyperparameters ({} if it logged none)."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    steps, values = np.array([]), np.array([])
    if tag in events.Tags()["scalars"]:
        scalars = events.Scalars(tag)
        steps, values = np.array([s.step for s in scalars]), np.array([s.value for s in scalars])
    hyperparameters = {}
    if "hyperparameters/text_summary" in events.Tags()["tensors"]:
        table = events.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
        for row in table.splitlines()[2:]:  # |param|value| and |-|-| first
            cells = row.strip().strip("|").split("|", 1)
            if len(cells) == 2:
                hyperparameters[cells[0].strip()] = cells[1].strip()
    return steps, values, hyperparameters


def trailing_mean(steps: np.ndarray, values: np.ndarray, grid: np.ndarray, window: int, min_points: int = 1):
    """The mean of the values logged in the `window` steps up to each grid step (nan where there are too few)."""
    out = np.full(len(grid), np.nan)
    for i, s in enumerate(grid):
        inside = values[(steps > s - window) & (steps <= s)]
        if len(inside) >= min_points:
            out[i] = inside.mean()
    return out


def first_step_reaching(steps: np.ndarray, values: np.ndarray, threshold: float, window: int, min_points: int):
    """The first logged step at which the trailing mean reaches `threshold`, or None."""
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    means = trailing_mean(steps, values, steps, window, min_points)
    reached = np.flatnonzero(means >= threshold)
    return int(steps[reached[0]]) if len(reached) else None


def setting_labels(settings: dict, overrides: dict[str, str]) -> dict:
    """A legend label per setting: the hyperparameters in which the settings differ, else env and exp_name."""
    keys = sorted({k for hp in (dict(key[2]) for key in settings) for k in hp})
    differing = [
        k for k in keys if len({dict(key[2]).get(k) for key in settings}) > 1 and k not in COMPUTED | {"exp_name"}
    ]
    several_envs = len({key[0] for key in settings}) > 1
    labels = {}
    for key in settings:
        env_id, exp_name, hyperparameters = key[0], key[1], dict(key[2])
        if exp_name in overrides:
            label = overrides[exp_name]
        elif hyperparameters and differing:
            label = ", ".join(f"{k}={hyperparameters.get(k, '-')}" for k in differing if k != "env_id")
            label = label or exp_name
        else:
            label = exp_name
        if several_envs and "env_id" not in differing:
            label = f"{env_id}: {label}"
        labels[key] = label
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=pathlib.Path, help="a folder of run folders named {env}__{exp}__{seed}__{time}")
    parser.add_argument("--tag", default="charts/success_rate", help="the TensorBoard scalar to plot")
    parser.add_argument("--window", type=int, default=4096, help="env steps averaged into each point")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("curve.png"))
    parser.add_argument("--title", default="")
    parser.add_argument("--ylabel", default="", help="the y axis label (default: the tag)")
    parser.add_argument("--labels", nargs="*", default=[], help="EXP_NAME=legend text")
    parser.add_argument(
        "--threshold", type=float, help="also print each seed's first step at which the curve reaches it"
    )
    parser.add_argument("--min-points", type=int, default=1, help="points a window needs for the threshold table")
    parser.add_argument(
        "--ignore", nargs="*", default=[], help="flags that vary with the seed, such as env_seeds: not a setting"
    )
    args = parser.parse_args()
    if not args.runs.is_dir():
        raise SystemExit(f"{args.runs} is not a folder of runs.")
    overrides = dict(item.split("=", 1) for item in args.labels)

    settings = collections.defaultdict(list)
    for run in sorted(p for p in args.runs.iterdir() if p.is_dir() and p.name.count("__") == 3):
        env_id, exp_name, seed, _ = run.name.split("__")
        steps, values, hyperparameters = read_run(run, args.tag)
        if len(steps):
            ignored = NOT_A_SETTING | set(args.ignore)
            setting = tuple(sorted((k, v) for k, v in hyperparameters.items() if k not in ignored))
            settings[(env_id, exp_name, setting)].append((seed, steps, values))
    if not settings:
        raise SystemExit(f"no run in {args.runs} logged {args.tag}.")
    labels = setting_labels(settings, overrides)

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)  # 960 x 540 px
    for key, seeds in settings.items():
        grid = np.linspace(args.window, max(args.window, min(s.max() for _, s, _ in seeds)), 60)
        # every plotted point averages at least its own stretch of steps and one logging interval
        interval = max(float(np.median(np.diff(np.sort(s)))) if len(s) > 1 else 0.0 for _, s, _ in seeds)
        window = max(args.window, grid[1] - grid[0], interval)
        curves = np.array([trailing_mean(s, v, grid, window) for _, s, v in seeds])
        label = f"{labels[key]} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
        with warnings.catch_warnings():  # a point where no seed has data stays empty
            warnings.simplefilter("ignore", RuntimeWarning)
            (line,) = ax.plot(grid, np.nanmean(curves, 0), label=label)
            if len(seeds) > 1:
                ax.fill_between(grid, np.nanmin(curves, 0), np.nanmax(curves, 0), color=line.get_color(), alpha=0.2)
    if args.threshold is not None:
        ax.axhline(args.threshold, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("env steps")
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x else "0")
    ax.set_ylabel(args.ylabel or args.tag)
    ax.set_title(args.title or f"{args.tag}: mean over seeds, band from the lowest to the highest seed", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")

    if args.threshold is not None:
        print(f"\n| setting | seeds | first step at {args.tag} >= {args.threshold:g} (per seed) | final, mean ± std |")
        print("| --- | --- | --- | --- |")
        for key, seeds in settings.items():
            reached = [first_step_reaching(s, v, args.threshold, args.window, args.min_points) for _, s, v in seeds]
            finals = [v[s > s.max() - args.window].mean() for _, s, v in seeds]  # the last window of each seed
            print(
                f"| {labels[key]} | {', '.join(seed for seed, _, _ in seeds)} | "
                f"{', '.join('-' if r is None else str(r) for r in reached)} | "
                f"{np.mean(finals):.2f} ± {np.std(finals):.2f} |"
            )


if __name__ == "__main__":
    main()
