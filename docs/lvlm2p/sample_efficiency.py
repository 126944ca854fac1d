"""Env steps to a mean return of 0.9 (and of 0.5) for ppo_lvlm2p_distill runs, as a markdown table and a plot.

    python docs/lvlm2p/sample_efficiency.py RUNS_DIR [--out docs/lvlm2p/sample_efficiency.png]

RUNS_DIR holds the runs' TensorBoard folders (`{env_id}__{exp_name}__{seed}__{time}`); runs with the same env and
--exp-name are seeds of one setting. The return at step s is the mean `charts/episodic_return` of the episodes that
ended in the WINDOW env steps up to s (at least MIN_EPISODES of them); a seed's *steps to 0.9* is the first s where it
reaches 0.9 (*steps to 0.5*: 0.5, for settings that do not reach 0.9 within their budget). The plot (drawn with
Pillow, no plotting library needed) shows that trailing return, averaged over the seeds, against env steps: one
panel per env and algorithm, one line per setting.
"""

import argparse
import collections
import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

WINDOW, MIN_EPISODES, TARGETS = 4096, 10, (0.5, 0.9)
COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


def episode_returns(run: pathlib.Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, returns) of a run's episodes and the run's last step."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    episodes = events.Scalars("charts/episodic_return")
    return (
        np.array([e.step for e in episodes]),
        np.array([e.value for e in episodes]),
        events.Scalars("charts/SPS")[-1].step,
    )


def trailing_return(steps: np.ndarray, returns: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The mean return of the episodes that ended in the WINDOW steps up to each grid step (nan with too few)."""
    out = np.full(len(grid), np.nan)
    for i, s in enumerate(grid):
        window = returns[(steps > s - WINDOW) & (steps <= s)]
        if len(window) >= MIN_EPISODES:
            out[i] = window.mean()
    return out


def steps_to_target(steps: np.ndarray, returns: np.ndarray, target: float) -> int | None:
    """The first episode-end step at which the trailing return reaches `target`, or None."""
    for s in steps:
        window = returns[(steps > s - WINDOW) & (steps <= s)]
        if len(window) >= MIN_EPISODES and window.mean() >= target:
            return int(s)
    return None


def draw(panels: dict, path: pathlib.Path) -> None:
    """One panel per (env, algo) with a line per setting: trailing return (mean over seeds) against env steps."""
    width, height, margin = 520, 340, 56
    legend = 14 * max(len(settings) for settings in panels.values())  # the names go under the axes
    font = ImageFont.load_default()
    image = Image.new("RGB", (width * len(panels), height + legend), "white")
    draw = ImageDraw.Draw(image)
    for p, ((env_id, algo), settings) in enumerate(sorted(panels.items())):
        x0, x1, y0, y1 = p * width + margin, (p + 1) * width - 16, height - margin + 8, 28
        max_step = max(grid[-1] for grid, _ in settings.values())

        def to_x(s: float, x0: int = x0, x1: int = x1, max_step: int = max_step) -> float:
            return x0 + (x1 - x0) * s / max_step

        def to_y(r: float, y0: int = y0, y1: int = y1) -> float:
            return y0 - (y0 - y1) * r

        draw.rectangle([x0, y1, x1, y0], outline="black")
        draw.text((x0, 8), f"{env_id}, {algo.upper()} (scripted teacher)", fill="black", font=font)
        for r in (0.0, *TARGETS, 1.0):
            draw.line([x0, to_y(r), x1, to_y(r)], fill=(120, 120, 120) if r in TARGETS else (200, 200, 200))
            draw.text((x0 - 28, to_y(r) - 6), f"{r:.1f}", fill="black", font=font)
        for k in range(6):
            s = max_step * k / 5
            draw.text((to_x(s) - 12, y0 + 6), f"{s / 1000:.0f}k", fill="black", font=font)
        draw.text(((x0 + x1) // 2 - 30, height - 20), "env steps", fill="black", font=font)
        for c, (name, (grid, curve)) in enumerate(sorted(settings.items())):
            color = COLORS[c % len(COLORS)]
            points = [(to_x(s), to_y(r)) for s, r in zip(grid, curve) if not math.isnan(r)]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            draw.text((x0, height - 2 + 14 * c), name, fill=color, font=font)
    image.save(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).with_suffix(".png"))
    args = parser.parse_args()
    seeds = collections.defaultdict(list)
    for run in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        env_id, exp_name, seed, _ = run.name.split("__")
        seeds[env_id, exp_name].append((int(seed), *episode_returns(run)))

    print("| env | setting | seeds | steps | steps to 0.5 (per seed) | steps to 0.9 (per seed) | final return |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    panels: dict = collections.defaultdict(dict)
    for (env_id, exp_name), runs in sorted(seeds.items()):
        last = min(end for *_, end in runs)
        grid = np.arange(WINDOW // 2, last + 1, 512)
        curves = [trailing_return(steps, returns, grid) for _, steps, returns, _ in runs]
        finals = [c[~np.isnan(c)][-1] for c in curves if (~np.isnan(c)).any()]
        reached = [
            ", ".join(
                "-" if r is None else f"{r / 1000:.1f}k"
                for r in (steps_to_target(steps, returns, target) for _, steps, returns, _ in runs)
            )
            for target in TARGETS
        ]
        print(
            f"| {env_id} | {exp_name} | {', '.join(str(s) for s, *_ in runs)} | {last // 1000}k | "
            f"{' | '.join(reached)} | {np.mean(finals):.2f} ± {np.std(finals):.2f} |"
        )
        algo = "a2c" if exp_name.startswith("a2c") else "ppo"
        panels[env_id, algo][exp_name] = (grid, np.nanmean(np.vstack(curves), axis=0))
    draw(panels, args.out)
    print(f"plot written to {args.out}")
