"""Env steps to a mean success of 0.9, dense reward programs against the sparse reward, as a markdown table and a plot.

    python docs/vlm_car/steps_to_success.py RUNS_DIR [--out docs/vlm_car/steps_to_success.png]

RUNS_DIR holds the runs' TensorBoard folders (`{env_id}__{exp_name}__{seed}__{time}`): exp_name vlm_car_reward is
the dense reward, ppo_cnn_baseline the sparse one. An episode is a success when its env return (`charts/
episodic_return`, the env's reward without the sub-task bonus) is positive, as on every MiniGrid key / door task. The
success at step s is the share of successes among the episodes that ended in the WINDOW env steps up to s (at least
MIN_EPISODES of them); a seed's *steps to 0.9* is the first episode end where it reaches 0.9 (*steps to 0.5*: 0.5,
for runs that do not get to 0.9). The plot (drawn with
Pillow) shows that trailing success, averaged over the seeds, against env steps: one panel per env.
"""

import argparse
import collections
import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

WINDOW, MIN_EPISODES, TARGETS = 10_000, 10, (0.5, 0.9)
NAMES = {"vlm_car_reward": "dense (reference programs)", "ppo_cnn_baseline": "sparse (env reward)"}
COLORS = {"vlm_car_reward": (214, 39, 40), "ppo_cnn_baseline": (31, 119, 180)}


def episode_successes(run: pathlib.Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, successes) of a run's episodes and the run's last step."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    episodes = events.Scalars("charts/episodic_return")
    return (
        np.array([e.step for e in episodes]),
        np.array([e.value > 0 for e in episodes], dtype=float),
        events.Scalars("charts/SPS")[-1].step,
    )


def trailing_success(steps: np.ndarray, successes: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The success rate of the episodes that ended in the WINDOW steps up to each grid step (nan with too few)."""
    out = np.full(len(grid), np.nan)
    for i, s in enumerate(grid):
        window = successes[(steps > s - WINDOW) & (steps <= s)]
        if len(window) >= MIN_EPISODES:
            out[i] = window.mean()
    return out


def steps_to_target(steps: np.ndarray, successes: np.ndarray, target: float) -> int | None:
    """The first episode-end step at which the trailing success reaches `target`, or None."""
    for s in steps:
        window = successes[(steps > s - WINDOW) & (steps <= s)]
        if len(window) >= MIN_EPISODES and window.mean() >= target:
            return int(s)
    return None


def draw(panels: dict, path: pathlib.Path) -> None:
    """One panel per env with a line per reward: trailing success (mean over seeds) against env steps."""
    width, height, margin = 520, 340, 56
    font = ImageFont.load_default()
    image = Image.new("RGB", (width * len(panels), height + 28), "white")  # the names go under the axes
    draw = ImageDraw.Draw(image)
    for p, (env_id, settings) in enumerate(sorted(panels.items())):
        x0, x1, y0, y1 = p * width + margin, (p + 1) * width - 16, height - margin + 8, 28
        max_step = max(grid[-1] for grid, _ in settings.values())

        def to_x(s: float, x0: int = x0, x1: int = x1, max_step: int = max_step) -> float:
            return x0 + (x1 - x0) * s / max_step

        def to_y(r: float, y0: int = y0, y1: int = y1) -> float:
            return y0 - (y0 - y1) * r

        draw.rectangle([x0, y1, x1, y0], outline="black")
        draw.text((x0, 8), f"{env_id}: success rate, mean over seeds", fill="black", font=font)
        for r in (0.0, *TARGETS, 1.0):
            draw.line([x0, to_y(r), x1, to_y(r)], fill=(120, 120, 120) if r in TARGETS else (200, 200, 200))
            draw.text((x0 - 28, to_y(r) - 6), f"{r:.1f}", fill="black", font=font)
        for k in range(6):
            s = max_step * k / 5
            draw.text((to_x(s) - 12, y0 + 6), f"{s / 1000:.0f}k", fill="black", font=font)
        draw.text(((x0 + x1) // 2 - 30, height - 20), "env steps", fill="black", font=font)
        for c, (exp_name, (grid, curve)) in enumerate(sorted(settings.items(), reverse=True)):
            points = [(to_x(s), to_y(r)) for s, r in zip(grid, curve) if not math.isnan(r)]
            if len(points) > 1:
                draw.line(points, fill=COLORS[exp_name], width=2)
            draw.text((x0, height - 2 + 14 * c), NAMES[exp_name], fill=COLORS[exp_name], font=font)
    image.save(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).with_suffix(".png"))
    args = parser.parse_args()
    seeds = collections.defaultdict(list)
    for run in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        env_id, exp_name, seed, _ = run.name.split("__")
        seeds[env_id, exp_name].append((int(seed), *episode_successes(run)))

    print(
        "| env | reward | seeds | steps | steps to 0.5 (per seed) | steps to 0.9 (per seed) | final success (per seed) "
        "| successful episodes (per seed) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    panels: dict = collections.defaultdict(dict)
    for (env_id, exp_name), runs in sorted(seeds.items()):
        last = min(end for *_, end in runs)
        grid = np.arange(WINDOW // 2, last + 1, 2048)
        curves = [trailing_success(steps, successes, grid) for _, steps, successes, _ in runs]
        finals = [c[~np.isnan(c)][-1] for c in curves if (~np.isnan(c)).any()]
        reached = [
            ", ".join(
                "-" if r is None else f"{r / 1000:.0f}k"
                for r in (steps_to_target(steps, successes, target) for _, steps, successes, _ in runs)
            )
            for target in TARGETS
        ]
        print(
            f"| {env_id} | {NAMES[exp_name]} | {', '.join(str(s) for s, *_ in runs)} | {last // 1000}k | "
            f"{' | '.join(reached)} | {np.mean(finals):.2f} ({', '.join(f'{f:.2f}' for f in finals)}) | "
            f"{', '.join(str(int(successes.sum())) for _, _, successes, _ in runs)} |"
        )
        panels[env_id][exp_name] = (grid, np.nanmean(np.vstack(curves), axis=0))
    draw(panels, args.out)
    print(f"plot written to {args.out}")
