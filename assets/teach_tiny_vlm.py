"""Teach the small offline VLMs of the likelihood and CoT scripts on this CPU, bit for bit from a seed.

    python assets/teach_tiny_vlm.py            # rewrites the three models below
    python assets/teach_tiny_vlm.py tiny-smolvlm-cot                        # one of them

Each model is a SmolVLM (Idefics3) with random weights from make_tiny_vlm.build_teachable_smolvlm, its tokenizer
trained on the prompts of the script it serves, then taught by sft_vlm.py (every weight, --lora-r 0) on noisy
expert demonstrations (--expert-noise 0.2, env seeds from 1000 on; held-out evaluation on seeds 0-99):
  - tiny-smolvlm-likelihood: ppo_vlm_likelihood.py's prompts on FrozenLake8x8, 64-px frames in 8-px patches
    (one patch per lake tile: the map is only in the image, the text describes the agent's surroundings);
  - tiny-smolvlm-gotoredball: the same on BabyAI-GoToRedBallGrey with the paper's macro actions (64-px frames of the
    8x8 room, one patch per cell; the text names the objects the agent sees and where);
  - tiny-smolvlm-cot: ppo_vlm_cot.py's NumberLine prompt and JSON answers, 128-px frames in 16-px patches (the
    numbers are only in the image), white normalised to 0: under SigLIP's mean of 0.5 the digits moved the image
    features by about 1% and the model never learned to read them.
The runs go side by side, one torch thread each (the same thread count gives the same weights). They are
small models taught offline on these envs, not the papers' models: their numbers prove mechanisms only.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent
REPO = ASSETS.parent
sys.path[:0] = [str(REPO), str(ASSETS)]

from make_tiny_vlm import build_teachable_smolvlm  # noqa: E402

import ppo_vlm_likelihood as likelihood  # noqa: E402
import sft_vlm  # noqa: E402

# sft_vlm.py's flags: the likelihood models differ in --env-id only
LIKELIHOOD = "--format likelihood --num-demos 1000 --num-epochs 4 --learning-rate 1e-3 --batch-size 32 --eval-freq 1"
COT = "--format cot --env-id NumberLine --num-demos 1000 --num-epochs 4 --eval-freq 1 --learning-rate 1e-3"
COT += " --batch-size 32 --max-new-tokens 64"  # the JSON answer is about 38 tokens
TEACHING = {  # output folder: (frame pixels, patch pixels, pixel value normalised to 0, sft_vlm.py flags)
    "tiny-smolvlm-likelihood": (64, 8, 0.5, f"--env-id FrozenLake8x8 {LIKELIHOOD}".split()),
    "tiny-smolvlm-gotoredball": (64, 8, 0.5, f"--env-id GoToRedBallGrey {LIKELIHOOD}".split()),
    "tiny-smolvlm-cot": (128, 16, 1.0, COT.split()),
}


def prompt_corpus(flags: list[str]) -> list[str]:
    """The texts the model will read and write: 300 demonstration episodes in the script's own prompt format."""
    args = sft_vlm.Args(
        **{
            k.lstrip("-").replace("-", "_"): v for k, v in zip(flags[::2], flags[1::2]) if k in ("--format", "--env-id")
        },
        num_demos=300,
    )
    action_names = likelihood.env_action_names(args.env_id)
    demos, _ = sft_vlm.collect_demos(args, action_names, np.random.default_rng(0))
    if args.format == "likelihood":
        template = likelihood.state_template(args.env_id)
        prompts = [likelihood.ACTION_TEMPLATE.format(action=name) for name in action_names]
        return [template.format(description=d.text, actions=", ".join(action_names)) for d in demos] + prompts * 50
    return [d.text + " " + d.answer for d in demos]


if __name__ == "__main__":
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[1:] or TEACHING:  # the models to teach, by folder name (default: all)
            image_size, patch_size, image_mean, flags = TEACHING[name]
            init = build_teachable_smolvlm(
                str(Path(tmp) / name), prompt_corpus(flags), image_size, patch_size, image_mean
            )
            command = [
                sys.executable,
                str(REPO / "sft_vlm.py"),
                "--model-id",
                init,
                "--lora-r",
                "0",
                "--output-dir",
                str(ASSETS / name),
                "--exp-name",
                f"teach_{name}",
                *flags,
            ]
            print(" ".join(command[1:]), flush=True)
            runs.append(subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}))
        failed = [run.args for run in runs if run.wait() != 0]
    if failed:
        raise SystemExit(f"teaching failed: {failed}")
